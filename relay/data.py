"""DATA in: the message read in pieces, each checked and de-transparent as it arrives.

aiosmtpd reads DATA one line at a time through a 1 KB stream limit, and then (like
any whole-message check) passes over the complete message several times: counting
line ends for bare CR/LF, measuring lines, removing the dot-stuffing. Each such pass
over a 10 MB message is one C call that holds the interpreter lock for milliseconds,
while every other SMTP session on the event loop stands still (bench/large_mail.py).
Here every check is done on each piece as it is read (at most DATA_CHUNK octets), so
no step of a large message keeps the loop longer than a small message does. The
results are exactly those of the whole-message checks (tests/test_relay_smtp.py holds
the pieces to them, cut anywhere).
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

# The session's stream limit: DATA is read in pieces of up to this (and a client's unread
# input is buffered up to twice this before reading pauses). aiosmtpd's 1 KB made a
# large message thousands of pauses; commands stay bounded by their own size limits.
DATA_CHUNK = 64 * 1024
MAX_LINE = 1001  # aiosmtpd's line_length_limit: 998 octets + CRLF (RFC 5321 4.5.3.1.6), with slack
LINE_TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"
TOO_MUCH_DATA = "552 Error: Too much mail data"
_ANY_LINE_END = re.compile(rb"\r\n|\r|\n")


@dataclass
class DataRead:
    """A message as read from DATA: the content (de-transparent), or why it is refused."""

    content: bytes
    problem: str | None = None  # the reply when the message cannot be taken
    bare_newline: bool = False  # a CR or LF not part of a CRLF (SMTP smuggling; refused or normalized)


@dataclass
class DataScan:
    """The whole-message checks of DATA, fed one raw (dot-stuffed) piece at a time.

    After feeding the pieces of a message in order, `long_line` is has_long_line of the
    whole, `bare_newline()` is has_bare_newline of the whole, and the pieces `feed`
    returned, joined, are the whole de-transparent (RFC 5321 4.5.2), however the
    message was cut into pieces.
    """

    limit: int = MAX_LINE
    long_line: bool = False
    line: int = 0  # octets of the line not yet ended by an LF
    before: bytes = b"\r\n"  # the last two octets fed: DATA starts at the start of a line
    crlf: int = 0
    cr: int = 0
    lf: int = 0

    def feed(self, piece: bytes) -> bytes:
        """Check `piece` and return it without the dot-stuffing."""
        if not piece:
            return piece
        self._count_line_ends(piece)
        if not self.long_line:
            self._measure_lines(piece)
        before = self.before
        self.before = (before + piece)[-2:] if len(piece) < 2 else piece[-2:]
        # A leading "." is removed after every CRLF: inside the piece, and where the
        # CRLF before it ends the previous piece or is cut in two by the piece boundary.
        if before == b"\r\n" and piece[:1] == b".":
            piece = piece[1:]
        elif before[-1:] == b"\r" and piece[:2] == b"\n.":
            piece = b"\n" + piece[2:]
        return piece.replace(b"\r\n.", b"\r\n")

    def bare_newline(self) -> bool:
        """Each CRLF holds one CR and one LF: any other is bare. (Counts in C, not a regex.)"""
        return self.cr != self.crlf or self.lf != self.crlf

    def _count_line_ends(self, piece: bytes) -> None:
        self.crlf += piece.count(b"\r\n") + (self.before[-1:] == b"\r" and piece[:1] == b"\n")
        self.cr += piece.count(b"\r")
        self.lf += piece.count(b"\n")

    def _measure_lines(self, piece: bytes) -> None:
        first = piece.find(b"\n")
        if first < 0:
            self.line += len(piece)
            self.long_line = self.line > self.limit
            return
        last = piece.rfind(b"\n")
        self.long_line = self.line + first + 1 > self.limit or has_long_line(piece, self.limit, first + 1, last + 1)
        self.line = len(piece) - last - 1
        self.long_line = self.long_line or self.line > self.limit


async def read_data(reader: asyncio.StreamReader, size_limit: int | None) -> DataRead:
    """Read DATA up to the lone "." line: the de-transparent content, or what was wrong.

    The whole message is always read to its end, as aiosmtpd does (RFC 5321 4.2.5: the
    reply comes after the data), but not kept once it is known to be refused. A
    ".\r\n" counts as the end only at the start of a line: after the CRLF that ended
    the DATA command or the previous line.
    """
    scan = DataScan()
    pieces: list[bytes] = []
    size = 0
    keep = True  # until the message is known to be refused: then only its end is looked for
    while True:
        try:
            piece = await reader.readuntil(b".\r\n")
            found = True
        except asyncio.LimitOverrunError as error:  # no ".\r\n" within the limit: take what is safe
            piece = await reader.readexactly(error.consumed)
            found = False
        end = found and (piece[-5:-3] if len(piece) >= 5 else (scan.before + piece)[-5:-3]) == b"\r\n"
        if end:
            piece = piece[:-3]
        size += len(piece)
        keep = keep and not (size_limit and size > size_limit)
        if keep:
            pieces.append(scan.feed(piece))
            keep = not scan.long_line
        else:
            pieces = []
            scan.before = piece[-2:] if len(piece) >= 2 else (scan.before + piece)[-2:]
        if end:
            break
    if size_limit and size > size_limit:
        return DataRead(b"", TOO_MUCH_DATA)
    if scan.long_line:
        return DataRead(b"", LINE_TOO_LONG)
    return DataRead(b"".join(pieces), bare_newline=scan.bare_newline())


def has_long_line(raw: bytes, limit: int = MAX_LINE, start: int = 0, end: int | None = None) -> bool:
    """Is any line of raw[start:end] longer than `limit` octets with its line end? Without
    splitting the message or copying the slice.

    A line that long holds a whole aligned block of (limit - 1) // 2 octets with no LF,
    so only such blocks (found with bytes.find, in C) are measured.
    """
    end = len(raw) if end is None else end
    block = (limit - 1) // 2
    for at in range(start, end - block + 1, block):
        if raw.find(b"\n", at, at + block) >= 0:
            continue
        line_start = max(raw.rfind(b"\n", start, at) + 1, start)
        line_end = raw.find(b"\n", at, end)
        if (end if line_end < 0 else line_end + 1) - line_start > limit:
            return True
    return False


def has_bare_newline(message: bytes) -> bool:
    """A CR or LF that is not part of a CRLF: three counts in C, not a regex over the message."""
    crlf = message.count(b"\r\n")
    return message.count(b"\r") != crlf or message.count(b"\n") != crlf


async def crlf_line_ends(message: bytes, piece: int = DATA_CHUNK) -> bytes:
    """Every line end (CRLF, or a bare CR or LF) as CRLF, for a message known to have a
    bare one (has_bare_newline, DataScan).

    A regular expression holds the interpreter lock from its start to its end, so it
    runs over one piece at a time, handing the loop back between pieces. A piece
    never ends between the CR and the LF of a CRLF.
    """
    parts: list[bytes] = []
    start = 0
    while start < len(message):
        end = start + piece
        if message[end - 1 : end + 1] == b"\r\n":
            end += 1
        parts.append(_ANY_LINE_END.sub(b"\r\n", message[start:end]))
        start = end
        if start < len(message):
            await asyncio.sleep(0)
    return b"".join(parts)

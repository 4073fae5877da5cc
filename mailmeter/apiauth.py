"""Who may call the admin API: named bearer tokens from `api.tokens_file`.

The file holds one `NAME:TOKEN` per line (blank lines and `#` comments are
skipped). The NAME is what the audit trail records as the actor, so it is kept
to letters, digits and `._-` (no `:`, which marks the built-in actors such as
`cli:alice` and `webhook:payment`). Only SHA-256 digests of the tokens are kept
in memory, and a presented token is compared with every digest in constant
time, so neither its content nor its length shows in the timing.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
MIN_TOKEN_LENGTH = 16


class TokenFileError(ValueError):
    """A tokens file that cannot be used; the message names the line and the fix."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class ApiTokens:
    """The named tokens, as (name, SHA-256 of the token) pairs."""

    digests: tuple[tuple[str, bytes], ...]

    def name_for(self, presented: str) -> str | None:
        """The NAME of the token presented, or None; checks every token, no early exit."""
        candidate = _digest(presented)
        found: str | None = None
        for name, digest in self.digests:
            if hmac.compare_digest(candidate, digest) and found is None:
                found = name
        return found

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.digests]


def parse_tokens(text: str) -> ApiTokens:
    """Read `NAME:TOKEN` lines, or raise TokenFileError naming the line at fault."""
    digests: list[tuple[str, bytes]] = []
    seen_names: set[str] = set()
    seen_tokens: set[bytes] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, colon, token = line.partition(":")
        name, token = name.strip(), token.strip()
        if not colon:
            raise TokenFileError(f"line {number}: write NAME:TOKEN (the name, a colon, then the token)")
        if not NAME_PATTERN.fullmatch(name):
            raise TokenFileError(f"line {number}: token name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
        if len(token) < MIN_TOKEN_LENGTH or any(ch.isspace() for ch in token):
            raise TokenFileError(
                f"line {number}: the token of {name!r} must be at least {MIN_TOKEN_LENGTH} characters"
                " without spaces (generate one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        digest = _digest(token)
        if name in seen_names:
            raise TokenFileError(f"line {number}: the name {name!r} is used twice; give each token its own name")
        if digest in seen_tokens:
            raise TokenFileError(f"line {number}: this token is also given to another name; give each its own token")
        seen_names.add(name)
        seen_tokens.add(digest)
        digests.append((name, digest))
    if not digests:
        raise TokenFileError("no tokens: add a NAME:TOKEN line")
    return ApiTokens(tuple(digests))


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header, or None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()

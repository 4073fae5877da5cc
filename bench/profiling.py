"""Optional py-spy sampling of the mailmeter process during the throughput pass.

BENCH_PROFILE=1 turns it on. The raw (collapsed) stacks are kept in BENCH_OUT
and summarized as text (where the CPU goes, by function), because the report
has to say where the time goes without anyone opening a flame graph.
py-spy is not a dependency: install it into the bench's Python
(`pip install py-spy`) when you want a profile.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]+)(?::(?P<line>\d+))?\)$")


def find_py_spy(python: str) -> str | None:
    beside = Path(python).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def short_frame(frame: str, with_line: bool = False) -> str:
    """'commit (/x/metering/sqlite/ledger.py:231)' -> 'commit (metering/sqlite/ledger.py[:231])'."""
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    parts = Path(match.group("file")).parts
    line = match.group("line") if with_line and match.group("line") else ""
    return f"{match.group('func')} ({'/'.join(parts[-2:])}{':' + line if line else ''})"


def summarize(collapsed: str, top: int = 15) -> list[str]:
    """Self and inclusive sample shares by function, from py-spy's raw output."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        raw_frames = stack.split(";")[1:]  # drop the thread
        if not raw_frames:
            continue
        frames = [short_frame(f) for f in raw_frames]
        total += count
        own[short_frame(raw_frames[-1], with_line=True)] += count
        for frame in set(frames):
            inclusive[frame] += count
    if total == 0:
        return ["profile: no samples"]
    lines = [f"profile: {total} samples of the GIL holder (Python CPU); self time by line:"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines.append("profile: inclusive time, the project's own functions:")
    ours = [(f, n) for f, n in inclusive.most_common() if re.search(r"\((relay|metering|mailmeter|policies)/", f)]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in ours[:top]]
    return lines


class PySpy:
    """py-spy record --nonblocking on one pid, stopped with SIGINT (it then writes its file)."""

    def __init__(self, python: str, pid: int, out_prefix: Path) -> None:
        self.binary = find_py_spy(python)
        self.pid = pid
        self.output = out_prefix.with_suffix(".collapsed")
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.binary is None:
            return
        self.output.parent.mkdir(parents=True, exist_ok=True)
        # --subprocesses: with listen.processes the relay runs in the supervisor's children.
        # --gil: only the thread holding the GIL is sampled, i.e. Python CPU time. The relay's
        # event loop is one thread, so that is where its throughput goes; threads blocked in
        # fsync or SQLite's C code release the GIL and do not show (they show as less CPU).
        argv = [
            self.binary,
            "record",
            "--pid",
            str(self.pid),
            "--rate",
            "250",
            "--nonblocking",
            "--gil",
            "--subprocesses",
            "--threads",
            "--format",
            "raw",
            "--output",
            str(self.output),
        ]
        self._process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop_and_summarize(self) -> list[str]:
        if self.binary is None:
            return ["profile: py-spy not found (pip install py-spy into the bench's Python)"]
        if self._process is None:
            return []
        self._process.send_signal(signal.SIGINT)
        try:
            _, err = self._process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            _, err = self._process.communicate()
        self._process = None
        if not self.output.exists():
            return [f"profile: py-spy wrote nothing: {err.decode(errors='replace').strip()[-300:]}"]
        return [f"profile: {self.output}"] + summarize(self.output.read_text())

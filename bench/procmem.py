"""Peak resident memory of a server made of one or many processes, from /proc.

mailmeter is one process, so its VmHWM at the end is its peak. Postfix is a
master with short-lived children (smtpd exits after max_use connections,
cleanup and smtp come and go), so a reading at the end would miss most of
them: a background sampler sums the VmHWM of every live process of the tree
and keeps the largest sum seen. Shared pages (libc, the Postfix libraries) are
counted once per process, as RSS always does, which overstates a many-process
server; so the largest sum of PSS (shared pages divided among their users) is
kept too, as the fairer total.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field


def vm_hwm_kib(pid: int) -> int:
    """VmHWM (peak RSS) of a live process in KiB; 0 if it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def pss_kib(pid: int) -> int:
    """Proportional set size in KiB: shared pages split between their users; 0 if unreadable."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return comm.read().strip()
    except OSError:
        return "?"


def parent_map() -> dict[int, int]:
    """pid -> ppid of every process now running."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                # The command name may hold spaces and parentheses: split after the last ')'.
                fields = stat.read().rpartition(")")[2].split()
            parents[int(entry)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    return parents


def descendants(roots: Iterable[int]) -> set[int]:
    """The given pids and every process below them."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parent_map().items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    stack = [pid for pid in roots if os.path.exists(f"/proc/{pid}")]
    while stack:
        pid = stack.pop()
        if pid not in found:
            found.add(pid)
            stack.extend(children.get(pid, []))
    return found


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name: [state, ppid, ...]."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()
    except OSError:
        return []


def cpu_seconds(roots: Iterable[int]) -> float:
    """CPU time (user + system) of a process tree so far, including its reaped children.

    Postfix's children exit all the time; their time then moves into the
    master's cutime/cstime, so live processes plus the roots' reaped children
    account for (nearly) all of it.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    root_set = set(roots)
    total = 0
    for pid in descendants(root_set):
        fields = _stat_fields(pid)
        if len(fields) > 14:
            total += int(fields[11]) + int(fields[12])
            if pid in root_set:
                total += int(fields[13]) + int(fields[14])
    return total / ticks


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy (not idle, not waiting for I/O) since boot.

    Sampled around a pass, it shows how much of the machine the pass had: the
    server, the client, the sink, and whatever else runs here (other people's
    tests skew every figure, and this makes that visible).
    """
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle, iowait = fields[3], fields[4]
    return (sum(fields[:8]) - idle - iowait) / os.sysconf("SC_CLK_TCK")


@dataclass
class PeakRss:
    """Largest sum of VmHWM over a process tree, sampled in a background thread."""

    roots: Callable[[], list[int]]
    interval: float = 0.5
    peak_kib: int = 0
    peak_processes: int = 0
    peak_pss_kib: int = 0
    by_name_kib: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> None:
        """One reading: keep the largest total and the largest per process name."""
        pids = descendants(self.roots())
        total = pss = 0
        names: dict[str, int] = {}
        for pid in pids:
            kib = vm_hwm_kib(pid)
            if kib == 0:
                continue  # exited since it was listed (or a kernel thread)
            total += kib
            pss += pss_kib(pid)
            name = process_name(pid)
            names[name] = names.get(name, 0) + kib
        if total > self.peak_kib:
            self.peak_kib, self.peak_processes = total, len(pids)
        self.peak_pss_kib = max(self.peak_pss_kib, pss)
        for name, kib in names.items():
            self.by_name_kib[name] = max(kib, self.by_name_kib.get(name, 0))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> None:
        self.sample()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Take a last reading (a live process's VmHWM only grows) and stop sampling."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    @property
    def peak_mib(self) -> float:
        return self.peak_kib / 1024

    @property
    def peak_pss_mib(self) -> float:
        return self.peak_pss_kib / 1024

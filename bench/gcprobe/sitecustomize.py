"""Garbage-collector pauses of every Python process started with this directory on PYTHONPATH.

    # an absolute path: the services run elsewhere
    PYTHONPATH=$PWD/bench/gcprobe BENCH_TARGETS=mailmeter bash bench/run
    cat /tmp/mailmeter-gcprobe/*.txt

Python imports `sitecustomize` at start-up; this one times each collection through
`gc.callbacks` and rewrites GCPROBE_DIR/<pid>.txt (default /tmp/mailmeter-gcprobe)
after every full collection and at exit: collections per generation, their total and
longest time, and the last pauses over 2 ms in order. It found the 25-52 ms full
collections that `serve` now avoids with gc.freeze() (issue 6). The probe itself costs
a few microseconds per collection; do not compare throughput figures taken with it.
"""

from __future__ import annotations

import atexit
import gc
import os
import time

_DIRECTORY = os.environ.get("GCPROBE_DIR", "/tmp/mailmeter-gcprobe")
_started = 0.0
_totals = {generation: [0, 0.0, 0.0] for generation in range(3)}  # count, seconds, longest
_pauses: list[tuple[int, float]] = []


def _timed(phase: str, info: dict[str, int]) -> None:
    global _started
    if phase == "start":
        _started = time.perf_counter()
        return
    seconds = time.perf_counter() - _started
    totals = _totals[info["generation"]]
    totals[0] += 1
    totals[1] += seconds
    totals[2] = max(totals[2], seconds)
    if seconds > 0.002:
        _pauses.append((info["generation"], round(seconds * 1000, 2)))
    if info["generation"] == 2:
        _write()


def _write() -> None:
    os.makedirs(_DIRECTORY, exist_ok=True)
    lines = [
        f"gen{generation}: {count} collections, total {total * 1000:.1f} ms, longest {longest * 1000:.2f} ms"
        for generation, (count, total, longest) in _totals.items()
    ]
    lines.append(f"pauses over 2 ms (generation, ms), last 50: {_pauses[-50:]}")
    with open(os.path.join(_DIRECTORY, f"{os.getpid()}.txt"), "w") as out:
        out.write("\n".join(lines) + "\n")


gc.callbacks.append(_timed)
atexit.register(_write)

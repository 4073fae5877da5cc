"""The spool's shared directory fsync (relay/spool.py DirectorySync), with real threads."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

import pytest

from mailmeter.relay.spool import DirectorySync, Envelope, Spool


class RecordingFsync:
    """Times each fsync on one sequence shared with the callers (slow enough to overlap)."""

    def __init__(self, seconds: float = 0.005, fail_first: bool = False) -> None:
        self.seconds = seconds
        self.fail_first = fail_first
        self.sequence = itertools.count()
        self.lock = threading.Lock()
        self.fsyncs: list[tuple[int, int]] = []  # (started, ended) on the sequence

    def tick(self) -> int:
        with self.lock:
            return next(self.sequence)

    def __call__(self, path: Path) -> None:
        started = self.tick()
        time.sleep(self.seconds)
        with self.lock:
            if self.fail_first:
                self.fail_first = False
                raise OSError(5, "Input/output error")
            self.fsyncs.append((started, next(self.sequence)))


def test_concurrent_callers_share_fsyncs_and_each_gets_one_started_after_it(tmp_path: Path) -> None:
    fsync = RecordingFsync()
    sync = DirectorySync(tmp_path, fsync)
    calls: list[tuple[int, int]] = []  # (called, returned) on the same sequence
    errors: list[BaseException] = []

    def caller() -> None:
        for _ in range(20):
            called = fsync.tick()
            try:
                sync.sync()
            except BaseException as error:  # pragma: no cover - reported below
                errors.append(error)
            calls.append((called, fsync.tick()))

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(calls) == 160
    for called, returned in calls:  # durable: an fsync that began after the call ended before the return
        assert any(called < started and ended < returned for started, ended in fsync.fsyncs)
    assert len(fsync.fsyncs) < 80  # shared: 8 concurrent callers, far fewer fsyncs than calls


def test_alone_every_call_gets_its_own_fsync(tmp_path: Path) -> None:
    fsync = RecordingFsync(seconds=0)
    sync = DirectorySync(tmp_path, fsync)
    for _ in range(5):
        sync.sync()
    assert len(fsync.fsyncs) == 5


def test_a_failed_fsync_fails_its_caller_and_the_others_get_a_fresh_one(tmp_path: Path) -> None:
    fsync = RecordingFsync(fail_first=True)
    sync = DirectorySync(tmp_path, fsync)
    outcomes: list[str] = []

    def caller() -> None:
        try:
            sync.sync()
            outcomes.append("ok")
        except OSError:
            outcomes.append("error")

    threads = [threading.Thread(target=caller) for _ in range(6)]
    for thread in threads:
        thread.start()
        time.sleep(0.001)
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["error"] + ["ok"] * 5
    with pytest.raises(OSError):  # and the directory's own errors reach the caller
        DirectorySync(tmp_path / "missing").sync()


def test_spool_writes_from_threads_are_all_there(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.open()

    def write(number: int) -> None:
        envelope = Envelope(f"Q{number:04d}", "app", "app@example.com", ["a@dest.test"], 0.0)
        spool.write_incoming(envelope, b"Received: x\r\n", b"Subject: %d\r\n\r\nbody\r\n" % number)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert spool.incoming_ids() == [f"Q{n:04d}" for n in range(40)]
    spool.activate("Q0007")
    envelope, body = spool.read("Q0007")
    assert envelope.queue_id == "Q0007" and body == b"Received: x\r\nSubject: 7\r\n\r\nbody\r\n"

"""Issue 6 item 3: memory of a relay holding many idle SMTP sessions.

Starts `mailmeter serve` on loopback, opens N sessions (banner read, EHLO answered,
then idle), and prints the server's RSS before and with them open.

    .venv/bin/python bench/idle_sessions.py --sessions 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import tempfile
from pathlib import Path

import yaml


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def idle_session(port: int, ready: list[asyncio.StreamWriter]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.readline()
    writer.write(b"EHLO idle.bench\r\n")
    while not (await reader.readline()).startswith(b"250 "):
        pass
    ready.append(writer)


async def main(sessions: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, sessions * 2 + 256)), hard))
    work = Path(tempfile.mkdtemp(prefix="mailmeter-idle-"))
    config = yaml.safe_load(Path("config.example.yaml").read_text())
    config["listen"]["port"] = 0
    config["database"]["path"] = str(work / "meter.db")
    config["spool"]["path"] = str(work / "spool")
    config.setdefault("abuse", {})["max_connections_per_client"] = sessions + 10
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mailmeter.cli",
        "serve",
        "--config",
        str(work / "config.yaml"),
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    while True:
        record = json.loads(await process.stderr.readline())
        if record.get("event") == "relay.started":
            port = int(record["listen"].rsplit(":", 1)[1])
            break
    asyncio.ensure_future(_drain(process.stderr))
    before = rss_mib(process.pid)
    writers: list[asyncio.StreamWriter] = []
    for start in range(0, sessions, 100):
        await asyncio.gather(*(idle_session(port, writers) for _ in range(start, min(start + 100, sessions))))
    await asyncio.sleep(1.0)
    with_sessions = rss_mib(process.pid)
    print(
        f"idle sessions: {len(writers)} open; server RSS {before:.1f} MiB before, {with_sessions:.1f} MiB with them"
        f" ({(with_sessions - before) * 1024 / max(len(writers), 1):.1f} KiB per session); target < 300 MiB"
    )
    for writer in writers:
        writer.close()
    process.terminate()
    await process.wait()


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1000)
    asyncio.run(main(parser.parse_args().sessions))

"""`mailmeter db backup` for the PostgreSQL store: pg_dump of the meter's schema.

pg_dump reads everything in one snapshot, so the copy is consistent while every
node keeps writing (like SQLite's online backup). The database URL may carry
server settings (e.g. `?search_path=meter`) that asyncpg accepts and libpq does
not, so only libpq's own parameters are passed on; the password goes through the
environment, never the command line (where `ps` would show it).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from mailmeter.metering.records import StoreUnavailable

_LIBPQ_PARAMS = {
    "sslmode",
    "sslcert",
    "sslkey",
    "sslrootcert",
    "sslcrl",
    "sslpassword",
    "connect_timeout",
    "application_name",
    "passfile",
    "target_session_attrs",
    "service",
    "krbsrvname",
    "gsslib",
    "options",
    "host",
    "port",
    "user",
    "dbname",
}


def libpq_url(url: str) -> tuple[str, str | None]:
    """The URL without its password and non-libpq parameters, and the password."""
    parts = urlsplit(url)
    password = parts.password
    netloc = parts.netloc.rsplit("@", 1)
    if len(netloc) == 2:
        user = netloc[0].split(":", 1)[0]
        host = f"{user}@{netloc[1]}"
    else:
        host = netloc[0]
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k in _LIBPQ_PARAMS])
    return urlunsplit((parts.scheme, host, parts.path, query, "")), password


async def dump(url: str, schema: str, target: Path) -> None:
    """pg_dump (custom format, restore with pg_restore) of `schema` into `target`."""
    program = shutil.which("pg_dump")
    if program is None:
        raise StoreUnavailable("pg_dump is not installed: install the PostgreSQL client tools to back up")
    dsn, password = libpq_url(url)
    env = dict(os.environ)
    if password is not None:
        env["PGPASSWORD"] = password
    process = await asyncio.create_subprocess_exec(
        program,
        "--format=custom",
        f'--schema="{schema}"',
        f"--file={target}",
        f"--dbname={dsn}",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, errors = await process.communicate()
    if process.returncode != 0:
        target.unlink(missing_ok=True)
        raise StoreUnavailable(f"pg_dump failed ({process.returncode}): {errors.decode(errors='replace').strip()}")

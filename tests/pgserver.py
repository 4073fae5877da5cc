"""The real PostgreSQL server the PostgreSQL store's tests run against, one fresh schema per test.

Each test gets its own schema (random name), reached through `search_path` (as a
server setting, or as `?search_path=` in the URL the relay processes get), and the
schema is dropped afterwards: tests run in parallel and leave nothing behind.

Without a reachable server the tests skip, saying why; with CI=true they fail
instead, so CI proves them (`.ci/run` starts the machine's cluster first).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest

PG_URL = os.environ.get("MAILMETER_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
_unreachable: list[str] = []  # the reason, once a connection attempt failed (not retried per test)


def _absent(reason: str) -> None:
    message = (
        f"PostgreSQL is not reachable at {PG_URL} ({reason}); start it (pg_ctlcluster ... main start)"
        " or point MAILMETER_TEST_PG_URL at a server"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}. CI=true: the PostgreSQL store must be proven, not skipped", pytrace=False)
    pytest.skip(message)


async def admin_connection() -> asyncpg.Connection:
    """A plain connection to the test database, or skip/fail the test when there is none."""
    if not _unreachable:
        try:
            return await asyncpg.connect(PG_URL, timeout=5)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            _unreachable.append(f"{type(error).__name__}: {error}")
    _absent(_unreachable[0])
    raise AssertionError("unreachable: _absent skips or fails")


def schema_url(schema: str) -> str:
    """The test database's URL with the schema as search_path (asyncpg passes it as a server setting)."""
    return f"{PG_URL}{'&' if '?' in PG_URL else '?'}search_path={schema}"


@asynccontextmanager
async def isolated_schema() -> AsyncIterator[str]:
    """A new, empty schema for one test; dropped with everything in it afterwards."""
    admin = await admin_connection()
    schema = f"mm_test_{secrets.token_hex(6)}"
    try:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        yield schema
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()


async def scalar(schema: str, sql: str) -> int:
    """One integer from `sql` run in `schema`, on a connection of its own (what the nodes committed)."""
    admin = await admin_connection()
    try:
        await admin.execute(f'SET search_path = "{schema}"')
        return int(await admin.fetchval(sql))
    finally:
        await admin.close()

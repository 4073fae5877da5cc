"""PostgreSQL transactions for the meter: retry what PostgreSQL asks us to, fail closed on the rest.

A transaction that loses a serialization or deadlock race did nothing, so it is
run again from the start (its policy callbacks are pure, so running them twice is
harmless). Every other database or connection failure, and a retry budget spent,
becomes StoreUnavailable: the relay answers 451 and never sends unbilled mail.
A connection lost mid-transaction is not retried: its COMMIT may have landed.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
import structlog

from mailmeter.metering.records import StoreUnavailable

T = TypeVar("T")

# Conflicts PostgreSQL resolves by aborting one side: safe to run again from the start.
RETRYABLE: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.SerializationError,  # 40001
    asyncpg.exceptions.DeadlockDetectedError,  # 40P01
    asyncpg.exceptions.LockNotAvailableError,  # 55P03
)
# Anything the server, the driver, the pool or the network can raise.
DB_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
    TimeoutError,
)


def unavailable(error: BaseException) -> StoreUnavailable:
    """The error the relay fails closed on, with PostgreSQL's SQLSTATE when there is one."""
    code = getattr(error, "sqlstate", None)
    detail = f"{type(error).__name__}{f' [{code}]' if code else ''}: {error}"
    return StoreUnavailable(f"meter store (PostgreSQL): {detail}")


def rows_affected(status: str) -> int:
    """The row count of a command tag: 'UPDATE 3' -> 3, 'INSERT 0 1' -> 1."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


async def with_retries(
    attempt: Callable[[], Awaitable[T]],
    retries: int,
    on_failure: Callable[[], None] = lambda: None,
    base_delay: float = 0.005,
) -> T:
    """Run `attempt` (one whole transaction); again after a retryable conflict, up to `retries` times.

    `on_failure` runs after every failed attempt (the store undoes what it noted in memory).
    """
    log = structlog.get_logger("mailmeter.store")
    for number in range(retries + 1):
        try:
            return await attempt()
        except RETRYABLE as error:
            on_failure()
            sqlstate = getattr(error, "sqlstate", None)
            if number == retries:
                log.warning("store.retries_exhausted", attempts=number + 1, sqlstate=sqlstate)
                raise unavailable(error) from error
            log.info("store.retry", attempt=number + 1, sqlstate=sqlstate)
            await asyncio.sleep(base_delay * (2**number) * (0.5 + random.random()))
        except DB_ERRORS as error:
            on_failure()
            raise unavailable(error) from error
        except BaseException:
            on_failure()
            raise
    raise AssertionError("unreachable")  # pragma: no cover

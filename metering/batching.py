"""Group commit for a shared database: many callers' writes in one transaction.

Each caller submits its item and waits for its own outcome. One task runs batches:
every item submitted while the previous transaction was in flight goes into the
next one. Nothing waits for a batch to fill, so a lone caller pays one transaction
as before; under load, transactions (and their WAL flushes and lock waits) are
shared. Each caller still learns its outcome only after its transaction committed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

Run = Callable[[list[T]], Awaitable[list[R | Exception]]]


class Batcher(Generic[T, R]):
    """`run` gets a batch and returns one outcome per item: a value, or an exception for that item alone."""

    def __init__(self, run: Run[T, R], max_batch: int = 200) -> None:
        self._run = run
        self.max_batch = max_batch
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._worker: asyncio.Task[None] | None = None
        self.batches = 0  # transactions run; for tests and metrics

    def submit_nowait(self, item: T) -> asyncio.Future[R]:
        """Queue `item`; its future resolves once its batch committed (or failed)."""
        outcome: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, outcome))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work())
        return outcome

    async def submit(self, item: T) -> R:
        # Shielded: a caller that goes away does not cancel the batch it shares with others.
        return await asyncio.shield(self.submit_nowait(item))

    async def _work(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            self.batches += 1
            try:
                outcomes = await self._run([item for item, _ in batch])
            except Exception as error:  # the whole transaction failed: every item in it did
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            except BaseException as error:  # cancelled (shutdown): nothing is left waiting forever
                for _, future in batch + self._pending:
                    if not future.done():
                        future.set_exception(ConnectionError(f"batch interrupted: {error!r}"))
                self._pending = []
                raise
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():
                    continue
                if isinstance(outcome, Exception):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)


__all__ = ["Batcher"]

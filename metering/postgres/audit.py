"""The PostgreSQL store's audit trail: the events of admin changes, each written inside its change's
transaction (PgBase._write, under the target account's lock)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import asyncpg

from mailmeter.metering.postgres.base import AUDIT_DRAFT, PgBase
from mailmeter.metering.records import AuditDraft


class PgAudit(PgBase):
    # -- the audit trail of admin changes ------------------------------------------------

    @asynccontextmanager
    async def audited(self, draft: AuditDraft) -> AsyncIterator[AuditDraft]:
        """Record `draft` inside the next write transaction this task runs (see
        SqliteStore.audited: same contract). The transaction locks the target account
        first, so `before` and `after` bracket exactly this change, even with other
        nodes changing the account at the same moment.
        """
        token = AUDIT_DRAFT.set(draft)
        try:
            yield draft
        finally:
            AUDIT_DRAFT.reset(token)

    async def add_audit_event(
        self,
        at: datetime,
        actor: str,
        action: str,
        target: str,
        before: object,
        after: object,
        detail: dict[str, Any],
    ) -> int:
        """An audit event for a change that is not one account's (a billing run)."""

        async def body(conn: asyncpg.Connection) -> int:
            return int(
                await conn.fetchval(
                    "INSERT INTO audit_events (time, actor, action, target, before, after, detail)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
                    at.isoformat(),
                    actor,
                    action,
                    target,
                    None if before is None else json.dumps(before, sort_keys=True),
                    None if after is None else json.dumps(after, sort_keys=True),
                    json.dumps(detail, sort_keys=True),
                )
            )

        return await self._write(body)

    async def audit_events(self, target: str | None = None, limit: int = 100) -> list[asyncpg.Record]:
        """The newest `limit` events, newest first; only those of `target` when given."""
        if target is None:
            return await self._fetch("SELECT * FROM audit_events ORDER BY id DESC LIMIT $1", limit)
        return await self._fetch(
            "SELECT * FROM audit_events WHERE target = $1 ORDER BY id DESC LIMIT $2", target, limit
        )

    async def audit_event_for(self, event_id: str) -> asyncpg.Record | None:
        return await self._fetchrow("SELECT * FROM audit_events WHERE event_id = $1", event_id)

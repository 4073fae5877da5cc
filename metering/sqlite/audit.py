"""The SQLite store's audit trail: an admin change and its audit event in one transaction."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from datetime import datetime
from typing import Any

import aiosqlite

from mailmeter.metering.records import AuditDraft, DuplicateEvent, account_core
from mailmeter.metering.sqlite.accounts import ACCOUNT_SELECT
from mailmeter.metering.sqlite.connection import SqliteConnection

_AUDIT_DRAFT: ContextVar[AuditDraft | None] = ContextVar("mailmeter_audit_draft", default=None)


class SqliteAudit(SqliteConnection):
    # -- the audit trail of admin changes ----------------------------------------------

    @asynccontextmanager
    async def audited(self, draft: AuditDraft) -> AsyncIterator[AuditDraft]:
        """Record `draft` inside the next write transaction this task runs.

        Admin changes go through the meter, whose methods each run one transaction
        of their own; this puts the audit row into that same transaction (with the
        account's view read just after BEGIN IMMEDIATE and just before COMMIT), so a
        change is never committed without its audit event, nor an event without its
        change. A context variable carries the draft, so the SMTP sessions' transactions
        on the same connection (other tasks) never pick it up. No row is written when
        the target account does not exist (the change did nothing); a draft whose
        `event_id` was already recorded raises DuplicateEvent and rolls the change back.
        """
        token = _AUDIT_DRAFT.set(draft)
        try:
            yield draft
        finally:
            _AUDIT_DRAFT.reset(token)

    async def _audit_begin(self, db: aiosqlite.Connection) -> None:
        draft = _AUDIT_DRAFT.get()
        if draft is not None and not draft.written:
            draft.before = await self._audit_view(db, draft)

    async def _audit_end(self, db: aiosqlite.Connection) -> None:
        draft = _AUDIT_DRAFT.get()
        if draft is None or draft.written:
            return
        after = await self._audit_view(db, draft)
        if after is None:
            return
        try:
            cursor = await db.execute(
                "INSERT INTO audit_events (time, actor, action, target, before, after, detail, event_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    draft.at.isoformat(),
                    draft.actor,
                    draft.action,
                    draft.target,
                    None if draft.before is None else json.dumps(draft.before, sort_keys=True),
                    json.dumps(after, sort_keys=True),
                    json.dumps(draft.detail, sort_keys=True),
                    draft.event_id,
                ),
            )
        except sqlite3.IntegrityError:
            raise DuplicateEvent(f"event {draft.event_id!r} was already applied") from None
        draft.after, draft.written, draft.id = after, True, cursor.lastrowid

    async def _audit_view(self, db: aiosqlite.Connection, draft: AuditDraft) -> dict[str, Any] | None:
        cursor = await db.execute(f"{ACCOUNT_SELECT} WHERE a.name = ?", (draft.target,))
        row = await cursor.fetchone()
        if row is None:
            return None
        domains = await (
            await db.execute("SELECT domain FROM account_domains WHERE account_id = ? ORDER BY domain", (row["id"],))
        ).fetchall()
        networks = await (
            await db.execute("SELECT network FROM account_networks WHERE account_id = ? ORDER BY network", (row["id"],))
        ).fetchall()
        return draft.view(account_core(row, tuple(r[0] for r in domains), tuple(r[0] for r in networks)))

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
        async with self._tx() as db:
            cursor = await db.execute(
                "INSERT INTO audit_events (time, actor, action, target, before, after, detail)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    at.isoformat(),
                    actor,
                    action,
                    target,
                    None if before is None else json.dumps(before, sort_keys=True),
                    None if after is None else json.dumps(after, sort_keys=True),
                    json.dumps(detail, sort_keys=True),
                ),
            )
            return int(cursor.lastrowid or 0)

    async def audit_events(self, target: str | None = None, limit: int = 100) -> list[sqlite3.Row]:
        """The newest `limit` events, newest first; only those of `target` when given."""
        sql = "SELECT * FROM audit_events"
        if target is None:
            return await self._read(sql + " ORDER BY id DESC LIMIT ?", (limit,))
        return await self._read(sql + " WHERE target = ? ORDER BY id DESC LIMIT ?", (target, limit))

    async def audit_event_for(self, event_id: str) -> sqlite3.Row | None:
        rows = await self._read("SELECT * FROM audit_events WHERE event_id = ?", (event_id,))
        return rows[0] if rows else None

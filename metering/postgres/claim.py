"""A node's live claim on its name in the shared PostgreSQL meter.

Holds and leases belong to a node name: a starting node releases every hold its name
left behind. A second process that starts under a running node's name would release
that node's live holds (its open transactions then fail) and double its leases. So a
node first takes a session-level advisory lock keyed on the schema and its name, on a
connection of its own that it keeps for its lifetime. PostgreSQL drops the lock with
the connection, so the claim is exactly as live as the node: a node that dies (kill -9,
a lost host) frees its name at once, with no heartbeat or timeout to wait out.

The connection carries `application_name` = the claimant (pid, host), so a refused
node can say which process holds the name. If the claim's connection is lost (a
database restart), `NodeClaim.keep` takes it again; if another process took the name
meanwhile, `on_lost` is called: the node must stop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import asyncpg
import structlog

from mailmeter.metering.postgres.tx import DB_ERRORS, unavailable
from mailmeter.metering.records import NodeClaimed

# 64 bits from the schema and the node name: nodes of two deployments in two schemas
# of one database do not collide. (The schema lock of postgres/schema.py hashes another prefix.)
_KEY = "hashtextextended('mailmeter.node:' || COALESCE(current_schema(), '') || ':' || $1, 0)"
_HOLDER = (
    "SELECT a.application_name, host(a.client_addr) AS address, a.pid FROM pg_locks l"
    " JOIN pg_stat_activity a ON a.pid = l.pid"
    f" CROSS JOIN (SELECT {_KEY} AS k) key"
    " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND l.classid::bigint = ((key.k >> 32) & 4294967295) AND l.objid::bigint = (key.k & 4294967295)"
    " AND a.pid <> pg_backend_pid()"
)
KEEP_EVERY = 5.0  # seconds between checks that the claim's connection is alive


class NodeClaim:
    """The advisory lock on one node name, on a dedicated connection."""

    def __init__(
        self, url: str, server_settings: Mapping[str, str], node: str, owner: str, connect_timeout: float = 5.0
    ) -> None:
        self.url = url
        self.server_settings = dict(server_settings)
        self.node = node
        self.owner = owner
        self.connect_timeout = connect_timeout
        self._conn: asyncpg.Connection | None = None

    async def take(self) -> None:
        """Claim the name, or raise NodeClaimed (another process has it) or StoreUnavailable."""
        settings = {**self.server_settings, "application_name": self.owner[:63]}
        try:
            conn = await asyncpg.connect(self.url, timeout=self.connect_timeout, server_settings=settings)
        except DB_ERRORS as error:
            raise unavailable(error) from error
        try:
            if await conn.fetchval(f"SELECT pg_try_advisory_lock({_KEY})", self.node):
                self._conn = conn
                return
            row = await conn.fetchrow(_HOLDER, self.node)
        except DB_ERRORS as error:
            await conn.close()
            raise unavailable(error) from error
        await conn.close()
        if row is None:  # it was let go between the two queries, or we may not see other sessions
            holder = "another process (its database session is not visible to this user)"
        else:
            holder = f"{row['application_name'] or 'a process'} (database session {row['pid']}"
            holder += f" from {row['address']})" if row["address"] else ")"
        raise NodeClaimed(self.node, holder)

    async def keep(self, on_lost: Callable[[str], None], every: float = KEEP_EVERY) -> None:
        """Run for the node's lifetime: if the claim's connection died, claim the name again."""
        log = structlog.get_logger("mailmeter.meter")
        while True:
            await asyncio.sleep(every)
            conn = self._conn
            try:
                if conn is not None and not conn.is_closed():
                    await conn.fetchval("SELECT 1")
                    continue
            except DB_ERRORS:
                pass
            self._conn = None
            if conn is not None:
                conn.terminate()
            try:
                await self.take()
            except NodeClaimed as claimed:
                log.error("meter.node_claim_lost", node=self.node, holder=claimed.holder, result="stopping")
                on_lost(
                    f"node.name {self.node!r} was claimed by {claimed.holder} while this node's"
                    " database connection was down"
                )
                return
            except Exception as error:  # the database is still away: try again later
                log.warning("meter.node_claim", node=self.node, result="retrying", error=repr(error))
                continue
            log.info("meter.node_claim", node=self.node, result="claimed again")

    async def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close(timeout=2)
            except Exception:
                conn.terminate()

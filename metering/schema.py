"""Versioned schema for the meter's store. Each migration runs once, in order."""

from __future__ import annotations

MIGRATIONS: list[str] = [
    # 1: accounts, usage counters, holds (reservations), committed messages, results
    """
    CREATE TABLE accounts (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        password_hash TEXT,
        plan TEXT NOT NULL,
        subscribed_on TEXT NOT NULL,
        payment_ok INTEGER NOT NULL DEFAULT 1,
        suspended INTEGER NOT NULL DEFAULT 0,
        prepaid_balance INTEGER NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL
    );
    CREATE TABLE account_domains (
        account_id INTEGER NOT NULL REFERENCES accounts(id),
        domain TEXT NOT NULL,
        PRIMARY KEY (account_id, domain)
    );
    CREATE TABLE account_networks (
        account_id INTEGER NOT NULL REFERENCES accounts(id),
        network TEXT NOT NULL,
        PRIMARY KEY (account_id, network)
    );
    CREATE TABLE period_usage (
        account_id INTEGER NOT NULL REFERENCES accounts(id),
        period_key TEXT NOT NULL,
        accepted INTEGER NOT NULL DEFAULT 0,
        reserved INTEGER NOT NULL DEFAULT 0,
        delivered INTEGER NOT NULL DEFAULT 0,
        soft_bounced INTEGER NOT NULL DEFAULT 0,
        hard_bounced INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (account_id, period_key)
    );
    CREATE TABLE holds (
        id TEXT PRIMARY KEY,
        account_id INTEGER NOT NULL REFERENCES accounts(id),
        period_key TEXT NOT NULL,
        emails INTEGER NOT NULL,
        node TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE INDEX holds_by_node ON holds (node);
    CREATE TABLE messages (
        queue_id TEXT PRIMARY KEY,
        account_id INTEGER NOT NULL REFERENCES accounts(id),
        period_key TEXT NOT NULL,
        recipients INTEGER NOT NULL,
        node TEXT NOT NULL,
        accepted_at TEXT NOT NULL
    );
    CREATE TABLE recipient_results (
        queue_id TEXT NOT NULL REFERENCES messages(queue_id),
        recipient TEXT NOT NULL,
        result TEXT NOT NULL,
        period_key TEXT,
        detail TEXT NOT NULL DEFAULT '',
        updated_at TEXT NOT NULL,
        PRIMARY KEY (queue_id, recipient)
    );
    CREATE INDEX results_deferred ON recipient_results (result) WHERE result = 'deferred';
    """,
]

"""Versioned schema of the SQLite store: each migration runs once, in order (postgres/schema.py mirrors it)."""

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
    # 2: billing: contacts, limit changes, ledger of charges, invoices, notices, breakdowns
    """
    ALTER TABLE accounts ADD COLUMN contacts TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE accounts ADD COLUMN payment_detail TEXT NOT NULL DEFAULT '';
    ALTER TABLE accounts ADD COLUMN awaiting_results INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE accounts ADD COLUMN spending_limit_override INTEGER;
    ALTER TABLE accounts ADD COLUMN included_change TEXT;
    ALTER TABLE accounts ADD COLUMN quota_change TEXT;
    CREATE TABLE charges (
        idempotency_key TEXT PRIMARY KEY,
        account_id INTEGER NOT NULL REFERENCES accounts(id),
        period_key TEXT NOT NULL,
        kind TEXT NOT NULL,
        seq INTEGER NOT NULL,
        amount INTEGER NOT NULL,
        emails_unlocked INTEGER,
        description TEXT NOT NULL,
        created_at TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX charges_by_period ON charges (account_id, period_key, kind, seq);
    CREATE INDEX charges_due ON charges (status, next_attempt_at);
    CREATE TABLE invoices (
        id TEXT PRIMARY KEY,
        account_id INTEGER NOT NULL REFERENCES accounts(id),
        period_key TEXT NOT NULL,
        period_end TEXT NOT NULL,
        issued_at TEXT NOT NULL,
        invoice_date TEXT NOT NULL,
        due_date TEXT NOT NULL,
        statement_date TEXT NOT NULL,
        total INTEGER NOT NULL,
        amount_due INTEGER NOT NULL,
        prepaid_applied INTEGER NOT NULL,
        status TEXT NOT NULL,
        statement_sent INTEGER NOT NULL DEFAULT 0,
        body TEXT NOT NULL,
        UNIQUE (account_id, period_key)
    );
    CREATE TABLE balance_entries (
        id INTEGER PRIMARY KEY,
        account_id INTEGER NOT NULL REFERENCES accounts(id),
        amount INTEGER NOT NULL,
        kind TEXT NOT NULL,
        reference TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL
    );
    CREATE TABLE notices (
        account_id INTEGER NOT NULL REFERENCES accounts(id),
        period_key TEXT NOT NULL,
        key TEXT NOT NULL,
        body TEXT NOT NULL,
        created_at TEXT NOT NULL,
        email_sent INTEGER NOT NULL DEFAULT 0,
        webhook_sent INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (account_id, period_key, key)
    );
    CREATE TABLE usage_breakdown (
        account_id INTEGER NOT NULL REFERENCES accounts(id),
        period_key TEXT NOT NULL,
        campaign TEXT NOT NULL,
        region TEXT NOT NULL,
        accepted INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (account_id, period_key, campaign, region)
    );
    ALTER TABLE messages ADD COLUMN region TEXT NOT NULL DEFAULT '';
    """,
    # 3: the audit trail of admin changes (CLI, HTTP API, payment webhook). before/after
    # are the account's public JSON (never a password hash or token); event_id is the
    # inbound webhook's event id, UNIQUE so that the same event is applied only once.
    """
    CREATE TABLE audit_events (
        id INTEGER PRIMARY KEY,
        time TEXT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        before TEXT,
        after TEXT,
        detail TEXT NOT NULL DEFAULT '{}',
        event_id TEXT UNIQUE
    );
    CREATE INDEX audit_by_target ON audit_events (target, id);
    """,
    # 4: a result's sub-type (model C: mailbox_full, not_exist, ...; policies/results.py),
    # beside its billing category in `result`. Results recorded before have '' (unclassified).
    """
    ALTER TABLE recipient_results ADD COLUMN reason TEXT NOT NULL DEFAULT '';
    """,
    # 5: plan changes and a period's history. accounts.plan_change: a change waiting for the
    # end of the period (JSON: plan, previous, requested_at, effective); period_usage.history:
    # what a limit raise or an upgrade fixed earlier in the period (JSON, policies/history.py).
    """
    ALTER TABLE accounts ADD COLUMN plan_change TEXT;
    ALTER TABLE period_usage ADD COLUMN history TEXT;
    """,
    # 6: model B's monthly payment is credit. monthly_payment: the account's own amounts,
    # JSON [[first period start, micros], ...] ([]: the plan's); credited_through: the
    # last period whose credit is recorded; settled_through: the last period invoiced
    # (periods are invoiced in order), so an account read carries the usage of the
    # periods after it, which the balance still holds until their invoices deduct it.
    # An existing account's current period is credited from here on.
    """
    ALTER TABLE accounts ADD COLUMN monthly_payment TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE accounts ADD COLUMN credited_through TEXT;
    ALTER TABLE accounts ADD COLUMN settled_through TEXT;
    UPDATE accounts SET settled_through = (SELECT MAX(i.period_key) FROM invoices i WHERE i.account_id = accounts.id);
    UPDATE accounts SET credited_through = settled_through;
    """,
    # 7: an account deleted by the operator (`account delete`): deleted_at is when. The row
    # stays, so its invoices and audit trail stay readable and its name is never reused;
    # a deleted account cannot authenticate, its networks bind no client, and it is suspended.
    """
    ALTER TABLE accounts ADD COLUMN deleted_at TEXT;
    """,
    # 8: sending rates (policies/rate.py). accounts.sending_rate: the account's own rate
    # ("100/minute", "unlimited"; NULL: the plan's). rate_windows: recipients taken by holds in
    # each fixed window (start: epoch seconds), counted in the reserve's transaction; ended
    # windows are deleted as new ones start. No foreign key: counters, which must not stand in
    # the way of removing an account.
    """
    ALTER TABLE accounts ADD COLUMN sending_rate TEXT;
    CREATE TABLE rate_windows (
        account_id INTEGER NOT NULL,
        window_seconds INTEGER NOT NULL,
        window_start INTEGER NOT NULL,
        recipients INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (account_id, window_seconds, window_start)
    );
    """,
    # 9: events and suppression (issue 18). webhooks: an account's endpoint, its HMAC secret
    # and the kinds it takes (comma-separated). events: the outbox, written in the transaction
    # of the result, notice or payment change it tells of, for an account whose webhook takes
    # its kind; status pending | delivered | failed. event_attempts: the delivery log.
    # suppressions: recipients an account's mail hard-bounced to as Invalid Email (does not
    # exist, format error); address is lower-case. account_tokens: the SHA-256 of the
    # account's own API token (never the token).
    """
    CREATE TABLE webhooks (
        account_id INTEGER PRIMARY KEY REFERENCES accounts(id),
        url TEXT NOT NULL,
        secret TEXT NOT NULL,
        events TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        account_id INTEGER NOT NULL REFERENCES accounts(id),
        kind TEXT NOT NULL,
        data TEXT NOT NULL,
        created_at TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at TEXT NOT NULL
    );
    CREATE INDEX events_due ON events (status, next_attempt_at);
    CREATE INDEX events_by_account ON events (account_id, id);
    CREATE TABLE event_attempts (
        event_id INTEGER NOT NULL REFERENCES events(id),
        attempt INTEGER NOT NULL,
        at TEXT NOT NULL,
        status_code INTEGER,
        error TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (event_id, attempt)
    );
    CREATE TABLE suppressions (
        account_id INTEGER NOT NULL REFERENCES accounts(id),
        address TEXT NOT NULL,
        reason TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '',
        queue_id TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        PRIMARY KEY (account_id, address)
    );
    CREATE TABLE account_tokens (
        account_id INTEGER PRIMARY KEY REFERENCES accounts(id),
        token_hash TEXT NOT NULL UNIQUE,
        created_at TEXT NOT NULL
    );
    """,
    # 10: the account holder's side (mailmeter/portal/): messages_by_account_period, the usage
    # chart's per-day sums of one account's period (its sign-in token is migration 9's).
    """
    CREATE INDEX messages_by_account_period ON messages (account_id, period_key, accepted_at);
    """,
    # 11: the inline spool (issue 19 item 3, spool.inline): a small accepted message kept in
    # the transaction that commits its usage, one fsync for both. `data` is what the file
    # spool writes to active/QID (the envelope as one JSON line, then the message); `node`
    # is the relay process whose delivery owns it. Deleted once delivery is done with it.
    """
    CREATE TABLE spooled_messages (
        queue_id TEXT PRIMARY KEY,
        node TEXT NOT NULL,
        data BLOB NOT NULL
    );
    CREATE INDEX spooled_messages_by_node ON spooled_messages (node);
    """,
    # 12: the bound networks' version (issue 19 item 5; a period's results by region or
    # sub-type go through migration 10's messages_by_account_period, or they read every result
    # ever recorded: 10 million, 20 s per account at a month's close on a store with history),
    # bumped by triggers on any change to them or to an account's name, deletion or existence:
    # each relay process asks for it every 2 s and reads the bindings again only when it
    # changed (reading 10,000 every 2 s cost more than a message's metering).
    """
    CREATE TABLE network_bindings_version (version INTEGER NOT NULL);
    INSERT INTO network_bindings_version (version) VALUES (0);
    CREATE TRIGGER networks_added AFTER INSERT ON account_networks
    BEGIN UPDATE network_bindings_version SET version = version + 1; END;
    CREATE TRIGGER networks_changed AFTER UPDATE ON account_networks
    BEGIN UPDATE network_bindings_version SET version = version + 1; END;
    CREATE TRIGGER networks_removed AFTER DELETE ON account_networks
    BEGIN UPDATE network_bindings_version SET version = version + 1; END;
    CREATE TRIGGER accounts_renamed AFTER UPDATE OF name, deleted_at ON accounts
    BEGIN UPDATE network_bindings_version SET version = version + 1; END;
    CREATE TRIGGER accounts_removed AFTER DELETE ON accounts
    BEGIN UPDATE network_bindings_version SET version = version + 1; END;
    """,
]

"""Who changed what: actor names and the JSON an audit event keeps of an account.

An audit event keeps the account as it was before and after the change, as its
public JSON (never the password hash) plus the pending email-limit changes,
which `account show` leaves out but an auditor needs to see a limit move.
"""

from __future__ import annotations

import getpass
import json
import os
from typing import Any

from mailmeter.metering.records import Account, Row
from mailmeter.policies.currency import Currency

WEBHOOK_ACTOR = "webhook:payment"


def cli_actor() -> str:
    """`cli:USER`: the local user running the command (a token NAME never contains ':')."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name in the environment or the password database
        user = f"uid{os.getuid()}"
    return f"cli:{user}"


def account_view(account: Account, currency: Currency) -> dict[str, Any]:
    """The account's public JSON, with the email-limit changes that `public()` leaves out."""
    view = dict(account.public(currency))
    view["limit_changes"] = {
        which: None
        if change is None
        else {"previous": change.previous, "new": change.new, "changed_at": change.changed_at.isoformat()}
        for which, change in (("included", account.included_change), ("quota", account.quota_change))
    }
    return view


def changes(before: Any, after: Any) -> dict[str, list[Any]]:
    """The top-level keys whose value differs: {key: [before, after]}."""
    if not isinstance(before, dict) or not isinstance(after, dict):
        return {}
    keys = sorted(set(before) | set(after))
    return {key: [before.get(key), after.get(key)] for key in keys if before.get(key) != after.get(key)}


def event_json(row: Row) -> dict[str, Any]:
    before = None if row["before"] is None else json.loads(row["before"])
    after = None if row["after"] is None else json.loads(row["after"])
    return {
        "id": row["id"],
        "time": row["time"],
        "actor": row["actor"],
        "action": row["action"],
        "target": row["target"],
        "before": before,
        "after": after,
        "changes": changes(before, after),
        "detail": json.loads(row["detail"]),
        "event_id": row["event_id"],
    }


def event_line(event: dict[str, Any]) -> str:
    """One tab-separated line for `mailmeter audit` without --json."""
    changed = ", ".join(f"{key}: {old} -> {new}" for key, (old, new) in event["changes"].items())
    return "\t".join([event["time"], event["actor"], event["action"], event["target"], changed or "-"])

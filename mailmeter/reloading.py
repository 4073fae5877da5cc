"""What a reload (SIGHUP) applies, and what needs a restart: every config key is one or the other.

A running node applies every key on reload except those below, which its sockets, database,
spool, node name and delivery workers were built from; a change to one of them is kept for
the next start and listed in the reload's log line (`needs_restart`). docs/operating.md
has the table; tests/mailmeter/test_reload_keys.py walks every key of config.example.yaml.
"""

from __future__ import annotations

from typing import Any

from mailmeter.config import Config

# A key needs a restart if it is one of these or under one (dotted prefixes).
NEEDS_RESTART: tuple[str, ...] = (
    "node",  # the node's name (its holds, its claim on PostgreSQL) and region (on its usage)
    "listen",  # the SMTP socket(s) and the number of relay processes
    "database",  # the meter's store and its connections, leasing
    "spool",  # the spool directory this process holds the lock of
    "delivery.workers",  # the delivery tasks started with the node
    "portal",  # the account holders' pages: their listener (sessions live in memory)
)


LIST_SECTIONS = ("listen", "upstream")  # one mapping, or a list of them


def needs_restart(key: str) -> bool:
    """Whether a change to the dotted config `key` needs a restart."""
    return any(key == prefix or key.startswith(prefix + ".") for prefix in NEEDS_RESTART)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b": value} for every leaf of a nested mapping. The sections that may be a list
    (`listen`, `upstream`) are named as the config spells them: one item as the mapping
    itself (`listen.port`), several by position (`listen.1.port`); any other list is a leaf."""
    if prefix in LIST_SECTIONS and isinstance(data, list) and data and all(isinstance(i, dict) for i in data):
        if len(data) == 1:
            return flatten(data[0], prefix)
        leaves: dict[str, Any] = {}
        for index, item in enumerate(data):
            leaves.update(flatten(item, f"{prefix}.{index}"))
        return leaves
    if not isinstance(data, dict) or (prefix and not data):
        return {prefix: data}
    leaves = {}
    for key, value in data.items():
        leaves.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return leaves


def changed_keys(old: Config, new: Config) -> list[str]:
    """The dotted keys whose value differs between two configs (plans: one key per plan)."""
    before = _leaves(old)
    after = _leaves(new)
    return sorted(key for key in set(before) | set(after) if before.get(key) != after.get(key))


def _leaves(config: Config) -> dict[str, Any]:
    data = config.model_dump(mode="json", exclude={"base_dir", "plans"})
    leaves = flatten(data)
    for name, plan in config.plans.items():  # the plans are checked and parsed as a whole
        leaves[f"plans.{name}"] = plan
    return leaves


def split_changes(old: Config, new: Config) -> tuple[list[str], list[str]]:
    """(keys a reload applies, keys that need a restart) among those that changed."""
    changed = changed_keys(old, new)
    return [k for k in changed if not needs_restart(k)], [k for k in changed if needs_restart(k)]


def restart_section(config: Config, running: Config) -> Config:
    """`config` with every needs-restart key as the running node has it (kept until a restart)."""
    update: dict[str, Any] = {}
    for prefix in NEEDS_RESTART:
        section, _, field = prefix.partition(".")
        if not field:
            update[section] = getattr(running, section)
        else:
            base = update.get(section, getattr(config, section))
            update[section] = base.model_copy(update={field: getattr(getattr(running, section), field)})
    return config.model_copy(update=update)


__all__ = ["NEEDS_RESTART", "changed_keys", "flatten", "needs_restart", "restart_section", "split_changes"]

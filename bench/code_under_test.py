"""The code under test, in either layout, for the bench's in-process scripts (meter_latency.py, ...).

Since issue 16 the code installs as one package (`mailmeter.metering.meter`, `mailmeter.policies.plans`,
...); before it, `metering`, `policies` and `relay` were top-level packages, with the stores in
`metering/sqlite_store.py` and `metering/pg_store.py`. bench/run puts either kind first on
PYTHONPATH (BENCH_SRC=<revision>), so an A/B run can compare across the change.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

# Modules whose name changed with the layout: the current name -> the name before issue 16.
_BEFORE = {"metering.sqlite": "metering.sqlite_store", "metering.postgres": "metering.pg_store"}


def _top_level_packages() -> bool:
    """True for a revision before issue 16 (its `metering` package is importable at the top level)."""
    try:
        return importlib.util.find_spec("metering.sqlite_store") is not None
    except ModuleNotFoundError:  # no top-level `metering` at all
        return False


TOP_LEVEL = _top_level_packages()


def module(name: str) -> ModuleType:
    """The module the current layout calls mailmeter.`name` (e.g. "metering.meter"), from the code under test."""
    if TOP_LEVEL:
        return importlib.import_module(_BEFORE.get(name, name))
    return importlib.import_module(f"mailmeter.{name}")

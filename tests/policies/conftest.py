"""Shared fixtures for the policy tests: the five ready plans, parsed from five_plans.yaml.

Loading the YAML the docs ship (rather than building plans in code) proves the file
parses with parse_plan and that the worked examples hold for exactly that config.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mailmeter.policies.plans import Plan, parse_plans

FIVE_PLANS = Path(__file__).with_name("five_plans.yaml")
EXAMPLE_CONFIG = Path(__file__).resolve().parents[2] / "config.example.yaml"


@pytest.fixture(scope="session")
def five_plans() -> dict[str, Plan]:
    return parse_plans(yaml.safe_load(FIVE_PLANS.read_text(encoding="utf-8"))["plans"])


@pytest.fixture(scope="session")
def plan_a(five_plans: dict[str, Plan]) -> Plan:
    return five_plans["per-email-threshold"]


@pytest.fixture(scope="session")
def plan_b(five_plans: dict[str, Plan]) -> Plan:
    return five_plans["prepaid-tiered"]


@pytest.fixture(scope="session")
def plan_c(five_plans: dict[str, Plan]) -> Plan:
    return five_plans["delivery-results"]


@pytest.fixture(scope="session")
def plan_d(five_plans: dict[str, Plan]) -> Plan:
    return five_plans["included-capped"]


@pytest.fixture(scope="session")
def plan_e(five_plans: dict[str, Plan]) -> Plan:
    return five_plans["limit-overage"]


@pytest.fixture(scope="session")
def example_plans() -> dict[str, Plan]:
    """Every plan config.example.yaml ships, the bigger plans to upgrade to included."""
    return parse_plans(yaml.safe_load(EXAMPLE_CONFIG.read_text(encoding="utf-8"))["plans"])


@pytest.fixture(scope="session")
def plan_e100(example_plans: dict[str, Plan]) -> Plan:
    return example_plans["limit-overage-100k"]


@pytest.fixture(scope="session")
def plan_d200(example_plans: dict[str, Plan]) -> Plan:
    return example_plans["included-capped-200k"]

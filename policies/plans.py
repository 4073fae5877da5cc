"""Plans parsed from plain config mappings, with errors that name the dotted key at fault.

Parsing is here (pure) so the config loader and `mailmeter plan preview` share one
reading of a plan, and so a bad plan names the exact key (`plans.X.price.tiers[1].up_to`).
Plan and PlanError live in plan.py and are re-exported here, where callers import them.

Money in config is always a string ("0.20") or a whole number of currency units:
a YAML float would already have lost exactness before we see it, so it is refused.
Every amount is written in the billing currency's minor units at most (USD "0.20",
JPY "200", BHD "0.200"); a price below the minor unit per email is written per a
number of emails (`amount: "0.02"`, `per: 100` is $0.0002 an email).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import time
from typing import Any

from mailmeter.policies.currency import USD, Currency
from mailmeter.policies.money import MoneyError, parse_money
from mailmeter.policies.parts import BlockCharge, Funding, InPeriodCharge, Invoicing, ResultPrices, ThresholdCharge
from mailmeter.policies.periods import PeriodSpec
from mailmeter.policies.plan import Plan, PlanError, tiers_problem
from mailmeter.policies.pricing import BlockPrice, FlatPrice, GraduatedPrice, Tier, UnitPrice, VolumePrice
from mailmeter.policies.rate import RateError, SendRate, parse_rate

__all__ = ["PLAN_KEYS", "Plan", "PlanError", "parse_period", "parse_plan", "parse_plans", "parse_price"]


PLAN_KEYS = frozenset(
    {
        "display_name",
        "period",
        "sending_rate",
        "email_quota",
        "included_emails",
        "plan_fee",
        "billable",
        "price",
        "result_prices",
        "in_period_charge",
        "spending_limit",
        "funding",
        "invoicing",
        "usage_alerts",
        "rank",
        "suppression",
    }
)


def _mapping(data: Any, path: str, known: frozenset[str] | set[str]) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise PlanError(path, "must be a mapping")
    unknown = set(data) - set(known)
    if unknown:
        raise PlanError(f"{path}.{sorted(map(str, unknown))[0]}", f"unknown key (known: {', '.join(sorted(known))})")
    return data


def _int(data: Mapping[str, Any], key: str, path: str, minimum: int = 0) -> int | None:
    if key not in data or data[key] is None:
        return None
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlanError(f"{path}.{key}", f"must be a whole number, got {value!r}")
    if value < minimum:
        raise PlanError(f"{path}.{key}", f"must be at least {minimum}, got {value}")
    return value


def _money(data: Mapping[str, Any], key: str, path: str, currency: Currency) -> int | None:
    if key not in data or data[key] is None:
        return None
    value = data[key]
    if isinstance(value, float):
        raise PlanError(f"{path}.{key}", f'write money as a quoted string like "{value}", never a float')
    try:
        micros = parse_money(value, currency)
    except MoneyError as error:
        hint = (
            "; a smaller price per email is written per a number of emails (per: 1000)"
            if ("decimals" in str(error))
            else ""
        )
        raise PlanError(f"{path}.{key}", f"{error}{hint}") from None
    if micros < 0:
        raise PlanError(f"{path}.{key}", "must not be negative")
    return micros


def _required(value: int | None, key: str, path: str) -> int:
    if value is None:
        raise PlanError(f"{path}.{key}", "is required")
    return value


def _per_email(amount: int, per: int, path: str) -> int:
    """Micros per email from "amount per `per` emails", refusing a fraction of a micro."""
    if amount % per:
        raise PlanError(f"{path}.per", f"amount / per is not a whole number of micros per email (per={per})")
    return amount // per


def parse_period(data: Any, path: str) -> PeriodSpec:
    if data is None:
        return PeriodSpec()
    data = _mapping(data, path, {"kind", "timezone"})
    kind = data.get("kind", "calendar_month")
    if kind not in ("calendar_month", "anniversary"):
        raise PlanError(f"{path}.kind", f"must be calendar_month or anniversary, got {kind!r}")
    spec = PeriodSpec(kind=kind, timezone=str(data.get("timezone", "UTC")))
    try:
        spec.zone()
    except ValueError as error:
        raise PlanError(f"{path}.timezone", str(error)) from None
    return spec


def _parse_tiers(data: Any, path: str, currency: Currency) -> tuple[Tier, ...]:
    if not isinstance(data, list) or not data:
        raise PlanError(path, "must be a non-empty list of tiers ({up_to, amount, per}; the last without up_to)")
    tiers: list[Tier] = []
    for number, item in enumerate(data):
        tier_path = f"{path}[{number}]"
        item = _mapping(item, tier_path, {"up_to", "amount", "per"})
        amount = _required(_money(item, "amount", tier_path, currency), "amount", tier_path)
        per = _int(item, "per", tier_path, minimum=1) or 1
        tiers.append(
            Tier(up_to=_int(item, "up_to", tier_path, minimum=1), per_email=_per_email(amount, per, tier_path))
        )
    problem = tiers_problem(tuple(tiers))
    if problem is not None:
        raise PlanError(path, problem)
    return tuple(tiers)


def parse_price(data: Any, path: str, currency: Currency = USD) -> UnitPrice:
    if data is None:
        return FlatPrice(0)
    if not isinstance(data, Mapping):
        raise PlanError(path, "must be a mapping with a kind: flat, graduated, volume or per_block")
    kind = data.get("kind")
    if kind == "flat":
        data = _mapping(data, path, {"kind", "amount", "per"})
        amount = _required(_money(data, "amount", path, currency), "amount", path)
        return FlatPrice(_per_email(amount, _int(data, "per", path, minimum=1) or 1, path))
    if kind in ("graduated", "volume"):
        data = _mapping(data, path, {"kind", "tiers"})
        tiers = _parse_tiers(data.get("tiers"), f"{path}.tiers", currency)
        return GraduatedPrice(tiers) if kind == "graduated" else VolumePrice(tiers)
    if kind == "per_block":
        data = _mapping(data, path, {"kind", "amount", "block_emails"})
        return BlockPrice(
            block_emails=_required(_int(data, "block_emails", path, minimum=1), "block_emails", path),
            per_block=_required(_money(data, "amount", path, currency), "amount", path),
        )
    raise PlanError(f"{path}.kind", f"must be flat, graduated, volume or per_block, got {kind!r}")


def parse_result_prices(data: Any, path: str, currency: Currency = USD) -> ResultPrices:
    data = _mapping(data, path, {"per", "delivered", "soft_bounced", "invalid", "hard_bounced"})
    if "invalid" in data and "hard_bounced" in data:
        raise PlanError(f"{path}.hard_bounced", "give invalid or hard_bounced (the same category), not both")
    per = _int(data, "per", path, minimum=1) or 1
    prices: dict[str, int] = {}
    for key in ("delivered", "soft_bounced", "invalid", "hard_bounced"):
        amount = _money(data, key, path, currency)
        if amount is not None:
            prices["hard_bounced" if key == "invalid" else key] = _per_email(amount, per, f"{path}.{key}")
    if not prices:
        raise PlanError(path, "needs a price for at least one of delivered, soft_bounced, invalid")
    return ResultPrices(**prices)


def parse_in_period_charge(data: Any, path: str, currency: Currency = USD) -> InPeriodCharge | None:
    if data is None:
        return None
    if not isinstance(data, Mapping):
        raise PlanError(path, "must be a mapping with a kind: threshold or per_block")
    kind = data.get("kind")
    if kind == "threshold":
        data = _mapping(data, path, {"kind", "amount"})
        return ThresholdCharge(amount=_required(_money(data, "amount", path, currency), "amount", path))
    if kind == "per_block":
        _mapping(data, path, {"kind"})
        return BlockCharge()
    raise PlanError(f"{path}.kind", f"must be threshold or per_block, got {kind!r}")


def parse_funding(data: Any, path: str, currency: Currency = USD) -> Funding:
    if data is None:
        return Funding()
    data = _mapping(data, path, {"kind", "net_days", "overdraft_allowance", "monthly_payment"})
    kind = data.get("kind", "postpaid")
    if kind not in ("prepaid", "postpaid"):
        raise PlanError(f"{path}.kind", f"must be prepaid or postpaid, got {kind!r}")
    return Funding(
        kind=kind,
        net_days=_int(data, "net_days", path) or 0,
        overdraft_allowance=_money(data, "overdraft_allowance", path, currency),
        monthly_payment=_money(data, "monthly_payment", path, currency) or 0,
    )


def parse_invoicing(data: Any, path: str) -> Invoicing:
    if data is None:
        return Invoicing()
    data = _mapping(data, path, {"issue_time", "statement_after_days"})
    issue_time = time(0, 0)
    if "issue_time" in data:
        text = data["issue_time"]
        if not isinstance(text, str):
            raise PlanError(
                f"{path}.issue_time", f'must be a quoted "HH:MM" (YAML reads 15:00 unquoted as a number), got {text!r}'
            )
        try:
            issue_time = time.fromisoformat(text)
        except ValueError:
            raise PlanError(f"{path}.issue_time", f'must be "HH:MM", got {text!r}') from None
    return Invoicing(issue_time=issue_time, statement_after_days=_int(data, "statement_after_days", path) or 0)


def parse_alerts(data: Any, path: str) -> tuple[int, ...]:
    if data is None:
        return ()
    if not isinstance(data, list) or any(isinstance(p, bool) or not isinstance(p, int) for p in data):
        raise PlanError(path, "must be a list of whole percentages like [75, 90, 100]")
    return tuple(data)


DEFAULT_USAGE_ALERTS: tuple[int, ...] = (75, 90, 100)


def _suppression(data: Mapping[str, Any], path: str) -> bool:
    value = data.get("suppression", True)
    if not isinstance(value, bool):
        raise PlanError(f"{path}.suppression", "must be true (suppress hard-bounced recipients) or false")
    return value


def parse_plan(name: str, data: Any, path: str | None = None, currency: Currency = USD) -> Plan:
    """Build a Plan in `currency` from its config mapping, or raise PlanError naming the key."""
    path = path or f"plans.{name}"
    if not isinstance(data, Mapping):
        raise PlanError(path, "must be a mapping of plan parts")
    unknown = set(data) - PLAN_KEYS
    if unknown:
        raise PlanError(
            f"{path}.{sorted(map(str, unknown))[0]}", f"unknown plan key (known: {', '.join(sorted(PLAN_KEYS))})"
        )
    billable = data.get("billable", "accepted")
    if billable not in ("accepted", "results"):
        raise PlanError(f"{path}.billable", f"must be accepted or results, got {billable!r}")
    if billable == "results":
        if "price" in data:
            raise PlanError(f"{path}.price", "not used when billable: results; price each result in result_prices")
        if "result_prices" not in data:
            raise PlanError(f"{path}.result_prices", "is required when billable: results")
    elif "result_prices" in data:
        raise PlanError(f"{path}.result_prices", "only used with billable: results")
    display_name = data.get("display_name")
    if display_name is not None and not isinstance(display_name, str):
        raise PlanError(f"{path}.display_name", "must be text")
    fee = _money(data, "plan_fee", path, currency)
    quota = _int(data, "email_quota", path)
    included = _int(data, "included_emails", path) or 0
    if "usage_alerts" in data:
        alerts = parse_alerts(data.get("usage_alerts"), f"{path}.usage_alerts")
    else:
        # Notify at 75%, 90% and 100% of any email limit unless the plan says otherwise ([] for none).
        alerts = DEFAULT_USAGE_ALERTS if (included or quota is not None) else ()
    try:
        return Plan(
            name=name,
            display_name=display_name,
            period=parse_period(data.get("period"), f"{path}.period"),
            email_quota=quota,
            included_emails=included,
            plan_fee=fee or 0,
            billable=billable,
            price=parse_price(data.get("price"), f"{path}.price", currency),
            result_prices=(
                parse_result_prices(data["result_prices"], f"{path}.result_prices", currency)
                if billable == "results"
                else ResultPrices()
            ),
            in_period_charge=parse_in_period_charge(data.get("in_period_charge"), f"{path}.in_period_charge", currency),
            spending_limit=_money(data, "spending_limit", path, currency),
            funding=parse_funding(data.get("funding"), f"{path}.funding", currency),
            invoicing=parse_invoicing(data.get("invoicing"), f"{path}.invoicing"),
            usage_alerts=alerts,
            currency=currency,
            rank=_int(data, "rank", path),
            sending_rate=_sending_rate(data, path),
            suppression=_suppression(data, path),
        )
    except PlanError as error:
        prefix = f"plans.{name}"
        if path != prefix and error.key.startswith(prefix + ".") and not error.key.startswith(path + "."):
            raise PlanError(path + error.key[len(prefix) :], error.message) from None
        raise


def _sending_rate(data: Mapping[str, Any], path: str) -> SendRate | None:
    text = data.get("sending_rate")
    if text is None:
        return None
    try:
        return parse_rate(text)
    except RateError as error:
        raise PlanError(f"{path}.sending_rate", str(error)) from None


def parse_plans(data: Any, path: str = "plans", currency: Currency = USD) -> dict[str, Plan]:
    """Every plan under a config's `plans:` mapping, by name, all in the one billing currency."""
    if not isinstance(data, Mapping) or not data:
        raise PlanError(path, "must be a non-empty mapping of plan name to plan")
    return {str(name): parse_plan(str(name), body, f"{path}.{name}", currency) for name, body in data.items()}

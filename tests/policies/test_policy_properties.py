"""Properties over random plans and random sequences of usage events.

A tiny in-memory meter replays events (reserve at RCPT, commit, release, delivery
results, top-ups) through admit / charges_due / close_period, and checks after every
step that:

- no cap is ever exceeded (quota, spending limit, prepaid balance, overdraft), and a
  partial grant is refused only because one more email would exceed a cap;
- charges_due at a usage is a prefix of charges_due at any later usage, so a charge
  key is never issued twice and an issued charge never changes;
- in-period charges + the closing invoice total == plan fee + the usage lines, each
  rounded half-up to cents once, which are within half a cent per line of the exact
  priced usage; a prepaid balance covers the usage to the cent.

Plans are built from config mappings through parse_plan, so the parts are
combined exactly as an operator would combine them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import date, datetime, timezone
from typing import Any

from hypothesis import event, given, settings
from hypothesis import strategies as st

from mailmeter.policies.account import Standing, Usage
from mailmeter.policies.charges import Charge, charged_total, charges_due
from mailmeter.policies.currency import USD
from mailmeter.policies.decision import Refusal, admit
from mailmeter.policies.invoice import close_period
from mailmeter.policies.limits import email_quota, included_emails, spending_limit
from mailmeter.policies.money import format_money
from mailmeter.policies.periods import Period, period_containing
from mailmeter.policies.plans import Plan, parse_plan
from mailmeter.policies.preview import preview
from mailmeter.policies.pricing import cost_ceiling
from mailmeter.policies.usage_cost import priced_usage, results_cost

CENT = 10_000


def money(micros: int) -> str:
    """An amount as the config writes it; amounts are whole cents (USD's minor unit)."""
    assert micros % CENT == 0
    return format_money(micros, USD)


def per_email(micros: int) -> dict[str, Any]:
    """A price of `micros` per email, written as the config must: whole cents per 10,000 emails."""
    return {"amount": money(micros * 10_000), "per": 10_000}


def cents(draw: st.DrawFn, low: int, high: int) -> int:
    """Micros of a whole number of cents in [low, high] micros."""
    return draw(st.integers(min_value=-(-low // CENT), max_value=high // CENT)) * CENT


@st.composite
def tier_list(draw: st.DrawFn) -> list[dict[str, Any]]:
    bounds = sorted(draw(st.sets(st.integers(min_value=1, max_value=400), max_size=3)))
    tiers: list[dict[str, Any]] = []
    for up_to in [*bounds, None]:
        tier: dict[str, Any] = per_email(draw(st.integers(min_value=0, max_value=3_000)))
        if up_to is not None:
            tier["up_to"] = up_to
        tiers.append(tier)
    return tiers


@st.composite
def plan_configs(draw: st.DrawFn) -> dict[str, Any]:
    """A random, valid combination of plan parts with small numbers."""
    config: dict[str, Any] = {}
    funding_kind = draw(st.sampled_from(["prepaid", "postpaid", "postpaid"]))
    funding: dict[str, Any] = {"kind": funding_kind, "net_days": draw(st.sampled_from([0, 14]))}
    if funding_kind == "postpaid" and draw(st.booleans()):
        funding["overdraft_allowance"] = money(cents(draw, 0, 300_000))
    config["funding"] = funding
    if draw(st.booleans()):
        config["plan_fee"] = money(draw(st.integers(min_value=0, max_value=2_000)) * CENT)
    if draw(st.integers(min_value=0, max_value=2)) == 0:
        config["email_quota"] = draw(st.integers(min_value=0, max_value=600))
    if draw(st.integers(min_value=0, max_value=2)) == 0:
        config["spending_limit"] = money(cents(draw, 0, 300_000))
    if draw(st.integers(min_value=0, max_value=3)) == 0:
        config["billable"] = "results"
        config["result_prices"] = {
            "per": 10_000,
            **{
                key: per_email(draw(st.integers(min_value=0, max_value=3_000)))["amount"]
                for key in ("delivered", "soft_bounced", "invalid")
            },
        }
        return config
    config["included_emails"] = draw(st.integers(min_value=0, max_value=60))
    kind = draw(st.sampled_from(["flat", "graduated", "volume", "per_block"]))
    may_charge = funding_kind == "postpaid"
    may_charge_blocks = may_charge and "overdraft_allowance" not in funding
    if kind == "flat":
        config["price"] = {"kind": "flat", **per_email(draw(st.integers(min_value=0, max_value=3_000)))}
    elif kind in ("graduated", "volume"):
        config["price"] = {"kind": kind, "tiers": draw(tier_list())}
    else:
        charged = may_charge_blocks and draw(st.integers(min_value=0, max_value=3)) > 0
        per_block = draw(st.integers(min_value=1, max_value=5)) * CENT if charged else cents(draw, 0, 30_000)
        config["price"] = {
            "kind": "per_block",
            "amount": money(per_block),
            "block_emails": draw(st.integers(min_value=1, max_value=25)),
        }
        if charged:
            config["in_period_charge"] = {"kind": "per_block"}
    if may_charge and kind in ("flat", "graduated") and draw(st.integers(min_value=0, max_value=3)) > 0:
        config["in_period_charge"] = {
            "kind": "threshold",
            "amount": money(draw(st.integers(min_value=1, max_value=5)) * CENT),
        }
    return config


def sometimes(strategy: st.SearchStrategy[int]) -> st.SearchStrategy[int | None]:
    """An override is the exception: None (use the plan's value) three times in four."""
    return st.one_of(st.none(), st.none(), st.none(), strategy)


@st.composite
def standings(draw: st.DrawFn) -> Standing:
    return Standing(
        prepaid_balance=draw(st.integers(min_value=0, max_value=50)) * CENT,
        outstanding_debt=draw(st.sampled_from([0, 0, 0, draw(st.integers(min_value=0, max_value=150_000))])),
        included_emails_override=draw(sometimes(st.integers(min_value=0, max_value=80))),
        email_quota_override=draw(sometimes(st.integers(min_value=0, max_value=600))),
        spending_limit_override=draw(sometimes(st.integers(min_value=0, max_value=300_000))),
    )


SEND = st.tuples(st.just("send"), st.integers(min_value=0, max_value=120))
EVENTS = st.one_of(
    SEND,
    SEND,
    st.tuples(st.just("reserve"), st.integers(min_value=0, max_value=80)),
    st.tuples(st.just("commit"), st.integers(min_value=0, max_value=80)),
    st.tuples(st.just("release"), st.integers(min_value=0, max_value=30)),
    st.tuples(st.sampled_from(["delivered", "soft_bounced", "hard_bounced"]), st.integers(min_value=0, max_value=60)),
    st.tuples(st.just("top_up"), st.integers(min_value=0, max_value=20)),
)


def cap_breaches(plan: Plan, standing: Standing, usage: Usage) -> list[Refusal]:
    """The caps this state exceeds, computed forwards (cost of the held emails), not via
    the inverse functions admit uses."""
    held = usage.held
    if plan.billable == "results":
        pending = max(usage.accepted - usage.resolved, 0) + usage.reserved
        cost_of_held = results_cost(plan.result_prices, usage) + pending * plan.result_prices.highest
    else:
        cost_of_held = cost_ceiling(plan.price, held, included_emails(plan, standing))
    breaches: list[Refusal] = []
    quota = email_quota(plan, standing)
    if quota is not None and held > quota:
        breaches.append(Refusal.QUOTA_EXHAUSTED)
    limit = spending_limit(plan, standing)
    if limit is not None and cost_of_held > limit:
        breaches.append(Refusal.SPENDING_LIMIT)
    if plan.funding.kind == "prepaid" and cost_of_held > standing.prepaid_balance:
        breaches.append(Refusal.BALANCE_EXHAUSTED)
    allowance = plan.funding.overdraft_allowance
    if plan.funding.kind == "postpaid" and allowance is not None:
        debt = (
            cost_of_held - charged_total(plan, standing, usage) - standing.prepaid_balance + standing.outstanding_debt
        )
        if debt > allowance:
            breaches.append(Refusal.OVERDRAFT_LIMIT)
    return breaches


@dataclass
class Store:
    """What the meter keeps: usage and the charges it inserted, by key."""

    usage: Usage = Usage()
    issued: dict[str, Charge] = field(default_factory=dict)
    history: list[list[Charge]] = field(default_factory=list)

    def insert_due_charges(self, plan: Plan, standing: Standing) -> None:
        due = charges_due(plan, standing, self.usage)
        keys = [charge.key for charge in due]
        assert len(keys) == len(set(keys)), "a charge key appears twice"
        if self.history:
            previous = self.history[-1]
            assert due[: len(previous)] == previous, "charges_due is not a prefix of the later list"
        self.history.append(due)
        assert charges_due(plan, standing, self.usage, after_index=len(self.issued)) == due[len(self.issued) :]
        for charge in due:
            if charge.key in self.issued:
                assert self.issued[charge.key] == charge, "an issued charge changed"
            else:
                self.issued[charge.key] = charge


def a_period_of(plan: Plan) -> Period:
    return period_containing(plan.period, datetime(2026, 4, 15, tzinfo=timezone.utc), date(2026, 1, 31))


@settings(max_examples=250, deadline=None)
@given(plan_configs(), standings(), st.lists(EVENTS, min_size=3, max_size=40))
def test_usage_events_never_exceed_caps_and_charges_add_up(
    config: dict[str, Any], standing: Standing, events: list[tuple[str, int]]
) -> None:
    plan = parse_plan("random", config)
    store = Store()
    assert cap_breaches(plan, standing, store.usage) == [] or store.usage.held == 0
    for kind, amount in events:
        usage = store.usage
        if kind in ("reserve", "send"):
            admission = admit(plan, standing, usage, amount)
            assert 0 <= admission.granted <= amount
            store.usage = replace(usage, reserved=usage.reserved + admission.granted)
            if admission.granted:
                assert cap_breaches(plan, standing, store.usage) == []
            if admission.granted < amount:
                assert admission.refusal is not None
                event(f"refused: {admission.refusal.value}")
                one_more = replace(store.usage, reserved=store.usage.reserved + 1)
                assert admission.refusal in cap_breaches(plan, standing, one_more)
            else:
                assert admission.refusal is None
            if kind == "send":  # RCPT then the message's 250: reserve and commit at once
                store.usage = replace(store.usage, reserved=usage.reserved, accepted=usage.accepted + admission.granted)
        elif kind == "commit":
            moved = min(amount, usage.reserved)
            store.usage = replace(usage, reserved=usage.reserved - moved, accepted=usage.accepted + moved)
        elif kind == "release":
            store.usage = replace(usage, reserved=usage.reserved - min(amount, usage.reserved))
        elif kind == "top_up":
            standing = replace(standing, prepaid_balance=standing.prepaid_balance + amount * CENT)
        else:
            resolved = min(amount, usage.accepted - usage.resolved)
            store.usage = replace(usage, **{kind: getattr(usage, kind) + resolved})
        if store.usage.held and cap_breaches(plan, standing, usage) == []:
            # commits, releases, results and top-ups never push a within-caps state over a cap
            assert cap_breaches(plan, standing, store.usage) == []
        store.insert_due_charges(plan, standing)

    if plan.in_period_charge is not None:
        event(f"charging plan issued charges: {bool(store.issued)}")
    final = replace(store.usage, reserved=0)
    store.usage = final
    store.insert_due_charges(plan, standing)
    invoice = close_period(plan, standing, final, a_period_of(plan), list(store.issued.values()))
    charged = sum(charge.amount for charge in store.issued.values())
    usage_lines = [line for line in invoice.lines if line.kind == "usage"]
    rounded_usage = sum(line.amount for line in usage_lines)
    assert all(line.amount % CENT == 0 for line in invoice.lines)
    assert charged + invoice.total == plan.plan_fee + rounded_usage
    assert abs(rounded_usage - priced_usage(plan, standing, final)) <= 5_000 * max(len(usage_lines), 1)
    assert invoice.total >= plan.plan_fee, "in-period charges collected more than the usage"
    assert invoice.amount_due == invoice.total - invoice.prepaid_applied
    if plan.funding.kind == "prepaid":
        assert invoice.prepaid_balance_after is not None and invoice.prepaid_balance_after >= 0
        # the balance (whole cents) covered every email, rounding included
        assert invoice.amount_due - plan.plan_fee <= 5_000 * (len(usage_lines) - 1 if usage_lines else 0)


@settings(max_examples=100, deadline=None)
@given(plan_configs(), standings(), st.integers(min_value=0, max_value=5_000), st.integers(min_value=0, max_value=100))
def test_preview_agrees_with_the_policy_functions(
    config: dict[str, Any], standing: Standing, emails: int, bounce_pct: int
) -> None:
    plan = parse_plan("random", config)
    start = datetime(2026, 4, 1, tzinfo=timezone.utc)
    soft = emails * bounce_pct // 200
    result = preview(plan, emails, start, standing=standing, soft_bounced=soft, invalid=soft)
    assert result.accepted + result.refused == emails
    assert cap_breaches(plan, standing, Usage(accepted=result.accepted)) == [] or result.accepted == 0
    if result.refused:
        assert result.refusal is not None
        # One more email as admission sees it: held, its own threshold charge not yet collected.
        one_more = Usage(accepted=result.accepted, reserved=1)
        assert result.refusal in cap_breaches(plan, standing, one_more) or result.accepted == 0
    assert [timed.charge for timed in result.charges] == charges_due(plan, standing, result.usage)
    times = [timed.at for timed in result.charges if timed.at is not None]
    assert times == sorted(times) and all(result.period.contains(at) for at in times)
    invoice = result.invoice
    charged = sum(timed.charge.amount for timed in result.charges)
    assert charged + invoice.total == plan.plan_fee + invoice.usage_total


@st.composite
def charging_plans(draw: st.DrawFn) -> dict[str, Any]:
    """Postpaid plans that always collect in the period, with generous or no caps, so
    that long runs of charges are exercised (the general strategy stops early at caps)."""
    config: dict[str, Any] = {
        "funding": {"kind": "postpaid"},
        "included_emails": draw(st.integers(min_value=0, max_value=40)),
    }
    if draw(st.booleans()):
        config["price"] = {
            "kind": "per_block",
            "amount": money(draw(st.integers(min_value=1, max_value=3)) * CENT),
            "block_emails": draw(st.integers(min_value=1, max_value=15)),
        }
        config["in_period_charge"] = {"kind": "per_block"}
    else:
        if draw(st.booleans()):
            config["price"] = {"kind": "flat", **per_email(draw(st.integers(min_value=1, max_value=3_000)))}
        else:
            config["price"] = {"kind": "graduated", "tiers": draw(tier_list())}
        config["in_period_charge"] = {
            "kind": "threshold",
            "amount": money(draw(st.integers(min_value=1, max_value=4)) * CENT),
        }
    if draw(st.booleans()):
        config["spending_limit"] = money(cents(draw, 100_000, 2_000_000))
    if draw(st.booleans()) and config["in_period_charge"]["kind"] == "threshold":
        config["funding"]["overdraft_allowance"] = money(cents(draw, 50_000, 500_000))
    return config


@settings(max_examples=150, deadline=None)
@given(charging_plans(), sometimes(st.integers(min_value=0, max_value=60)), st.lists(SEND, min_size=1, max_size=25))
def test_charges_are_prefixes_never_reissued_and_add_up(
    config: dict[str, Any], included_override: int | None, sends: list[tuple[str, int]]
) -> None:
    plan = parse_plan("charging", config)
    standing = Standing(included_emails_override=included_override)
    store = Store()
    for _, amount in sends:
        granted = admit(plan, standing, store.usage, amount).granted
        store.usage = replace(store.usage, accepted=store.usage.accepted + granted)
        assert cap_breaches(plan, standing, store.usage) == []
        store.insert_due_charges(plan, standing)
    event(f"charges issued: {min(len(store.issued), 10)}{'+' if len(store.issued) >= 10 else ''}")
    for charge in store.issued.values():
        assert charge.trigger_email is not None and charge.trigger_email <= store.usage.accepted
        before = charges_due(plan, standing, Usage(accepted=charge.trigger_email - 1))
        assert len(before) == charge.index - 1, "the trigger email is the first that makes the charge due"
    invoice = close_period(plan, standing, store.usage, a_period_of(plan), list(store.issued.values()))
    assert sum(c.amount for c in store.issued.values()) + invoice.total == invoice.usage_total
    assert 0 <= invoice.total
    assert abs(invoice.usage_total - priced_usage(plan, standing, store.usage)) <= 5_000

"""Properties of a period whose limits and plan change while the account sends.

A reference model applies the documents' rules email by email (an email is chargeable
when its number in the period is beyond the limit in force when it is sent; overage is
billed per started block of chargeable emails, a threshold charge each time a part's
usage reaches another threshold; an upgrade starts a new part under the new plan; a
charge once made is final) and is compared with the closed-form policy functions the
meter runs, over random plans and random sequences of sends, delivery results, limit
changes up and down, and plan changes:

- the in-period charges issued, plus the closing invoice's lines, equal what the
  reference gives, part by part, rounded per line as the documents say;
- no invoice total is negative (it is never less than the plan fee), and no charge is
  ever issued twice or kept beyond the usage;
- a grant never takes the account past a cap in force.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any

from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from mailmeter.policies.account import Standing, Usage
from mailmeter.policies.changes import change_limit, switch_plan, without_own_limits
from mailmeter.policies.charges import Charge, charges_due
from mailmeter.policies.decision import admit
from mailmeter.policies.invoice import close_period
from mailmeter.policies.money import round_half_up
from mailmeter.policies.parts import ThresholdCharge
from mailmeter.policies.periods import period_containing
from mailmeter.policies.plans import Plan, parse_plan
from mailmeter.policies.pricing import BlockPrice, FlatPrice, GraduatedPrice, Tier, VolumePrice
from tests.policies.test_policy_properties import CENT, charging_plans, money, plan_configs, standings

APRIL_1 = datetime(2026, 4, 1, tzinfo=timezone.utc)


def tier_of(tiers: tuple[Tier, ...], number: int) -> int:
    """The price of email `number` under graduated or volume tiers (its tier's)."""
    low = 0
    for tier in tiers:
        if tier.up_to is None or number <= tier.up_to:
            return tier.per_email
        low = tier.up_to
    raise AssertionError(low)


@dataclass
class RefPart:
    """One plan's part of the period, email by email: (number in the period, limit in force)."""

    plan: Plan
    emails: list[tuple[int, int]] = field(default_factory=list)
    results: list[int] = field(default_factory=lambda: [0, 0, 0])

    def chargeable(self) -> int:
        return sum(1 for number, limit in self.emails if number > limit)

    def cost(self) -> int:
        plan = self.plan
        if plan.billable == "results":
            prices = plan.result_prices
            return sum(
                n * p for n, p in zip(self.results, (prices.delivered, prices.soft_bounced, prices.hard_bounced))
            )
        over = [number for number, limit in self.emails if number > limit]
        price = plan.price
        if isinstance(price, FlatPrice):
            return len(over) * price.per_email
        if isinstance(price, BlockPrice):
            return -(-len(over) // price.block_emails) * price.per_block
        if isinstance(price, GraduatedPrice):
            return sum(tier_of(price.tiers, number) for number in over)
        assert isinstance(price, VolumePrice)
        return len(over) * tier_of(price.tiers, self.emails[-1][0]) if over else 0

    def lines(self) -> int:
        """The part's usage lines as the invoice rounds them: per line, half-up."""
        if self.plan.billable == "results":
            prices = self.plan.result_prices
            each = (prices.delivered, prices.soft_bounced, prices.hard_bounced)
            return sum(round_half_up(n * p, self.plan.currency) for n, p in zip(self.results, each))
        cost = self.cost()
        return round_half_up(cost, self.plan.currency) if (cost or self.emails) else 0

    def charges(self) -> int:
        """The in-period charges the documents' rules make for this part, in micros."""
        plan, charge = self.plan, self.plan.in_period_charge
        if charge is None:
            return 0
        if isinstance(charge, ThresholdCharge):
            return self.cost() // charge.amount * charge.amount
        assert isinstance(plan.price, BlockPrice)
        return -(-self.chargeable() // plan.price.block_emails) * plan.price.per_block


@dataclass
class Reference:
    """The documents' rules: limits in force as they change, each email priced when sent."""

    parts: list[RefPart]
    limit: int
    quota: int | None
    spending: int | None

    @classmethod
    def starting(cls, plan: Plan, standing: Standing) -> Reference:
        return cls(
            [RefPart(plan)],
            plan.included_emails if standing.included_emails_override is None else standing.included_emails_override,
            plan.email_quota if standing.email_quota_override is None else standing.email_quota_override,
            plan.spending_limit if standing.spending_limit_override is None else standing.spending_limit_override,
        )

    @property
    def sent(self) -> int:
        return sum(len(part.emails) for part in self.parts)

    def send(self, emails: int) -> None:
        first = self.sent + 1
        self.parts[-1].emails.extend((number, self.limit) for number in range(first, first + emails))

    def cost(self) -> int:
        return sum(part.cost() for part in self.parts)

    def upgrade(self, plan: Plan) -> None:
        """At once: a new part; the account's own limits give way to the new plan's."""
        self.parts.append(RefPart(plan))
        self.limit, self.quota, self.spending = plan.included_emails, plan.email_quota, plan.spending_limit


SEND = st.tuples(st.just("send"), st.integers(min_value=0, max_value=90))
LIMIT_EVENTS = st.one_of(
    SEND,
    SEND,
    SEND,
    st.tuples(st.just("included"), st.integers(min_value=0, max_value=150)),
    st.tuples(st.just("quota"), st.integers(min_value=0, max_value=500)),
    st.tuples(st.just("spending"), st.integers(min_value=0, max_value=300_000)),
    st.tuples(st.sampled_from(["delivered", "soft_bounced", "hard_bounced"]), st.integers(min_value=0, max_value=40)),
)
PLAN_CHANGE = st.tuples(st.just("plan"), st.integers(min_value=0, max_value=1))
PLAN_EVENTS = st.one_of(LIMIT_EVENTS, PLAN_CHANGE, PLAN_CHANGE)


@dataclass
class Run:
    """The policy functions driven as the meter drives them, next to the reference."""

    plan: Plan
    standing: Standing
    ref: Reference
    usage: Usage = Usage()
    issued: dict[str, Charge] = field(default_factory=dict)
    pending: Any = None
    clock: datetime = APRIL_1 + timedelta(hours=1)
    raised_after_a_charge: bool = False

    @property
    def period(self) -> Any:
        return period_containing(self.plan.period, APRIL_1)

    def tick(self) -> datetime:
        self.clock += timedelta(hours=1)
        return self.clock

    def settle(self) -> None:
        """What the meter's commit does: insert the charges now due, each key once."""
        last = max((charge.index for charge in self.issued.values()), default=0)
        for charge in charges_due(self.plan, self.standing, self.usage, after_index=last):
            assert charge.key not in self.issued, "a charge key was issued twice"
            assert charge.index == last + 1, "charge indexes follow each other"
            self.issued[charge.key] = charge
            last = charge.index

    def apply(self, kind: str, amount: int, plans: list[Plan]) -> None:
        plan, usage, ref = self.plan, self.usage, self.ref
        if kind == "send":
            admission = admit(plan, self.standing, usage, amount)
            assert 0 <= admission.granted <= amount
            if admission.granted < amount:
                assert admission.refusal is not None
                event(f"refused: {admission.refusal.value}")
            before = ref.cost()
            ref.send(admission.granted)
            self.usage = replace(usage, accepted=usage.accepted + admission.granted)
            if admission.granted:
                self.check_caps(before)
            self.settle()
        elif kind in ("included", "quota", "spending"):
            outcome = change_limit(plan, self.standing, usage, kind, amount, self.tick(), self.period)
            self.standing = outcome.standing
            if outcome.history is not None:
                self.usage = replace(usage, history=outcome.history)
            if kind == "included":
                self.raised_after_a_charge |= amount > ref.limit and bool(self.issued)
                ref.limit = max(ref.limit, amount)  # an increase at once, a decrease at period end
            elif kind == "quota":
                ref.quota = None if ref.quota is None else max(ref.quota, amount)
            else:
                ref.spending = amount  # the spending limit moves at once, either way
        elif kind == "plan":
            new = plans[amount]
            switch = switch_plan(plan, new, self.standing, usage, self.period, self.tick(), self.pending)
            event(f"plan change: {switch.kind}{' at once' if switch.at_once else ''}")
            if switch.kind == "upgrade" and switch.at_once:
                self.plan, self.pending = new, None
                self.standing = without_own_limits(self.standing)
                self.usage = replace(usage, history=switch.history)
                ref.upgrade(new)
            elif switch.kind == "cancelled":
                self.pending = None
            elif not switch.at_once:
                self.pending = switch.pending
        else:
            counts = ref.parts[-1].results
            resolved = usage.delivered + usage.soft_bounced + usage.hard_bounced
            taken = min(amount, usage.accepted - resolved)
            counts[("delivered", "soft_bounced", "hard_bounced").index(kind)] += taken
            self.usage = replace(usage, **{kind: getattr(usage, kind) + taken})

    def check_caps(self, cost_before: int) -> None:
        """A grant never takes the account past a cap in force (computed forwards)."""
        ref, plan = self.ref, self.plan
        cost = ref.cost()
        if ref.quota is not None:
            assert ref.sent <= ref.quota
        if cost == cost_before:
            return  # free emails: no money cap is touched
        if plan.billable == "results":
            pending = self.usage.accepted - self.usage.delivered - self.usage.soft_bounced - self.usage.hard_bounced
            cost += pending * plan.result_prices.highest
        if ref.spending is not None:
            assert cost <= ref.spending
        if plan.funding.kind == "prepaid":
            assert cost <= self.standing.prepaid_balance
        allowance = plan.funding.overdraft_allowance
        if allowance is not None:
            charged = sum(charge.amount for charge in self.issued.values())
            assert cost - charged - self.standing.prepaid_balance + self.standing.outstanding_debt <= allowance

    def close(self) -> None:
        """The closing invoice against the reference: lines + charges, per part; never negative."""
        invoice = close_period(self.plan, self.standing, self.usage, self.period, list(self.issued.values()))
        charged = sum(charge.amount for charge in self.issued.values())
        parts = [part for part in self.ref.parts if part.emails or any(part.results) or part is self.ref.parts[-1]]
        assert charged == sum(part.charges() for part in self.ref.parts), "in-period charges differ from the rules"
        assert invoice.usage_total == sum(part.lines() for part in parts)
        assert charged + invoice.total == self.plan.plan_fee + sum(part.lines() for part in parts)
        assert invoice.total >= self.plan.plan_fee >= 0, "an invoice total below the fee (or negative)"
        assert all(line.kind != "charges_kept" for line in invoice.lines)
        assert invoice.amount_due == invoice.total - invoice.prepaid_applied
        headers = [line for line in invoice.lines if line.kind == "plan_part"]
        assert len(headers) == (len(parts) if len(parts) > 1 else 0)


ANY_PLAN = st.one_of(charging_plans(), plan_configs())


@settings(max_examples=300, deadline=None)
@given(ANY_PLAN, standings(), st.lists(LIMIT_EVENTS, min_size=2, max_size=40))
def test_sends_and_limit_changes_bill_what_the_rules_give_and_never_a_negative_total(
    config: dict[str, Any], standing: Standing, events: list[tuple[str, int]]
) -> None:
    plan = parse_plan("random", config)
    run = Run(plan, standing, Reference.starting(plan, standing))
    for kind, amount in events:
        run.apply(kind, amount, [plan])
    if plan.in_period_charge is not None:
        event(f"charges issued: {bool(run.issued)}")
    event(f"limit raised after a charge: {run.raised_after_a_charge}")
    run.close()


@settings(max_examples=200, deadline=None)
@given(
    charging_plans(),
    st.integers(min_value=1, max_value=3_000),
    st.integers(min_value=1, max_value=400),
    st.lists(LIMIT_EVENTS, max_size=20),
)
def test_a_limit_raised_after_charges_were_made_keeps_them_and_their_usage(
    config: dict[str, Any], first_send: int, raise_by: int, events: list[tuple[str, int]]
) -> None:
    """Every charging plan (A's thresholds, D's and E's blocks): charges made, then the
    included emails raised past what was sent or not, then anything."""
    plan = parse_plan("charging", config)
    run = Run(plan, Standing(), Reference.starting(plan, Standing()))
    run.apply("send", first_send, [plan])
    assume(run.issued)
    run.apply("included", run.ref.limit + raise_by, [plan])
    event(f"raised past what was sent: {run.ref.limit > run.usage.accepted}")
    for kind, amount in events:
        run.apply(kind, amount, [plan])
    run.close()


@st.composite
def plan_pairs(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two plans an account may move between (the same periods, billing the same thing);
    half the time the second is the first made bigger: a fee and more included emails."""
    first = draw(ANY_PLAN)
    if draw(st.booleans()):
        second = draw(ANY_PLAN)
        assume(("billable" in second) == ("billable" in first))
        return first, second
    second = dict(first)
    second["plan_fee"] = money(draw(st.integers(min_value=1, max_value=2_000)) * CENT)
    if "billable" not in first:
        second["included_emails"] = first.get("included_emails", 0) + draw(st.integers(min_value=0, max_value=80))
        if draw(st.booleans()):
            second["price"] = draw(charging_plans())["price"] if "in_period_charge" not in first else first["price"]
    return first, second


@settings(max_examples=250, deadline=None)
@given(plan_pairs(), standings(), st.lists(PLAN_EVENTS, min_size=2, max_size=40))
def test_plan_changes_bill_each_part_under_its_plan_and_never_a_negative_total(
    configs: tuple[dict[str, Any], dict[str, Any]], standing: Standing, events: list[tuple[str, int]]
) -> None:
    plans = [parse_plan("first", configs[0]), parse_plan("second", configs[1])]
    run = Run(plans[0], standing, Reference.starting(plans[0], standing))
    for kind, amount in events:
        run.apply(kind, amount, plans)
    event(f"parts: {len(run.ref.parts)}")
    run.close()


def test_the_reference_agrees_with_the_documents_on_model_e(plan_e: Plan) -> None:
    """The reference itself, on the issue's example: 52,000 sent, the limit raised to 60,000."""
    ref = Reference.starting(plan_e, Standing())
    ref.send(52_000)
    ref.limit = 60_000
    assert (ref.parts[0].chargeable(), ref.parts[0].charges(), ref.parts[0].lines()) == (2_000, 10**6, 10**6)
    ref.send(14_000)
    assert (ref.parts[0].chargeable(), ref.parts[0].charges()) == (8_000, 2 * 10**6)
    assert CENT == 10_000

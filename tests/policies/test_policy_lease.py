"""admit_lease: a node's block of an account's allowance, decided like any hold.

The property that matters for the no-overspend guarantee: a lease admits nothing
that `admit` would not (it is `admit` of the request plus a block), and it serves
the request exactly as `admit` of the request alone would.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from mailmeter.policies.account import Standing, Usage
from mailmeter.policies.decision import Refusal, admit, headroom
from mailmeter.policies.lease import LEASE_SHARE, admit_lease, lease_block
from mailmeter.policies.plans import Plan, parse_plan
from tests.policies.test_policy_properties import plan_configs, standings


def test_block_is_full_while_the_room_is_large() -> None:
    assert lease_block(None, 1, 50) == 50
    assert lease_block(10_000, 1, 50) == 50
    assert lease_block(1_000, 1, 50) == 50  # 999 // 8 = 124


def test_block_shrinks_to_a_share_of_what_is_left() -> None:
    assert lease_block(200, 1, 50) == 199 // LEASE_SHARE == 24
    assert lease_block(9, 1, 50) == 1
    assert lease_block(8, 1, 50) == 0  # near the end, only what sessions ask for
    assert lease_block(0, 1, 50) == 0


def test_no_block_when_leasing_is_off() -> None:
    assert lease_block(None, 1, 0) == 0


def test_a_quota_is_never_leased_past() -> None:
    plan = parse_plan("quota", {"email_quota": 1_000, "funding": {"kind": "postpaid"}})
    standing = Standing()
    assert admit_lease(plan, standing, Usage(), 1, 50).granted == 51
    assert admit_lease(plan, standing, Usage(accepted=997), 1, 50).granted == 1  # 2 left after it: no block
    full = admit_lease(plan, standing, Usage(accepted=990, reserved=10), 1, 50)
    assert full.granted == 0 and full.refusal == Refusal.QUOTA_EXHAUSTED


def test_a_blocked_account_gets_no_lease(plan_a: Plan) -> None:
    admission = admit_lease(plan_a, Standing(payment_ok=False), Usage(), 1, 50)
    assert admission.granted == 0 and admission.refusal == Refusal.PAYMENT_FAILED


def test_a_prepaid_balance_bounds_the_lease(plan_b: Plan) -> None:
    standing = Standing(prepaid_balance=11_000_000)  # $11: 11,000 emails at $1.00 per 1,000
    room, _ = headroom(plan_b, standing, Usage())
    assert room == 11_000
    admission = admit_lease(plan_b, standing, Usage(), 1, 100_000)
    assert admission.granted == 1 + 10_999 // 8 and admission.refusal is None


@settings(max_examples=300, deadline=None)
@given(
    plan_configs(),
    standings(),
    st.integers(min_value=0, max_value=700),
    st.integers(min_value=0, max_value=700),
    st.integers(min_value=0, max_value=20),
    st.integers(min_value=0, max_value=200),
)
def test_a_lease_admits_nothing_admit_would_not(
    config: dict[str, Any], standing: Standing, accepted: int, reserved: int, requested: int, block: int
) -> None:
    plan = parse_plan("random", config)
    usage = Usage(accepted=accepted, reserved=reserved)
    leased = admit_lease(plan, standing, usage, requested, block)
    alone = admit(plan, standing, usage, requested)
    room, _ = headroom(plan, standing, usage)
    # the request is served exactly as admit alone serves it, refusal included
    assert min(leased.granted, requested) == alone.granted
    assert (leased.refusal is None) == (alone.refusal is None)
    # the block never exceeds itself, nor the room
    assert leased.granted <= requested + block
    if room is not None:
        assert leased.granted <= room
        assert leased.granted - min(leased.granted, requested) <= max(room - requested, 0) // LEASE_SHARE
    # and what it grants, admit would grant as one request
    assert admit(plan, standing, usage, leased.granted).granted == leased.granted

"""Unit prices: the closed forms agree with pricing every email one by one."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailmeter.policies.pricing import (
    BlockPrice,
    FlatPrice,
    GraduatedPrice,
    Tier,
    UnitPrice,
    VolumePrice,
    cost,
    cost_ceiling,
    first_email_reaching,
    is_monotone,
    max_emails_within,
)

LIMIT = 300  # brute force looks at emails 0..LIMIT


@st.composite
def tiers(draw: st.DrawFn) -> tuple[Tier, ...]:
    bounds = sorted(draw(st.sets(st.integers(min_value=1, max_value=200), max_size=3)))
    prices = draw(st.lists(st.integers(min_value=0, max_value=50), min_size=len(bounds) + 1, max_size=len(bounds) + 1))
    return tuple(Tier(up_to, price) for up_to, price in zip([*bounds, None], prices))


def prices() -> st.SearchStrategy[UnitPrice]:
    return st.one_of(
        st.builds(FlatPrice, st.integers(min_value=0, max_value=50)),
        st.builds(GraduatedPrice, tiers()),
        st.builds(VolumePrice, tiers()),
        st.builds(BlockPrice, st.integers(min_value=1, max_value=30), st.integers(min_value=0, max_value=100)),
    )


def tier_price(tiers_: tuple[Tier, ...], ordinal: int) -> int:
    for tier in tiers_:
        if tier.up_to is None or ordinal <= tier.up_to:
            return tier.per_email
    raise AssertionError


def brute_cost(price: UnitPrice, emails: int, included: int) -> int:
    """Price the emails one at a time, the slow obvious way."""
    chargeable = max(emails - included, 0)
    if isinstance(price, FlatPrice):
        return sum(price.per_email for _ in range(chargeable))
    if isinstance(price, GraduatedPrice):
        return sum(tier_price(price.tiers, i) for i in range(included + 1, emails + 1))
    if isinstance(price, VolumePrice):
        return chargeable * tier_price(price.tiers, emails) if emails else 0
    blocks = 0
    for i in range(1, chargeable + 1):
        if (i - 1) % price.block_emails == 0:
            blocks += 1
    return blocks * price.per_block


@settings(max_examples=150, deadline=None)
@given(prices(), st.integers(min_value=0, max_value=60), st.integers(min_value=-5, max_value=3_000))
def test_closed_forms_match_brute_force(price: UnitPrice, included: int, budget: int) -> None:
    costs = [brute_cost(price, n, included) for n in range(LIMIT + 1)]
    ceiling = 0
    for n, exact in enumerate(costs):
        ceiling = max(ceiling, exact)
        assert cost(price, n, included) == exact
        assert cost_ceiling(price, n, included) == ceiling
    if is_monotone(price):
        assert costs == sorted(costs)
    most = max_emails_within(price, budget, included)
    first_over = next((n for n, c in enumerate(costs) if c > budget), None)
    if budget < 0:
        assert most == 0
    elif first_over is not None:
        assert most == first_over - 1
    elif most is not None:
        assert most >= LIMIT and cost_ceiling(price, most, included) <= budget < cost(price, most + 1, included)
    if is_monotone(price) and budget >= 1:
        reach = first_email_reaching(price, budget, included)
        first_reaching = next((n for n, c in enumerate(costs) if c >= budget), None)
        if first_reaching is not None:
            assert reach == first_reaching
        elif reach is not None:
            assert cost(price, reach, included) >= budget > cost(price, reach - 1, included)


def test_none_means_the_price_stops_growing() -> None:
    assert max_emails_within(FlatPrice(0), 10, 5) is None
    assert max_emails_within(GraduatedPrice((Tier(10, 1), Tier(None, 0))), 100, 0) is None
    assert max_emails_within(GraduatedPrice((Tier(10, 1), Tier(None, 0))), 5, 0) == 5


def test_volume_price_can_fall_so_caps_hold_for_every_smaller_count() -> None:
    price = VolumePrice((Tier(999, 1_000_000), Tier(None, 900_000)))
    assert cost(price, 999, 0) > cost(price, 1_000, 0)
    # $950 cannot cover 999 emails at $1, even though 1,000 at $0.90 would fit
    assert max_emails_within(price, 950_000_000, 0) == 950


@pytest.mark.parametrize("emails", [0, 1, 10**9])
def test_large_counts_are_instant(emails: int) -> None:
    price = GraduatedPrice((Tier(100_000, 1_000), Tier(1_000_000, 800), Tier(None, 500)))
    budget = cost(price, emails, 10_000)
    assert max_emails_within(price, budget, 10_000) >= emails  # type: ignore[operator]


def test_a_budget_that_exactly_fills_a_tier_continues_into_the_next() -> None:
    price = GraduatedPrice((Tier(10, 5), Tier(None, 1)))
    assert max_emails_within(price, 50, 0) == 10
    assert max_emails_within(price, 52, 0) == 12
    # 4 included: emails 5-10 cost 6 x 5 = 30, the 22 left buy emails 11-32 at 1 each
    assert max_emails_within(price, 52, 4) == 32
    assert cost(price, 32, 4) == 52

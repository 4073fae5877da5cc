"""Model C's result categories: every row of docs/delivery-results.md against the code."""

from __future__ import annotations

import pytest

from mailmeter.policies.results import BY_REPLY_CODE, PERMANENT, ResultClass, classify, classify_failure, parse_enhanced
from mailmeter.relay.dsn import reply_codes
from tests.result_rows import Row, rows

ROWS = rows()


def test_the_doc_has_every_row_the_code_knows() -> None:
    """Every 5.Y.Z the code maps and every specific reply code is a row of the doc's tables."""
    documented = {reply_codes(row.reply) for row in ROWS}
    enhanced = {e for _, e in documented if e is not None}
    assert {f"5.{subject}.{detail}" for subject, detail in PERMANENT} <= enhanced
    assert set(BY_REPLY_CODE) <= {code for code, e in documented if e is None}
    assert {"2", "4", "5"} <= {e[0] for e in enhanced}  # every class
    assert len(ROWS) >= 100


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.reply[:9])
def test_each_documented_reply_bills_as_the_doc_says(row: Row) -> None:
    code, enhanced = reply_codes(row.reply)
    if row.code < 300:
        verdict = "delivered"
    elif row.code < 500 or (row.code == 552 and enhanced is not None and enhanced.endswith(".5.3")):
        verdict = "soft_bounced"  # retried until delivery.max_age
    else:
        verdict = "hard_bounced"  # refused for good
    assert classify(verdict, code, enhanced) == ResultClass(row.category, row.reason)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("552 5.2.2 Mailbox full", ResultClass("soft_bounced", "mailbox_full")),
        ("552 5.3.4 Message too big", ResultClass("soft_bounced", "message_too_large")),
        ("550 5.1.1 No such user", ResultClass("hard_bounced", "not_exist")),
        ("552 Mailbox full", ResultClass("soft_bounced", "mailbox_full")),
        ("550 2.0.0 contradictory", ResultClass("hard_bounced", "not_exist")),  # a success code on a failure: ignored
        ("554 5.1.99 unlisted detail", ResultClass("hard_bounced", "not_exist")),  # as its subject's 5.1.0
    ],
)
def test_the_issue_examples_a_permanent_refusal_can_be_a_soft_bounce(reply: str, expected: ResultClass) -> None:
    code, enhanced = reply_codes(reply)
    assert classify_failure(code, enhanced, permanent=True) == expected


def test_a_failure_retried_until_it_expired_is_always_a_soft_bounce() -> None:
    assert classify("soft_bounced", 450, "4.1.1") == ResultClass("soft_bounced", "server_unavailable")
    assert classify("soft_bounced", 452, "4.2.2") == ResultClass("soft_bounced", "mailbox_full")
    assert classify("soft_bounced", None, None) == ResultClass("soft_bounced", "server_unavailable")
    assert classify("deferred", 450, "4.2.2") is None  # not final yet


def test_a_permanent_refusal_without_any_code_is_a_reject() -> None:
    assert classify("hard_bounced", None, None) == ResultClass("hard_bounced", "reject")


@pytest.mark.parametrize("text", ["", "5.2", "5.2.2.", "6.1.1", "x.1.1", "5.1234.1"])
def test_parse_enhanced_refuses_what_is_not_a_status_code(text: str) -> None:
    assert parse_enhanced(text) is None


def test_reply_codes_reads_only_the_start_of_a_reply() -> None:
    assert reply_codes("552 5.2.2 Mailbox full") == (552, "5.2.2")
    assert reply_codes("550-5.1.1 first line\n5.1.1 second") == (550, "5.1.1")
    assert reply_codes("550 No such user") == (550, None)
    assert reply_codes("250") == (250, None)
    assert reply_codes("connection to 10.1.2.3:25 failed: 4.4.1") == (None, None)

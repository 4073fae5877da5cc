"""relay/replies.py's texts that are built from their parts: the suppressed recipient's 550."""

from __future__ import annotations

from mailmeter.relay.replies import recipient_suppressed


def test_the_suppressed_reply_says_when_why_and_how_to_lift_it_within_one_reply_line() -> None:
    reply = recipient_suppressed("a@b.test", "app", "2026-12-01T03:04:05+00:00", "not_exist")
    assert reply == (
        "550 5.1.1 <a@b.test> is suppressed for this account: it hard-bounced on 2026-12-01"
        " (the address does not exist); remove it with DELETE /v1/account/suppressions/a@b.test"
        " (account API) or mailmeter suppression remove app a@b.test"
    )
    assert "(the address is malformed)" in recipient_suppressed("a@b.test", "app", "2026-12-01", "format_error")
    longest = "a" * 64 + "@" + "b" * 185 + ".test"  # 255 octets
    reply = recipient_suppressed(longest, "x" * 128, "2026-12-01", "not_exist")
    assert len(reply.encode()) + 2 <= 512  # RFC 5321 4.5.3.1.5, with its CRLF
    assert reply.startswith(f"550 5.1.1 <{longest}> is suppressed") and reply.endswith("does not exist)")

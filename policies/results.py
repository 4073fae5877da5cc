"""What a delivery result bills as: its category and sub-type, from what the failure means.

Model C bills every accepted email by its final delivery result: Delivered, Soft Bounce
(a temporary failure: mailbox full, server unavailable, message too large) or Invalid
Email (a permanent one: format error, does not exist, rejected, junk). Whether the relay
*retries* a failure is a different question, answered by the reply code alone (RFC 5321:
4yz is transient, 5yz permanent): a `552 5.2.2` (mailbox full) is not retried, and is
still a Soft Bounce, because a full mailbox is a temporary condition of the mailbox,
not a bad address.

So the category comes from the meaning of the reply: the enhanced status code first
(RFC 3463 and the IANA registry that extends it: class.subject.detail), then the reply
code (RFC 5321, RFC 7504) when there is no enhanced code or it says nothing (X.0.0).
`docs/delivery-results.md` has the whole mapping as a table; tests hold the two together.

The category names are the usage counters' (`hard_bounced` is the document's "Invalid
Email"); the sub-types are the document's examples, in snake case.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Category = Literal["delivered", "soft_bounced", "hard_bounced"]
Reason = Literal[
    "",
    "mailbox_full",
    "message_too_large",
    "server_unavailable",
    "format_error",
    "not_exist",
    "reject",
    "junk_mail",
    "deleted_by_operator",
]

SOFT_REASONS: tuple[Reason, ...] = ("mailbox_full", "message_too_large", "server_unavailable")
INVALID_REASONS: tuple[Reason, ...] = ("format_error", "not_exist", "reject", "junk_mail")
# Invalid Email sub-types that say the address itself is bad: sending to it again can only
# bounce again, so it goes on the account's suppression list (a "reject" or "junk_mail" is
# about the message or the sender, and may pass another time).
SUPPRESSING_REASONS: tuple[Reason, ...] = ("not_exist", "format_error")


def suppresses(category: str, reason: str) -> bool:
    """Whether a final result puts its recipient on the account's suppression list."""
    return category == "hard_bounced" and reason in SUPPRESSING_REASONS


@dataclass(frozen=True)
class ResultClass:
    """A final result's billing category and its sub-type ("" for Delivered)."""

    category: Category
    reason: Reason


DELIVERED = ResultClass("delivered", "")
# Not a reply's meaning: the operator deleted the message from the queue (`mailmeter queue
# delete`) before it had a final result. A Soft Bounce: the address was never judged bad.
DELETED_BY_OPERATOR = ResultClass("soft_bounced", "deleted_by_operator")


def _soft(reason: Reason) -> ResultClass:
    return ResultClass("soft_bounced", reason)


def _invalid(reason: Reason) -> ResultClass:
    return ResultClass("hard_bounced", reason)


# 5.subject.detail -> what a permanent failure with that meaning bills as. A detail not
# listed counts as its subject's X.subject.0; subject 0 (and any unknown subject) says
# nothing, so the reply code decides.
PERMANENT: dict[tuple[int, int], ResultClass] = {
    # X.1: addressing
    (1, 0): _invalid("not_exist"),  # other address status
    (1, 1): _invalid("not_exist"),  # bad destination mailbox address
    (1, 2): _invalid("not_exist"),  # bad destination system address
    (1, 3): _invalid("format_error"),  # bad destination mailbox address syntax
    (1, 4): _invalid("not_exist"),  # destination mailbox address ambiguous
    (1, 6): _invalid("not_exist"),  # mailbox has moved, no forwarding address
    (1, 7): _invalid("format_error"),  # bad sender's mailbox address syntax
    (1, 8): _invalid("reject"),  # bad sender's system address
    (1, 10): _invalid("not_exist"),  # recipient address has null MX (RFC 7505)
    # X.2: mailbox
    (2, 0): _invalid("reject"),  # other or undefined mailbox status
    (2, 1): _invalid("reject"),  # mailbox disabled, not accepting messages
    (2, 2): _soft("mailbox_full"),  # mailbox full
    (2, 3): _soft("message_too_large"),  # message length exceeds administrative limit
    (2, 4): _invalid("reject"),  # mailing list expansion problem
    # X.3: mail system
    (3, 0): _soft("server_unavailable"),  # other or undefined mail system status
    (3, 1): _soft("mailbox_full"),  # mail system full
    (3, 2): _soft("server_unavailable"),  # system not accepting network messages
    (3, 3): _invalid("reject"),  # system not capable of selected features
    (3, 4): _soft("message_too_large"),  # message too big for system
    (3, 5): _soft("server_unavailable"),  # system incorrectly configured
    # X.4: network and routing
    (4, 0): _soft("server_unavailable"),  # other or undefined network or routing status
    (4, 1): _soft("server_unavailable"),  # no answer from host
    (4, 2): _soft("server_unavailable"),  # bad connection
    (4, 3): _soft("server_unavailable"),  # directory server failure
    (4, 4): _invalid("not_exist"),  # unable to route
    (4, 5): _soft("server_unavailable"),  # mail system congestion
    (4, 6): _soft("server_unavailable"),  # routing loop detected
    (4, 7): _soft("server_unavailable"),  # delivery time expired
    # X.5: mail delivery protocol
    (5, 0): _invalid("reject"),  # other or undefined protocol status
    (5, 1): _invalid("reject"),  # invalid command
    (5, 2): _invalid("format_error"),  # syntax error
    (5, 3): _soft("server_unavailable"),  # too many recipients
    (5, 4): _invalid("format_error"),  # invalid command arguments
    (5, 5): _invalid("reject"),  # wrong protocol version
    (5, 6): _invalid("reject"),  # authentication exchange line is too long (RFC 4954)
    # X.6: message content or media
    (6, 0): _invalid("reject"),  # other or undefined media error
    (6, 1): _invalid("reject"),  # media not supported
    (6, 2): _invalid("reject"),  # conversion required and prohibited
    (6, 3): _invalid("reject"),  # conversion required but not supported
    (6, 5): _invalid("reject"),  # conversion failed
    (6, 6): _invalid("reject"),  # message content not available (RFC 4468)
    (6, 7): _invalid("reject"),  # non-ASCII addresses not permitted for that recipient (RFC 6531)
    (6, 8): _invalid("reject"),  # UTF-8 string reply required, not permitted by the client (RFC 6531)
    (6, 9): _invalid("reject"),  # UTF-8 header message cannot be transferred (RFC 6531)
    # X.7: security or policy
    (7, 0): _invalid("reject"),  # other or undefined security status
    (7, 1): _invalid("reject"),  # delivery not authorized, message refused
    (7, 2): _invalid("reject"),  # mailing list expansion prohibited
    (7, 3): _invalid("reject"),  # security conversion required but not possible
    (7, 4): _invalid("reject"),  # security features not supported
    (7, 5): _invalid("reject"),  # cryptographic failure
    (7, 6): _invalid("reject"),  # cryptographic algorithm not supported
    (7, 7): _invalid("reject"),  # message integrity failure
    (7, 8): _invalid("reject"),  # authentication credentials invalid (RFC 4954)
    (7, 9): _invalid("reject"),  # authentication mechanism is too weak (RFC 4954)
    (7, 10): _invalid("reject"),  # encryption needed (RFC 5248)
    (7, 11): _invalid("reject"),  # encryption required for requested authentication mechanism
    (7, 12): _invalid("reject"),  # a password transition is needed (RFC 4954)
    (7, 13): _invalid("reject"),  # user account disabled (RFC 5248)
    (7, 14): _invalid("reject"),  # trust relationship required (RFC 5248)
    (7, 15): _invalid("reject"),  # priority level is too low (RFC 6710)
    (7, 16): _soft("message_too_large"),  # message is too big for the specified priority (RFC 6710)
    (7, 17): _invalid("not_exist"),  # mailbox owner has changed (RFC 7293)
    (7, 18): _invalid("not_exist"),  # domain owner has changed (RFC 7293)
    (7, 19): _invalid("reject"),  # RRVS test cannot be completed (RFC 7293)
    (7, 20): _invalid("junk_mail"),  # no passing DKIM signature found (RFC 7372)
    (7, 21): _invalid("junk_mail"),  # no acceptable DKIM signature found (RFC 7372)
    (7, 22): _invalid("junk_mail"),  # no valid author-matched DKIM signature found (RFC 7372)
    (7, 23): _invalid("junk_mail"),  # SPF validation failed (RFC 7372)
    (7, 24): _invalid("junk_mail"),  # SPF validation error (RFC 7372)
    (7, 25): _invalid("junk_mail"),  # reverse DNS validation failed (RFC 7372)
    (7, 26): _invalid("junk_mail"),  # multiple authentication checks failed (RFC 7372)
    (7, 27): _invalid("reject"),  # sender address has null MX (RFC 7505)
    (7, 28): _invalid("junk_mail"),  # mail flood detected (IANA registry)
    (7, 29): _invalid("junk_mail"),  # ARC validation failure (RFC 8617)
    (7, 30): _invalid("reject"),  # REQUIRETLS support required (RFC 8689)
}

# Reply codes (no enhanced code, or one that says nothing) whose meaning is specific.
# Other 4yz are Soft Bounce / server_unavailable, other 5yz Invalid Email / reject.
BY_REPLY_CODE: dict[int, ResultClass] = {
    452: _soft("mailbox_full"),  # insufficient system storage
    501: _invalid("format_error"),  # syntax error in parameters or arguments (the address)
    521: _invalid("not_exist"),  # host does not accept mail (RFC 7504)
    550: _invalid("not_exist"),  # mailbox unavailable (not found, no access)
    551: _invalid("not_exist"),  # user not local
    552: _soft("mailbox_full"),  # exceeded storage allocation
    553: _invalid("format_error"),  # mailbox name not allowed (syntax)
    554: _invalid("reject"),  # transaction failed
    556: _invalid("not_exist"),  # domain does not accept mail (RFC 7504)
}

# What a temporary failure's sub-type is, when its enhanced code names the condition.
_TRANSIENT_REASON: dict[tuple[int, int], Reason] = {
    (2, 2): "mailbox_full",
    (3, 1): "mailbox_full",
    (2, 3): "message_too_large",
    (3, 4): "message_too_large",
    (7, 16): "message_too_large",
}

_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})")


def parse_enhanced(enhanced: str | None) -> tuple[int, int, int] | None:
    """(class, subject, detail) of an enhanced status code like "5.2.2"; None if it is not one."""
    if not enhanced:
        return None
    match = _ENHANCED.fullmatch(enhanced.strip())
    if match is None:
        return None
    klass, subject, detail = (int(part) for part in match.groups())
    return klass, subject, detail


def _by_reply_code(code: int | None) -> ResultClass | None:
    if code is None or not 400 <= code < 600:
        return None
    known = BY_REPLY_CODE.get(code)
    if known is not None:
        return known
    return _soft("server_unavailable") if code < 500 else _invalid("reject")


def _transient_reason(code: int | None, parsed: tuple[int, int, int] | None) -> Reason:
    if parsed is not None and parsed[0] in (4, 5):
        reason = _TRANSIENT_REASON.get(parsed[1:])
        if reason is not None:
            return reason
        if parsed[1] != 0:
            return "server_unavailable"
    by_code = _by_reply_code(code)
    if by_code is not None and by_code.category == "soft_bounced":
        return by_code.reason
    return "server_unavailable"


def classify_failure(code: int | None, enhanced: str | None, *, permanent: bool) -> ResultClass:
    """The billing category of a recipient that was not delivered.

    code / enhanced: the upstream's reply code and enhanced status code ("5.2.2"), either
    may be None (a connection that failed has neither).
    permanent: the relay refused it for good (not retried); False for a recipient whose
    temporary failures lasted until the queue's maximum age, or that is still deferred.
    A temporary failure is always a Soft Bounce; only its sub-type depends on the codes.
    """
    parsed = parse_enhanced(enhanced)
    if not permanent or (parsed is not None and parsed[0] == 4):
        return _soft(_transient_reason(code, parsed))
    if parsed is not None and parsed[0] == 5 and parsed[1] != 0:
        subject, detail = parsed[1], parsed[2]
        known = PERMANENT.get((subject, detail)) or PERMANENT.get((subject, 0))
        if known is not None:
            return known
    by_code = _by_reply_code(code)
    if by_code is not None:
        return by_code
    return _invalid("reject")  # refused for good, with no code that says why


def classify(delivery: str, code: int | None, enhanced: str | None) -> ResultClass | None:
    """A delivery verdict's billing category; None while it is not final (deferred).

    delivery: the relay's verdict: delivered, deferred, soft_bounced (temporary failures
    until the queue's maximum age), hard_bounced (refused permanently, not retried) or
    deleted (the operator deleted the message from the queue: a Soft Bounce).
    """
    if delivery == "delivered":
        return DELIVERED
    if delivery == "deferred":
        return None
    if delivery == "deleted":
        return DELETED_BY_OPERATOR
    if delivery not in ("soft_bounced", "hard_bounced"):
        raise ValueError(f"unknown delivery verdict {delivery!r}")
    return classify_failure(code, enhanced, permanent=delivery == "hard_bounced")


__all__ = [
    "BY_REPLY_CODE",
    "DELETED_BY_OPERATOR",
    "DELIVERED",
    "INVALID_REASONS",
    "SUPPRESSING_REASONS",
    "PERMANENT",
    "SOFT_REASONS",
    "Category",
    "Reason",
    "ResultClass",
    "classify",
    "classify_failure",
    "parse_enhanced",
    "suppresses",
]

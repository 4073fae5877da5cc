"""Every SMTP reply the relay gives for a policy or system reason, in one place.

One text per reason, each saying why and what the sender must do; docs/smtp-replies.md lists
them. The codes are 4xx so a client's queue pauses and retries later.
"""

from __future__ import annotations

from mailmeter.policies.decision import Refusal

# Account-state refusals. At MAIL the whole transaction is deferred (451); at RCPT
# only that recipient is (452), so a partial acceptance keeps the recipients that fit.
_REFUSAL_TEXT: dict[Refusal, str] = {
    Refusal.QUOTA_EXHAUSTED: "4.7.1 Email quota for this billing period is used up;"
    " retry after the period renews or ask your provider to raise the plan's quota",
    Refusal.BALANCE_EXHAUSTED: "4.7.1 Prepaid balance is used up; top up the balance (mailmeter balance add) and retry",
    Refusal.SPENDING_LIMIT: "4.7.1 Spending limit for this billing period is reached;"
    " raise the spending limit or upgrade the plan, then retry",
    Refusal.OVERDRAFT_LIMIT: "4.7.1 Overdraft allowance is used up;"
    " repay the overdrawn amount (mailmeter repay) and retry",
    Refusal.PAYMENT_FAILED: "4.7.1 Sending is paused because a payment failed;"
    " update the payment method and sending resumes at once",
    Refusal.SUSPENDED: "4.7.1 Sending is suspended for this account; contact your provider",
}


def refusal_text(reason: str) -> str:
    try:
        return _REFUSAL_TEXT[Refusal(reason)]
    except (ValueError, KeyError):
        return f"4.7.1 Sending is not allowed right now ({reason}); retry later"


def mail_refused(reason: str) -> str:
    return f"451 {refusal_text(reason)}"


def rcpt_refused(reason: str) -> str:
    return f"452 {refusal_text(reason)}"


def rate_reached(rate: str, account: str, retry_after: int) -> str:
    """A recipient past the account's sending rate (policies/rate.py): 451, with when to retry."""
    return f"451 4.7.1 Sending rate {rate} reached for account {account}; retry after {retry_after} s"


AUTH_REQUIRED = "530 5.7.0 Authentication required: AUTH with your account's credentials"
# A listener with `auth: none` takes mail only from networks bound to an account.
NETWORK_NOT_BOUND = (
    "550 5.7.1 Relay access denied: this port takes mail only from networks bound to an account;"
    " send from a bound network, or use a port that offers AUTH"
)
AUTH_NOT_OFFERED = "502 5.5.1 AUTH is not offered on this port; use the submission port"
AUTH_TEMPFAIL = "454 4.7.0 Temporary authentication failure; retry later"
# RFC 4954 4: the account of an open transaction cannot change under its recipients.
AUTH_IN_TRANSACTION = "503 5.5.1 AUTH not permitted during a mail transaction; send AUTH before MAIL, or RSET first"
AUTH_LINE_TOO_LONG = "500 5.5.6 Authentication Exchange line is too long"
METER_UNAVAILABLE = "451 4.3.0 Metering is temporarily unavailable; retry later"
SPOOL_FULL = "452 4.3.1 Insufficient system storage; retry later"
SPOOL_FAILED = "451 4.3.0 Could not store the message; retry later"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients for one message (limit {limit}); send the rest in another message"
SENDER_OK = "250 2.1.0 Sender OK"
# Abuse limits (relay/abuse.py) and session limits. 421 replies close the connection.
AUTH_LOCKED_CLIENT = (
    "454 4.7.0 Too many failed authentication attempts from your address;"
    " authentication is locked for {seconds} more seconds"
)
AUTH_LOCKED_LOGIN = (
    "454 4.7.0 Too many failed authentication attempts for this login;"
    " authentication is locked for {seconds} more seconds"
)
TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections from your address; retry later"
SHUTTING_DOWN = "421 4.3.2 {hostname} Service shutting down; retry later"
IDLE_TIMEOUT = "421 4.4.2 {hostname} Idle timeout exceeded; closing connection"
SESSION_TIME_LIMIT = "421 4.4.2 {hostname} Session time limit exceeded; closing connection"
BARE_NEWLINE = "500 5.5.2 Message refused: bare CR or LF in DATA; lines must end with CRLF (RFC 5321 2.3.8)"
ADDRESS_INVALID = "553 5.1.3 Address cannot be relayed: bad syntax, control characters or not UTF-8"
ADDRESS_NEEDS_SMTPUTF8 = "553 5.6.7 Non-ASCII address requires MAIL FROM with the SMTPUTF8 parameter"
# DATA without a recipient taken (RFC 2920 3.1: a pipelined DATA after refused RCPTs).
NO_VALID_RECIPIENTS = "554 5.5.1 Error: no valid recipients"
NEED_MAIL = "503 5.5.1 Error: need MAIL command"
INTERNAL_ERROR = "451 4.3.0 Internal error; retry later"
RECIPIENT_OK = "250 2.1.5 Recipient OK"
QUEUED = "250 2.0.0 Ok: queued as {queue_id}"


SUPPRESSED = "suppressed"  # the meter's refusal of a recipient on the account's suppression list
# Why a recipient was suppressed, by the Invalid Email sub-type of its bounce (policies/results.py).
_SUPPRESSED_WHY = {"not_exist": "the address does not exist", "format_error": "the address is malformed"}


def recipient_suppressed(address: str, account: str, since: str, reason: str) -> str:
    """RCPT of a recipient the account's mail hard-bounced to as Invalid Email: permanent (5xx),
    so the client drops it rather than retries; it says when, why, and how to lift it."""
    why = _SUPPRESSED_WHY.get(reason, reason or "an Invalid Email bounce")
    reply = f"550 5.1.1 <{address}> is suppressed for this account: it hard-bounced on {since[:10]} ({why})"
    hint = (
        f"; remove it with DELETE /v1/account/suppressions/{address} (account API)"
        f" or mailmeter suppression remove {account} {address}"
    )
    # A reply line is at most 512 octets with its CRLF (RFC 5321 4.5.3.1.5): a long address keeps the reason.
    return reply + hint if len((reply + hint).encode()) <= 510 else reply


def sender_not_allowed(address: str, account: str) -> str:
    return (
        f"550 5.7.1 Sender <{address}> is not in the sender domains of account {account};"
        " send from one of the account's domains"
    )


def all_refusal_texts() -> dict[str, str]:
    """For docs/smtp-replies.md and tests: every refusal reason and its reply text."""
    return {reason.value: text for reason, text in _REFUSAL_TEXT.items()}

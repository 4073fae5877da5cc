"""The admin API's OpenAPI 3.1 document, written by hand and served at GET /openapi.json.

It is the contract for API clients, so it lives next to the routes and a test
checks that every aiohttp route is in it and every path in it is a route.
Money is a decimal string everywhere (`Money`), never a JSON number.
"""

from __future__ import annotations

from typing import Any

JSON = "application/json"


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    meaning = {
        400: "Bad request: the message names the field and the fix",
        401: "Missing or wrong credentials",
        404: "Not found: the message says where to look",
        409: "Conflict with the current state",
        503: "The database (or the feature) is unavailable; retry",
    }
    return {str(code): _json(_ref("Error"), meaning[code]) for code in codes}


def _op(
    summary: str,
    response: dict[str, Any],
    *,
    body: dict[str, Any] | None = None,
    params: list[dict[str, Any]] | None = None,
    errors: tuple[int, ...] = (401, 503),
    status: int = 200,
    public: bool = False,
) -> dict[str, Any]:
    if not public and 400 not in errors:  # any route: a path or query parameter that is not text
        errors = (400, *errors)
    operation: dict[str, Any] = {
        "summary": summary,
        "responses": {str(status): response, **_errors(*errors)},
    }
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {JSON: {"schema": body}}}
    if params:
        operation["parameters"] = params
    if public:
        operation["security"] = []
    return operation


# Text the API takes: no control characters but TAB (a 400 names the field otherwise).
TEXT = {"type": "string", "pattern": "^[^\\x00-\\x08\\x0a-\\x1f\\x7f]*$"}


def _path(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": TEXT}


ACCOUNT = _path("name", "The account name")
QUEUE_ID = _path("id", "The message's queue id (`queue list`)")
MONEY = {
    "type": "string",
    "pattern": r"^-?[0-9]+(\.[0-9]+)?$",
    "examples": ["25.00", "2500", "25.000"],
    "description": "An amount of billing.currency as a decimal string (never a JSON number), in its minor"
    ' units: USD "25.00", JPY "2500", BHD "25.000"; an amount sent with more decimals'
    " than the currency has is refused",
}
OPTIONAL_MONEY = {"oneOf": [_ref("Money"), {"type": "null"}]}
COUNT = {"type": "integer", "minimum": 0}
ANY_OBJECT = {"type": "object", "additionalProperties": True}
ADDRESS = _path("address", "An email address (case does not matter)")
LIMIT = {
    "name": "limit",
    "in": "query",
    "required": False,
    "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
}


def _own(
    summary: str,
    response: dict[str, Any],
    *,
    params: list[dict[str, Any]] | None = None,
    errors: tuple[int, ...] = (401, 404, 503),
) -> dict[str, Any]:
    """An operation of the account's own API: its bearer is the account's token."""
    return {**_op(summary, response, params=params, errors=errors), "security": [{"account": []}]}


SCHEMAS: dict[str, Any] = {
    "Money": MONEY,
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"enum": ["ok"]}, "node": {"type": "string"}},
    },
    "Account": {
        "type": "object",
        "required": ["name", "plan", "payment_state", "prepaid_balance"],
        "properties": {
            "name": {"type": "string"},
            "plan": {"type": "string"},
            "subscribed_on": {"type": "string", "format": "date"},
            "sender_domains": {"type": "array", "items": {"type": "string"}},
            "networks": {"type": "array", "items": {"type": "string"}},
            "contacts": {"type": "array", "items": {"type": "string"}},
            "payment_state": {"enum": ["ok", "failed"]},
            "payment_detail": {"type": "string"},
            "suspended": {"type": "boolean"},
            "deleted_at": {"type": ["string", "null"], "format": "date-time", "description": "when it was deleted"},
            "prepaid_balance": _ref("Money"),
            "overdrawn": _ref("Money"),
            "spending_limit_override": OPTIONAL_MONEY,
            "has_password": {"type": "boolean"},
            "sending_rate": {
                "type": ["string", "null"],
                "description": "the account's own sending rate (100/minute, unlimited); null: the plan's",
            },
            "plan_change": {
                "oneOf": [
                    {"type": "null"},
                    {
                        "type": "object",
                        "description": "a plan change that takes effect when the period ends",
                        "properties": {
                            "plan": {"type": "string"},
                            "effective": {"type": "string", "format": "date-time"},
                            "requested_at": {"type": "string", "format": "date-time"},
                        },
                    },
                ]
            },
            "monthly_payment_changes": {
                "type": "array",
                "description": "the account's own monthly payment (prepaid plans), from each period on",
                "items": {
                    "type": "object",
                    "properties": {"from": {"type": "string", "format": "date-time"}, "amount": _ref("Money")},
                },
            },
        },
    },
    "AccountOverview": {
        "allOf": [
            _ref("Account"),
            {
                "type": "object",
                "required": ["standing", "awaiting_results", "usage"],
                "properties": {
                    "standing": {"enum": ["active", "suspended", "blocked: payment failed", "deleted"]},
                    "awaiting_results": {
                        "type": "integer",
                        "description": "recipients of its mail accepted and still without a final result",
                    },
                    "usage": _ref("Usage"),
                },
            },
        ]
    },
    "AccountChange": {
        "type": "object",
        "additionalProperties": False,
        "description": "What to change; a removal of what the account does not have is refused (400)",
        "properties": {
            "add_domains": {"type": "array", "items": TEXT},
            "remove_domains": {"type": "array", "items": TEXT},
            "add_networks": {"type": "array", "items": TEXT},
            "remove_networks": {"type": "array", "items": TEXT},
            "add_contacts": {"type": "array", "items": TEXT},
            "remove_contacts": {"type": "array", "items": TEXT},
            "password": {"type": "string", "description": "a new SMTP password (stored as a salted scrypt hash)"},
            "clear_password": {"type": "boolean", "description": "no SMTP AUTH any more (needs a bound network)"},
            "allow_wide_network": {"type": "boolean"},
        },
    },
    "QueueEntry": {
        "type": "object",
        "required": ["queue_id", "account", "sender", "size", "status", "pending", "recipients", "attempts"],
        "properties": {
            "queue_id": {"type": "string"},
            "account": {"type": ["string", "null"], "description": "null: a bounce the relay made"},
            "sender": {"type": "string"},
            "received_at": {"type": "number", "description": "Unix seconds"},
            "size": {
                "type": "integer",
                "description": "octets of the message as spooled (with the Received header the relay added)",
            },
            "status": {
                "enum": ["ready", "active", "deferred", "held", "deleted"],
                "description": "ready: attempted now; active: being attempted; deferred: waiting; held;"
                " deleted: what a delete answers",
            },
            "pending": {"type": "array", "items": {"type": "string"}},
            "recipients": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "address": {"type": "string"},
                        "status": {
                            "enum": ["pending", "deferred", "delivered", "soft_bounced", "hard_bounced", "deleted"]
                        },
                        "reply": {"type": "string"},
                    },
                },
            },
            "attempts": COUNT,
            "last_attempt_at": {"type": ["number", "null"]},
            "next_attempt_at": {"type": ["number", "null"]},
            "last_reply": {"type": "string"},
            "reported": {"type": "boolean", "description": "delete only: the meter has every result"},
        },
    },
    "QueueFlush": {
        "type": "object",
        "additionalProperties": False,
        "description": "exactly one of the three",
        "properties": {"queue_id": TEXT, "account": TEXT, "all": {"type": "boolean"}},
    },
    "Upstream": {
        "type": "object",
        "required": ["upstream", "position", "up", "down_until", "failures", "last_error"],
        "properties": {
            "upstream": {"type": "string", "description": "host:port"},
            "position": {"type": "integer", "minimum": 1, "description": "its place in `upstream`, tried in order"},
            "up": {"type": "boolean", "description": "false: skipped until down_until"},
            "down_until": {"type": "number", "description": "Unix seconds; 0 when up"},
            "failures": {**COUNT, "description": "failures since the node started, every process summed"},
            "consecutive_failures": COUNT,
            "last_error": {"type": "string"},
            "last_change": {"type": "number", "description": "Unix seconds of the last up/down change; 0: never"},
            "delivered_attempts": {**COUNT, "description": "attempts it took (recipients delivered or refused)"},
        },
    },
    "QueueFlushResult": {
        "type": "object",
        "required": ["flushed", "skipped"],
        "properties": {
            "flushed": {"type": "array", "items": {"type": "string"}},
            "skipped": {"type": "array", "items": ANY_OBJECT},
        },
    },
    "NewAccount": {
        "type": "object",
        "additionalProperties": False,
        "required": ["name", "plan", "sender_domains"],
        "properties": {
            "name": TEXT,
            "plan": TEXT,
            "password": {"type": "string", "description": "for SMTP AUTH; stored only as a salted scrypt hash"},
            "sender_domains": {"type": "array", "items": TEXT, "minItems": 1},
            "networks": {
                "type": "array",
                "items": TEXT,
                "description": "client CIDRs bound to it (they send without AUTH, billed to it); wider"
                " than a /16 (IPv4) or /48 (IPv6) only with allow_wide_network",
            },
            "contacts": {"type": "array", "items": {**TEXT, "format": "email"}},
            "subscribed_on": {"type": "string", "format": "date"},
            "allow_wide_network": {
                "type": "boolean",
                "default": False,
                "description": "accept a network binding wider than a /16 or /48",
            },
            "monthly_payment": {
                **MONEY,
                "description": "prepaid plans: the amount credited each period instead of"
                " the plan's funding.monthly_payment",
            },
        },
    },
    "Usage": {
        "type": "object",
        "required": ["account", "plan", "period", "accepted", "remaining", "payment_state"],
        "properties": {
            "account": {"type": "string"},
            "plan": {"type": "string"},
            "period": {"type": "string"},
            "accepted": COUNT,
            "delivered": COUNT,
            "soft_bounced": COUNT,
            "hard_bounced": COUNT,
            "bounce_types": {
                "type": "object",
                "description": "the period's final bounces by category and sub-type (docs/delivery-results.md):"
                " soft_bounced: mailbox_full, message_too_large, server_unavailable;"
                " hard_bounced (Invalid Email): format_error, not_exist, reject, junk_mail;"
                " unclassified for results recorded before sub-types existed",
                "properties": {
                    category: {"type": "object", "additionalProperties": COUNT}
                    for category in ("soft_bounced", "hard_bounced")
                },
            },
            "deferred": COUNT,
            "reserved": COUNT,
            "remaining": {"type": ["integer", "null"]},
            "spent": _ref("Money"),
            "spending_limit": OPTIONAL_MONEY,
            "unbilled": _ref("Money"),
            "prepaid_balance": _ref("Money"),
            "overdrawn": _ref("Money"),
            "prepaid": {"oneOf": [{"type": "null"}, _ref("PrepaidUsage")]},
            "payment_state": {"enum": ["ok", "failed"]},
            "currency": {"type": "string"},
            "by_campaign": {"type": "object", "additionalProperties": {"type": "integer"}},
            "by_region": {"type": "object", "additionalProperties": {"type": "integer"}},
        },
    },
    "PrepaidUsage": {
        "type": "object",
        "description": "a prepaid plan's balance in the current period",
        "properties": {
            "available": {
                **MONEY,
                "description": "what the period may spend: carried in, its monthly payment, top-ups",
            },
            "spent": _ref("Money"),
            "remaining": _ref("Money"),
            "monthly_payment": {**MONEY, "description": "credited at this period's start"},
            "next_monthly_payment": {**MONEY, "description": "to be credited at the next period's start"},
            "next_credit_at": {"type": "string", "format": "date-time"},
        },
    },
    "MonthlyPaymentChange": {
        "type": "object",
        "additionalProperties": False,
        "required": ["amount"],
        "properties": {
            "amount": {
                **MONEY,
                "description": "in the billing currency's minor units, credited from the next period on",
            }
        },
    },
    "MonthlyPaymentResult": {
        "type": "object",
        "required": ["account", "monthly_payment", "next_monthly_payment", "applies_from"],
        "properties": {
            "account": {"type": "string"},
            "monthly_payment": {**MONEY, "description": "this period's credit (fixed when the period started)"},
            "next_monthly_payment": _ref("Money"),
            "applies_from": {"type": "string", "format": "date-time"},
            "prepaid_balance": _ref("Money"),
        },
    },
    "PaymentChange": {
        "type": "object",
        "additionalProperties": False,
        "required": ["state"],
        "properties": {"state": {"enum": ["failed", "ok"]}, "reason": TEXT},
    },
    "BalanceChange": {
        "type": "object",
        "additionalProperties": False,
        "required": ["amount"],
        "properties": {"amount": _ref("Money")},
    },
    "BalanceResult": {
        "type": "object",
        "required": ["account", "added", "prepaid_balance"],
        "properties": {"account": {"type": "string"}, "added": _ref("Money"), "prepaid_balance": _ref("Money")},
    },
    "RepayResult": {
        "type": "object",
        "required": ["account", "repaid"],
        "properties": {"account": {"type": "string"}, "repaid": _ref("Money")},
    },
    "SendingRate": {
        "type": "object",
        "properties": {
            "account": {"type": "string"},
            "account_rate": {"type": ["string", "null"], "description": "its own setting; null: the plan's"},
            "plan": {"type": "string"},
            "plan_rate": {"type": ["string", "null"]},
            "rate": {"type": ["string", "null"], "description": "the rate in force (null: none)"},
        },
    },
    "RateChange": {
        "type": "object",
        "additionalProperties": False,
        "required": ["rate"],
        "properties": {
            "rate": {
                "type": "string",
                "description": "N/second, N/minute, N/hour or N/day; none: the plan's rate; unlimited: no rate",
                "examples": ["100/minute", "none", "unlimited"],
            }
        },
    },
    "LimitChange": {
        "description": 'included and quota take {"emails": N}; spending takes {"amount": "20.00" or null}',
        "oneOf": [
            {"type": "object", "additionalProperties": False, "required": ["emails"], "properties": {"emails": COUNT}},
            {
                "type": "object",
                "additionalProperties": False,
                "required": ["amount"],
                "properties": {"amount": OPTIONAL_MONEY},
            },
        ],
    },
    "Charge": {
        "type": "object",
        "required": ["key", "amount", "status"],
        "properties": {
            "key": {"type": "string", "description": "the charge's idempotency key: ACCOUNT/PERIOD/KIND/INDEX"},
            "period_start": {"type": "string"},
            "kind": {"enum": ["threshold", "block", "invoice"]},
            "index": COUNT,
            "amount": _ref("Money"),
            "currency": {"type": "string"},
            "emails_unlocked": {"type": ["integer", "null"]},
            "description": {"type": "string"},
            "created_at": {"type": "string", "format": "date-time"},
            "status": {
                "enum": ["pending", "submitted", "recorded", "succeeded", "failed"],
                "description": "pending: to be sent; submitted: the gateway will report; recorded: no"
                " gateway, left to an external system; succeeded, failed: final",
            },
            "attempts": COUNT,
            "detail": {"type": "string"},
            "account": {"type": "string"},
            "payment_state": {"enum": ["ok", "failed"]},
        },
    },
    "ChargeSettlement": {
        "type": "object",
        "additionalProperties": False,
        "required": ["charge", "state"],
        "properties": {
            "charge": {"type": "string", "description": "the charge's key (GET /v1/accounts/{name}/charges)"},
            "state": {"enum": ["collected", "failed"]},
            "reason": {"type": "string", "description": "what the collecting system said"},
        },
    },
    "PlanChangeRequest": {
        "type": "object",
        "additionalProperties": False,
        "required": ["plan"],
        "properties": {"plan": {"type": "string", "description": "a plan the config defines"}},
    },
    "PlanChangeResult": {
        "type": "object",
        "required": ["account", "from", "to", "change", "at_once", "effective", "reason", "plan"],
        "properties": {
            "account": {"type": "string"},
            "from": {"type": "string"},
            "to": {"type": "string"},
            "change": {"enum": ["upgrade", "downgrade", "unchanged", "cancelled"]},
            "at_once": {
                "type": "boolean",
                "description": "true: in force now; false: from `effective`, the period's end",
            },
            "effective": {"type": "string", "format": "date-time"},
            "reason": {"type": "string"},
            "plan": {"type": "string", "description": "the plan in force now"},
            "plan_change": {"type": ["object", "null"], "description": "the change waiting for the period's end"},
        },
    },
    "InvoiceSummary": {
        "type": "object",
        "required": ["id", "period", "total", "amount_due", "status"],
        "properties": {
            "id": {"type": "string"},
            "period": {"type": "string"},
            "invoice_date": {"type": "string", "format": "date"},
            "due_date": {"type": "string", "format": "date"},
            "currency": {"type": "string"},
            "total": _ref("Money"),
            "amount_due": _ref("Money"),
            "status": {"enum": ["paid", "open", "overdrawn"]},
        },
    },
    "Invoice": {
        "type": "object",
        "required": ["id", "account", "period", "lines", "total", "amount_due", "status"],
        "properties": {
            "id": {"type": "string"},
            "account": {"type": "string"},
            "plan": {"type": "string"},
            "currency": {"type": "string"},
            "period": {"type": "string"},
            "lines": {"type": "array", "items": ANY_OBJECT},
            "total": _ref("Money"),
            "amount_due": _ref("Money"),
            "status": {"type": "string"},
            "in_period_charges": {"type": "array", "items": ANY_OBJECT},
            "prepaid_applied": _ref("Money"),
            "payments": {
                "type": "array",
                "items": ANY_OBJECT,
                "description": "what paid part of the total before it fell due (kind prepaid)",
            },
            "monthly_payments": {
                "type": "array",
                "items": ANY_OBJECT,
                "description": "the period's monthly payment charge (prepaid plans)",
            },
            "prepaid": {
                "type": ["object", "null"],
                "description": "a prepaid period's balance:"
                " balance_before_usage, monthly_payment, applied, balance_after",
            },
            "regions": {"type": "array", "items": ANY_OBJECT},
        },
    },
    "Plan": {
        "type": "object",
        "required": ["name", "display_name", "period", "funding"],
        "properties": {
            "name": {"type": "string"},
            "display_name": {"type": "string"},
            "period": ANY_OBJECT,
            "billable": {"enum": ["accepted", "results"]},
            "currency": {"type": "string"},
            "plan_fee": _ref("Money"),
            "included_emails": COUNT,
            "email_quota": {"type": ["integer", "null"]},
            "spending_limit": OPTIONAL_MONEY,
            "in_period_charge": {"enum": ["threshold", "per_block", None]},
            "funding": ANY_OBJECT,
            "rank": {"type": ["integer", "null"], "description": "the plan's place in upgrades (higher: bigger)"},
        },
    },
    "PreviewEvent": {
        "description": "Happens once `at` emails of the preview were attempted",
        "oneOf": [
            {
                "type": "object",
                "additionalProperties": False,
                "required": ["at", "type", "which"],
                "properties": {
                    "at": COUNT,
                    "type": {"const": "limit"},
                    "which": {"enum": ["included", "quota", "spending"]},
                    "emails": COUNT,
                    "amount": OPTIONAL_MONEY,
                },
            },
            {
                "type": "object",
                "additionalProperties": False,
                "required": ["at", "type", "plan"],
                "properties": {"at": COUNT, "type": {"const": "plan"}, "plan": {"type": "string"}},
            },
            {
                "type": "object",
                "additionalProperties": False,
                "required": ["at", "type", "amount"],
                "properties": {"at": COUNT, "type": {"const": "top_up"}, "amount": _ref("Money")},
            },
            {
                "type": "object",
                "additionalProperties": False,
                "required": ["at", "type", "state"],
                "properties": {"at": COUNT, "type": {"const": "payment"}, "state": {"enum": ["failed", "ok"]}},
            },
        ],
    },
    "PreviewRequest": {
        "type": "object",
        "additionalProperties": False,
        "required": ["emails"],
        "properties": {
            "emails": COUNT,
            "start": {"type": "string", "format": "date"},
            "delivered": COUNT,
            "soft_bounced": COUNT,
            "invalid": COUNT,
            "balance": {**MONEY, "description": "the prepaid balance to start from"},
            "events": {"type": "array", "items": _ref("PreviewEvent")},
        },
    },
    "Preview": {
        "type": "object",
        "required": ["plan", "accepted", "refused", "charges", "invoice"],
        "properties": {
            "plan": {"type": "string"},
            "currency": {"type": "string"},
            "period": {"type": "string"},
            "emails": COUNT,
            "accepted": COUNT,
            "refused": COUNT,
            "refusal": {"type": ["string", "null"]},
            "balance": _ref("Money"),
            "refusals": {"type": "array", "items": ANY_OBJECT, "description": "each run of refused attempts"},
            "events": {"type": "array", "items": ANY_OBJECT, "description": "the script as applied"},
            "plan_at_end": {"type": "string"},
            "plan_change": {"type": ["object", "null"]},
            "charges": {"type": "array", "items": ANY_OBJECT},
            "invoice": ANY_OBJECT,
        },
    },
    "BillingRun": {
        "type": "object",
        "required": ["invoices", "charges_collected", "charges_failed", "statements"],
        "properties": {
            "invoices": {"type": "array", "items": {"type": "string"}},
            "charges_collected": COUNT,
            "charges_failed": COUNT,
            "charges_recorded": COUNT,
            "statements": COUNT,
        },
    },
    "AuditEvent": {
        "type": "object",
        "required": ["id", "time", "actor", "action", "target", "before", "after"],
        "properties": {
            "id": {"type": "integer"},
            "time": {"type": "string", "format": "date-time"},
            "actor": {"type": "string", "description": "the API token's NAME, cli:USER, or webhook:payment"},
            "action": {"type": "string"},
            "target": {"type": "string"},
            "before": {"type": ["object", "null"]},
            "after": {"type": ["object", "null"]},
            "changes": {"type": "object", "description": "{key: [before, after]} of the keys that changed"},
            "detail": ANY_OBJECT,
            "event_id": {"type": ["string", "null"]},
        },
    },
    "PaymentEvent": {
        "type": "object",
        "required": ["id", "type"],
        "properties": {
            "id": {
                "type": "string",
                "minLength": 1,
                "description": "the event id, required (it is signed with the body; an Idempotency-Key header"
                " is not and is ignored); a redelivery with the same id changes nothing",
            },
            "type": {"enum": ["charge.succeeded", "charge.failed", "payment_method.updated"]},
            "charge": {"type": "string", "description": "charge.*: the Idempotency-Key of the relay's charge"},
            "reason": {"type": "string"},
            "account": {"type": "string", "description": "payment_method.updated: the account to release"},
        },
    },
    "PaymentEventResult": {
        "type": "object",
        "required": ["event", "duplicate"],
        "properties": {
            "event": {"type": "string"},
            "duplicate": {"type": "boolean"},
            "type": {"type": "string"},
            "account": {"type": "string"},
            "charge": {"type": "string"},
            "applied": {"type": "boolean"},
            "charge_status": {"type": "string"},
            "payment_state": {"enum": ["ok", "failed"]},
        },
    },
    "Webhook": {
        "type": "object",
        "required": ["url", "events", "created_at"],
        "properties": {
            "url": {"type": "string"},
            "events": {"type": "array", "items": {"$ref": "#/components/schemas/EventKind"}},
            "created_at": {"type": "string", "format": "date-time"},
        },
    },
    "EventKind": {"type": "string", "enum": ["delivered", "deferred", "bounced", "usage_alert", "payment"]},
    "WebhookRequest": {
        "type": "object",
        "required": ["url"],
        "additionalProperties": False,
        "properties": {
            "url": {"type": "string", "description": "http:// or https:// URL the events are POSTed to"},
            "events": {
                "type": "array",
                "items": {"$ref": "#/components/schemas/EventKind"},
                "description": "the kinds it takes (default: all)",
            },
            "secret": {
                "type": "string",
                "minLength": 16,
                "description": "the signing secret (default: a new random one, returned once)",
            },
        },
    },
    "WebhookSet": {
        "type": "object",
        "required": ["account", "url", "events", "secret"],
        "properties": {
            "account": {"type": "string"},
            "url": {"type": "string"},
            "events": {"type": "array", "items": {"$ref": "#/components/schemas/EventKind"}},
            "secret": {
                "type": "string",
                "description": "the HMAC-SHA256 key of the Mailmeter-Signature header; shown only here",
            },
        },
    },
    "WebhookRemoved": {
        "type": "object",
        "required": ["account", "webhook"],
        "properties": {"account": {"type": "string"}, "webhook": {"type": "null"}},
    },
    "Event": {
        "type": "object",
        "required": ["id", "type", "created", "account", "data", "status", "attempts"],
        "description": "An account event as POSTed (id, type, created, account, data), with its delivery state."
        " data: delivered/deferred/bounced: queue_id, recipient, result, reason, detail (and bounce:"
        " soft or hard); usage_alert: percent, limit, sent; payment: payment_state, detail",
        "properties": {
            "id": {"type": "string", "examples": ["evt_42"]},
            "type": {"$ref": "#/components/schemas/EventKind"},
            "created": {"type": "string", "format": "date-time"},
            "account": {"type": "string"},
            "data": {"type": "object", "additionalProperties": True},
            "status": {"type": "string", "enum": ["pending", "delivered", "failed"]},
            "next_attempt_at": {"type": ["string", "null"], "format": "date-time"},
            "attempts": {"type": "array", "items": {"$ref": "#/components/schemas/EventAttempt"}},
        },
    },
    "EventAttempt": {
        "type": "object",
        "required": ["attempt", "at", "status_code", "error"],
        "properties": {
            "attempt": {"type": "integer", "minimum": 1},
            "at": {"type": "string", "format": "date-time"},
            "status_code": {"type": ["integer", "null"], "description": "the receiver's HTTP status; null: none"},
            "error": {"type": "string", "description": "empty when the receiver answered 2xx"},
        },
    },
    "AccountToken": {
        "type": "object",
        "required": ["account", "token"],
        "properties": {
            "account": {"type": "string"},
            "token": {"type": "string", "description": "the account's API token, shown once (kept as a SHA-256)"},
        },
    },
    "Suppression": {
        "type": "object",
        "required": ["address", "reason", "detail", "queue_id", "suppressed_at"],
        "properties": {
            "address": {"type": "string", "description": "lower-case"},
            "reason": {"type": "string", "enum": ["not_exist", "format_error"]},
            "detail": {"type": "string", "description": "the upstream's reply"},
            "queue_id": {"type": "string", "description": "the message that bounced"},
            "suppressed_at": {"type": "string", "format": "date-time"},
        },
    },
    "SuppressionRemoved": {
        "type": "object",
        "required": ["account", "address", "suppressed"],
        "properties": {
            "account": {"type": "string"},
            "address": {"type": "string"},
            "suppressed": {"type": "boolean", "const": False},
        },
    },
}


def _array(name: str) -> dict[str, Any]:
    return {"type": "array", "items": _ref(name)}


PATHS: dict[str, dict[str, Any]] = {
    "/healthz": {
        "get": _op(
            "Liveness: the API and the database answer", _json(_ref("Health"), "Healthy"), errors=(503,), public=True
        )
    },
    "/openapi.json": {
        "get": _op("This document", _json({"type": "object"}, "The OpenAPI 3.1 document"), errors=(), public=True)
    },
    "/metrics": {
        "get": _op(
            "Prometheus metrics of this node",
            {
                "description": "Prometheus text exposition format",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
            errors=(401, 404),
        )
    },
    "/v1/accounts": {
        "get": _op(
            "List accounts (deleted ones too with deleted=true)",
            _json(_array("Account"), "Every account"),
            params=[
                {
                    "name": "deleted",
                    "in": "query",
                    "required": False,
                    "description": "true: list deleted accounts too",
                    "schema": {"enum": ["true", "false"]},
                }
            ],
        ),
        "post": _op(
            "Add an account",
            _json(_ref("Account"), "The new account"),
            body=_ref("NewAccount"),
            errors=(400, 401, 409, 503),
            status=201,
        ),
    },
    "/v1/accounts/{name}": {
        "get": _op(
            "One account on one screen: settings, standing and the current period's usage (never its password hash)",
            _json(_ref("AccountOverview"), "The account"),
            params=[ACCOUNT],
            errors=(401, 404, 503),
        ),
        "patch": _op(
            "Change sender domains, bound networks, contacts or the password, in force at once",
            _json(_ref("Account"), "The account after the change"),
            body=_ref("AccountChange"),
            params=[ACCOUNT],
            errors=(400, 401, 404, 409, 503),
        ),
        "delete": _op(
            "Delete the account: it stops sending at once and is kept with its invoices and audit trail;"
            " refused (409) while it has mail awaiting a result or usage not invoiced, unless force=true",
            _json(_ref("Account"), "The deleted account"),
            params=[
                ACCOUNT,
                {
                    "name": "force",
                    "in": "query",
                    "required": False,
                    "description": "true: delete even with mail in the queue or usage not invoiced",
                    "schema": {"enum": ["true", "false"]},
                },
            ],
            errors=(400, 401, 404, 409, 503),
        ),
    },
    "/v1/accounts/{name}/suspend": {
        "post": _op(
            "Suspend sending, live: an open session gets 452 4.7.1 at its next RCPT (451 at MAIL)",
            _json(_ref("Account"), "The account after the change"),
            params=[ACCOUNT],
            errors=(400, 401, 404, 409, 503),
        ),
    },
    "/v1/accounts/{name}/resume": {
        "post": _op(
            "Resume a suspended account's sending, live",
            _json(_ref("Account"), "The account after the change"),
            params=[ACCOUNT],
            errors=(400, 401, 404, 409, 503),
        ),
    },
    "/v1/accounts/{name}/usage": {
        "get": _op(
            "The current period's usage",
            _json(_ref("Usage"), "Usage and the dashboard"),
            params=[ACCOUNT],
            errors=(401, 404, 409, 503),
        ),
    },
    "/v1/accounts/{name}/payment": {
        "post": _op(
            "Block (failed) or release (ok) sending, live at the next MAIL or RCPT",
            _json(_ref("Account"), "The account after the change"),
            body=_ref("PaymentChange"),
            params=[ACCOUNT],
            errors=(400, 401, 404, 503),
        ),
    },
    "/v1/accounts/{name}/balance": {
        "post": _op(
            "Top up the prepaid balance",
            _json(_ref("BalanceResult"), "The new balance"),
            body=_ref("BalanceChange"),
            params=[ACCOUNT],
            errors=(400, 401, 404, 503),
        ),
    },
    "/v1/accounts/{name}/monthly-payment": {
        "put": _op(
            "Set the monthly payment credited to a prepaid balance, from the next period on",
            _json(_ref("MonthlyPaymentResult"), "This period's and the next period's monthly payment"),
            body=_ref("MonthlyPaymentChange"),
            params=[ACCOUNT],
            errors=(400, 401, 404, 409, 503),
        ),
    },
    "/v1/accounts/{name}/repay": {
        "post": _op(
            "Settle the whole overdrawn amount",
            _json(_ref("RepayResult"), "What was repaid"),
            params=[ACCOUNT],
            errors=(400, 401, 404, 503),
        ),
    },
    "/v1/accounts/{name}/limits/{which}": {
        "put": _op(
            "Set a limit: included or quota emails (an increase at once, a decrease at period end),"
            " or the spending amount (at once)",
            _json(_ref("Usage"), "Usage under the new limit"),
            body=_ref("LimitChange"),
            params=[
                ACCOUNT,
                {
                    **_path("which", "included, quota or spending"),
                    "schema": {"enum": ["included", "quota", "spending"]},
                },
            ],
            errors=(400, 401, 404, 503),
        ),
    },
    "/v1/accounts/{name}/rate": {
        "get": _op(
            "The account's sending rate: its own, its plan's and the one in force",
            _json(_ref("SendingRate"), "The rates"),
            params=[ACCOUNT],
            errors=(401, 404, 503),
        ),
        "put": _op(
            "Set the account's sending rate (live at the next RCPT; past it RCPT gets 451 4.7.1)",
            _json(_ref("SendingRate"), "The rates after the change"),
            body=_ref("RateChange"),
            params=[ACCOUNT],
            errors=(400, 401, 404, 503),
        ),
    },
    "/v1/accounts/{name}/charges": {
        "get": _op(
            "The account's charges and their state, oldest first",
            _json(_array("Charge"), "Charges"),
            params=[
                ACCOUNT,
                {
                    "name": "status",
                    "in": "query",
                    "required": False,
                    "schema": {"enum": ["pending", "submitted", "recorded", "succeeded", "failed"]},
                    "description": "only charges in this state",
                },
            ],
            errors=(400, 401, 404, 503),
        ),
    },
    "/v1/charges/settle": {
        "post": _op(
            "Mark a charge collected or failed, as the system that collects it reports (for"
            " billing.gateway.kind none); failed blocks the account's sending at its next MAIL or RCPT",
            _json(_ref("Charge"), "The charge after the change"),
            body=_ref("ChargeSettlement"),
            errors=(400, 401, 404, 409, 503),
        ),
    },
    "/v1/accounts/{name}/plan": {
        "put": _op(
            "Move the account to another plan: an upgrade at once (the invoice shows each part of the"
            " period under its plan), any other change when the period ends",
            _json(_ref("PlanChangeResult"), "What the change did and when it takes effect"),
            body=_ref("PlanChangeRequest"),
            params=[ACCOUNT],
            errors=(400, 401, 404, 409, 503),
        ),
    },
    "/v1/accounts/{name}/invoices": {
        "get": _op(
            "The account's invoices",
            _json(_array("InvoiceSummary"), "Invoices, oldest first"),
            params=[ACCOUNT],
            errors=(401, 404, 503),
        ),
    },
    "/v1/invoices/{id}": {
        "get": _op(
            "One invoice: lines, totals, in-period charges, per-region results",
            _json(_ref("Invoice"), "The invoice"),
            params=[_path("id", "The invoice id")],
            errors=(401, 404, 503),
        ),
    },
    "/v1/exports/{month}.csv": {
        "get": _op(
            "Every line item of the periods that start in the month, as CSV",
            {"description": "CSV with a header row", "content": {"text/csv": {"schema": {"type": "string"}}}},
            params=[{**_path("month", "YYYY-MM"), "schema": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}$"}}],
            errors=(400, 401, 503),
        ),
    },
    "/v1/plans": {"get": _op("The plans the config defines", _json(_array("Plan"), "Plans by name"))},
    "/v1/plans/{name}/preview": {
        "post": _op(
            "Run the plan's policy over one synthetic period, from a prepaid balance, through scripted events",
            _json(_ref("Preview"), "Charges, refusals and invoice"),
            body=_ref("PreviewRequest"),
            params=[_path("name", "The plan name")],
            errors=(400, 401, 404),
        ),
    },
    "/v1/billing/run": {
        "post": _op(
            "Close every ended period and collect pending charges now",
            _json(_ref("BillingRun"), "What the run did"),
            errors=(401, 503),
        ),
    },
    "/v1/audit": {
        "get": _op(
            "Admin changes, newest first",
            _json(_array("AuditEvent"), "Audit events"),
            params=[
                {
                    "name": "account",
                    "in": "query",
                    "required": False,
                    "schema": TEXT,
                    "description": "only this account's changes",
                },
                {
                    "name": "limit",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                },
            ],
            errors=(400, 401, 404, 503),
        ),
    },
    "/v1/queue": {
        "get": _op(
            "The messages in the running relay's queue, oldest first (`queue list`)",
            _json(_array("QueueEntry"), "The queue"),
            params=[
                {
                    "name": "account",
                    "in": "query",
                    "required": False,
                    "schema": TEXT,
                    "description": "only this account's messages",
                }
            ],
            errors=(400, 401, 404, 503),
        ),
    },
    "/v1/upstreams": {
        "get": _op(
            "Each smarthost's health, in the order delivery tries them (`queue upstreams`; `queue list` heads its"
            " listing with it)",
            _json(_array("Upstream"), "The configured upstreams"),
            errors=(401,),
        ),
    },
    "/v1/queue/flush": {
        "post": _op(
            "Attempt now: one message, an account's, or all (`queue flush`)",
            _json(_ref("QueueFlushResult"), "What will be attempted now, and what was not flushed and why"),
            body=_ref("QueueFlush"),
            errors=(400, 401, 404, 503),
        ),
    },
    "/v1/queue/{id}": {
        "get": _op(
            "One message: every recipient with its state and last reply (`queue show`)",
            _json(_ref("QueueEntry"), "The message"),
            params=[QUEUE_ID],
            errors=(400, 401, 404, 503),
        ),
        "delete": _op(
            "Delete a message: each pending recipient gets the final result 'deleted by operator', a Soft"
            " Bounce of sub-type deleted_by_operator, so the books still balance (`queue delete`)",
            _json(_ref("QueueEntry"), "The message as deleted; `reported`: the meter has every result"),
            params=[QUEUE_ID],
            errors=(400, 401, 404, 409, 503),
        ),
    },
    "/v1/queue/{id}/hold": {
        "post": _op(
            "Hold a message: not attempted until released (`queue hold`)",
            _json(_ref("QueueEntry"), "The message"),
            params=[QUEUE_ID],
            errors=(400, 401, 404, 409, 503),
        ),
    },
    "/v1/queue/{id}/release": {
        "post": _op(
            "Release a held message: attempted at once (`queue release`)",
            _json(_ref("QueueEntry"), "The message"),
            params=[QUEUE_ID],
            errors=(400, 401, 404, 409, 503),
        ),
    },
    "/v1/accounts/{name}/webhook": {
        "get": _op(
            "The account's webhook (never its secret)",
            _json(_ref("Webhook"), "The webhook"),
            params=[ACCOUNT],
            errors=(401, 404, 503),
        ),
        "put": _op(
            "Set (or replace) the account's webhook for its events",
            _json(_ref("WebhookSet"), "The webhook, with its signing secret (shown once)"),
            body=_ref("WebhookRequest"),
            params=[ACCOUNT],
            errors=(400, 401, 404, 503),
        ),
        "delete": _op(
            "Remove the account's webhook: no more events are recorded or sent",
            _json(_ref("WebhookRemoved"), "Removed"),
            params=[ACCOUNT],
            errors=(401, 404, 503),
        ),
    },
    "/v1/accounts/{name}/events": {
        "get": _op(
            "The account's latest events, newest first, with their delivery log",
            _json(_array("Event"), "Events"),
            params=[ACCOUNT, LIMIT],
            errors=(400, 401, 404, 503),
        ),
    },
    "/v1/accounts/{name}/token": {
        "post": _op(
            "A new API token for the account itself (its previous one stops working)",
            _json(_ref("AccountToken"), "The token, shown once"),
            params=[ACCOUNT],
            errors=(400, 401, 404, 503),
            status=201,
        ),
    },
    "/v1/accounts/{name}/suppressions": {
        "get": _op(
            "The account's suppressed recipients (refused at RCPT with 550 5.1.1, never billed)",
            _json(_array("Suppression"), "Suppressed recipients by address"),
            params=[ACCOUNT],
            errors=(401, 404, 503),
        ),
    },
    "/v1/accounts/{name}/suppressions/{address}": {
        "delete": _op(
            "Take a recipient off the account's suppression list",
            _json(_ref("SuppressionRemoved"), "Removed: its next RCPT is accepted"),
            params=[ACCOUNT, ADDRESS],
            errors=(400, 401, 404, 503),
        ),
    },
    "/v1/account/usage": {
        "get": _own(
            "The account's own usage in its current period (as `mailmeter usage NAME --json`)",
            _json(_ref("Usage"), "Usage and the dashboard"),
        ),
    },
    "/v1/account/invoices": {
        "get": _own("The account's own invoices", _json(_array("InvoiceSummary"), "Invoices, oldest first")),
    },
    "/v1/account/invoices/{id}": {
        "get": _own(
            "One of the account's own invoices",
            _json(_ref("Invoice"), "The invoice"),
            params=[_path("id", "The invoice id")],
            errors=(400, 401, 404, 503),
        ),
    },
    "/v1/account/events": {
        "get": _own(
            "The account's own events, newest first, with their webhook delivery log",
            _json(_array("Event"), "Events"),
            params=[LIMIT],
            errors=(400, 401, 404, 503),
        ),
    },
    "/v1/account/suppressions": {
        "get": _own("The account's own suppressed recipients", _json(_array("Suppression"), "By address")),
    },
    "/v1/account/suppressions/{address}": {
        "delete": _own(
            "Take a recipient off the account's own suppression list",
            _json(_ref("SuppressionRemoved"), "Removed: its next RCPT is accepted"),
            params=[ADDRESS],
            errors=(400, 401, 404, 503),
        ),
    },
    "/v1/webhooks/payment": {
        "post": {
            **_op(
                "Inbound payment provider event (HMAC-signed, no bearer token)",
                _json(_ref("PaymentEventResult"), "Applied, or a duplicate that changed nothing"),
                body=_ref("PaymentEvent"),
                errors=(400, 401, 404, 503),
                public=True,
            ),
            "parameters": [
                {
                    "name": "X-Mailmeter-Timestamp",
                    "in": "header",
                    "required": True,
                    "schema": {"type": "string"},
                    "description": "Unix seconds; refused when further than api.webhook_tolerance from now",
                },
                {
                    "name": "X-Mailmeter-Signature",
                    "in": "header",
                    "required": True,
                    "schema": {"type": "string"},
                    "description": "sha256=HEX(HMAC-SHA256(secret, timestamp + '.' + body))",
                },
            ],
        },
    },
}


def document(version: str) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "mailmeter admin API",
            "version": version,
            "description": "Accounts, payment state, balances, limits, invoices, exports, plans, billing and"
            " the audit trail of one mailmeter relay, and each account's own API (/v1/account/, with the"
            " account's token): its usage, invoices, events and suppression list. JSON in and out; money is a"
            " decimal string.",
        },
        "security": [{"bearer": []}],
        "paths": PATHS,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "a token from api.tokens_file (NAME:TOKEN lines)",
                },
                "account": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "an account's own API token (`mailmeter account token NAME`): the /v1/account/"
                    " routes, which read and change that account's data only",
                },
            },
        },
    }

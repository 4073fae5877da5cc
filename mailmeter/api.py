"""The admin HTTP API: the CLI's actions over HTTP, on the relay's own asyncio loop.

Every handler only reads the request, calls one AdminService method (the same
layer the CLI uses, so the same rules and the same audit trail) and writes JSON;
there is no business logic here. Calls need `Authorization: Bearer TOKEN` with a
token from `api.tokens_file`, whose NAME becomes the audit actor: a route is
registered either `authenticated(handler)` (the handler gets the AdminService
acting for that NAME) or open. Only /healthz, /openapi.json and the payment
webhook (HMAC-signed instead) are open. The routes under /v1/account/ are the account
holder's: `account_authenticated(handler)` takes the account's own token instead
(`mailmeter account token NAME`) and gives the handler that one account's service.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import date
from typing import Any

import structlog
from aiohttp import web

from mailmeter.apiauth import ApiTokens, bearer_token
from mailmeter.audit import WEBHOOK_ACTOR
from mailmeter.metering.gateway import verify
from mailmeter.metering.meter import UnknownAccount, UnknownPlan
from mailmeter.metering.records import StoreUnavailable
from mailmeter.metrics import CONTENT_TYPE, Metrics
from mailmeter.openapi import document
from mailmeter.service import AccountService, AdminError, AdminService, Conflict, NotFound, Unavailable, text_problem

ServiceFor = Callable[[str], AdminService]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
AdminHandler = Callable[[web.Request, AdminService], Awaitable[web.StreamResponse]]
AccountHandler = Callable[[web.Request, AccountService], Awaitable[web.StreamResponse]]
ACCOUNT_ACTOR = "account"  # the service that checks account tokens; each change is audited as account:NAME
VERSION = "1"
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_SIGNATURE = re.compile(r"sha256=[0-9a-fA-F]{64}")
_ACTOR: ContextVar[str] = ContextVar("mailmeter_api_actor", default="")  # for the access log


class BadRequest(Exception):
    """The request itself is malformed (JSON, field types): 400 with the message."""


@dataclass(frozen=True)
class ApiDeps:
    """What the handlers need from the node; `service_for(actor)` is read per request
    so a config reload (a new Billing) is seen at once."""

    service_for: ServiceFor
    tokens: ApiTokens
    webhook_secret: bytes | None
    webhook_tolerance: float
    metrics: Metrics | None
    ping: Callable[[], Awaitable[None]]
    node: str


DEPS = web.AppKey("deps", ApiDeps)


def _deps(request: web.Request) -> ApiDeps:
    return request.app[DEPS]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


# -- request bodies: shape checks only; meaning is the service's ----------------------


async def _body(request: web.Request, fields: tuple[str, ...] | None) -> dict[str, Any]:
    """The JSON object sent; a field not in `fields` is refused (None: any field, for
    events whose sender may add fields over time)."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise BadRequest(f"the request body is not valid JSON ({error}); send a JSON object") from None
    except RecursionError:
        raise BadRequest(f"the request body is nested too deeply (at most {MAX_DEPTH} levels)") from None
    if not isinstance(data, dict):
        raise BadRequest('the request body must be a JSON object, like {"field": "value"}')
    _check_texts(data)
    unknown = sorted(set(data) - set(fields)) if fields is not None else []
    if unknown:
        takes = ", ".join(fields or ()) or "no fields"
        raise BadRequest(f"{unknown[0]}: unknown field; this request takes {takes}")
    return data


MAX_DEPTH = 8  # no request takes more than a list in an object; events get some room to grow


def _check_texts(data: dict[str, Any]) -> None:
    """Every key and string in the body is text the store can keep (service.text_problem),
    and the body is no deeper than MAX_DEPTH; else 400 naming the field (walked without
    recursion: the body may be as deep as the JSON parser allowed)."""
    pending: list[tuple[str, object, int]] = [("", data, 1)]
    while pending:
        path, value, depth = pending.pop()
        if depth > MAX_DEPTH:
            raise BadRequest(f"{path or 'the request body'}: nested too deeply (at most {MAX_DEPTH} levels)")
        if isinstance(value, str):
            problem = text_problem(value)
            if problem is not None:
                raise BadRequest(f"{path}: {problem}")
        elif isinstance(value, dict):
            for key, item in value.items():
                problem = text_problem(key)
                if problem is not None:
                    raise BadRequest(f"{path + '.' if path else ''}{key!a}: the field name {problem}")
                pending.append((f"{path}.{key}" if path else key, item, depth + 1))
        elif isinstance(value, list):
            pending.extend((f"{path}[{index}]", item, depth + 1) for index, item in enumerate(value))


def _string(data: dict[str, Any], key: str, required: bool = False) -> str | None:
    value = data.get(key)
    if value is None:
        if required:
            raise BadRequest(f"{key}: this field is required")
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{key}: give a string")
    return value


def _money(data: dict[str, Any], key: str, required: bool = True) -> str | None:
    value = data.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise BadRequest(f'{key}: write money as a decimal string like "25.00", not {json.dumps(value)}')
    return value


def _count(data: dict[str, Any], key: str, required: bool = False) -> int | None:
    value = data.get(key)
    if value is None and not required:
        return None
    if isinstance(value, float) and value.is_integer():  # 1000.0 is a whole number in JSON
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{key}: give a whole number, like 1000")
    return value


def _flag(data: dict[str, Any], key: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise BadRequest(f"{key}: give true or false")
    return value


def _strings(data: dict[str, Any], key: str) -> list[str]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise BadRequest(f"{key}: give a list of strings")
    return value


def _date(data: dict[str, Any], key: str) -> date | None:
    value = _string(data, key)
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise BadRequest(f"{key}: write the date as YYYY-MM-DD") from None


# -- middleware: errors as JSON, bearer auth, one log event per request -----------------


def _check_parameters(request: web.Request) -> None:
    """Path and query parameters are text the store can look up (else 400 naming them)."""
    for kind, items in (("path", request.match_info.items()), ("query", request.query.items())):
        for key, value in items:
            problem = text_problem(value) or text_problem(key)
            if problem is not None:
                raise BadRequest(f"{key!a} ({kind} parameter): {problem}")


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        _check_parameters(request)
        return await handler(request)
    except BadRequest as error:
        return _error(400, str(error))
    except (NotFound, UnknownAccount) as error:
        return _error(404, str(error).strip('"'))
    except (Conflict, UnknownPlan) as error:
        return _error(409, str(error).strip('"'))
    except Unavailable as error:
        return _error(503, str(error))
    except AdminError as error:
        return _error(400, str(error))
    except StoreUnavailable as error:
        return _error(503, f"the database is unavailable ({error}); retry later")
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return _error(error.status, f"{error.reason}: {request.method} {request.path}; see GET /openapi.json")
    except Exception as error:  # noqa: BLE001 (a bug: the client still gets JSON, the log the traceback)
        structlog.get_logger("mailmeter.api").exception(
            "api.error", method=request.method, path=request.path, error=repr(error)
        )
        return _error(500, "internal error; the relay's log has the details (event api.error)")


def authenticated(handler: AdminHandler) -> Handler:
    """The route needs a bearer token; the handler gets the service acting for its NAME."""

    async def checked(request: web.Request) -> web.StreamResponse:
        token = bearer_token(request.headers.get("Authorization"))
        if token is None:
            return _error(
                401, "authentication required: send Authorization: Bearer TOKEN (a token from api.tokens_file)"
            )
        name = _deps(request).tokens.name_for(token)
        if name is None:
            return _error(
                401, "the bearer token is not one of api.tokens_file; check the token (or the file) and retry"
            )
        _ACTOR.set(name)
        return await handler(request, _deps(request).service_for(name))

    return checked


def account_authenticated(handler: AccountHandler) -> Handler:
    """The route needs the account's own token (`mailmeter account token NAME`); the handler
    gets that account's service, which reaches no other account."""

    async def checked(request: web.Request) -> web.StreamResponse:
        token = bearer_token(request.headers.get("Authorization"))
        if token is None:
            return _error(
                401, "authentication required: send Authorization: Bearer TOKEN (the account's own API token)"
            )
        service = _deps(request).service_for(ACCOUNT_ACTOR)
        account = await service.verify_account_token(token)
        if account is None:
            return _error(
                401, "the bearer token is not an account's API token; ask the operator for a new one and retry"
            )
        _ACTOR.set(f"account:{account.name}")
        return await handler(request, service.for_account(account.name))

    return checked


@web.middleware
async def access_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    actor = _ACTOR.set("")  # a keep-alive connection serves several requests in one task
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as error:
        status = error.status
        raise
    finally:
        route = request.match_info.route.resource
        structlog.get_logger("mailmeter.api").info(
            "api.request",
            method=request.method,
            route=route.canonical if route else request.path,
            status=status,
            actor=_ACTOR.get(),
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
        _ACTOR.reset(actor)


# -- handlers -----------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    await _deps(request).ping()
    return web.json_response({"status": "ok", "node": _deps(request).node})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(document(VERSION))


async def metrics(request: web.Request, service: AdminService) -> web.Response:
    registry = _deps(request).metrics
    if registry is None:
        raise NotFound("this node keeps no metrics")
    return web.Response(body=registry.render(), headers={"Content-Type": CONTENT_TYPE})


async def list_accounts(request: web.Request, service: AdminService) -> web.Response:
    deleted = request.query.get("deleted", "false")
    if deleted not in ("true", "false"):
        raise BadRequest(f"deleted: {deleted!r} is not true or false")
    return web.json_response(await service.accounts(include_deleted=deleted == "true"))


async def add_account(request: web.Request, service: AdminService) -> web.Response:
    data = await _body(
        request,
        (
            "name",
            "password",
            "plan",
            "sender_domains",
            "networks",
            "contacts",
            "subscribed_on",
            "allow_wide_network",
            "monthly_payment",
        ),
    )
    name = _string(data, "name", required=True)
    plan = _string(data, "plan", required=True)
    assert name is not None and plan is not None
    account = await service.add_account(
        name,
        _string(data, "password"),
        plan,
        _strings(data, "sender_domains"),
        _strings(data, "networks"),
        _strings(data, "contacts"),
        _date(data, "subscribed_on"),
        allow_wide_network=_flag(data, "allow_wide_network"),
        monthly_payment=_money(data, "monthly_payment", required=False),
    )
    return web.json_response(account, status=201, headers={"Location": f"/v1/accounts/{account['name']}"})


async def show_account(request: web.Request, service: AdminService) -> web.Response:
    return web.json_response(await service.overview(request.match_info["name"]))


CHANGE_FIELDS = (
    "add_domains",
    "remove_domains",
    "add_networks",
    "remove_networks",
    "add_contacts",
    "remove_contacts",
)


async def change_account(request: web.Request, service: AdminService) -> web.Response:
    data = await _body(request, (*CHANGE_FIELDS, "password", "clear_password", "allow_wide_network"))
    lists = {key: _strings(data, key) for key in CHANGE_FIELDS}
    account = await service.change_account(
        request.match_info["name"],
        **lists,
        password=_string(data, "password"),
        clear_password=_flag(data, "clear_password"),
        allow_wide_network=_flag(data, "allow_wide_network"),
    )
    return web.json_response(account)


async def suspend_account(request: web.Request, service: AdminService) -> web.Response:
    await _body(request, ())
    return web.json_response(await service.suspend(request.match_info["name"], True))


async def resume_account(request: web.Request, service: AdminService) -> web.Response:
    await _body(request, ())
    return web.json_response(await service.suspend(request.match_info["name"], False))


async def delete_account(request: web.Request, service: AdminService) -> web.Response:
    force = request.query.get("force", "false")
    if force not in ("true", "false"):
        raise BadRequest(f"force: {force!r} is not true or false")
    return web.json_response(await service.delete_account(request.match_info["name"], force=force == "true"))


async def usage(request: web.Request, service: AdminService) -> web.Response:
    return web.json_response(await service.usage(request.match_info["name"]))


async def payment(request: web.Request, service: AdminService) -> web.Response:
    data = await _body(request, ("state", "reason"))
    state = _string(data, "state", required=True)
    assert state is not None
    account = await service.payment(request.match_info["name"], state, _string(data, "reason") or "")
    return web.json_response(account)


async def balance(request: web.Request, service: AdminService) -> web.Response:
    data = await _body(request, ("amount",))
    amount = _money(data, "amount")
    assert amount is not None
    return web.json_response(await service.add_balance(request.match_info["name"], amount))


async def monthly_payment(request: web.Request, service: AdminService) -> web.Response:
    data = await _body(request, ("amount",))
    amount = _money(data, "amount")
    assert amount is not None
    return web.json_response(await service.set_monthly_payment(request.match_info["name"], amount))


async def repay(request: web.Request, service: AdminService) -> web.Response:
    await _body(request, ())
    return web.json_response(await service.repay(request.match_info["name"]))


async def set_limit(request: web.Request, service: AdminService) -> web.Response:
    which = request.match_info["which"]
    if which == "spending":
        data = await _body(request, ("amount",))
        if "amount" not in data:
            raise BadRequest('amount: this field is required (a decimal string like "20.00", or null for none)')
        value: object = _money(data, "amount", required=False)
    else:
        data = await _body(request, ("emails",))
        value = _count(data, "emails", required=True)
    return web.json_response(await service.set_limit(request.match_info["name"], which, value))


async def get_rate(request: web.Request, service: AdminService) -> web.Response:
    return web.json_response(await service.sending_rate(request.match_info["name"]))


async def set_rate(request: web.Request, service: AdminService) -> web.Response:
    data = await _body(request, ("rate",))
    if "rate" not in data:
        raise BadRequest('rate: this field is required (like "100/minute", or "none" or "unlimited")')
    return web.json_response(await service.set_sending_rate(request.match_info["name"], data["rate"]))


async def charges(request: web.Request, service: AdminService) -> web.Response:
    return web.json_response(await service.charges(request.match_info["name"], request.query.get("status")))


async def settle_charge(request: web.Request, service: AdminService) -> web.Response:
    data = await _body(request, ("charge", "state", "reason"))
    key = _string(data, "charge", required=True)
    state = _string(data, "state", required=True)
    assert key is not None and state is not None
    return web.json_response(await service.settle_charge(key, state, _string(data, "reason") or ""))


async def set_plan(request: web.Request, service: AdminService) -> web.Response:
    data = await _body(request, ("plan",))
    plan = _string(data, "plan", required=True)
    return web.json_response(await service.set_plan(request.match_info["name"], plan))


async def invoices(request: web.Request, service: AdminService) -> web.Response:
    return web.json_response(await service.invoices(request.match_info["name"]))


async def invoice(request: web.Request, service: AdminService) -> web.Response:
    return web.json_response(await service.invoice(request.match_info["id"]))


async def export(request: web.Request, service: AdminService) -> web.Response:
    month = request.match_info["month"]
    text = await service.export_csv(month)
    return web.Response(
        text=text,
        content_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="mailmeter-{month}.csv"'},
    )


async def plans(request: web.Request, service: AdminService) -> web.Response:
    return web.json_response(service.plans())


async def preview(request: web.Request, service: AdminService) -> web.Response:
    data = await _body(request, ("emails", "start", "delivered", "soft_bounced", "invalid", "balance", "events"))
    emails = _count(data, "emails", required=True)
    assert emails is not None
    events = data.get("events", [])
    if not isinstance(events, list):
        raise BadRequest('events: give a list of events like [{"at": 1000, "type": "payment", "state": "failed"}]')
    result = service.preview(
        request.match_info["name"],
        emails,
        _date(data, "start"),
        _count(data, "delivered"),
        _count(data, "soft_bounced") or 0,
        _count(data, "invalid") or 0,
        _money(data, "balance", required=False),
        events,
    )
    return web.json_response(result)


async def run_billing(request: web.Request, service: AdminService) -> web.Response:
    await _body(request, ())
    return web.json_response(await service.run_billing())


async def audit(request: web.Request, service: AdminService) -> web.Response:
    limit_text = request.query.get("limit", "100")
    try:
        limit = int(limit_text)
    except ValueError:
        raise BadRequest(f"limit: {limit_text!r} is not a number; give 1 to 1000") from None
    return web.json_response(await service.audit(request.query.get("account"), limit))


async def queue_list(request: web.Request, service: AdminService) -> web.Response:
    return web.json_response(await service.queue_list(request.query.get("account")))


async def upstreams(request: web.Request, service: AdminService) -> web.Response:
    return web.json_response(await service.upstreams())


async def queue_show(request: web.Request, service: AdminService) -> web.Response:
    return web.json_response(await service.queue_show(request.match_info["id"]))


async def queue_flush(request: web.Request, service: AdminService) -> web.Response:
    data = await _body(request, ("queue_id", "account", "all"))
    return web.json_response(
        await service.queue_flush(_string(data, "queue_id"), _string(data, "account"), _flag(data, "all"))
    )


async def queue_hold(request: web.Request, service: AdminService) -> web.Response:
    await _body(request, ())
    return web.json_response(await service.queue_hold(request.match_info["id"], True))


async def queue_release(request: web.Request, service: AdminService) -> web.Response:
    await _body(request, ())
    return web.json_response(await service.queue_hold(request.match_info["id"], False))


async def queue_delete(request: web.Request, service: AdminService) -> web.Response:
    return web.json_response(await service.queue_delete(request.match_info["id"]))


def _limit(request: web.Request) -> int:
    text = request.query.get("limit", "100")
    try:
        return int(text)
    except ValueError:
        raise BadRequest(f"limit: {text!r} is not a number; give 1 to 1000") from None


async def set_webhook(request: web.Request, service: AdminService) -> web.Response:
    data = await _body(request, ("url", "events", "secret"))
    url = _string(data, "url", required=True)
    assert url is not None
    kinds = _strings(data, "events") if "events" in data else None
    result = await service.set_webhook(request.match_info["name"], url, kinds, _string(data, "secret"))
    return web.json_response(result)


async def show_webhook(request: web.Request, service: AdminService) -> web.Response:
    hook = await service.webhook(request.match_info["name"])
    if hook is None:
        raise NotFound(f"account {request.match_info['name']!r} has no webhook")
    return web.json_response(hook)


async def remove_webhook(request: web.Request, service: AdminService) -> web.Response:
    return web.json_response(await service.remove_webhook(request.match_info["name"]))


async def account_events(request: web.Request, service: AdminService) -> web.Response:
    return web.json_response(await service.events(request.match_info["name"], _limit(request)))


async def account_token(request: web.Request, service: AdminService) -> web.Response:
    await _body(request, ())
    return web.json_response(await service.account_token(request.match_info["name"]), status=201)


async def suppressions(request: web.Request, service: AdminService) -> web.Response:
    return web.json_response(await service.suppressions(request.match_info["name"]))


async def remove_suppression(request: web.Request, service: AdminService) -> web.Response:
    return web.json_response(
        await service.remove_suppression(request.match_info["name"], request.match_info["address"])
    )


# -- the account's own API (bearer: the account's token) -----------------------------------


async def own_usage(request: web.Request, account: AccountService) -> web.Response:
    return web.json_response(await account.usage())


async def own_invoices(request: web.Request, account: AccountService) -> web.Response:
    return web.json_response(await account.invoices())


async def own_invoice(request: web.Request, account: AccountService) -> web.Response:
    return web.json_response(await account.invoice(request.match_info["id"]))


async def own_events(request: web.Request, account: AccountService) -> web.Response:
    return web.json_response(await account.events(_limit(request)))


async def own_suppressions(request: web.Request, account: AccountService) -> web.Response:
    return web.json_response(await account.suppressions())


async def own_remove_suppression(request: web.Request, account: AccountService) -> web.Response:
    return web.json_response(await account.remove_suppression(request.match_info["address"]))


async def payment_webhook(request: web.Request) -> web.Response:
    """A payment provider's event, authenticated by its HMAC signature rather than a token."""
    deps = _deps(request)
    if deps.webhook_secret is None:
        return _error(503, "the payment webhook is not configured: set api.payment_webhook_secret_file and restart")
    body = await request.read()
    timestamp = request.headers.get("X-Mailmeter-Timestamp", "")
    signature = request.headers.get("X-Mailmeter-Signature", "")
    if not timestamp or not signature:
        return _error(
            401,
            "sign the request: send X-Mailmeter-Timestamp (Unix seconds) and"
            " X-Mailmeter-Signature: sha256=HMAC-SHA256(secret, timestamp + '.' + body)",
        )
    if not _TIMESTAMP.fullmatch(timestamp):
        raise BadRequest("X-Mailmeter-Timestamp: give the signing time as Unix seconds (ASCII digits)")
    if not _SIGNATURE.fullmatch(signature):
        raise BadRequest(
            "X-Mailmeter-Signature: give sha256= and the 64 hex digits of HMAC-SHA256(secret, timestamp + '.' + body)"
        )
    now = time.time()
    if not verify(deps.webhook_secret, timestamp, body, signature, now, deps.webhook_tolerance):
        try:
            stale = not abs(now - float(timestamp)) <= deps.webhook_tolerance
        except ValueError:
            stale = True
        if stale:
            return _error(
                401,
                f"X-Mailmeter-Timestamp {timestamp!r} is not within {deps.webhook_tolerance:g} s"
                " of the relay's clock; sign the event again with the current time",
            )
        return _error(
            401,
            "the signature does not match: sign timestamp + '.' + body with the shared secret"
            " of api.payment_webhook_secret_file",
        )
    _ACTOR.set(WEBHOOK_ACTOR)
    event = await _body(request, None)
    # The id inside the signed body, never a header: an unsigned Idempotency-Key would let a
    # captured event be applied again under a new key within the timestamp's tolerance.
    event_id = event.get("id")
    if not isinstance(event_id, str) or not event_id:
        raise BadRequest(
            "id: give the event's id (a non-empty string) in the signed body; it is how a"
            " redelivery is recognised (an Idempotency-Key header is not signed, so it cannot be)"
        )
    service = deps.service_for(WEBHOOK_ACTOR)
    return web.json_response(await service.payment_event(event, event_id))


def build_app(deps: ApiDeps) -> web.Application:
    app = web.Application(middlewares=[access_log, errors_as_json], client_max_size=1024 * 1024)
    app[DEPS] = deps
    routes = app.router
    # Open: health checks, this API's description, and the HMAC-signed payment webhook.
    routes.add_get("/healthz", healthz)
    routes.add_get("/openapi.json", openapi)
    routes.add_post("/v1/webhooks/payment", payment_webhook)
    # Everything else needs a bearer token.
    routes.add_get("/metrics", authenticated(metrics))
    routes.add_get("/v1/accounts", authenticated(list_accounts))
    routes.add_post("/v1/accounts", authenticated(add_account))
    routes.add_get("/v1/accounts/{name}", authenticated(show_account))
    routes.add_patch("/v1/accounts/{name}", authenticated(change_account))
    routes.add_delete("/v1/accounts/{name}", authenticated(delete_account))
    routes.add_post("/v1/accounts/{name}/suspend", authenticated(suspend_account))
    routes.add_post("/v1/accounts/{name}/resume", authenticated(resume_account))
    routes.add_get("/v1/accounts/{name}/usage", authenticated(usage))
    routes.add_post("/v1/accounts/{name}/payment", authenticated(payment))
    routes.add_post("/v1/accounts/{name}/balance", authenticated(balance))
    routes.add_put("/v1/accounts/{name}/monthly-payment", authenticated(monthly_payment))
    routes.add_post("/v1/accounts/{name}/repay", authenticated(repay))
    routes.add_put("/v1/accounts/{name}/limits/{which}", authenticated(set_limit))
    routes.add_get("/v1/accounts/{name}/rate", authenticated(get_rate))
    routes.add_put("/v1/accounts/{name}/rate", authenticated(set_rate))
    routes.add_get("/v1/accounts/{name}/charges", authenticated(charges))
    routes.add_post("/v1/charges/settle", authenticated(settle_charge))
    routes.add_put("/v1/accounts/{name}/plan", authenticated(set_plan))
    routes.add_get("/v1/accounts/{name}/invoices", authenticated(invoices))
    routes.add_get("/v1/invoices/{id}", authenticated(invoice))
    routes.add_get("/v1/exports/{month}.csv", authenticated(export))
    routes.add_get("/v1/plans", authenticated(plans))
    routes.add_post("/v1/plans/{name}/preview", authenticated(preview))
    routes.add_post("/v1/billing/run", authenticated(run_billing))
    routes.add_get("/v1/audit", authenticated(audit))
    routes.add_get("/v1/queue", authenticated(queue_list))
    routes.add_post("/v1/queue/flush", authenticated(queue_flush))
    routes.add_get("/v1/upstreams", authenticated(upstreams))
    routes.add_get("/v1/queue/{id}", authenticated(queue_show))
    routes.add_delete("/v1/queue/{id}", authenticated(queue_delete))
    routes.add_post("/v1/queue/{id}/hold", authenticated(queue_hold))
    routes.add_post("/v1/queue/{id}/release", authenticated(queue_release))
    routes.add_get("/v1/accounts/{name}/webhook", authenticated(show_webhook))
    routes.add_put("/v1/accounts/{name}/webhook", authenticated(set_webhook))
    routes.add_delete("/v1/accounts/{name}/webhook", authenticated(remove_webhook))
    routes.add_get("/v1/accounts/{name}/events", authenticated(account_events))
    routes.add_post("/v1/accounts/{name}/token", authenticated(account_token))
    routes.add_get("/v1/accounts/{name}/suppressions", authenticated(suppressions))
    routes.add_delete("/v1/accounts/{name}/suppressions/{address}", authenticated(remove_suppression))
    # The account's own API: its token, its data only.
    routes.add_get("/v1/account/usage", account_authenticated(own_usage))
    routes.add_get("/v1/account/invoices", account_authenticated(own_invoices))
    routes.add_get("/v1/account/invoices/{id}", account_authenticated(own_invoice))
    routes.add_get("/v1/account/events", account_authenticated(own_events))
    routes.add_get("/v1/account/suppressions", account_authenticated(own_suppressions))
    routes.add_delete("/v1/account/suppressions/{address}", account_authenticated(own_remove_suppression))
    return app


class ApiServer:
    """The API's aiohttp runner and TCP site, started and stopped with the relay."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.runner = web.AppRunner(app, access_log=None)
        self.site: web.BaseSite | None = None

    async def start(self, sock: socket.socket) -> None:
        """Serve on a socket bound beforehand (bind_api), so a port in use fails the relay's start early."""
        await self.runner.setup()
        self.site = web.SockSite(self.runner, sock)
        await self.site.start()

    @property
    def port(self) -> int:
        """The bound port (the real one when api.port is 0)."""
        addresses = self.runner.addresses
        assert addresses, "the API is not listening"
        return int(addresses[0][1])

    async def stop(self) -> None:
        await self.runner.cleanup()
        self.site = None

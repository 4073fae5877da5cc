"""The portal's aiohttp application: sign-in, the pages, the forms, and their guards.

Guards, in the order a request meets them:
- `guarded` (middleware): security headers on every answer (a CSP allowing only this
  origin, no framing, no caching); every POST must carry the CSRF token of its session
  (or, for the sign-in form, of its `mm_signin` cookie), else 403; errors become pages.
- `signed_in` (per route): the `mm_session` cookie names a live session, else GET goes
  to /signin and anything else is 403. The handler gets a Holder for that session's
  account only (holder.py): no route takes an account name.

Sign-in by name and password goes through the SMTP AUTH lockout (the relay's own
AuthGuard: failures here and in SMTP AUTH count together) and the same password hash.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import structlog
from aiohttp import web

from mailmeter.metering.meter import UnknownAccount
from mailmeter.metering.records import StoreUnavailable
from mailmeter.portal import eventviews, views
from mailmeter.portal.chart import usage_chart
from mailmeter.portal.holder import Holder, invoice_csv, model_of, threshold_lines
from mailmeter.portal.sessions import Session, Sessions, same_token
from mailmeter.relay.abuse import AuthGuard
from mailmeter.service import AdminError, AdminService, Conflict, NotFound, text_problem

SESSION_COOKIE = "mm_session"
SIGNIN_COOKIE = "mm_signin"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
HolderHandler = Callable[[web.Request, Holder, Session], Awaitable[web.StreamResponse]]
NAV: tuple[tuple[str, str], ...] = (
    ("/usage", "Usage"),
    ("/invoices", "Invoices"),
    ("/events", "Events"),
    ("/suppressed", "Suppressed"),
)
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:;"
    " form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
NOTICES = {
    "spending": "Your spending limit is changed. Sending that had paused at the old limit resumes at once.",
    "monthly": "Your monthly limit is changed: an increase applies at once, a decrease when this period ends.",
    "payment": "Your monthly payment is changed from the next period on.",
    "topup": "Your top-up is sent to the payment provider: the balance rises when it confirms the payment.",
    "repay": "Your repayment is sent to the payment provider: the overdrawn amount is settled when it confirms.",
}


@dataclass(frozen=True)
class ExtraPage:
    """A page another part adds to the portal (its nav shows it): GET `path`, signed in."""

    path: str
    label: str
    handler: HolderHandler


@dataclass
class PortalDeps:
    """What the portal needs from the node; `service()` is read per request (a reload's new Billing)."""

    service: Callable[[], AdminService]
    guard: AuthGuard
    sessions: Sessions
    secure_cookies: bool = False
    nav: tuple[tuple[str, str], ...] = NAV
    log: Any = field(default_factory=lambda: structlog.get_logger("mailmeter.portal"))


PORTAL = web.AppKey("portal", PortalDeps)


def _deps(request: web.Request) -> PortalDeps:
    return request.app[PORTAL]


def _html(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _problem(request: web.Request, status: int, text: str) -> web.Response:
    return _html(views.page("Not available", views.message(text, "error")), status)


# -- middleware ----------------------------------------------------------------------------


@web.middleware
async def guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        for key, value in [*request.match_info.items(), *request.query.items()]:
            if text_problem(value) or text_problem(key):
                raise AdminError(f"{key}: {text_problem(value) or text_problem(key)}")
        if request.method == "POST" and not await _csrf_ok(request):
            _deps(request).log.warning("portal.csrf", path=request.path, client=request.remote, result="refused")
            response: web.StreamResponse = _problem(
                request, 403, "This form has expired or did not come from this site: reload the page and try again."
            )
        else:
            response = await handler(request)
    except (NotFound, UnknownAccount) as error:
        response = _problem(request, 404, str(error).strip('"'))
    except Conflict as error:
        response = _problem(request, 409, str(error))
    except AdminError as error:
        response = _problem(request, 400, str(error))
    except StoreUnavailable:
        response = _problem(request, 503, "The service is unavailable for a moment; try again shortly.")
    except web.HTTPException as error:
        if error.status < 400:
            raise
        response = _problem(request, error.status, f"{error.reason}: {request.path}")
    except Exception as error:  # noqa: BLE001 (a bug: the holder gets a page, the log the traceback)
        _deps(request).log.exception("portal.error", path=request.path, error=repr(error))
        response = _problem(request, 500, "Something went wrong on our side; try again later.")
    for key, value in HEADERS.items():
        response.headers.setdefault(key, value)
    return response


async def _csrf_ok(request: web.Request) -> bool:
    form = await request.post()
    presented = form.get("csrf")
    token = presented if isinstance(presented, str) else None
    if request.path == "/signin":
        cookie = request.cookies.get(SIGNIN_COOKIE)
        return cookie is not None and same_token(cookie, token)
    session = _deps(request).sessions.get(request.cookies.get(SESSION_COOKIE))
    return session is not None and same_token(session.csrf, token)


def signed_in(handler: HolderHandler) -> Handler:
    async def checked(request: web.Request) -> web.StreamResponse:
        deps = _deps(request)
        session = deps.sessions.get(request.cookies.get(SESSION_COOKIE))
        if session is None:
            if request.method == "GET":
                raise web.HTTPSeeOther("/signin")
            return _problem(request, 403, "Sign in first.")
        return await handler(request, Holder.of(session.account, deps.service()), session)

    return checked


def _cookie(request: web.Request, response: web.StreamResponse, name: str, value: str) -> None:
    response.set_cookie(
        name,
        value,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=_deps(request).secure_cookies or request.secure,
    )


# -- sign-in and out ---------------------------------------------------------------------------


async def signin_page(request: web.Request, error: str | None = None, status: int = 200) -> web.Response:
    deps = _deps(request)
    if error is None and deps.sessions.get(request.cookies.get(SESSION_COOKIE)) is not None:
        raise web.HTTPSeeOther("/usage")
    token = request.cookies.get(SIGNIN_COOKIE) or _new_token()
    response = _html(views.page("Sign in", views.signin_form(token, error)), status)
    _cookie(request, response, SIGNIN_COOKIE, token)
    return response


def _new_token() -> str:
    return secrets.token_urlsafe(32)


async def signin(request: web.Request) -> web.StreamResponse:
    deps = _deps(request)
    form = await request.post()
    name, password, token = (str(form.get(key) or "") for key in ("name", "password", "token"))
    client = request.remote or "unknown"
    problem = text_problem(name) or text_problem(password) or text_problem(token)
    if problem:
        return await signin_page(request, "The name, password or token holds characters they cannot hold.", 400)
    account: str | None = None
    delay = 0.0
    async with deps.guard.attempt(client, None if token else name) as attempt:
        if attempt.locked is not None:
            seconds = max(1, round(attempt.locked.seconds_left))
            deps.log.warning("portal.signin", account=name, client=client, result="locked", scope=attempt.locked.scope)
            return await signin_page(request, f"Too many failed sign-ins: try again in {seconds} seconds.", 429)
        service = deps.service()
        if token:
            holder = await service.verify_account_token(token)
            account = holder.name if holder is not None and holder.deleted_at is None else None
        elif name and password:
            found = await service.meter.authenticate(name, password.encode())
            account = found.name if found is not None else None
        if account is None:
            delay = attempt.failed()
        else:
            attempt.succeeded()
    if account is None:
        deps.log.info("portal.signin", account=name, client=client, result="failed", delay=delay)
        if delay > 0:
            await asyncio.sleep(delay)
        return await signin_page(request, "Wrong account name, password or token.", 401)
    session = deps.sessions.start(account)
    deps.log.info("portal.signin", account=account, client=client, via="token" if token else "password", result="ok")
    response = _see_other("/usage")
    _cookie(request, response, SESSION_COOKIE, session.id)
    response.del_cookie(SIGNIN_COOKIE, path="/")
    return response


async def signout(request: web.Request, holder: Holder, session: Session) -> web.StreamResponse:
    _deps(request).sessions.end(session.id)
    _deps(request).log.info("portal.signout", account=holder.name, result="ok")
    response = _see_other("/signin")
    response.del_cookie(SESSION_COOKIE, path="/")
    return response


async def root(request: web.Request) -> web.StreamResponse:
    raise web.HTTPSeeOther("/usage")


# -- pages -----------------------------------------------------------------------------------


def _page(
    request: web.Request, title: str, body: str, holder: Holder, session: Session, status: int = 200
) -> web.Response:
    deps = _deps(request)
    return _html(views.page(title, body, holder.name, session.csrf, deps.nav, request.path), status)


async def usage_page(
    request: web.Request, holder: Holder, session: Session, error: str | None = None, status: int = 200
) -> web.Response:
    usage = await holder.usage()
    plan, period = await holder.terms()
    model = model_of(plan)
    charges = await holder.charges(period)
    in_period = [c for c in charges if c["kind"] not in ("invoice", "monthly", "topup", "repay")]
    csrf = session.csrf
    parts: list[str] = []
    done = request.query.get("done")
    if done in NOTICES:
        parts.append(views.message(NOTICES[done], "notice"))
    if error:
        parts.append(views.message(error, "error"))
    if usage["payment_state"] != "ok":
        parts.append(views.message("Sending is paused because a payment failed: update your payment method.", "error"))
    if model == "D":
        parts.append(views.model_d(usage, plan))
    elif model == "E":
        parts.append(views.model_e(usage, plan, in_period, await holder.limit_decrease(period)))
        parts.append(views.history(await holder.history()))
    elif model == "C":
        parts.append(views.model_c(usage))
    elif model == "B":
        parts.append(views.model_b(usage, plan))
    else:
        parts.append(views.model_a(usage, in_period))
    days = await holder.days(plan, period)
    chart = usage_chart(days, threshold_lines(plan, usage), f"Emails by day, {usage['period']}")
    parts.append(f"<section><h2>This period by day</h2>{chart}{views.days_table(days)}</section>")
    parts.append(_self_service(model, usage, csrf, charges))
    return _page(request, views.model_title(model), "".join(parts), holder, session, status)


def _self_service(model: str, usage: dict[str, Any], csrf: str, charges: Sequence[dict[str, Any]]) -> str:
    cur = usage["currency"]
    if model == "D":
        return (
            "<section><h2>Spending limit</h2>"
            + views.form(
                "/limits/spending",
                csrf,
                "amount",
                f"Spending limit ({cur})",
                usage["spending_limit"] or "",
                "Change the spending limit",
                "Raise it to keep sending once the limit is reached (at once: sending that paused resumes);"
                " lower it to cap this period's usage charges.",
            )
            + "</section>"
        )
    if model == "E":
        return (
            "<section><h2>Monthly limit</h2>"
            + views.form(
                "/limits/monthly",
                csrf,
                "emails",
                "Monthly email limit",
                str(usage["included_emails"]),
                "Change the monthly limit",
                "Increasing the limit applies at once, in this billing month. Decreasing it in the middle of the"
                " month keeps the original higher limit until the month ends.",
            )
            + "</section>"
        )
    if model == "B":
        prepaid = usage["prepaid"] or {}
        topups = [c for c in charges if c["kind"] == "topup"]
        return (
            "<section><h2>Send more</h2>"
            + views.form(
                "/top-up",
                csrf,
                "amount",
                f"Top up the balance ({cur})",
                "",
                "Top up",
                "Paid through the payment provider; the balance rises when it confirms the payment.",
            )
            + views.form(
                "/monthly-payment",
                csrf,
                "amount",
                f"Monthly payment ({cur})",
                str(prepaid.get("next_monthly_payment", "")),
                "Change the monthly payment",
                "Credited to the balance at the start of each period, from the next period on.",
            )
            + "</section>"
            + views.payments(topups, "Top-ups")
        )
    if model == "C":
        repays = [c for c in charges if c["kind"] == "repay"]
        owes = any(ch not in "0.," for ch in usage["overdrawn"])
        button = (
            views.button_form(
                "/repay",
                csrf,
                f"Repay overdrawn ({usage['overdrawn']} {cur})",
                "A payment page opens with the total amount due, already aggregated from all regions:"
                " it is paid through the payment provider, and settled when it confirms.",
            )
            if owes
            else '<p class="muted">Nothing is overdrawn.</p>'
        )
        return "<section><h2>Repay overdrawn</h2>" + button + "</section>" + views.payments(repays, "Repayments")
    return ""


async def chart_svg(request: web.Request, holder: Holder, session: Session) -> web.Response:
    usage = await holder.usage()
    plan, period = await holder.terms()
    days = await holder.days(plan, period)
    svg = usage_chart(days, threshold_lines(plan, usage), f"Emails by day, {usage['period']}")
    return web.Response(text=svg, content_type="image/svg+xml")


async def invoices_page(request: web.Request, holder: Holder, session: Session) -> web.Response:
    return _page(request, "Invoices", views.invoices_list(await holder.invoices()), holder, session)


async def invoice_page(request: web.Request, holder: Holder, session: Session) -> web.Response:
    invoice = await holder.invoice(request.match_info["id"])
    return _page(request, f"Invoice {invoice['period']}", views.invoice_page(invoice), holder, session)


async def invoice_csv_file(request: web.Request, holder: Holder, session: Session) -> web.Response:
    invoice = await holder.invoice(request.match_info["id"])
    return web.Response(
        text=invoice_csv(invoice),
        content_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{re.sub(r"[^A-Za-z0-9._-]", "_", invoice["id"])}.csv"'},
    )


async def events_page(request: web.Request, holder: Holder, session: Session) -> web.Response:
    """The account's webhook (never its secret) and its latest events with their delivery logs."""
    body = eventviews.webhook_section(await holder.webhook()) + eventviews.events_section(await holder.events())
    return _page(request, "Events", body, holder, session)


async def suppressed_page(
    request: web.Request, holder: Holder, session: Session, error: str | None = None, status: int = 200
) -> web.Response:
    """The account's suppressed recipients, each with a Remove button."""
    parts: list[str] = []
    removed = request.query.get("removed")
    if removed and error is None:
        parts.append(views.message(f"{removed} is no longer suppressed: your next email to it is accepted.", "notice"))
    if error:
        parts.append(views.message(error, "error"))
    parts.append(eventviews.suppressed_section(await holder.suppressions(), session.csrf))
    return _page(request, "Suppressed addresses", "".join(parts), holder, session, status)


async def remove_suppressed(request: web.Request, holder: Holder, session: Session) -> web.StreamResponse:
    """Take one address off the signed-in account's list (audited as `account:NAME`), then back to the list."""
    form = await request.post()
    value = form.get("address")
    address = value if isinstance(value, str) else ""
    try:
        if text_problem(address):
            raise AdminError(f"address: {text_problem(address)}")
        removed = await holder.remove_suppression(address)
    except AdminError as error:
        status = 404 if isinstance(error, NotFound) else 400
        return await suppressed_page(request, holder, session, str(error).strip('"'), status)
    _deps(request).log.info("portal.change", account=holder.name, action="suppression.remove", result="ok")
    raise web.HTTPSeeOther(f"/suppressed?removed={quote(removed['address'], safe='@')}")


# -- forms: each changes only the signed-in account, then shows the usage page ----------------


def _action(field: str, change: Callable[[Holder, str], Awaitable[object]], done: str) -> HolderHandler:
    async def handler(request: web.Request, holder: Holder, session: Session) -> web.StreamResponse:
        form = await request.post()
        value = form.get(field)
        try:
            await change(holder, value if isinstance(value, str) else "")
        except (AdminError, ValueError) as error:
            message = str(error).strip('"')
            status = 409 if isinstance(error, Conflict) else 400
            return await usage_page(request, holder, session, message, status)
        _deps(request).log.info("portal.change", account=holder.name, action=done, result="ok")
        raise web.HTTPSeeOther(f"/usage?done={done}")

    return handler


async def _repay(holder: Holder, _: str) -> object:
    return await holder.repay()


async def css(request: web.Request) -> web.Response:
    return web.Response(text=views.CSS, content_type="text/css", headers={"Cache-Control": "max-age=3600"})


async def js(request: web.Request) -> web.Response:
    return web.Response(text=views.JS, content_type="text/javascript", headers={"Cache-Control": "max-age=3600"})


def build_app(deps: PortalDeps, pages: Sequence[ExtraPage] = ()) -> web.Application:
    """The portal; `pages` are added to its nav and routes (signed in), after its own pages."""
    deps.nav = NAV + tuple((page.path, page.label) for page in pages)
    app = web.Application(middlewares=[guarded], client_max_size=64 * 1024)
    app[PORTAL] = deps
    routes = app.router
    routes.add_get("/portal.css", css)
    routes.add_get("/portal.js", js)
    routes.add_get("/signin", signin_page)
    routes.add_post("/signin", signin)
    routes.add_post("/signout", signed_in(signout))
    routes.add_get("/", root)
    routes.add_get("/usage", signed_in(usage_page))
    routes.add_get("/usage/chart.svg", signed_in(chart_svg))
    routes.add_get("/invoices", signed_in(invoices_page))
    routes.add_get(r"/invoices/{id:[^/]+}.csv", signed_in(invoice_csv_file))
    routes.add_get("/invoices/{id}", signed_in(invoice_page))
    routes.add_post("/limits/spending", signed_in(_action("amount", Holder.set_spending_limit, "spending")))
    routes.add_post("/limits/monthly", signed_in(_action("emails", Holder.set_monthly_limit, "monthly")))
    routes.add_post("/monthly-payment", signed_in(_action("amount", Holder.set_monthly_payment, "payment")))
    routes.add_post("/top-up", signed_in(_action("amount", Holder.top_up, "topup")))
    routes.add_post("/repay", signed_in(_action("", _repay, "repay")))
    routes.add_get("/events", signed_in(events_page))
    routes.add_get("/suppressed", signed_in(suppressed_page))
    routes.add_post("/suppressed/remove", signed_in(remove_suppressed))
    for page in pages:
        routes.add_get(page.path, signed_in(page.handler))
    return app


class PortalServer:
    """The portal's aiohttp runner on its own socket (portal.address:portal.port), HTTPS when `tls`."""

    def __init__(self, app: web.Application, tls: ssl.SSLContext | None = None) -> None:
        self.runner = web.AppRunner(app, access_log=None)
        self.tls = tls
        self.site: web.BaseSite | None = None

    async def start(self, sock: socket.socket) -> None:
        await self.runner.setup()
        self.site = web.SockSite(self.runner, sock, ssl_context=self.tls)
        await self.site.start()

    @property
    def port(self) -> int:
        addresses = self.runner.addresses
        assert addresses, "the portal is not listening"
        return int(addresses[0][1])

    async def stop(self) -> None:
        await self.runner.cleanup()
        self.site = None

"""The dashboard's pages: Dashboard, Jobs (list, page, submit, cancel), Wallet (history, CSV,
transfer) and Nodes (list, page, enrollment). Each handler reads through the store, the
ledger and the jobs service, and renders a template; every rule about jobs and credits stays
in those libraries (forms.py only turns form fields into their inputs)."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import logging
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import quote

import aiohttp_jinja2
from aiohttp import web

import wasm_jobs
from hub.api.auth import Identity
from hub.api.jobs import file_response
from hub.api.nodes import ca_pin, enroll_command
from hub.api.views import jobs_running, node_view
from hub.ledger import reports
from hub.ledger.money import InsufficientFunds, UnknownAccount, format_micro
from hub.market.errors import JobError, NotAllowed
from hub.market.jobs import wallet_of
from hub.market.spec import JOB_STATES, TERMINAL_STATES
from hub.web import forms, live, queries, session
from hub.web.session import services

log = logging.getLogger(__name__)
Context = dict[str, Any]
PageFn = Callable[[web.Request, Identity], Awaitable[Context]]
ACTIVE_STATES = ("queued", "assigned", "running")
NAV_URL = {"dashboard": "/", "jobs": "/jobs", "wallet": "/wallet", "nodes": "/nodes",
           "agents": "/agents"}  # fmt: skip


Handler = Callable[[web.Request], Awaitable[web.Response]]


def page(template: str, nav: str) -> Callable[[PageFn], Handler]:
    """A signed-in page: the handler's context plus what every page shows (who, balance),
    rendered into `template`, with the server's time in a Server-Timing header."""

    def wrap(fn: PageFn) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            started = time.perf_counter()
            who = session.require(request)
            return render(request, who, template, nav, await fn(request, who), started)

        return handler

    return wrap


def render(
    request: web.Request, who: Identity, template: str, nav: str, ctx: Context,
    started: float, status: int = 200,
) -> web.Response:  # fmt: skip
    ctx.update(common(request, who, nav))
    # What the live script fetches again to refresh parts of the page: a form's answer
    # (a POST) refreshes from its page's own address.
    ctx["refresh_url"] = request.path_qs if request.method == "GET" else NAV_URL[nav]
    response = aiohttp_jinja2.render_template(template, request, ctx, status=status)
    ms = (time.perf_counter() - started) * 1000
    response.headers["Server-Timing"] = f"app;dur={ms:.2f}"
    return response


def common(request: web.Request, who: Identity, nav: str) -> Context:
    svc = services(request)
    user = svc.store.user(who.user_id)
    try:
        balance = svc.ledger.balance(wallet_of(who.user_id))
    except UnknownAccount:
        balance = 0
    from hub.web import agents_available

    return {
        "me": {"id": who.user_id, "name": user["name"] if user else who.user_id,
               "role": who.role, "admin": who.is_admin},
        "nav": nav,
        "nav_balance": format_micro(balance),
        "agents_nav": agents_available(request.app),
        "now": time.time(),
    }  # fmt: skip


def not_found(what: str) -> web.HTTPNotFound:
    return web.HTTPNotFound(text=f"{what} (or it is not yours to see)", content_type="text/plain")


# --- error pages --------------------------------------------------------------------------
# Paths that are not pages: the REST API keeps its JSON errors (hub/api/http.py), and the
# event stream, static files and an operator's probes keep what their clients expect.
NOT_PAGES = ("/api/", "/static/", "/live", "/metrics", "/healthz", "/readyz")
ERROR_TITLES = {
    404: "Page not found",
    403: "Not allowed",
    405: "Not allowed here",
    413: "Too large",
    500: "Something went wrong",
}
ERROR_HINTS = {
    404: "There is nothing at {path}. Check the address, or find it from the dashboard.",
    405: "{method} is not allowed on {path}.",
    500: "The hub failed to show this page; it logged why. Try again, or go back to the dashboard.",
}


def _wants_page(request: web.Request) -> bool:
    if request.path.startswith(NOT_PAGES):
        return False
    accept = request.headers.get("Accept", "")
    return not accept or "text/html" in accept or "*/*" in accept


def error_page(request: web.Request, status: int, detail: str | None) -> web.Response:
    """An error inside the site's layout (with the navigation when signed in) and a way home."""
    try:
        title = ERROR_TITLES.get(status) or HTTPStatus(status).phrase
    except ValueError:
        title = f"Error {status}"
    hint = ERROR_HINTS.get(status, "")
    message = detail or hint.format(path=request.path, method=request.method) or title
    ctx: Context = {"status": status, "title": title, "message": message, "nav": None}
    who = session.current(request)
    if who is not None:
        with contextlib.suppress(Exception):  # the layout's own reads must not hide the error
            ctx.update(common(request, who, "dashboard"))
            ctx["nav"] = None
    return aiohttp_jinja2.render_template("error.html", request, ctx, status=status)


@web.middleware
async def error_pages_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """404s and other errors of the pages as pages; everything else passes through."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400 or not _wants_page(request):
            raise
        detail = e.text if e.text and not e.text.startswith(f"{e.status}:") else None
        return error_page(request, e.status, detail)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        if not _wants_page(request):
            raise
        log.exception("error rendering %s %s", request.method, request.path)
        return error_page(request, 500, None)


# --- dashboard ----------------------------------------------------------------------------
@page("dashboard.html", "dashboard")
async def dashboard(request: web.Request, who: Identity) -> Context:
    svc = services(request)
    owner = None if who.is_admin else who.user_id
    nodes = svc.store.nodes(owner)
    online = [n for n in nodes if n["state"] != "offline"]
    capacity = {"cpu": 0.0, "memory_mb": 0, "gpu": 0}
    for n in online:
        res = queries.offered(n)
        capacity["cpu"] += res["cpu"]
        capacity["memory_mb"] += res["memory_mb"]
        capacity["gpu"] += res["gpu"]
    states = {n["state"]: 0 for n in nodes}
    for n in nodes:
        states[n["state"]] += 1
    counts = queries.job_counts(svc.db, owner)
    hourly = queries.jobs_per_hour(svc.db, owner)
    seen = live._Visibility(svc, who)
    events = [e for e in request.app[live.LIVE].events if e["kind"] in ("job", "node")]
    events = [e for e in events if seen.allows(e)][:12]
    recent = [svc.jobs.view(r) for r in svc.store.jobs(owner=owner, limit=6)]
    node_ids = {e["id"] for e in events if e["kind"] == "node"}
    job_ids = {e["id"] for e in events if e["kind"] == "job"}
    books = None
    if who.is_admin:
        # The cached balances' sum (cheap); `deparrow ledger audit` rescans every posting.
        row = svc.db.query_one("SELECT COALESCE(SUM(balance), 0) AS s, count(*) AS n FROM accounts")
        if row is not None:
            books = {"balanced": int(row["s"]) == 0, "accounts": int(row["n"]),
                     "total": format_micro(int(row["s"]))}  # fmt: skip
    return {
        "books": books,
        "nodes_total": len(nodes),
        "nodes_online": len(online),
        "node_states": states,
        "capacity": capacity,
        "counts": counts,
        "jobs_24h": sum(sum(v) for v in hourly["series"].values()),
        "hourly": hourly,
        "events": events,
        "node_names": queries.node_names(svc.db, node_ids),
        "job_names": queries.job_names(svc.db, job_ids),
        "recent": recent,
        "wallet": wallet_summary(svc, who.user_id),
    }


def wallet_summary(svc: Any, user_id: str) -> Context:
    wallet = wallet_of(user_id)
    try:
        balance = svc.ledger.balance(wallet)
        held = svc.ledger.held_for(wallet)
    except UnknownAccount:
        balance = held = 0
    return {"balance": format_micro(balance), "held": format_micro(held),
            "balance_micro": balance, "held_micro": held}  # fmt: skip


async def wallet_chart(request: web.Request) -> web.Response:
    """Earned and spent per day for the signed-in wallet (the charts fetch this)."""
    who = session.require(request)
    svc = services(request)
    days = min(90, max(1, _whole(request.query.get("days")) or 14))
    data = queries.wallet_by_day(svc.db, wallet_of(who.user_id), days)
    return web.json_response(data)


# --- jobs ---------------------------------------------------------------------------------
def _whole(value: str | None) -> int | None:
    """A page's whole-number parameter (a cursor, a count): plain ASCII digits that SQLite can
    hold, else None, and the page shows its default (a link is never an error here)."""
    if value is None or not value.isascii() or not value.isdigit() or len(value) > 18:
        return None
    return int(value)


def _cursor(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


async def _jobs_context(request: web.Request, who: Identity) -> Context:
    svc = services(request)
    q = request.query
    state = q.get("state") if q.get("state") in JOB_STATES else None
    search = (q.get("q") or "").strip()[:128] or None
    scope = "mine" if not who.is_admin or q.get("scope") == "mine" else "all"
    owner = who.user_id if scope == "mine" else None
    pg = queries.job_page(
        svc.db, owner=owner, state=state, q=search,
        before=_cursor(q.get("before")), after=_cursor(q.get("after")),
    )  # fmt: skip
    counts = queries.job_counts(svc.db, owner)
    names = queries.user_names(svc.db, {r["owner"] for r in pg.rows}) if who.is_admin else {}
    return {
        "jobs": [svc.jobs.view(r) for r in pg.rows],
        "page": pg,
        "counts": counts,
        "total": sum(counts.values()),
        "state": state,
        "q": search or "",
        "scope": scope,
        "names": names,
        "node_names": queries.node_names(svc.db, {r["node"] for r in pg.rows}),
        "states": JOB_STATES,
        "form": forms.job_form_defaults(),
        "examples": wasm_jobs.examples(),
        "errors": {},
        "review": None,
    }


async def submit_job(request: web.Request) -> web.Response:
    """The submit form: first a review with the price, then the confirmed submission."""
    started = time.perf_counter()
    who = session.require(request)
    svc = services(request)
    post = await request.post()
    form, errors, spec = forms.parse_job_form(post, svc)
    review = None
    if spec is not None and not errors:
        price = forms.job_price(spec)
        wallet = wallet_summary(svc, who.user_id)
        if post.get("step") == "confirm":
            try:
                job = svc.jobs.submit(who.user_id, spec, submit_key="web:" + form["key"])
            except InsufficientFunds as e:
                errors["timeout"] = forms.short_of(e)
            except JobError as e:
                errors[forms.FIELD_OF.get(e.field or "", "module")] = str(e)
            else:
                live.record(request.app, "job", {"id": job["id"], "state": job["state"]})
                if svc.bridge is not None:
                    # Queued and paid for: if this fails, the bridge's next tick assigns it.
                    with contextlib.suppress(Exception):
                        svc.bridge.dispatch()
                raise web.HTTPSeeOther(f"/jobs/{job['id']}?submitted=1")
        if not errors:
            if price > wallet["balance_micro"]:
                errors["timeout"] = (
                    f"Too few credits: this job holds up to {format_micro(price)} credits and "
                    f"your wallet has {wallet['balance']}. Shorten the timeout, choose normal "
                    "priority, or add credits."
                )
            else:
                review = {"price": format_micro(price), "after": format_micro(
                    wallet["balance_micro"] - price), "spec": spec}  # fmt: skip
    ctx = await _jobs_context(request, who)
    ctx.update(form=form, errors=errors, review=review, open_form=True)
    return render(request, who, "jobs.html", "jobs", ctx, started, 400 if errors else 200)


jobs_list = page("jobs.html", "jobs")(_jobs_context)


def _visible_job(request: web.Request, who: Identity) -> Any:
    svc = services(request)
    job_id = request.match_info["job_id"]
    job = svc.store.job(job_id)
    if job is None or (job["owner"] != who.user_id and not who.is_admin):
        raise not_found(f"no job {job_id}")
    return job


@page("job.html", "jobs")
async def job_page(request: web.Request, who: Identity) -> Context:
    svc = services(request)
    row = _visible_job(request, who)
    job = svc.jobs.view(row)
    hold = svc.ledger.hold(row["id"])
    t = job["timings"]
    steps = [("submitted", t["submitted_at"]), ("assigned", t["assigned_at"]),
             ("started", t["started_at"]),
             (job["state"] if job["state"] in TERMINAL_STATES else "finished",
              t["finished_at"])]  # fmt: skip
    result = job["result"] or {}
    stdout = result.get("stdout") or ""
    verification = job["verification"]  # None unless the job asked for replicas
    owner = svc.store.user(row["owner"])
    return {
        "job": job,
        "steps": steps,
        "hold": hold,
        "hold_placed": format_micro(hold.placed) if hold else None,
        "hold_left": format_micro(hold.balance) if hold else None,
        "result": result,
        "stdout_preview": stdout[: forms.PREVIEW_CHARS],
        "stdout_long": len(stdout) > forms.PREVIEW_CHARS,
        "verification": verification,
        "active": job["state"] in ACTIVE_STATES,
        "owner_name": owner["name"] if owner else row["owner"],
        "submitted": bool(request.query.get("submitted")),
        "spec_json": json.dumps(job["spec"], indent=2),
        "outputs": [
            {**f, "href": f"/jobs/{row['id']}/files/{quote(f['path'])}"}
            for f in result.get("outputs") or []
        ],
        "inputs": job["spec"].get("inputs") or [],
        "node_names": queries.node_names(
            svc.db, {row["node"]} | {r["node"] for r in (verification or {}).get("runs", [])}
        ),
    }


async def job_output(request: web.Request) -> web.Response:
    who = session.require(request)
    job = services(request).jobs.view(_visible_job(request, who))
    result = job["result"] or {}
    stream = "stderr" if request.query.get("stream") == "stderr" else "stdout"
    return web.Response(
        text=result.get(stream) or "",
        content_type="text/plain",
        headers={"Content-Disposition": f'attachment; filename="{job["id"]}.{stream}.txt"'},
    )


async def job_file(request: web.Request) -> web.Response:
    """A file the job wrote under /outputs, for the signed-in owner (as the API's
    /api/v1/jobs/{id}/outputs/{path} gives it to a token)."""
    who = session.require(request)
    row = _visible_job(request, who)
    path = request.match_info["path"]
    data = services(request).store.job_file(row["id"], "output", path)
    if data is None:
        gone = row["outputs_expired_at"] is not None
        raise not_found(f"the outputs of job {row['id']} expired" if gone
                        else f"job {row['id']} has no output {path}")  # fmt: skip
    return file_response(path, data)


async def cancel_job(request: web.Request) -> web.Response:
    who = session.require(request)
    svc = services(request)
    job_id = request.match_info["job_id"]
    try:
        job, node = svc.jobs.cancel(who.user_id, job_id, who.is_admin)
    except (NotAllowed, JobError):
        raise not_found(f"no job {job_id}") from None
    if node and svc.bridge is not None:
        svc.bridge.cancel_on_node(node, job["id"], int(job["attempt"]))
    live.record(request.app, "job", {"id": job["id"], "state": job["state"]})
    raise web.HTTPSeeOther(f"/jobs/{job_id}")


# --- wallet -------------------------------------------------------------------------------
def _history(svc: Any, user_id: str, before: int | None) -> tuple[list[Context], int | None]:
    wallet = wallet_of(user_id)
    try:
        balance = svc.ledger.balance(wallet)
    except UnknownAccount:
        return [], None
    rows = queries.history_page(svc.db, wallet, balance, forms.HISTORY_PAGE, before)
    lines = reports.describe(svc.db, wallet, rows)
    ids = {c[len("wallet:") :] for r in rows for c in r.counterparties if c.startswith("wallet:")}
    names = queries.user_names(svc.db, ids)
    items = [
        {"entry": line.entry_id, "at": line.created_at, "text": line.text,
         "category": line.category, "href": _link(line.link), "amount": line.amount,
         "held": line.held, "back": line.back, "balance_after": line.balance_after,
         "with": [forms.describe_account(c, names) for c in line.counterparties
                  if not c.startswith("hold:")],
         "memo": (line.memo or {}).get("memo")}
        for line in lines
    ]  # fmt: skip
    more = len(rows) == forms.HISTORY_PAGE
    return items, rows[-1].entry_id if rows and more else None


# How the wallet page names each kind of line (hub/ledger/reports.py sorts them).
CATEGORIES = {
    "work": "earned: node work", "uptime": "earned: uptime", "bonus": "earned: bonus",
    "grant": "earned: grant", "received": "earned: received", "compute": "spent: compute",
    "calls": "spent: service call", "sent": "spent: sent", "held": "held for a running job",
    "other": "",
}  # fmt: skip


def _link(link: tuple[str, str] | None) -> str | None:
    """Where a history line leads: a job's page, an agent's, a node's; nothing else."""
    if link is None:
        return None
    kind, ident = link
    pages = {"job": "/jobs/", "agent": "/agents/", "service": "/agents/console/", "node": "/nodes/"}
    return pages[kind] + quote(ident)


async def _wallet_context(request: web.Request, who: Identity) -> Context:
    svc = services(request)
    before = _whole(request.query.get("before"))
    items, older = _history(svc, who.user_id, before)
    return {
        "wallet": wallet_summary(svc, who.user_id),
        "items": items,
        "categories": CATEGORIES,
        "older": older,
        "first_page": before is None,
        "form": {"to": request.query.get("to", ""), "amount": "", "memo": ""},
        "errors": {},
        "review": None,
        "sent": request.query.get("sent"),
    }


@page("wallet.html", "wallet")
async def wallet_page(request: web.Request, who: Identity) -> Context:
    return await _wallet_context(request, who)


async def wallet_csv(request: web.Request) -> web.StreamResponse:
    who = session.require(request)
    svc = services(request)
    response = web.StreamResponse(headers={
        "Content-Type": "text/csv; charset=utf-8",
        "Content-Disposition": 'attachment; filename="wallet-history.csv"'})  # fmt: skip
    await response.prepare(request)
    buf = io.StringIO()
    out = csv.writer(buf)
    out.writerow(reports.CSV_HEADER)
    before: int | None = None
    wallet = wallet_of(who.user_id)
    while True:
        try:
            rows = svc.ledger.history(wallet, limit=1000, before_entry_id=before)
        except UnknownAccount:
            rows = []
        out.writerows(reports.csv_row(line) for line in reports.describe(svc.db, wallet, rows))
        await response.write(buf.getvalue().encode())
        buf.seek(0)
        buf.truncate()
        if len(rows) < 1000:
            break
        before = rows[-1].entry_id
    await response.write_eof()
    return response


async def transfer(request: web.Request) -> web.Response:
    """Send credits: a review that names the recipient and the amount, then the transfer."""
    started = time.perf_counter()
    who = session.require(request)
    svc = services(request)
    post = await request.post()
    form, errors, plan = forms.parse_transfer(post, svc, who.user_id)
    review = None
    if plan is not None and not errors:
        if post.get("step") == "confirm":
            memo = {"memo": form["memo"]} if form["memo"] else None
            try:
                entry = await svc.writer.transfer(
                    f"transfer:{who.user_id}:{form['key']}", wallet_of(who.user_id),
                    wallet_of(plan["to_id"]), plan["amount"], f"transfer to {plan['to_id']}",
                    memo=memo,
                )  # fmt: skip
            except InsufficientFunds as e:
                errors["amount"] = forms.short_of(e)
            else:
                raise web.HTTPSeeOther(f"/wallet?sent={entry.id}")
        if not errors:
            review = plan
    ctx = await _wallet_context(request, who)
    ctx.update(form=form, errors=errors, review=review)
    return render(request, who, "wallet.html", "wallet", ctx, started, 400 if errors else 200)


# --- nodes --------------------------------------------------------------------------------
def _node_row(n: Any, columns: set[str], names: dict[str, str], running: int) -> Context:
    view = node_view(n, running)
    view["offered"] = queries.offered(n)
    view["reputation"] = n["reputation"] if "reputation" in columns else None
    view["owner_name"] = names.get(n["owner"], n["owner"])
    return view


async def _nodes_context(request: web.Request, who: Identity) -> Context:
    svc = services(request)
    nodes = svc.store.nodes(None if who.is_admin else who.user_id)
    columns = queries.node_columns(svc.db)
    names = queries.user_names(svc.db, {n["owner"] for n in nodes}) if who.is_admin else {}
    running = jobs_running(svc.db, [n["id"] for n in nodes])
    views = [_node_row(n, columns, names, running.get(n["id"], 0)) for n in nodes]
    order = {"busy": 0, "idle": 1, "suspended": 2, "offline": 3}
    views.sort(key=lambda v: (order.get(v["state"], 2), v["name"]))
    return {
        "nodes": views,
        "has_reputation": "reputation" in columns,
        "enrollment": None,
    }


@page("nodes.html", "nodes")
async def nodes_page(request: web.Request, who: Identity) -> Context:
    return await _nodes_context(request, who)


async def enrollment_token(request: web.Request) -> web.Response:
    started = time.perf_counter()
    who = session.require(request)
    svc = services(request)
    token, exp = svc.store.create_enrollment_token(who.user_id, svc.config.enrollment_ttl_s)
    ctx = await _nodes_context(request, who)
    # The command `deparrow node token` prints: the hub's URL as the browser reached it (or as
    # a reverse proxy says) and, when the hub serves TLS with its own CA, the --ca pin.
    command = enroll_command(request, token)
    ctx["enrollment"] = {"token": token, "expires_at": exp, "command": command,
                         "ca": ca_pin(request)}  # fmt: skip
    return render(request, who, "nodes.html", "nodes", ctx, started, 201)


@page("node.html", "nodes")
async def node_page(request: web.Request, who: Identity) -> Context:
    svc = services(request)
    node_id = request.match_info["node_id"]
    n = svc.store.node(node_id)
    if n is None or (n["owner"] != who.user_id and not who.is_admin):
        raise not_found(f"no node {node_id}")
    columns = queries.node_columns(svc.db)
    names = queries.user_names(svc.db, {n["owner"]})
    beats = live.heartbeats(request.app, node_id)
    return {
        "node": _node_row(n, columns, names, jobs_running(svc.db, [node_id]).get(node_id, 0)),
        "has_reputation": "reputation" in columns,
        "beats": beats,
        "recent_beats": list(reversed(beats[-12:])),
        "jobs": [svc.jobs.view(r) for r in queries.jobs_on_node(svc.db, node_id)],
        "earnings": queries.node_earnings(svc.db, n),
        "interval": svc.config.heartbeat_interval_s,
        "kept": live.HEARTBEATS_KEPT,
    }

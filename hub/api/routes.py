"""REST API v1: request decoding, auth checks, and the mapping of domain errors to statuses.

Handlers stay thin: they decode with msgspec, call the ledger/jobs/store, and encode views.
Domain errors become HTTP statuses only here.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

import msgspec
from aiohttp import web

from hub.agents.registry import AgentError, AgentForbidden, AgentNotFound, CallConflict
from hub.api import auth, openapi
from hub.api.auth import AuthError, Identity
from hub.api.types import (
    BlobView,
    CreateUser,
    EnrollmentTokenView,
    EnrollRequest,
    EnrollResponse,
    HistoryItem,
    MqttCredentials,
    NodeTokenRequest,
    SubmitResponse,
    TokenRequest,
    TokenResponse,
    TransferRequest,
    TransferResponse,
    UserCreated,
    WalletView,
)
from hub.ledger.ledger import (
    IdempotencyConflict,
    InsufficientFunds,
    InvalidAmount,
    LedgerError,
    UnknownAccount,
    credits_to_micro,
    format_micro,
)
from hub.market.errors import JobConflict, JobError, JobNotFound, NotAllowed
from hub.market.jobs import wallet_of
from hub.market.spec import JOB_STATES, JobSpec, error_field
from hub.store.rows import token_hash

log = logging.getLogger(__name__)
T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _services(request: web.Request) -> Any:
    from hub.api.services import SERVICES

    return request.app[SERVICES]


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(obj), status=status, content_type="application/json"
    )


def error(status: int, message: str, **extra: Any) -> web.Response:
    body = {"error": message}
    body.update({k: v for k, v in extra.items() if v is not None})
    return json_response(body, status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except AuthError as e:
        return error(401, str(e))
    except InsufficientFunds as e:
        return error(402, str(e), shortfall=format_micro(e.shortfall))
    except JobNotFound as e:
        return error(404, str(e))
    except JobConflict as e:
        return error(409, str(e))
    except NotAllowed as e:
        return error(403, str(e))
    except JobError as e:
        return error(400, str(e), field=e.field)
    except AgentNotFound as e:
        return error(404, str(e))
    except AgentForbidden as e:
        return error(403, str(e))
    except CallConflict as e:
        return error(409, str(e))
    except AgentError as e:
        return error(400, str(e), field=e.field)
    except IdempotencyConflict as e:
        return error(409, f"{e}: that Idempotency-Key was used for a different request")
    except UnknownAccount as e:
        return error(404, str(e))
    except LedgerError as e:
        return error(400, str(e), field="amount" if isinstance(e, InvalidAmount) else None)
    except msgspec.ValidationError as e:
        return error(400, f"invalid request: {e}", field=error_field(str(e)))
    except msgspec.DecodeError as e:
        return error(400, f"request body is not valid JSON: {e}")
    except web.HTTPException as e:
        if e.status < 400 or not request.path.startswith("/api/"):
            raise
        message = {
            404: f"no such endpoint: {request.method} {request.path} (see /api/v1/openapi.json)",
            405: f"{request.method} is not allowed on {request.path}",
            413: f"request body is over the hub's {request.app._client_max_size} byte limit",
        }.get(e.status, e.reason)
        return error(e.status, message)


async def decode_body(request: web.Request, type_: type[T]) -> T:
    body = await request.read()
    if not body:
        raise msgspec.ValidationError("request body is empty; send a JSON object")
    return msgspec.json.decode(body, type=type_)


def identity(request: web.Request, node_ok: bool = False) -> Identity:
    """Who is calling. A node's token is good only where node_ok says so (its own record):
    it holds no wallet, owns no jobs and speaks for nobody else."""
    services = _services(request)
    who = auth.verify(services.config.jwt_secret, auth.bearer(request.headers.get("Authorization")))
    if who.is_node and not node_ok:
        raise NotAllowed(
            f"node {who.user_id}'s token may only read its own node record; "
            "use a user's or agent's API token for this"
        )
    return who


def require_admin(request: web.Request) -> Identity:
    who = identity(request)
    if not who.is_admin:
        raise NotAllowed("only an admin may do this")
    return who


# --- auth and users -------------------------------------------------------------------
async def exchange_token(request: web.Request) -> web.Response:
    services = _services(request)
    req = await decode_body(request, TokenRequest)
    user = services.store.user_by_token(req.token)
    if user is None:
        raise AuthError("unknown API token")
    if user["broker_hash"] is None and services.store.fill_broker_hash(user["id"], req.token):
        services.sync_broker()  # an account from before broker logins can now use MQTT
    token, exp = auth.issue(
        services.config.jwt_secret, user["id"], user["role"], services.config.jwt_ttl_s
    )
    return json_response(
        TokenResponse(jwt=token, expires_at=exp, user=user["id"], role=user["role"])
    )


def _node_password_ok(node: Any, password: str) -> bool:
    return (
        node is not None
        and node["revoked_at"] is None
        and secrets.compare_digest(token_hash(password), node["mqtt_password_hash"])
    )


async def exchange_node_token(request: web.Request) -> web.Response:
    """A node's id and MQTT password (from its node.json) for a JWT with the node role."""
    services = _services(request)
    req = await decode_body(request, NodeTokenRequest)
    if not _node_password_ok(services.store.node(req.node_id), req.password):
        raise AuthError(
            f"node {req.node_id} with this password is unknown here (or was removed): use the "
            "node id and MQTT password from node.json, or enroll again"
        )
    token, exp = auth.issue(
        services.config.jwt_secret, req.node_id, "node", services.config.jwt_ttl_s
    )
    return json_response(TokenResponse(jwt=token, expires_at=exp, user=req.node_id, role="node"))


async def create_user(request: web.Request) -> web.Response:
    require_admin(request)
    req = await decode_body(request, CreateUser)
    services = _services(request)
    if req.referred_by is not None and services.store.user(req.referred_by) is None:
        return error(400, f"referred_by: no user {req.referred_by}", field="referred_by")
    user_id, token, grant = services.create_user(req.name, req.role, req.referred_by)
    return json_response(
        UserCreated(
            id=user_id, name=req.name, role=req.role, token=token, welcome_grant=format_micro(grant)
        ),
        201,
    )


# --- wallet ---------------------------------------------------------------------------
async def wallet(request: web.Request) -> web.Response:
    who = identity(request)
    services = _services(request)
    account = wallet_of(who.user_id)
    balance = services.ledger.balance(account)
    held = services.ledger.held_for(account)
    return json_response(
        WalletView(
            owner=who.user_id,
            balance=format_micro(balance),
            held=format_micro(held),
            balance_micro=balance,
            held_micro=held,
        )
    )


async def wallet_history(request: web.Request) -> web.StreamResponse:
    who = identity(request)
    ledger = _services(request).ledger
    try:
        limit = min(1000, max(1, int(request.query.get("limit", "50"))))
    except ValueError:
        return error(400, "limit must be an integer", field="limit")
    try:
        before = int(request.query["before"]) if "before" in request.query else None
    except ValueError:
        return error(400, "before must be an entry number", field="before")
    rows = ledger.history(wallet_of(who.user_id), limit=limit, before_entry_id=before)
    items = [
        HistoryItem(entry=r.entry_id, at=r.created_at, reason=r.reason,
                    amount=format_micro(r.amount), balance_after=format_micro(r.balance_after),
                    counterparties=list(r.counterparties))
        for r in rows
    ]  # fmt: skip
    if request.query.get("format") == "csv":
        buf = io.StringIO()
        out = csv.writer(buf)
        out.writerow(["entry", "time_utc", "reason", "amount", "balance_after", "counterparties"])
        for i in items:
            when = datetime.fromtimestamp(i.at, UTC).isoformat(timespec="seconds")
            out.writerow([i.entry, when, i.reason, i.amount, i.balance_after,
                          " ".join(i.counterparties)])  # fmt: skip
        return web.Response(
            text=buf.getvalue(), content_type="text/csv",
            headers={"Content-Disposition": 'attachment; filename="wallet-history.csv"'},
        )  # fmt: skip
    next_before = items[-1].entry if len(items) == limit else None
    return json_response({"items": items, "next_before": next_before})


async def wallet_transfer(request: web.Request) -> web.Response:
    who = identity(request)
    services = _services(request)
    key = request.headers.get("Idempotency-Key")
    if not key or len(key) > 128:
        return error(
            400, "an Idempotency-Key header (1 to 128 characters) is required: retrying with "
            "the same key never moves credits twice", field="Idempotency-Key",
        )  # fmt: skip
    req = await decode_body(request, TransferRequest)
    amount = credits_to_micro(req.amount)
    if amount <= 0:
        return error(400, f"amount must be more than 0 credits, not {req.amount}", field="amount")
    if req.to == who.user_id:
        return error(400, "you cannot transfer to yourself", field="to")
    if services.store.user(req.to) is None:
        return error(404, f"no user or agent {req.to}", field="to")
    src, dst = wallet_of(who.user_id), wallet_of(req.to)
    ledger = services.ledger
    ledger.open_account(dst, "wallet", req.to)
    memo = {"memo": req.memo} if req.memo else None
    # Through the writer: concurrent transfers share one durable commit, and the answer is
    # sent only once that commit is on disk.
    entry = await services.writer.transfer(
        f"transfer:{who.user_id}:{key}", src, dst, amount, f"transfer to {req.to}", memo=memo
    )
    return json_response(
        TransferResponse(entry=entry.id, to=req.to, amount=format_micro(amount),
                         balance=format_micro(services.ledger.balance(src)),
                         replayed=entry.replayed),
        200 if entry.replayed else 201,
    )  # fmt: skip


# --- blobs and jobs -------------------------------------------------------------------
async def upload_blob(request: web.Request) -> web.Response:
    identity(request)
    services = _services(request)
    data = await request.read()
    limit = services.config.max_module_bytes
    if not data:
        return error(400, "empty upload: send the file's bytes as the request body")
    if len(data) > limit:
        return error(413, f"upload of {len(data)} bytes is over the {limit}-byte limit")
    digest = services.store.put_blob(data)
    return json_response(BlobView(ref="sha256:" + digest, size=len(data)), 201)


async def submit_job(request: web.Request) -> web.Response:
    who = identity(request)
    services = _services(request)
    spec = await decode_body(request, JobSpec)
    key = request.headers.get("Idempotency-Key")
    if key is not None and not (0 < len(key) <= 128):
        return error(400, "Idempotency-Key must be 1 to 128 characters", field="Idempotency-Key")
    submit_key = "rest:" + key if key else None
    writer = services.writer
    if writer is not None and writer.running:
        # Through the writer: concurrent submissions share one durable commit (the hold and
        # the queued job), and the answer is sent only once that commit is on disk.
        job = await writer.run(lambda _c: services.jobs.submit(who.user_id, spec, submit_key))
    else:
        job = services.jobs.submit(who.user_id, spec, submit_key=submit_key)
    services.on_change("job", {"id": job["id"], "state": job["state"]})
    if services.bridge is not None:
        try:
            services.bridge.dispatch()
        except Exception:  # the job is queued and paid for; the next tick assigns it
            log.exception("dispatch after submitting %s failed", job["id"])
    return json_response(
        SubmitResponse(
            id=job["id"],
            state=job["state"],
            hold=format_micro(int(job["hold"])),
            max_price=format_micro(int(job["hold"])),
        ),
        201,
    )


def _own_job(request: web.Request) -> Any:
    who = identity(request)
    services = _services(request)
    job_id = request.match_info["job_id"]
    job = services.store.job(job_id)
    if job is None:
        raise JobNotFound(f"no job {job_id}")
    if job["owner"] != who.user_id and not who.is_admin:
        raise JobNotFound(f"no job {job_id}")  # someone else's job: don't confirm it exists
    return job


async def get_job(request: web.Request) -> web.Response:
    return json_response(_services(request).jobs.view(_own_job(request)))


async def list_jobs(request: web.Request) -> web.Response:
    who = identity(request)
    services = _services(request)
    state = request.query.get("state")
    if state is not None and state not in JOB_STATES:
        return error(400, f"state must be one of {', '.join(JOB_STATES)}", field="state")
    try:
        limit = min(500, max(1, int(request.query.get("limit", "50"))))
    except ValueError:
        return error(400, "limit must be an integer", field="limit")
    owner = None if who.is_admin and request.query.get("all") == "1" else who.user_id
    rows = services.store.jobs(owner=owner, state=state, limit=limit)
    return json_response({"jobs": [services.jobs.view(r) for r in rows]})


async def cancel_job(request: web.Request) -> web.Response:
    who = identity(request)
    services = _services(request)
    job, node = services.jobs.cancel(who.user_id, request.match_info["job_id"], who.is_admin)
    stop = services.jobs.take_cancels()  # a verified job's replicas on their nodes
    if node:
        stop.append((node, job["id"], int(job["attempt"])))
    if services.bridge is not None:
        for node_id, job_id, attempt in stop:
            services.bridge.cancel_on_node(node_id, job_id, attempt)
    return json_response(services.jobs.view(job))


# --- nodes ----------------------------------------------------------------------------
def _public_mqtt_url(request: web.Request) -> str:
    services = _services(request)
    if services.config.mqtt_public_url:
        return str(services.config.mqtt_public_url)
    parts = urlsplit(services.mqtt_url)
    host = parts.hostname or "127.0.0.1"
    if host in ("0.0.0.0", "::", "127.0.0.1", "localhost"):
        # Tell the node to reach the broker the way it reached us.
        host = request.url.host or host
    return f"mqtt://{host}:{parts.port or 1883}"


async def create_enrollment_token(request: web.Request) -> web.Response:
    who = identity(request)
    services = _services(request)
    token, exp = services.store.create_enrollment_token(
        who.user_id, services.config.enrollment_ttl_s
    )
    hub_url = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
    return json_response(
        EnrollmentTokenView(
            token=token, expires_at=int(exp), command=f"edge-run --hub {hub_url} --token {token}"
        ),
        201,
    )


async def enroll_node(request: web.Request) -> web.Response:
    import time

    services = _services(request)
    req = await decode_body(request, EnrollRequest)
    row = services.store.enrollment_token(req.token)
    if row is None:
        raise AuthError("unknown enrollment token: create one with 'deparrow node token'")
    if row["used_by"] is not None:
        raise AuthError("enrollment token was already used; create a new one")
    if row["expires_at"] < time.time():
        raise AuthError("enrollment token expired; create a new one")
    password = secrets.token_urlsafe(24)
    try:
        node_id, secret = services.store.create_node(
            token=req.token,
            owner=row["owner"],
            name=req.name,
            engines=req.engines,
            arch=req.arch,
            cpu=req.cpu,
            memory_mb=req.memory_mb,
            mqtt_password=password,
        )
    except ValueError as e:
        raise AuthError(str(e)) from None
    services.ledger.open_account(wallet_of(row["owner"]), "wallet", row["owner"])
    # The node connects as soon as it has the answer: the hub's own broker must know it by then.
    if not await services.broker_accepts(node_id, password):
        log.warning("the broker has not taken node %s's login yet; the node retries", node_id)
    return json_response(
        EnrollResponse(
            node_id=node_id,
            node_secret=secret,
            owner=row["owner"],
            mqtt=MqttCredentials(
                url=_public_mqtt_url(request),
                username=node_id,
                password=password,
                client_id=node_id,
            ),
            heartbeat_interval_s=services.config.heartbeat_interval_s,
        ),
        201,
    )


async def list_nodes(request: web.Request) -> web.Response:
    who = identity(request)
    services = _services(request)
    owner = None if who.is_admin else who.user_id
    from hub.api.views import node_view

    nodes = [node_view(n) for n in services.store.nodes(owner) if n["revoked_at"] is None]
    return json_response({"nodes": nodes})


async def get_node(request: web.Request) -> web.Response:
    """One node as the hub sees it (state, credits earned). The node itself asks with HTTP
    Basic (its node id and MQTT password, from node.json) for its own page; a user with a
    JWT sees their own nodes, an admin any."""
    services = _services(request)
    node_id = request.match_info["node_id"]
    node = services.store.node(node_id)
    scheme, _, value = (request.headers.get("Authorization") or "").partition(" ")
    if scheme.lower() == "basic":
        try:
            pair = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise AuthError("Basic credentials must be base64 of 'node_id:password'") from None
        user, _, password = pair.partition(":")
        if user != node_id or not _node_password_ok(node, password):
            raise AuthError(
                f"node {node_id} with this password is unknown here (or was removed): use the "
                "node id and MQTT password from node.json, or re-enroll if the hub's database "
                "was reset"
            )
    else:
        who = identity(request, node_ok=True)
        if who.is_node:
            if who.user_id != node_id:
                raise NotAllowed(f"node {who.user_id} may read only its own record")
        elif node is None or (node["owner"] != who.user_id and not who.is_admin):
            return error(404, f"no node {node_id}")  # someone else's: don't confirm it exists
        if node is None:
            return error(404, f"no node {node_id}")
    from hub.api.views import node_view

    return json_response(node_view(node))


async def remove_node(request: web.Request) -> web.Response:
    """The owner (or an admin) takes a node off the network: its broker login goes, its jobs
    go back to the queue for other nodes, its history and earnings stay. Repeating it is
    harmless."""
    who = identity(request)
    services = _services(request)
    node_id = request.match_info["node_id"]
    node = services.store.node(node_id)
    if node is None or (node["owner"] != who.user_id and not who.is_admin):
        return error(404, f"no node {node_id}")  # someone else's: don't confirm it exists
    requeued = 0
    if services.store.revoke_node(node_id):
        running = services.scheduler.node_offline(node_id, "its owner removed it")
        requeued = len(running)
        services.sync_broker()
        if services.bridge is not None:
            for job in running:
                services.bridge.cancel_on_node(node_id, job["id"], int(job["attempt"]))
            services.bridge.dispatch()
        log.info("node %s removed by %s; %d job(s) requeued", node_id, who.user_id, requeued)
    row = services.store.node(node_id)
    assert row is not None
    return json_response(
        {"id": node_id, "removed": True, "removed_at": row["revoked_at"], "requeued": requeued}
    )


async def ledger_audit(request: web.Request) -> web.Response:
    require_admin(request)
    ledger = _services(request).ledger
    audit = ledger.audit()
    return json_response(
        {
            "balanced": audit.balanced,
            "total": format_micro(audit.total),
            "by_kind": {k: format_micro(v) for k, v in audit.by_kind.items()},
            "mismatches": [m.account for m in audit.mismatches],
            "negatives": [a for a, _ in audit.negatives],
            "unbalanced_entries": list(audit.unbalanced_entries),
            "stranded_holds": list(audit.stranded_holds),
            "entries": audit.entries,
            "accounts": [
                {
                    "id": a["id"],
                    "kind": a["kind"],
                    "owner": a["owner"],
                    "balance": format_micro(int(a["balance"])),
                }
                for a in ledger.accounts()
            ],
        }
    )


# --- status ---------------------------------------------------------------------------
async def status(request: web.Request) -> web.Response:
    services = _services(request)
    nodes = services.store.nodes()
    online = [n for n in nodes if n["state"] != "offline"]
    bridge = services.bridge
    return json_response(
        {
            "hub": "ok",
            # The hub's clock, for clients to measure their skew (`deparrow network diagnose`).
            "time": time.time(),
            "broker": {
                "url": services.mqtt_url,
                "public_url": _public_mqtt_url(request),
                "connected": bool(bridge and bridge.connected),
                "kind": services.broker.kind if services.broker else "external",
            },
            "nodes": {"total": len(nodes), "online": len(online)},
            # Failures the hub lived through (docs/operations.md): non-zero and growing means
            # look at the log.
            "health": _health(services),
            "version": 1,
        }
    )


def _health(services: Any) -> dict[str, int]:
    bridge, writer = services.bridge, services.writer
    out = {"bridge_restarts": 0, "messages_dropped": 0, "inbox_overflowed": 0,
           "tick_failures": 0, "announce_failures": 0, "writer_restarts": 0}  # fmt: skip
    if bridge is not None:
        st = bridge.stats
        out.update(bridge_restarts=st.restarts, messages_dropped=bridge.dropped,
                   inbox_overflowed=st.overflowed, tick_failures=st.tick_failures,
                   announce_failures=st.announce_failures)  # fmt: skip
    if writer is not None:
        out["writer_restarts"] = int(writer.restarts)
    return out


async def openapi_doc(request: web.Request) -> web.Response:
    return json_response(openapi.document())


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/api/v1/auth/token", exchange_token)
    r.add_post("/api/v1/auth/node-token", exchange_node_token)
    r.add_post("/api/v1/users", create_user)
    r.add_get("/api/v1/wallet", wallet)
    r.add_get("/api/v1/wallet/history", wallet_history)
    r.add_post("/api/v1/wallet/transfer", wallet_transfer)
    r.add_post("/api/v1/blobs", upload_blob)
    r.add_post("/api/v1/jobs", submit_job)
    r.add_get("/api/v1/jobs", list_jobs)
    r.add_get("/api/v1/jobs/{job_id}", get_job)
    r.add_post("/api/v1/jobs/{job_id}/cancel", cancel_job)
    r.add_post("/api/v1/enrollment-tokens", create_enrollment_token)
    r.add_post("/api/v1/nodes/enroll", enroll_node)
    r.add_get("/api/v1/nodes", list_nodes)
    r.add_get("/api/v1/nodes/{node_id}", get_node)
    r.add_delete("/api/v1/nodes/{node_id}", remove_node)
    r.add_get("/api/v1/ledger/audit", ledger_audit)
    r.add_get("/api/v1/status", status)
    r.add_get("/api/v1/openapi.json", openapi_doc)

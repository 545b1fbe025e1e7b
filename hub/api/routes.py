"""REST API v1: the route table, and the routes of sign-in, users and the hub's status.

Handlers stay thin: they decode with msgspec, call the ledger/jobs/store, and encode views.
Domain errors become HTTP statuses only in http.py's middleware. The handlers of jobs, nodes
and the wallet are in jobs.py, nodes.py and wallet.py; the agents' routes are in agents.py,
which the app factory adds beside these.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from hub.api import auth, bootstrap, openapi
from hub.api.auth import AuthError
from hub.api.http import _services, decode_body, error, json_response, require_admin
from hub.api.jobs import cancel_job, get_job, get_output, list_jobs, submit_job, upload_blob
from hub.api.nodes import (
    create_enrollment_token,
    enroll_node,
    get_node,
    list_nodes,
    node_password_ok,
    public_mqtt_url,
    remove_node,
    tls_ca,
)
from hub.api.types import (
    CreateUser,
    NodeTokenRequest,
    TokenRequest,
    TokenResponse,
    UserCreated,
)
from hub.api.wallet import ledger_audit, wallet, wallet_history, wallet_transfer
from hub.config import advertised_url
from hub.ledger.money import format_micro


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


async def exchange_node_token(request: web.Request) -> web.Response:
    """A node's id and MQTT password (from its node.json) for a JWT with the node role."""
    services = _services(request)
    req = await decode_body(request, NodeTokenRequest)
    if not node_password_ok(services.store.node(req.node_id), req.password):
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
                # The hub's own connection; a 0.0.0.0 or :: in it reaches this machine only
                # from itself, so its outward address is shown instead.
                "url": ",".join(advertised_url(u) for u in services.broker_urls_shown()),
                "public_url": public_mqtt_url(request),
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
    r.add_get("/api/v1/jobs/{job_id}/outputs/{path:.+}", get_output)
    r.add_post("/api/v1/jobs/{job_id}/cancel", cancel_job)
    r.add_post("/api/v1/enrollment-tokens", create_enrollment_token)
    r.add_post("/api/v1/nodes/enroll", enroll_node)
    r.add_get("/api/v1/nodes", list_nodes)
    # Any id but "enroll", whose own route takes POST only: a GET there is a 405 that allows
    # POST, as the OpenAPI document says, not a lookup of a node named "enroll".
    node = "/api/v1/nodes/{node_id:(?!enroll$)[^/]+}"
    r.add_get(node, get_node)
    r.add_delete(node, remove_node)
    r.add_get("/api/v1/ledger/audit", ledger_audit)
    r.add_get("/api/v1/status", status)
    r.add_get("/api/v1/openapi.json", openapi_doc)
    r.add_get("/api/v1/tls/ca", tls_ca)
    bootstrap.add_routes(app)  # GET /api/v1/bootstrap: the replicas and brokers, best first

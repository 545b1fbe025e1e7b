"""REST routes of nodes: enrollment tokens, enrolling, and a node's record and removal."""

from __future__ import annotations

import base64
import binascii
import logging
import secrets
import time
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from hub.api.auth import AuthError
from hub.api.http import _services, decode_body, error, identity, json_response
from hub.api.types import (
    EnrollmentTokenView,
    EnrollRequest,
    EnrollResponse,
    MqttCredentials,
)
from hub.market.errors import NotAllowed
from hub.market.jobs import wallet_of
from hub.store.rows import token_hash

log = logging.getLogger(__name__)


def node_password_ok(node: Any, password: str) -> bool:
    return (
        node is not None
        and node["revoked_at"] is None
        and secrets.compare_digest(token_hash(password), node["mqtt_password_hash"])
    )


def public_mqtt_url(request: web.Request) -> str:
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
                url=public_mqtt_url(request),
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
        if user != node_id or not node_password_ok(node, password):
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

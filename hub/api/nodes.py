"""REST routes of nodes: enrollment tokens, enrolling, the CA a node pins, and a node's record
and removal."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import secrets
import time
from dataclasses import dataclass
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
from hub.config import advertised_host, is_unspecified
from hub.market.errors import NotAllowed
from hub.market.jobs import wallet_of
from hub.store.rows import token_hash
from hub.tls import TlsError, TlsFiles

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HubTls:
    """The hub serves TLS (--tls): with these files, and MQTT over TLS on mqtt_port when the
    broker is the hub's own (None with an outside broker: its URL is the operator's)."""

    files: TlsFiles
    mqtt_port: int | None


TLS = web.AppKey("tls", HubTls)


def node_password_ok(node: Any, password: str) -> bool:
    return (
        node is not None
        and node["revoked_at"] is None
        and secrets.compare_digest(token_hash(password), node["mqtt_password_hash"])
    )


def _url_host(host: str) -> str:
    """A host as it goes in a URL: an IPv6 address in brackets."""
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host


def _from_proxy(request: web.Request) -> bool:
    """A reverse proxy on this machine (docs/tls.md) tells us the scheme and host the world
    used; anyone else's X-Forwarded-* headers are not believed."""
    try:
        return ipaddress.ip_address(request.remote or "").is_loopback
    except ValueError:
        return False


def _caller_host(request: web.Request) -> str:
    """The host the caller reached us by, unless it is 0.0.0.0 or :: (which reaches this
    machine only from itself): then the --public-url's host, or this machine's outward
    address."""
    host = request.url.host or "127.0.0.1"
    if not is_unspecified(host):
        return host
    public = _services(request).config.public_url
    return (urlsplit(public).hostname if public else None) or advertised_host(host)


def public_hub_url(request: web.Request) -> str:
    """The hub's URL as the caller reached it (--public-url when the operator gave one):
    what a node is told to enroll with."""
    public = _services(request).config.public_url
    if public:
        return str(public).rstrip("/")
    scheme, host = request.url.scheme, f"{_url_host(_caller_host(request))}"
    netloc = f"{host}:{request.url.port}" if request.url.port else host
    if _from_proxy(request) and request.headers.get("X-Forwarded-Proto") in ("http", "https"):
        scheme = request.headers["X-Forwarded-Proto"]
        netloc = request.headers.get("X-Forwarded-Host", "").split(",")[0].strip() or netloc
    return f"{scheme}://{netloc}"


def _reached_as(request: web.Request) -> str:
    """The host nodes reach the hub by: --public-url's when given, else the caller's."""
    public = _services(request).config.public_url
    return (urlsplit(public).hostname if public else None) or _caller_host(request)


def public_mqtt_url(request: web.Request) -> str:
    services = _services(request)
    if services.config.mqtt_public_url:
        return str(services.config.mqtt_public_url)
    tls = request.app.get(TLS)
    if tls is not None and tls.mqtt_port is not None:
        # Nodes and agents get the TLS listener, under the name they reached us by (the one
        # the certificate must cover); the plain one is the hub's own, on loopback.
        return f"mqtts://{_url_host(_reached_as(request))}:{tls.mqtt_port}"
    # With a broker cluster, --mqtt-public-url names the nodes' servers (the CLI requires
    # it); without, the first server the hub uses.
    parts = urlsplit(services.mqtt_url.split(",")[0].strip())
    host = parts.hostname or "127.0.0.1"
    if host in ("0.0.0.0", "::", "127.0.0.1", "localhost"):
        # Tell the node to reach the broker the way it reached us.
        host = _reached_as(request)
    scheme = "mqtts" if parts.scheme in ("mqtts", "ssl") else "mqtt"
    return f"{scheme}://{_url_host(host)}:{parts.port or (8883 if scheme == 'mqtts' else 1883)}"


def ca_pin(request: web.Request) -> str | None:
    """The fingerprint a node pins at enrollment (--ca sha256:...), None when it needs none
    (no TLS, or a certificate the system already trusts)."""
    tls = request.app.get(TLS)
    return tls.files.fingerprint if tls is not None and tls.files.pinned else None


def enroll_command(request: web.Request, token: str) -> str:
    """The edge-run command that enrolls a node with this token, its CA pin included."""
    pin = ca_pin(request)
    command = f"edge-run --hub {public_hub_url(request)} --token {token}"
    return command + (f" --ca {pin}" if pin else "")


async def create_enrollment_token(request: web.Request) -> web.Response:
    who = identity(request)
    services = _services(request)
    token, exp = services.store.create_enrollment_token(
        who.user_id, services.config.enrollment_ttl_s
    )
    return json_response(
        EnrollmentTokenView(
            token=token,
            expires_at=int(exp),
            command=enroll_command(request, token),
            ca=ca_pin(request),
        ),
        201,
    )


async def tls_ca(request: web.Request) -> web.Response:
    """The certificate nodes pin, as PEM, to anyone: a node fetches it before it trusts
    anything, and checks its fingerprint against the one in its enrollment command."""
    tls = request.app.get(TLS)
    if tls is None:
        return error(404, "this hub does not serve TLS (it was started without --tls)")
    try:
        pem = tls.files.pin_pem
    except (OSError, TlsError) as e:
        log.error("cannot read the CA certificate: %s", e)
        return error(503, "the hub cannot read its CA certificate; see its log")
    return web.Response(
        body=pem,
        content_type="application/x-pem-file",
        headers={"X-Fingerprint": tls.files.fingerprint},
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
    from hub.api.views import node_views

    rows = [n for n in services.store.nodes(owner) if n["revoked_at"] is None]
    return json_response({"nodes": node_views(services.store.db, rows)})


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
    from hub.api.views import node_views

    return json_response(node_views(services.store.db, [node])[0])


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

"""`GET /api/v1/bootstrap`: the hub's live replicas and the brokers they give nodes, best
first, for nodes, the CLI and the SDK to pick from and fail over along (docs/protocol.md,
"Bootstrap and failover").

Each replica keeps its own row in the registry the replicas share (hub/cluster/registry.py):
`join()` writes it when the app starts and refreshes it in the background, `leave()` deletes
it when the app stops. The answer is open, without a token: it says where the hub is, which
anyone who reached it knows.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import msgspec
from aiohttp import web

from hub.api import metrics
from hub.api.http import BadRequest, error, json_response
from hub.api.nodes import TLS, _url_host
from hub.api.services import SERVICES
from hub.cluster.registry import DEFAULT_INTERVAL_S, Presence, Registry, Replica, split_urls
from hub.config import advertised_host, advertised_url

# A region as ?region= takes it: letters, digits, '.', '_' and '-' (eu-west, home.lan).
REGION = re.compile(r"[A-Za-z0-9._-]{1,64}")
REGION_PATTERN = "^[A-Za-z0-9._-]{1,64}$"


class ReplicaView(msgspec.Struct):
    url: str  # the replica's REST API and dashboard
    region: str  # "" when its operator gave none
    load: float  # HTTP requests per second it answered over its last interval
    lag_ms: float  # how late its event loop woke over its last interval
    seen_at: float  # when it last refreshed its row (the hub's clock, Unix seconds)


class BrokerView(msgspec.Struct):
    url: str  # mqtt:// or mqtts://, as nodes connect to it
    region: str  # the region of the (best) replica that gives it out


class BootstrapView(msgspec.Struct):
    replicas: list[ReplicaView]  # live ones, best first
    brokers: list[BrokerView]  # those replicas give nodes, best first, each once
    refresh_s: float  # fetch the list again this often (and whenever a replica fails)


API_TYPES = [BootstrapView, ReplicaView, BrokerView]


@dataclass
class Cluster:
    """This app's registry and its own row's keeper, once the app has started."""

    registry: Registry | None = None
    presence: Presence | None = None
    task: asyncio.Task[None] | None = None


CLUSTER = web.AppKey("cluster", Cluster)


def ordered(replicas: list[Replica], region: str | None) -> list[Replica]:
    """Best first: those in `region` (when asked), then the least loaded, then the least
    lagging; the URL settles ties so every replica answers in one order."""
    return sorted(
        replicas,
        key=lambda r: (0 if region and r.region == region else 1, r.requests_per_s, r.lag_ms,
                       r.url),
    )  # fmt: skip


def view(replicas: list[Replica], region: str | None, refresh_s: float) -> BootstrapView:
    best = ordered(replicas, region)
    brokers: list[BrokerView] = []
    seen: set[str] = set()
    for r in best:
        for url in r.brokers:
            if url not in seen:
                seen.add(url)
                brokers.append(BrokerView(url, r.region))
    return BootstrapView(
        [ReplicaView(r.url, r.region, r.requests_per_s, r.lag_ms, r.seen_at) for r in best],
        brokers,
        refresh_s,
    )


async def get_bootstrap(request: web.Request) -> web.Response:
    region = request.query.get("region")
    if region is not None and not REGION.fullmatch(region):
        raise BadRequest(
            f"region must be 1 to 64 letters, digits, '.', '_' or '-' (eu-west), not {region!r}",
            "region",
        )
    cluster = request.app[CLUSTER]
    if cluster.registry is None:
        return error(503, "the hub is starting: its replica registry is not open yet; retry")
    refresh = cluster.presence.interval_s if cluster.presence else DEFAULT_INTERVAL_S
    return json_response(view(cluster.registry.live(), region, refresh))


# --- this replica's own row ---------------------------------------------------------------
def _public_host(app: web.Application) -> str:
    config = app[SERVICES].config
    public = urlsplit(config.public_url).hostname if config.public_url else None
    return public or advertised_host(config.host, by_name=app.get(TLS) is not None)


def replica_url(app: web.Application) -> str:
    """Where clients reach this replica: --public-url, else the address it serves on."""
    config = app[SERVICES].config
    if config.public_url:
        return str(config.public_url).rstrip("/")
    scheme = "https" if app.get(TLS) is not None else "http"
    return f"{scheme}://{_url_host(_public_host(app))}:{config.port}"


def broker_urls(app: web.Application) -> list[str]:
    """The brokers this replica gives nodes: --mqtt-public-url (a comma-separated list for a
    broker cluster's servers), else its own broker's TLS listener, else the broker it uses,
    without any login in its URL."""
    services = app[SERVICES]
    if services.config.mqtt_public_url:
        return split_urls(services.config.mqtt_public_url)
    tls = app.get(TLS)
    if tls is not None and tls.mqtt_port is not None:
        return [f"mqtts://{_url_host(_public_host(app))}:{tls.mqtt_port}"]
    parts = urlsplit(advertised_url(services.mqtt_url))
    netloc = parts.netloc.rpartition("@")[2]  # never a password
    return [urlunsplit((parts.scheme, netloc, "", "", ""))]


def _requests_answered(app: web.Application) -> float:
    """HTTP requests this app answered so far (the metrics' counter, all labels)."""
    total = 0.0
    for family in app[metrics.METRICS].http_requests.collect():
        total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


async def join(app: web.Application, interval_s: float = DEFAULT_INTERVAL_S) -> None:
    """Open the registry, write this replica's row and keep it fresh (from _services_ctx,
    once the broker URL is known)."""
    services = app[SERVICES]
    cluster = app[CLUSTER]
    cluster.registry = Registry(services.db, clock=lambda: services.jobs.clock())
    cluster.presence = Presence(
        cluster.registry,
        url=replica_url(app),
        brokers=broker_urls(app),
        region=services.config.region,
        requests=lambda: _requests_answered(app),
        interval_s=interval_s,
    )
    cluster.presence.tick()  # listed before the first request
    cluster.task = asyncio.create_task(cluster.presence.run())


async def leave(app: web.Application) -> None:
    """Stop refreshing and delete this replica's row: clients move on at once."""
    cluster = app[CLUSTER]
    task, cluster.task = cluster.task, None
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if cluster.presence is not None:
        cluster.presence.leave()


def add_routes(app: web.Application) -> None:
    app[CLUSTER] = Cluster()
    app.router.add_get("/api/v1/bootstrap", get_bootstrap)

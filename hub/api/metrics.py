"""`GET /metrics`: the hub's numbers in Prometheus' text format (docs/operations.md).

One registry per app, never prometheus_client's global one, so that several hubs in one
process (the tests) keep their numbers apart. Two kinds of numbers:

- what the database says, read at scrape time (jobs by state, the queue and its oldest job,
  nodes online by engine, nodes by state) with one GROUP BY each, and whether the bridge is
  connected to the broker: a collector, so nothing is kept in step by hand;
- what happens, counted where it happens through small hooks the app factory sets: results
  settled (hub/mqtt/messages.py), heartbeats received (same), the ledger's group commits
  (hub/ledger/writer.py) and HTTP requests (the middleware below).

/metrics is open, without a token: its numbers are counts and latencies by state, engine and
route pattern, with no ids, names or amounts; the hub listens on loopback unless told otherwise,
and a hub facing the world keeps /metrics off its reverse proxy (docs/operations.md).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from hub.api.http import Handler

# Job states as the store spells them: each is exposed, at 0 when no job is in it, so that a
# graph of one state has a line from the start.
JOB_STATES = ("queued", "assigned", "running", "completed", "failed", "cancelled")

# Seconds: from a second to a day (a job's timeout is at most max_timeout_s).
SETTLEMENT_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400)
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# The label of a request no route matched: one value for every stray URL, never the URL.
UNMATCHED = "unmatched"
# Methods are labels too: any other token a client sends counts as "other".
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class _FromDatabase(Collector):
    """The numbers read at scrape time: what the store says now, and the broker link."""

    def __init__(self, services: Any) -> None:
        self.services = services

    def describe(self) -> Iterator[Metric]:
        # Names only: registering must not query a database that may not be open yet.
        yield from self._families()

    def _families(self) -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily("deparrow_jobs", "Jobs in each state.", labels=["state"]),
            GaugeMetricFamily("deparrow_queue_length", "Jobs waiting for a node."),
            GaugeMetricFamily(
                "deparrow_queue_oldest_wait_seconds",
                "How long the oldest queued job has waited (0 when none waits).",
            ),
            GaugeMetricFamily(
                "deparrow_nodes_online",
                "Nodes not offline (idle, busy or suspended), by engine they offer; a node "
                "with several engines counts under each.",
                labels=["engine"],
            ),
            GaugeMetricFamily("deparrow_nodes", "Nodes not removed, by state.", labels=["state"]),
            GaugeMetricFamily(
                "deparrow_broker_connected",
                "1 while the hub's bridge is connected to the MQTT broker, else 0.",
            ),
        )

    def collect(self) -> Iterator[Metric]:
        jobs, queue, oldest, engines, nodes, broker = self._families()
        db = self.services.db
        counts = dict.fromkeys(JOB_STATES, 0)
        first_queued: float | None = None
        for row in db.query(
            "SELECT state, COUNT(*) AS n, MIN(submitted_at) AS first FROM jobs GROUP BY state"
        ):
            counts[row["state"]] = int(row["n"])
            if row["state"] == "queued":
                first_queued = row["first"]
        for state, n in counts.items():
            jobs.add_metric([state], n)
        queue.add_metric([], counts["queued"])
        wait = time.time() - float(first_queued) if first_queued is not None else 0.0
        oldest.add_metric([], max(0.0, wait))
        for row in db.query(
            "SELECT e.value AS engine, COUNT(*) AS n FROM nodes, json_each(nodes.engines) AS e"
            " WHERE nodes.state != 'offline' AND nodes.revoked_at IS NULL GROUP BY e.value"
        ):
            engines.add_metric([str(row["engine"])], int(row["n"]))
        for row in db.query(
            "SELECT state, COUNT(*) AS n FROM nodes WHERE revoked_at IS NULL GROUP BY state"
        ):
            nodes.add_metric([str(row["state"])], int(row["n"]))
        bridge = self.services.bridge
        broker.add_metric([], 1 if bridge is not None and bridge.connected else 0)
        yield from (jobs, queue, oldest, engines, nodes, broker)


class HubMetrics:
    """One hub's metrics: its registry, and the hooks that count what happens."""

    def __init__(self, services: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_FromDatabase(services))
        r = self.registry
        self.settlement = Histogram(
            "deparrow_settlement_seconds",
            "From a job's submission (since=submitted) or assignment (since=assigned) to its "
            "result settling it: completed and paid, or failed and refunded.",
            ["since"],
            buckets=SETTLEMENT_BUCKETS,
            registry=r,
        )
        self.heartbeats = Counter(
            "deparrow_heartbeats", "Heartbeats received from nodes.", registry=r
        )
        self.batch_size = Histogram(
            "deparrow_ledger_batch_size",
            "Writes committed together by the ledger's group commit (one COMMIT each).",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.commit_seconds = Histogram(
            "deparrow_ledger_commit_seconds",
            "Time of one group commit, from BEGIN IMMEDIATE to its durable COMMIT.",
            buckets=COMMIT_BUCKETS,
            registry=r,
        )
        self.http_seconds = Histogram(
            "deparrow_http_request_duration_seconds",
            "HTTP requests by method and route pattern (never the raw URL), and their time.",
            ["method", "route"],
            buckets=HTTP_BUCKETS,
            registry=r,
        )
        self.http_requests = Counter(
            "deparrow_http_requests",
            "HTTP responses by method, route pattern and status.",
            ["method", "route", "status"],
            registry=r,
        )

    # --- the hooks ---------------------------------------------------------------------------
    def result_settled(self, outcome: str, job: Any) -> None:
        """A node's result was handled (hub/mqtt/messages.py): when it ended a job that is
        not a replica (its parent settles), observe how long the job took to settle."""
        if job is None or job["parent"] is not None or outcome.startswith("ignored"):
            return
        if job["state"] not in ("completed", "failed") or job["finished_at"] is None:
            return
        finished = float(job["finished_at"])
        self.settlement.labels("submitted").observe(max(0.0, finished - job["submitted_at"]))
        if job["assigned_at"] is not None:
            self.settlement.labels("assigned").observe(
                max(0.0, finished - float(job["assigned_at"]))
            )

    def heartbeat(self) -> None:
        self.heartbeats.inc()

    def committed(self, size: int, seconds: float) -> None:
        """One group commit of `size` writes took `seconds` (hub/ledger/writer.py)."""
        self.batch_size.observe(size)
        self.commit_seconds.observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


METRICS = web.AppKey("metrics", HubMetrics)


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Times every request under its route's pattern (`/api/v1/jobs/{job_id}`), so that the
    number of series stays that of the routes, whatever URLs are asked for. The outermost
    middleware: rate-limited and failed requests count too."""
    info = request.match_info
    resource = info.route.resource
    route = resource.canonical if resource is not None else UNMATCHED
    if info.http_exception is not None:
        route = UNMATCHED  # a 404 or 405: the path asked for is not a route
    method = request.method if request.method in METHODS else "other"
    start = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as e:
        status = e.status
        raise
    finally:
        m = request.app[METRICS]
        m.http_seconds.labels(method, route).observe(time.perf_counter() - start)
        m.http_requests.labels(method, route, str(status)).inc()


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/metrics", metrics)

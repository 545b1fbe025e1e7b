"""Server-rendered pages. This first page lists nodes, jobs and balances; the full dashboard
(sign-in, live updates, charts) grows here."""

from __future__ import annotations

import json
import time
from collections import deque
from typing import Any

import aiohttp_jinja2
from aiohttp import web

from hub.ledger import format_micro

EVENTS = web.AppKey("events", deque[dict[str, Any]])


def notify(app: web.Application, kind: str, data: dict[str, Any]) -> None:
    """Record a change (job or node state) for the page's latest-events list."""
    events = app.get(EVENTS)
    if events is None:
        return
    events.appendleft({"t": time.time(), "kind": kind, **data})


def recent_events(app: web.Application, n: int) -> list[dict[str, Any]]:
    events: deque[dict[str, Any]] = app[EVENTS]
    return list(events)[:n]


def node_view(n: Any) -> dict[str, Any]:
    return {
        "id": n["id"],
        "name": n["name"],
        "owner": n["owner"],
        "state": n["state"],
        "engines": json.loads(n["engines"]),
        "arch": n["arch"],
        "cpu": n["cpu"],
        "memory_mb": n["memory_mb"],
        "last_seen": n["last_seen"],
        "running": json.loads(n["running"]),
        "earned": format_micro(int(n["earned"])),
        "uptime_s": int(n["uptime_ms"]) // 1000,
    }


@aiohttp_jinja2.template("index.html")
async def index(request: web.Request) -> dict[str, Any]:
    from hub.app import SERVICES

    services = request.app[SERVICES]
    # Until sign-in arrives, who may see what is decided by where the visitor is: the
    # operator on this machine sees every wallet and every job's output; anyone else sees
    # totals and states only.
    local = request.remote in ("127.0.0.1", "::1")
    users = {u["id"]: u for u in services.store.users()}
    balances = []
    totals: dict[str, int] = {}
    for row in services.ledger.accounts():
        totals[row["kind"]] = totals.get(row["kind"], 0) + int(row["balance"])
        if not local or (row["kind"] == "hold" and row["balance"] == 0):
            continue
        owner = users.get(row["owner"]) if row["owner"] else None
        balances.append(
            {
                "account": row["id"],
                "kind": row["kind"],
                "name": owner["name"] if owner else "",
                "balance": format_micro(int(row["balance"])),
            }
        )
    if not local:
        balances = [
            {"account": f"all {kind} accounts", "kind": kind, "name": "",
             "balance": format_micro(total)}
            for kind, total in sorted(totals.items())
        ]  # fmt: skip
    jobs = [services.jobs.view(j) for j in services.store.jobs(limit=50)]
    if not local:
        for j in jobs:
            if j["result"]:
                j["result"] = {**j["result"], "stdout": "", "returns": None}
    return {
        "nodes": [node_view(n) for n in services.store.nodes()],
        "jobs": jobs,
        "balances": balances,
        # The page refreshes itself: a sum over the cached balances is cheap; the full
        # audit (which rescans every posting) is `deparrow ledger audit`.
        "balanced": sum(totals.values()) == 0,
        "events": recent_events(request.app, 20),
        "mqtt_url": services.mqtt_url,
        "now": time.time(),
        "local": local,
    }


def add_routes(app: web.Application) -> None:
    app[EVENTS] = deque(maxlen=200)
    app.router.add_get("/", index)

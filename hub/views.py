"""What the API and the bridge share with the dashboard: change notifications and the node
view. The dashboard itself lives in hub/web/."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from hub.ledger import format_micro


def notify(app: web.Application, kind: str, data: dict[str, Any]) -> None:
    """A job or node changed state: the latest-events list and open pages hear of it."""
    from hub.web import live

    live.record(app, kind, data)


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
        # Today's availability not yet paid: it waits for a job that proves the node today.
        "uptime_waiting_s": int(n["uptime_pending_ms"]) // 1000,
        "reputation": round(float(n["reputation"]), 4),
        "allow_network": json.loads(n["allow_network"] or "[]"),
    }


def add_routes(app: web.Application) -> None:
    from hub import web as dashboard

    dashboard.add_routes(app)

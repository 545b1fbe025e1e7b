"""A node as the API shows it (GET /api/v1/nodes), which the dashboard's pages show too."""

from __future__ import annotations

import json
from typing import Any

from hub.ledger.money import format_micro


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

"""A node as the API shows it (GET /api/v1/nodes), which the dashboard's pages show too."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from hub.ledger.money import format_micro
from hub.store.db import Database


def jobs_running(db: Database, node_ids: Sequence[str]) -> dict[str, int]:
    """How many of the hub's jobs each node has now (assigned or running), as the scheduler
    counts them against its slots; nodes with none are left out."""
    if not node_ids:
        return {}
    rows = db.query(
        "SELECT node, COUNT(*) AS n FROM jobs WHERE state IN ('assigned', 'running')"
        " AND node IN (SELECT value FROM json_each(?)) GROUP BY node",
        (json.dumps(list(node_ids)),),
    )
    return {str(r["node"]): int(r["n"]) for r in rows}


def _gpus(text: str | None) -> list[dict[str, Any]]:
    """The GPUs of a node's hello (checked by hub/mqtt/wire.py before they were stored)."""
    gpus = json.loads(text) if text else []
    return [
        {"index": int(g["index"]), "name": str(g.get("name") or "GPU"),
         "uuid": g.get("uuid"), "memory_mb": g.get("memory_mb")}
        for g in gpus
    ]  # fmt: skip


def _free(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    free = json.loads(text)
    return {
        "cpu": float(free.get("cpu", 0)),
        "memory_mb": int(free.get("memory_mb", 0)),
        "gpu": int(free.get("gpu", 0)),
        "slots": int(free.get("slots", 0)),
    }


def node_view(n: Any, jobs_running: int = 0) -> dict[str, Any]:
    """A node row as the API shows it; jobs_running: the hub's jobs on it now (see
    `jobs_running`), which the row does not hold."""
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
        "slots": int(n["slots"] or 1),
        "jobs_running": jobs_running,
        "gpus": _gpus(n["gpus"]),
        "free": _free(n["free"]),
    }


def node_views(db: Database, nodes: Sequence[Any]) -> list[dict[str, Any]]:
    """node_view for each of nodes, their jobs counted in one query."""
    running = jobs_running(db, [str(n["id"]) for n in nodes])
    return [node_view(n, running.get(str(n["id"]), 0)) for n in nodes]

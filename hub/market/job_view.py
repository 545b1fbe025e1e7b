"""A job as the API and the dashboard show it: state, money, timings, result, retries, the
verification of its replicas and, for a service, its billing."""

from __future__ import annotations

import json
import sqlite3
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from hub.ledger.money import format_micro
from hub.market.replicas import LIVE

if TYPE_CHECKING:
    from hub.market.jobs import Jobs


def output_url(job_id: str, path: str) -> str:
    return f"/api/v1/jobs/{job_id}/outputs/{quote(path)}"


def view(jobs: Jobs, job: sqlite3.Row) -> dict[str, Any]:
    result = json.loads(job["result"]) if job["result"] else None
    if result and result.get("outputs"):
        for f in result["outputs"]:
            f["url"] = output_url(job["id"], f["path"])
    verified = jobs.replicas.view(job)
    reason = job["reason"]
    if verified is not None and reason is None and job["state"] in LIVE:
        # Under way: say why a replica still waits, if one does.
        reason = next(
            (
                f"replica {r['replica']}: {r['reason']}"
                for r in jobs.store.replicas(job["id"])
                if r["state"] == "queued" and r["reason"]
            ),
            None,
        )
    return {
        "id": job["id"],
        "name": job["name"],
        "state": job["state"],
        "owner": job["owner"],
        "node": job["node"],
        "attempt": job["attempt"],
        "priority": job["priority"],
        "hold": format_micro(int(job["hold"])),
        "cost": format_micro(int(job["cost"])) if job["cost"] is not None else None,
        "reason": reason,
        "timings": {
            "submitted_at": job["submitted_at"],
            "assigned_at": job["assigned_at"],
            "started_at": job["started_at"],
            "finished_at": job["finished_at"],
        },
        "result": result,
        "spec": json.loads(job["spec"]),
        "billing": jobs.billing.view(job),
        "retries": {
            "max_attempts": jobs.max_attempts,
            "node_failures": job["failures"],
            "history": json.loads(job["tries"] or "[]"),
        },
        "verification": verified,
        "replica_of": job["parent"],
        "outputs_expired_at": job["outputs_expired_at"],
    }

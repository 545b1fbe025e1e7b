"""The first scheduler: give each queued job to an eligible idle node.

Eligible: online, idle (not busy, not suspended by its owner's activity), speaks the job's
engine, offers enough CPU and RAM, and runs nothing else. High priority first, then oldest.
When nothing fits, the job's `reason` says why, so the submitter is not left guessing.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from typing import NamedTuple

from edge import protocol
from hub.config import HubConfig
from hub.jobs import Assignment, Jobs
from hub.store import Store

log = logging.getLogger(__name__)


class Offer(NamedTuple):
    """What one online node can take, parsed once per scheduling pass."""

    id: str
    idle: bool
    engines: frozenset[str]
    cpu: float
    memory_mb: int


def offer(node: sqlite3.Row) -> Offer:
    try:  # validated by hub/wire.py before it was stored; a bad row offers nothing
        res = json.loads(node["resources"] or "{}")
        cpu = float(res.get("cpu", node["cpu"]))
        mem = int(res.get("memory_mb", node["memory_mb"]))
        engines = frozenset(json.loads(node["engines"]))
    except (TypeError, ValueError):
        cpu, mem, engines = 0.0, 0, frozenset()
    return Offer(node["id"], node["state"] == protocol.IDLE, engines, cpu, mem)


def _misfit(engine: str, job: sqlite3.Row, node: Offer) -> str | None:
    """None when node can run job; else what it lacks, in words."""
    if engine not in node.engines:
        return f"no online node runs the {engine} engine"
    if node.cpu < job["cpu_milli"] / 1000:
        return f"no online node offers {job['cpu_milli'] / 1000:g} CPUs"
    if node.memory_mb < job["memory_mb"]:
        return f"no online node offers {job['memory_mb']} MB of RAM"
    return None


class Scheduler:
    def __init__(self, config: HubConfig, store: Store, jobs: Jobs) -> None:
        self.config = config
        self.store = store
        self.jobs = jobs

    def offline_after_s(self) -> float:
        return self.config.heartbeat_interval_s * self.config.missed_beats_offline

    def schedule(self) -> list[Assignment]:
        queued = self.store.queued_jobs()
        if not queued:
            return []
        online = [offer(n) for n in self.store.nodes() if n["state"] != protocol.OFFLINE]
        busy = {j["node"] for j in self.store.active_jobs()}
        free = [n for n in online if n.idle and n.id not in busy]
        out: list[Assignment] = []
        for job in queued:
            engine = json.loads(job["spec"])["engine"]["type"]
            pick = next((n for n in free if _misfit(engine, job, n) is None), None)
            if pick is None:
                self._explain(engine, job, online)
                continue
            assignment = self.jobs.assign(job, pick.id)
            if assignment is not None:
                out.append(assignment)
                free.remove(pick)
        return out

    def _explain(self, engine: str, job: sqlite3.Row, online: list[Offer]) -> None:
        """Say why a job waits, naming what does not fit when no online node could run it."""
        if not online:
            why = "no node is online"
        else:
            misfits = [_misfit(engine, job, n) for n in online]
            if all(m is not None for m in misfits):
                why = str(misfits[0])
            else:
                why = "every node that can run it is busy or its owner is using it"
        if job["reason"] != why:
            with self.store.db.transaction() as c:
                c.execute("UPDATE jobs SET reason = ? WHERE id = ?", (why, job["id"]))

    def sweep(self, now: float | None = None) -> list[str]:
        """Mark silent nodes offline, requeue their jobs, fail jobs past timeout + grace.
        Returns the ids of nodes that went offline."""
        now = time.time() if now is None else now
        gone: list[str] = []
        for node in self.store.nodes():
            if node["state"] == protocol.OFFLINE:
                continue
            if node["last_seen"] is None or now - node["last_seen"] > self.offline_after_s():
                self.node_offline(node["id"], "missed heartbeats")
                gone.append(node["id"])
        for job in self.store.queued_jobs():
            if now - job["submitted_at"] > self.config.queue_ttl_s:
                self.jobs.fail(
                    job["id"],
                    f"no node could run it within {self.config.queue_ttl_s:g}s: {job['reason']}",
                )
        for job in self.store.active_jobs():
            started = job["assigned_at"] or job["submitted_at"]
            if now - started > job["timeout_s"] + self.config.result_grace_s:
                self.jobs.fail(
                    job["id"],
                    f"timeout: no result from node {job['node']} within "
                    f"{job['timeout_s']}s (+{self.config.result_grace_s:g}s grace)",
                )
        return gone

    def node_offline(self, node_id: str, why: str) -> None:
        self.store.update_node(node_id, state=protocol.OFFLINE)
        for job in self.store.jobs_on_node(node_id):
            if self.jobs.requeue(job, f"node {node_id} went offline ({why}); waiting for another"):
                log.info("job %s requeued: node %s offline", job["id"], node_id)

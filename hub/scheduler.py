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

from edge import protocol
from hub.config import HubConfig
from hub.jobs import Assignment, Jobs
from hub.store import Store

log = logging.getLogger(__name__)


def _offered(node: sqlite3.Row) -> tuple[float, int]:
    res = json.loads(node["resources"] or "{}")
    cpu = float(res.get("cpu", node["cpu"]))
    mem = int(res.get("memory_mb", node["memory_mb"]))
    return cpu, mem


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
        online = [n for n in self.store.nodes() if n["state"] != protocol.OFFLINE]
        nodes = [n for n in online if n["state"] == protocol.IDLE]
        busy = {j["node"] for j in self.store.active_jobs()}
        free = [n for n in nodes if n["id"] not in busy]
        out: list[Assignment] = []
        for job in queued:
            spec = json.loads(job["spec"])
            engine = spec["engine"]["type"]
            cpu_needed = job["cpu_milli"] / 1000
            mem_needed = int(job["memory_mb"])
            pick = None
            why = "no node is online"
            if online:
                why = "every node is busy or its owner is using it"
            for node in free:
                cpu, mem = _offered(node)
                if engine not in json.loads(node["engines"]):
                    why = f"no idle node runs the {engine} engine"
                    continue
                if cpu < cpu_needed:
                    why = f"no idle node offers {cpu_needed:g} CPUs"
                    continue
                if mem < mem_needed:
                    why = f"no idle node offers {mem_needed} MB of RAM"
                    continue
                pick = node
                break
            if pick is None:
                if job["reason"] != why:
                    with self.store.db.transaction() as c:
                        c.execute("UPDATE jobs SET reason = ? WHERE id = ?", (why, job["id"]))
                continue
            assignment = self.jobs.assign(job, pick["id"])
            if assignment is not None:
                out.append(assignment)
                free.remove(pick)
        return out

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

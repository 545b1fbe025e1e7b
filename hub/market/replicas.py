"""A verified job's replicas: their results, the quorum's verdict, and the credits it moves.

A job with `verify: {replicas: k}` holds k times its maximum price and has k replica rows
(hub/store/rows.py, migration 6) that nodes run like any job. When the replicas have decided
(hub/market/verification.py), one transaction ends the job: each completed replica is charged as a
job of its own under its own ledger key, agreeing nodes are paid and gain reputation,
dissenters are not and lose it; or, without a quorum, the whole hold is refunded. Called by
hub/market/jobs.py inside its transactions; no aiohttp, no MQTT.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from typing import Any

from hub.ledger import economy
from hub.ledger.economy import REVENUE
from hub.ledger.ledger import Ledger
from hub.ledger.money import format_micro, hold_id, wallet_id
from hub.market import reputation, verification
from hub.market.attempts import Attempts
from hub.store.db import Database
from hub.store.rows import Store

LIVE = ("queued", "assigned", "running")


class Replicas:
    def __init__(
        self,
        db: Database,
        store: Store,
        ledger: Ledger,
        proved: Callable[[sqlite3.Row, str], None],
        attempts: Attempts,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.clock = clock  # the hub's clock (Jobs.clock): tests drive it
        self.db = db
        self.attempts = attempts
        self.store = store
        self.ledger = ledger
        self.proved = proved  # a node's first paid job for someone else (referral bonus)
        # Cancels for nodes decided inside a transaction (replicas a verdict made useless):
        # sent by the caller once it has committed (Jobs.take_cancels).
        self.cancels: list[tuple[str, str, int]] = []

    def record(
        self, job: sqlite3.Row, wall_ms: int, result: dict[str, Any], exit_code: int, digest: str
    ) -> None:
        """A replica completed: keep its result and hash; the credits move when the replicas
        have decided (decide), all in the transaction that ends the verified job."""
        charge = economy.job_charge(
            int(job["cpu_milli"]), wall_ms, int(job["timeout_s"]), job["priority"]
        )
        now = self.clock()
        with self.db.transaction() as c:
            cur = c.execute(
                "UPDATE jobs SET state = 'completed', result = ?, result_hash = ?, billed_ms = ?,"
                " cost = ?, finished_at = ?, reason = NULL"
                " WHERE id = ? AND state IN ('assigned', 'running')",
                (
                    json.dumps(result),
                    verification.result_hash(exit_code, digest),
                    wall_ms,
                    charge,
                    now,
                    job["id"],
                ),
            )
            # The attempt ends here; its credits move when the quorum decides (keyed by the
            # replica, which completes once).
            if cur.rowcount == 1 and self.attempts.end(
                str(job["id"]), int(job["attempt"]), "recorded", now, wall_ms=wall_ms
            ):
                self.decide(str(job["parent"]))

    def decide(self, job_id: str) -> None:
        """Inside the caller's transaction: when the replicas of a verified job have decided,
        settle it (quorum) or fail it (no quorum possible). Otherwise wait."""
        job = self.store.job(job_id)
        if job is None or job["state"] not in LIVE:
            return
        reps = self.store.replicas(job_id)
        hashes = [str(r["result_hash"]) for r in reps if r["state"] == "completed"]
        failed = [r for r in reps if r["state"] in ("failed", "cancelled")]
        failure = next((str(r["reason"]) for r in failed if r["reason"]), None)
        decision = verification.decide(int(job["replicas"]), hashes, len(failed), failure)
        if not decision.done:
            return
        if decision.agreed_hash is not None:
            self._settle(job, reps, decision.agreed_hash)
        else:
            self.end(job, "failed", str(decision.reason))

    def _settle(self, job: sqlite3.Row, reps: list[sqlite3.Row], agreed: str) -> None:
        """The quorum's result becomes the job's. Each completed replica is charged to the
        submitter as a job of its own at its actual use, in one ledger entry keyed by the
        replica: an agreeing node's owner is paid its share, a dissenter's share goes to the
        network (revenue). The rest of the hold goes back. Runs once: the job's state guards it."""
        c = self.db.conn
        winner = next(r for r in reps if r["result_hash"] == agreed)
        cur = c.execute(
            "UPDATE jobs SET state = 'completed', result = ?, result_hash = ?, finished_at = ?,"
            " reason = NULL WHERE id = ? AND state IN ('queued', 'assigned', 'running')",
            (winner["result"], agreed, self.clock(), job["id"]),
        )
        if cur.rowcount != 1:
            return
        c.execute(  # the agreed files are the job's (a replica's own stay with it)
            "INSERT OR IGNORE INTO job_files (job, role, path, sha256, size)"
            " SELECT ?, role, path, sha256, size FROM job_files WHERE job = ? AND role = 'output'",
            (job["id"], winner["id"]),
        )
        cpu, timeout = int(job["cpu_milli"]), int(job["timeout_s"])
        total = 0
        for r in reps:
            node = self.store.node(r["node"]) if r["node"] else None
            if r["state"] != "completed" or node is None:
                continue
            ok = r["result_hash"] == agreed
            charge = int(r["cost"])
            pay = economy.node_pay(cpu, int(r["billed_ms"]), timeout) if ok else 0
            legs = [(wallet_id(node["owner"]), pay), (REVENUE, charge - pay)]
            self.ledger.post(
                f"replica:{job['id']}:{r['replica']}",
                f"replica {r['replica']} of job {job['id']} on node {node['id']}: "
                + ("agreed with the quorum" if ok else "outvoted by the quorum, not paid"),
                [(hold_id(job["id"]), -charge), *[(a, n) for a, n in legs if n > 0]],
                {
                    "job_id": job["id"],
                    "replica": r["id"],
                    "node": node["id"],
                    "attempt": int(r["attempt"]),
                },
            )
            c.execute(
                "UPDATE jobs SET verdict = ?, paid = ? WHERE id = ?",
                ("agreed" if ok else "dissented", pay, r["id"]),
            )
            self.attempts.add(str(r["id"]), int(r["attempt"]), charge, pay)
            total += charge
            if ok:
                c.execute("UPDATE nodes SET earned = earned + ? WHERE id = ?", (pay, node["id"]))
                reputation.record(c, node["id"], "agreed")
                self.proved(node, job["owner"])
            else:
                reputation.record(c, node["id"], "dissented")
        c.execute("UPDATE jobs SET cost = ? WHERE id = ?", (total, job["id"]))
        self.ledger.close_hold(
            job["id"], [], reason=f"verified job {job['id']} completed: the rest of its hold"
        )

    def end(self, job: sqlite3.Row, state: str, reason: str) -> bool:
        """Inside the caller's transaction: fail or cancel a verified job, stop its replicas
        still live (their nodes are told, after commit), refund the whole hold: nobody is paid
        when the replicas do not agree."""
        c = self.db.conn
        cur = c.execute(
            "UPDATE jobs SET state = ?, cost = 0, finished_at = ?, reason = ?"
            " WHERE id = ? AND state IN ('queued', 'assigned', 'running')",
            (state, self.clock(), reason, job["id"]),
        )
        if cur.rowcount != 1:
            return False
        verdict = "no quorum" if reason.startswith("no quorum") else state
        for r in self.store.replicas(job["id"]):
            if r["state"] in LIVE:
                c.execute(
                    "UPDATE jobs SET state = 'cancelled', verdict = 'cancelled', cost = 0,"
                    " finished_at = ?, reason = ? WHERE id = ?",
                    (self.clock(), f"job {job['id']} {state}: {reason}", r["id"]),
                )
                if r["node"] is not None and r["state"] != "queued":
                    self.attempts.end(str(r["id"]), int(r["attempt"]), "cancelled", self.clock())
                    self.cancels.append((str(r["node"]), str(r["id"]), int(r["attempt"])))
            elif r["state"] == "completed":
                c.execute("UPDATE jobs SET verdict = ?, paid = 0 WHERE id = ?", (verdict, r["id"]))
        self.ledger.refund_hold(job["id"], reason=f"job {job['id']} {state}: {reason}")
        return True

    def view(self, job: sqlite3.Row) -> dict[str, Any] | None:
        k = int(job["replicas"])
        if k < 2:
            return None
        reps = self.store.replicas(job["id"])
        outcome = {"completed": "agreed", "failed": "no quorum", "cancelled": "cancelled"}
        state = str(job["state"])
        if state == "failed" and not str(job["reason"] or "").startswith("no quorum"):
            outcome["failed"] = "failed"

        def credits(v: Any) -> str | None:
            return format_micro(int(v)) if v is not None else None

        return {
            "replicas": k,
            "quorum": verification.quorum(k),
            "outcome": outcome.get(state, "pending"),
            "result_hash": job["result_hash"],
            "runs": [
                {
                    "job": r["id"],
                    "replica": r["replica"],
                    "state": r["state"],
                    "node": r["node"],
                    "attempt": r["attempt"],
                    "result_hash": r["result_hash"],
                    "verdict": r["verdict"],
                    "paid": credits(r["paid"]),
                    "cost": credits(r["cost"]),
                }
                for r in reps
            ],
        }

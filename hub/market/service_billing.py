"""Service jobs, billed per period: hold one period ahead, pay each as it ends, stop when the
wallet runs dry, settle the last partial period when the service ends.

docs/economy.md ("Service jobs: billed per hour") states the rule with a worked example. Each
period is one transaction keyed by its number; the period's pay is part of the attempt that
ran it (hub/market/attempts.py), and the periods billed before an attempt began are recorded
with it, so a service that moved pays its last partial period on the node that ran it.
Called by hub/market/jobs.py; no aiohttp, no MQTT.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable
from typing import Any

from hub.ledger import economy
from hub.ledger.economy import REVENUE
from hub.ledger.ledger import Ledger
from hub.ledger.money import InsufficientFunds, format_micro, hold_id, wallet_id
from hub.market.attempts import Attempts, Stale
from hub.market.bonuses import Bonuses
from hub.store.db import Database
from hub.store.rows import Store


class ServiceBilling:
    def __init__(
        self,
        period_s: int,
        db: Database,
        store: Store,
        ledger: Ledger,
        attempts: Attempts,
        bonuses: Bonuses,
        clock: Callable[[], float],
    ) -> None:
        self.period = period_s  # HubConfig.service_period_s: an hour unless a test says less
        self.db = db
        self.store = store
        self.ledger = ledger
        self.attempts = attempts
        self.bonuses = bonuses
        self.clock = clock

    def period_s(self, job: sqlite3.Row) -> int:
        return min(int(job["timeout_s"]), self.period)

    def split(self, job: sqlite3.Row, ran_ms: int) -> tuple[int, int]:
        """(node pay, charge) for ran_ms of the current period, capped at a whole period."""
        period = self.period_s(job)
        ran_ms = max(0, min(ran_ms, period * 1000))
        if ran_ms == 0:
            return 0, 0
        cpu, gpus = int(job["cpu_milli"]), int(job["gpu"])
        return (
            economy.node_pay(cpu, ran_ms, period, gpus=gpus),
            economy.job_charge(cpu, ran_ms, period, job["priority"], gpus=gpus),
        )

    def payouts(self, node: sqlite3.Row, pay: int, charge: int) -> list[tuple[str, int]]:
        payouts = [(wallet_id(node["owner"]), pay), (REVENUE, charge - pay)]
        return [(a, n) for a, n in payouts if n > 0]

    def close(
        self,
        job: sqlite3.Row,
        node_id: str,
        ran_ms: int,
        why: str,
        outcome: str,
        result: dict[str, Any] | None = None,
    ) -> None:
        """Inside the caller's transaction: pay the current period up to ran_ms, refund the
        rest of the hold, add the charge to the job's cost, end the attempt with `outcome`.
        The job row's state is the caller's (it has already moved it, which makes this run
        once)."""
        node = self.store.node(node_id)
        pay, charge = self.split(job, ran_ms) if node is not None else (0, 0)
        now = self.clock()
        self.attempts.end_moved(
            True, job, outcome, now, charge=charge, pay=pay, wall_ms=max(0, ran_ms)
        )
        c = self.db.conn
        payouts = self.payouts(node, pay, charge) if node is not None else []
        self.ledger.close_hold(
            job["id"],
            payouts,
            reason=f"service job {job['id']} {why}",
            memo={"attempt": int(job["attempt"])},
        )
        c.execute(
            "UPDATE jobs SET cost = COALESCE(cost, 0) + ?, period_start = NULL,"
            " result = COALESCE(?, result) WHERE id = ?",
            (charge, json.dumps(result) if result else None, job["id"]),
        )
        if node is not None and pay:
            c.execute("UPDATE nodes SET earned = earned + ? WHERE id = ?", (pay, node_id))
            self.bonuses.proved(node, str(job["owner"]))

    def settle(
        self,
        job: sqlite3.Row,
        node: sqlite3.Row,
        wall_ms: int,
        result: dict[str, Any],
        now: float,
    ) -> None:
        # The smaller of the node's word (its run's wall time, less the periods already paid
        # while this attempt ran: a service that moved was billed on its old node too) and
        # what the hub saw since the current period began.
        since = float(job["period_start"] or now)
        during = int(job["periods_billed"]) - self.attempts.period_from(
            str(job["id"]), int(job["attempt"])
        )
        ran_ms = min(
            int((now - since) * 1000),
            wall_ms - during * self.period_s(job) * 1000,
        )
        with contextlib.suppress(Stale), self.db.transaction() as c:
            cur = c.execute(
                "UPDATE jobs SET state = 'completed', finished_at = ?, reason = NULL"
                " WHERE id = ? AND state IN ('assigned', 'running')",
                (now, job["id"]),
            )
            if cur.rowcount != 1:
                raise Stale
            self.close(job, node["id"], ran_ms, "ended", "completed", result)

    def bill(self, now: float | None = None) -> list[tuple[str, str, int]]:
        """Bill every whole period that running service jobs have completed by `now`.

        Each period is one transaction: the next period is held first (a top-up of the job's
        hold), then the period that ended is paid out of the hold to the node's owner. When
        the owner's wallet cannot hold the next period, the period that ended is paid, the
        rest refunded, and the job stops. Returns (node, job, attempt) of stopped jobs, for
        the bridge to send a cancel. Idempotent: a period is billed once, keyed by its number.
        """
        now = self.clock() if now is None else now
        stopped: list[tuple[str, str, int]] = []
        for row in self.store.running_services():
            period = self.period_s(row)
            job: sqlite3.Row | None = row
            while job is not None and now - float(job["period_start"]) >= period:
                if self._bill_period(job, now):
                    stopped.append((str(job["node"]), str(job["id"]), int(job["attempt"])))
                    break
                billed = job["periods_billed"]
                job = self.store.job(job["id"])
                if job is not None and (
                    job["state"] != "running"
                    or job["period_start"] is None
                    or job["periods_billed"] == billed  # nothing billed: don't spin
                ):
                    job = None
        return stopped

    def _bill_period(self, job: sqlite3.Row, now: float) -> bool:
        """Bill the job's current period, which has ended. True when the job had to stop."""
        n = int(job["periods_billed"])
        period = self.period_s(job)
        node = self.store.node(job["node"])
        if node is None:
            return False
        pay, charge = self.split(job, period * 1000)
        price = economy.period_price(
            int(job["cpu_milli"]), period, job["priority"], gpus=int(job["gpu"])
        )
        wallet = wallet_id(job["owner"])
        with contextlib.suppress(Stale), self.db.transaction() as c:
            cur = c.execute(
                "UPDATE jobs SET periods_billed = periods_billed + 1,"
                " period_start = period_start + ? WHERE id = ? AND state = 'running'"
                " AND periods_billed = ?",
                (period, job["id"], n),
            )
            if cur.rowcount != 1:
                return False  # billed already (a replay) or ended meanwhile
            try:
                with self.db.transaction():
                    self.ledger.place_hold(
                        job["id"],
                        wallet,
                        price,
                        idem_key=f"hold:{job['id']}:period:{n + 1}",
                        reason=f"hold for period {n + 2} of service job {job['id']}",
                    )
            except InsufficientFunds as e:
                c.execute(
                    "UPDATE jobs SET state = 'cancelled', finished_at = ?, reason = ? WHERE id = ?",
                    (
                        now,
                        f"stopped after {n + 1} paid period(s): the next costs"
                        f" {format_micro(price)} credits and the wallet has"
                        f" {format_micro(e.available)}",
                        job["id"],
                    ),
                )
                self.close(job, node["id"], period * 1000, f"stopped: {e}", "cancelled")
                return True
            self.ledger.post(
                f"service:{job['id']}:period:{n}",
                f"service job {job['id']}: period {n + 1} ({period}s)",
                [(hold_id(job["id"]), -charge), *self.payouts(node, pay, charge)],
                {"job_id": job["id"], "period": n + 1, "attempt": int(job["attempt"])},
            )
            self.attempts.add(str(job["id"]), int(job["attempt"]), charge, pay)
            c.execute(
                "UPDATE jobs SET cost = COALESCE(cost, 0) + ?, hold = hold + ? WHERE id = ?",
                (charge, price, job["id"]),
            )
            c.execute("UPDATE nodes SET earned = earned + ? WHERE id = ?", (pay, node["id"]))
            if pay:
                self.bonuses.proved(node, str(job["owner"]))
        return False

    def view(self, job: sqlite3.Row) -> dict[str, Any] | None:
        if job["kind"] != "service":
            return None
        period = self.period_s(job)
        return {
            "period_s": period,
            "periods_billed": job["periods_billed"],
            "period_start": job["period_start"],
            "period_price": format_micro(
                economy.period_price(
                    int(job["cpu_milli"]), period, job["priority"], gpus=int(job["gpu"])
                )
            ),
        }

"""Attempts: every time a job is given to a node, and the one way each of them ends.

The rule this module owns: **each attempt is paid or refunded exactly once**. An attempt
begins when the scheduler assigns the job (`begin`) and ends once (`end`): its outcome is
written by a guarded UPDATE (`WHERE outcome IS NULL`), inside the same transaction that moves
the attempt's credits, and the caller moves them only when `end` says it won. So a duplicated
result, a late loss report, a cancel racing a result or a replayed tick finds the attempt
already ended and moves nothing.

Outcomes, and who writes them (all in hub/market/jobs.py and hub/market/replicas.py):

- completed: the node's signed result settled it; paid for actual use.
- recorded: a replica's result waits for the quorum; paid or not when the quorum decides, in
  one entry keyed by the replica (which completes once).
- failed: the job failed on it (trap, timeout, memory limit...); the hold comes back (a
  service: the current period).
- blamed: it broke its executor the way another node's attempt did: the job is at fault, the
  time used is charged and the nodes' owners paid for it. A lost attempt is re-judged blamed
  when that becomes clear (once: only a lost attempt can be).
- lost: the node went away, restarted, stayed silent or its executor broke; nothing moves,
  the one hold covers the retry.
- declined: the node turned the assignment down; nothing moves, the job waits for another.
- cancelled: its owner cancelled, or a verdict made it moot; the hold comes back (a service:
  the current period is paid up to the second).

A service's periods billed while an attempt runs add to that attempt's charge and pay
(`add`), and `period_from` records how many periods were billed before it began, so the last
partial period of a service that moved is measured on the node that ran it.
No aiohttp, no MQTT: called inside the market's transactions.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Final

from hub.store.db import Database

OUTCOMES: Final = (
    "completed",
    "recorded",
    "failed",
    "blamed",
    "lost",
    "declined",
    "cancelled",
)


class Stale(Exception):
    """Raised inside a transaction when a step finds its job or attempt already past it: the
    transaction rolls back, and the caller (which suppresses it) changes nothing."""


class Attempts:
    def __init__(self, db: Database) -> None:
        self.db = db

    def end_moved(
        self,
        moved: sqlite3.Cursor | bool,
        job: sqlite3.Row,
        outcome: str,
        now: float,
        **how: Any,
    ) -> None:
        """Inside a transaction that just moved the job's state (`moved`: its cursor, or
        whether it did): end the job's current attempt with `outcome`, or raise Stale, which
        rolls the transaction back, when either step finds it done already."""
        done = moved if isinstance(moved, bool) else moved.rowcount == 1
        if not done or not self.end(str(job["id"]), int(job["attempt"]), outcome, now, **how):
            raise Stale

    def begin(self, job_id: str, attempt: int, node_id: str, now: float, period_from: int) -> None:
        self.db.conn.execute(
            "INSERT OR IGNORE INTO attempts (job, attempt, node, started_at, period_from)"
            " VALUES (?, ?, ?, ?, ?)",
            (job_id, attempt, node_id, now, period_from),
        )

    def end(
        self,
        job_id: str,
        attempt: int,
        outcome: str,
        now: float,
        *,
        charge: int = 0,
        pay: int = 0,
        wall_ms: int | None = None,
        error: str | None = None,
    ) -> bool:
        """End the attempt with `outcome`; True only for the one call that ends it. Inside the
        caller's transaction, which moves the attempt's credits when (and only when) this is
        True. An attempt from before attempts were recorded is recorded as it ends."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown attempt outcome {outcome!r}")
        if attempt < 1:
            return False  # never assigned: no attempt to end
        c = self.db.conn
        cur = c.execute(
            "UPDATE attempts SET outcome = ?, ended_at = ?, charge = charge + ?, pay = pay + ?,"
            " wall_ms = ?, error = ? WHERE job = ? AND attempt = ? AND outcome IS NULL",
            (outcome, now, charge, pay, wall_ms, error, job_id, attempt),
        )
        if cur.rowcount == 1:
            return True
        # No open row: ended already, or assigned before attempts were recorded (migration 7),
        # in which case it is recorded now, as it ends. One statement on the common path.
        cur = c.execute(
            "INSERT OR IGNORE INTO attempts (job, attempt, started_at, outcome, ended_at, charge,"
            " pay, wall_ms, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (job_id, attempt, now, outcome, now, charge, pay, wall_ms, error),
        )
        return cur.rowcount == 1

    def add(self, job_id: str, attempt: int, charge: int, pay: int) -> None:
        """A service period billed while the attempt runs: part of what it cost and earned."""
        self.db.conn.execute(
            "UPDATE attempts SET charge = charge + ?, pay = pay + ? WHERE job = ? AND attempt = ?",
            (charge, pay, job_id, attempt),
        )

    def get(self, job_id: str, attempt: int) -> sqlite3.Row | None:
        return self.db.query_one(
            "SELECT * FROM attempts WHERE job = ? AND attempt = ?", (job_id, attempt)
        )

    def of_job(self, job_id: str) -> list[sqlite3.Row]:
        return self.db.query("SELECT * FROM attempts WHERE job = ? ORDER BY attempt", (job_id,))

    def period_from(self, job_id: str, attempt: int) -> int:
        row = self.get(job_id, attempt)
        return int(row["period_from"]) if row is not None else 0

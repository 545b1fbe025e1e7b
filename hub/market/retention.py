"""Retention of job files, and the collection of blobs nobody refers to.

A finished job's files (its inputs and the outputs it left under /outputs) are kept for the
operator's `output_retention_s`; then their rows go and the job says when
(`outputs_expired_at`; GET of an output answers 410 Gone). A blob is collected once nothing
refers to it: no job's module or stdin, no job file, and no upload or result within
`blob_grace_s` (an upload waits that long for the job that will name it). Runs from the
hub's tick, at most once a minute, a bounded batch at a time.
"""

from __future__ import annotations

from collections.abc import Callable

from hub.config import HubConfig
from hub.store.db import Database

EVERY_S = 60.0
BATCH = 500  # jobs expired, or blobs deleted, per step: a tick stays short


class Retention:
    def __init__(self, config: HubConfig, db: Database, clock: Callable[[], float]) -> None:
        self.config = config
        self.db = db
        self.clock = clock
        self.last = float("-inf")

    def due(self, now: float) -> bool:
        return now - self.last >= EVERY_S

    def run(self, now: float | None = None) -> tuple[int, int]:
        """Expire files of jobs past retention, then collect unreferenced blobs: (jobs
        expired, blobs collected). Call it in a transaction."""
        now = self.clock() if now is None else now
        self.last = now
        c = self.db.conn
        expired = [
            r[0]
            for r in c.execute(
                "SELECT id FROM jobs WHERE finished_at < ? AND outputs_expired_at IS NULL"
                " AND files_bytes IS NOT NULL AND state IN ('completed', 'failed', 'cancelled')"
                " ORDER BY finished_at LIMIT ?",
                (now - self.config.output_retention_s, BATCH),
            )
        ]
        for job_id in expired:
            c.execute("DELETE FROM job_files WHERE job = ?", (job_id,))
            c.execute("UPDATE jobs SET outputs_expired_at = ? WHERE id = ?", (now, job_id))
        cur = c.execute(
            "DELETE FROM blobs WHERE sha256 IN ("
            " SELECT b.sha256 FROM blobs b WHERE b.created_at < ?"
            " AND NOT EXISTS (SELECT 1 FROM job_files f WHERE f.sha256 = b.sha256)"
            " AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.module_sha256 = b.sha256)"
            " AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.input_sha256 = b.sha256)"
            " LIMIT ?)",
            (now - self.config.blob_grace_s, BATCH),
        )
        return len(expired), cur.rowcount

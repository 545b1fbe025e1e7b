"""Which hub replica leads: the one that runs the scheduling passes and the ticks (liveness
sweep, service billing, retention, the expiry of agent calls). Every replica handles the REST
API, the dashboard and its share of the MQTT traffic.

On SQLite there is one hub, and it always leads (`Leadership`). On PostgreSQL
(`PgLeadership`), the leader is the replica holding a session-level advisory lock on a
connection of its own: it tries every `retry_s`, and holds the lock as long as that connection
lives. A replica that dies (killed, crashed, cut off) loses its connection, the server
releases the lock, and the next replica to try takes it, within `retry_s` of the server
noticing (at once for a killed process; after TCP keepalives for a lost machine: `KEEPALIVE`).

Leadership is for economy, not safety: write transactions take the store's write lock
(hub/store/pg.py), and a pass decides on the state it reads under that lock, so two replicas
that both believed they led for a moment would still never assign a job twice or move credits
twice; they would only do the same work one after the other.

The same connection carries the replicas' notes to each other (LISTEN/NOTIFY):
- `deparrow_pass`: a replica that is not leading took a submission (or a result that frees a
  node) and asks the leader for a scheduling pass now, rather than at its next tick;
- `deparrow_live`: the changes one replica reports to its open dashboards (job and node
  states, heartbeats, balances) go to every other replica's dashboards too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

LEADER_LOCK = int.from_bytes(b"dp-lead!", "big") & 0x7FFF_FFFF_FFFF_FFFF
PASS = "deparrow_pass"
LIVE = "deparrow_live"
MAX_NOTE = 7000  # PostgreSQL takes NOTIFY payloads up to 8000 bytes
# A dead peer's connection (and so its lock) is noticed within about 5 + 2 * 2 s.
KEEPALIVE: dict[str, Any] = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
                             "keepalives_count": 2}  # fmt: skip

Change = tuple[str, dict[str, Any]]


class Leadership:
    """A hub alone: it always leads. The app sets the callbacks."""

    def __init__(self) -> None:
        self.replica = secrets.token_hex(6)
        self.leading = True
        self.on_lead: Callable[[], None] = lambda: None  # just became the leader
        self.on_pass: Callable[[], None] = lambda: None  # another replica asks for a pass
        self.on_change: Callable[[str, dict[str, Any]], None] = lambda _k, _d: None
        self.took_lead_at: float | None = None  # time.time() when this replica last took it

    async def start(self) -> None:
        self.took_lead_at = time.time()
        self.on_lead()

    async def stop(self) -> None:
        pass

    def request_pass(self) -> None:
        """Ask the leader for a scheduling pass (a replica that is not leading)."""

    def share(self, kind: str, data: dict[str, Any]) -> None:
        """Tell the other replicas' dashboards about a change."""

    def _become(self, leading: bool) -> None:
        if leading == self.leading:
            return
        self.leading = leading
        if leading:
            self.took_lead_at = time.time()
            log.warning("this hub replica (%s) leads: it runs the scheduler and the ticks",
                        self.replica)  # fmt: skip
            try:
                self.on_lead()
            except Exception:
                log.exception("taking the lead: catching up failed")
        else:
            log.warning("this hub replica (%s) no longer leads", self.replica)


class PgLeadership(Leadership):
    """Leadership among replicas sharing one PostgreSQL database; see the module."""

    def __init__(self, url: str, *, retry_s: float = 1.0, db: Any = None) -> None:
        super().__init__()
        self.url = url
        self.db = db  # the store's Database: pass requests inside its transactions
        self.retry_s = retry_s
        self.leading = False
        self._outbox: asyncio.Queue[tuple[str, str]] = asyncio.Queue(maxsize=10_000)
        self._changes: list[Change] = []
        self._pass_asked = False
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._tried = asyncio.Event()

    async def start(self) -> None:
        """Start, and return once the first try for the lock is over (a replica starting
        alone leads from its first moment), or after a few seconds without the store."""
        self._tried = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._control(), name="leadership"),
            asyncio.create_task(self._sender(), name="replica-notes"),
        ]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._tried.wait(), 5.0)

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        if self.leading:
            self._become(False)

    # --- notes to the other replicas -----------------------------------------------------
    def request_pass(self) -> None:
        """Asked inside a transaction (a batch that freed a node, took a submission), the
        note is part of it: PostgreSQL delivers it at COMMIT, so the leader's pass sees what
        this replica wrote (sent at once, it could run before, find nothing free, and leave
        the work to its next tick). Identical notes of one transaction arrive as one."""
        db = self.db
        if db is not None and db.in_transaction and not db.committing:
            db.conn.execute("SELECT pg_notify(?, ?)", (PASS, self.replica))
            return
        if not self._pass_asked:
            self._pass_asked = True
            self._note(PASS, self.replica)

    def share(self, kind: str, data: dict[str, Any]) -> None:
        if not self._changes:
            asyncio.get_running_loop().call_soon(self._flush_changes)
        self._changes.append((kind, data))

    def _flush_changes(self) -> None:
        changes, self._changes = self._changes, []
        batch: list[Change] = []
        size = 0
        for kind, data in changes:
            item = json.dumps([kind, data], separators=(",", ":"), default=str)
            if len(item) > MAX_NOTE:
                continue  # nothing a dashboard shows is this large
            if size + len(item) > MAX_NOTE and batch:
                self._note_changes(batch)
                batch, size = [], 0
            batch.append((kind, data))
            size += len(item) + 1
        if batch:
            self._note_changes(batch)

    def _note_changes(self, batch: list[Change]) -> None:
        payload = json.dumps({"r": self.replica, "c": batch}, separators=(",", ":"), default=str)
        self._note(LIVE, payload)

    def _note(self, channel: str, payload: str) -> None:
        with contextlib.suppress(asyncio.QueueFull):  # a store that is gone: dashboards lag
            self._outbox.put_nowait((channel, payload))

    async def _sender(self) -> None:
        import psycopg

        conn: psycopg.AsyncConnection[Any] | None = None
        while True:
            channel, payload = await self._outbox.get()
            if channel == PASS:
                self._pass_asked = False
            try:
                if conn is None or conn.closed:
                    conn = await psycopg.AsyncConnection.connect(
                        self.url, autocommit=True, **KEEPALIVE
                    )
                await conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))
            except psycopg.Error as e:
                log.warning("could not tell the other hub replicas (%s): %s", channel, e)
                if conn is not None:
                    await conn.close()
                conn = None
                await asyncio.sleep(self.retry_s)

    # --- the lock, and the notes from the others -----------------------------------------
    async def _control(self) -> None:
        import psycopg

        while not self._stopping:
            conn: psycopg.AsyncConnection[Any] | None = None
            try:
                conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True, **KEEPALIVE)
                await conn.execute(f"LISTEN {PASS}")
                await conn.execute(f"LISTEN {LIVE}")
                await self._hold_or_try(conn)
            except (psycopg.Error, OSError) as e:
                self._tried.set()
                log.warning("hub replica %s lost the store's leader lock connection: %s",
                            self.replica, e)  # fmt: skip
            finally:
                if self.leading:
                    self._become(False)
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
            if not self._stopping:
                await asyncio.sleep(self.retry_s)

    async def _hold_or_try(self, conn: Any) -> None:
        while True:
            if self.leading:
                await conn.execute("SELECT 1")  # the lock lives as long as this connection
            else:
                cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK,))
                row = await cur.fetchone()
                if row is not None and row[0]:
                    self._become(True)
                self._tried.set()
            deadline = time.monotonic() + self.retry_s
            while (left := deadline - time.monotonic()) > 0:
                async for note in conn.notifies(timeout=left):
                    self._received(note.channel, note.payload)

    def _received(self, channel: str, payload: str) -> None:
        if channel == PASS:
            if self.leading:
                self.on_pass()
            return
        try:
            note = json.loads(payload)
            if note.get("r") == self.replica:
                return
            for kind, data in note["c"]:
                self.on_change(str(kind), dict(data))
        except (ValueError, KeyError, TypeError):
            log.warning("a replica's live note could not be read; dropped")
        except Exception:
            log.exception("a change from another replica could not be shown")


def leadership_for(db_target: object, db: Any = None) -> Leadership:
    """PgLeadership for a postgresql:// store (db: its Database), else a hub that always
    leads."""
    if isinstance(db_target, str) and db_target.startswith(("postgresql://", "postgres://")):
        return PgLeadership(db_target, db=db)
    return Leadership()

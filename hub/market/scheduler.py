"""The scheduler: give each queued job to an eligible node with room for it.

Eligible: online, idle (a slot free, not suspended by its owner's activity), speaks the job's
engine, lets that engine's jobs use the network if the job asks for it (the owner's choice, in
the node's hello and heartbeats), and has enough CPU, RAM and GPUs free: what it offers less
the shares of the jobs the hub has given it (a node runs as many jobs at once as its slots and
its offer allow). High priority first, then oldest. Among the nodes that fit, those in good
standing (hub/market/reputation.py) take turns: the one given a job longest ago first, so
identical honest nodes earn alike; nodes below good standing come after, the most reputable
first. The replicas of a verified job go to nodes of distinct owners. When nothing fits, the
job's `reason` says why, so the submitter is not left guessing.

A pass decides first (`plan()`, which writes nothing; the matching is in hub/market/matching.py,
about O(nodes log nodes + jobs + distinct requirements x idle nodes)) and then commits the
decisions (`schedule()`). What a pass costs follows what changed, not what exists:

- Nothing changed: the pass returns at once. On SQLite the scheduler knows from the
  connection's change counter and `PRAGMA data_version` (which moves when another process
  commits) whether anything was written since the plan it last finished; its own writes, and
  those a caller declares irrelevant (`unimportant()`: a heartbeat that changed nothing a
  plan reads), do not count. Past `REBUILD_S`, or when it is in doubt (a decision that no
  longer held, a leader change: `forget()`), it reads the store again. On PostgreSQL, where
  other hub processes write the same rows, every pass reads the store.
- A big plan is committed a slice at a time (`MAX_WRITES` rows a pass), so a pass holds the
  writer, and the event loop, for milliseconds; what is left of the plan waits in memory for
  the next pass (`more`), each decision checked against the rows before it is written: the
  job still queued at the same attempt, the node still online and idle with room for it.
- A plan that took long (`OFFLOAD_S`) is made next time in a thread, from a snapshot of its own
  (`schedule(wake=...)`), while the loop goes on; `wake` is called when it is ready, and the
  next pass commits it as above. When the store changed while a plan is still being written
  `REPLAN_S` after it was made, a fresh plan is made the same way and takes over the rest.
- Only light changes since the store was last quiet (jobs arrived, started or ended, which
  Jobs counts; nodes went idle or busy with the same offer, which Messages declares:
  `light()`): the next plan reads the fleet and only the head of the queue, a page at a time
  until no idle node has a slot left, and says why each job that arrived meanwhile waits
  (`plan(head=True)`). The jobs further back keep their reasons, which only a change in what
  the nodes offer could alter. So a busy hub's passes cost O(fleet + a page), not O(queue).
- Anything else changed (an offer moved, a node came or went, another process wrote, or
  REBUILD_S passed since the last whole plan): the next plan reads the queue and the fleet
  again, O(queue + fleet), off the loop once that is long.
`bench/market.py` measures all of it on 10,000 (or 100,000) nodes and queued jobs.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import itertools
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

from edge.core import protocol
from hub.config import HubConfig
from hub.market.jobs import Assignment, Jobs
from hub.market.matching import (
    Capabilities,
    Free,
    Kind,
    Offer,
    message_need,
    misfit,
    offer,
    soonest,
)
from hub.market.reputation import GOOD_STANDING
from hub.store.rows import Store

log = logging.getLogger(__name__)

Query = Callable[[str, Sequence[Any]], Sequence[Any]]

# What a plan reads of a node: the columns matching parses (at fleet scale, building rows of
# every column costs more than the matching).
_NODE_COLUMNS = (
    "id, state, resources, engines, allow_network, files, gpus, slots, cpu, memory_mb, owner,"
    " max_message"
)


# The queue as a plan reads it, in order: high priority first, then oldest. A verified job
# (replicas > 1) is never placed itself: its replicas are.
_QUEUED_COLUMNS = (
    "SELECT id, attempt, cpu_milli, memory_mb, gpu, reason, parent, files_bytes, message_bytes,"
    " json_extract(spec, '$.engine.type') AS engine,"
    " json_extract(spec, '$.engine.network') AS network"
    " FROM jobs WHERE state = 'queued' AND replicas = 1"
)
_QUEUED = _QUEUED_COLUMNS + " ORDER BY CASE priority WHEN 'high' THEN 0 ELSE 1 END, submitted_at"
_QUEUED_BY_ID = _QUEUED_COLUMNS + " AND id IN ({marks})"


class Plan(NamedTuple):
    """A pass's decisions: (job, node id) to assign, (job, reason) for those that wait.
    timely: some reason names a time (a suspended node's resume), so it goes stale by itself."""

    assign: list[tuple[sqlite3.Row, str]]
    wait: list[tuple[sqlite3.Row, str]]
    timely: bool = False


class _Pending:
    """A plan being committed a slice per pass, and what the store looked like when it was
    made (the mark it leaves behind when it is all committed and nothing else was written)."""

    def __init__(self, plan: Plan, mark: tuple[int, int] | None) -> None:
        # Plain tuples of plain values, not the plan's rows: the collector stops tracking
        # them, so a big plan kept for seconds does not make each full collection on the
        # loop walk it (one took ~0.3 s at 100k jobs).
        self.assign = [
            (str(job["id"]), int(job["attempt"]), job["parent"], _need(job), node_id)
            for job, node_id in plan.assign
        ]
        self.wait = [(str(job["id"]), why) for job, why in plan.wait if job["reason"] != why]
        self.timely = plan.timely
        self.mark = mark
        self.made = time.monotonic()
        self.doubt = False  # a decision no longer held: plan again rather than trust the mark
        self.whole = True  # a plan of the whole queue, not of its head (plan(head=True))

    def __bool__(self) -> bool:
        return bool(self.assign or self.wait)


def _need(job: Any) -> tuple[Kind, int, int, int, int, int]:
    """What a queued job row asks for: (kind, milli-CPUs, MB, input bytes, GPUs, message)."""
    # json_extract gives JSON true as 1 (on PostgreSQL: 'true'); wasm jobs have no `network`.
    files = job["files_bytes"]
    kind = (str(job["engine"] or "unknown"), job["network"] in (1, "true"), files is not None)
    return (
        kind,
        int(job["cpu_milli"]),
        int(job["memory_mb"]),
        int(files or 0),
        int(job["gpu"] or 0),
        message_need(job["message_bytes"]),
    )


class _Room:
    """What the nodes of a slice of decisions have room for now, read from their rows: a
    decision made from an older snapshot is written only if it still fits."""

    def __init__(self, nodes: list[Offer], held: dict[str, tuple[int, int, int, int]]) -> None:
        self.free = Free(nodes, held)
        self.index = {n.id: i for i, n in enumerate(nodes)}

    def take(self, need: tuple[Kind, int, int, int, int, int], node_id: str) -> bool:
        i = self.index.get(node_id)
        if i is None:  # offline, busy, suspended or revoked now
            return False
        kind, cpu_milli, memory_mb, files, gpu, size = need
        if kind not in self.free.nodes[i].kinds:
            return False
        if not self.free.fits(i, cpu_milli, memory_mb, files, gpu, size):
            return False
        self.free.take(i, cpu_milli, memory_mb, gpu)
        return True


class Scheduler:
    # Rows (assignments, then changed reasons) a pass writes at most; the rest of its plan is
    # written by the next passes. An assignment costs ~0.1 ms on the loop (its rows and its
    # message), so a pass holds the writer for ~10-20 ms.
    MAX_WRITES = 100
    # A plan that took this long is made off the loop next time (schedule(wake=...)); so is
    # the first, when this many jobs are queued.
    OFFLOAD_S = 0.02
    OFFLOAD_JOBS = 2000
    # A quiet store (nothing written since the last plan) is trusted this long at most.
    REBUILD_S = 30.0
    # A plan still being committed this long after it was made is made again when the store
    # changed meanwhile.
    REPLAN_S = 2.0
    # The queue's head is read this many jobs at a time (plan(head=True)).
    HEAD_PAGE = 64

    def __init__(self, config: HubConfig, store: Store, jobs: Jobs) -> None:
        self.config = config
        self.store = store
        self.jobs = jobs
        self.more = False  # a plan is left to commit: the caller asks for another pass
        self._pending: _Pending | None = None
        self._planning = False  # a plan is being made in a thread
        self._generation = 0  # forget() moves it: a plan begun before is thrown away
        self._quiet: tuple[int, int] | None = None  # the store's mark when nothing was left
        self._quiet_at = 0.0
        self._ignored = 0  # changes of this connection that no plan needs to see
        self._light = 0  # changes declared light (light()), added to Jobs.light_changes
        self._quiet_light = 0  # the light changes counted when the store was last quiet
        self._whole_at = 0.0  # when a whole plan last left the store quiet
        self.last_plan_s: float | None = None  # how long the last plan took (s)
        self.head_plan_s = 0.0  # how long the last plan of the queue's head took (s)
        self._tasks: set[asyncio.Task[None]] = set()  # plans being made off the loop

    def offline_after_s(self) -> float:
        return self.config.heartbeat_interval_s * self.config.missed_beats_offline

    # --- what changed since the last plan ---------------------------------------------------
    def changes(self) -> int | None:
        """The writer connection's change counter (SQLite), for unimportant(); None elsewhere."""
        db = self.store.db
        if db.dialect != "sqlite":
            return None
        return int(db.conn.total_changes)

    def unimportant(self, since: int | None) -> None:
        """The writes made on the hub's connection since `changes()` said `since` change
        nothing a plan reads (a heartbeat that repeats the node's offer and state): they do not
        wake the next pass. Only for writes whose rows no plan reads."""
        now = self.changes()
        if since is not None and now is not None:
            self._ignored += now - since

    def light(self, since: int | None) -> None:
        """The writes made on the hub's connection since `changes()` said `since` only moved
        a node between idle and busy (a heartbeat that changed its state and nothing else of
        its offer): the next pass may plan from the head of the queue (plan(head=True))."""
        now = self.changes()
        if since is not None and now is not None:
            self._light += now - since

    def _light_count(self) -> int:
        return self._light + self.jobs.light_changes

    def forget(self) -> None:
        """Trust nothing remembered: the next pass reads the store (a leader change, or
        another process wrote rows this one plans from)."""
        self._pending = None
        self._quiet = None
        self._planning = False
        self._generation += 1
        self.more = False
        self.last_plan_s = None
        self.head_plan_s = 0.0

    def _mark(self) -> tuple[int, int] | None:
        """Where the store is: the writer connection's changes less those no plan needs, and
        the commits of other connections (PRAGMA data_version). None: no such counters
        (PostgreSQL), every pass reads the store."""
        db = self.store.db
        if db.dialect != "sqlite":
            return None
        conn = db.conn
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        return conn.total_changes - self._ignored, int(version)

    def _unchanged(self) -> bool:
        if self._quiet is None or time.monotonic() - self._quiet_at > self.REBUILD_S:
            return False
        return self._mark() == self._quiet

    def _only_light(self) -> bool:
        """Whether every write since the store was last quiet was a light one (jobs arrived,
        started or ended; nodes went idle or busy) and none came from another connection, within
        REBUILD_S of the last whole plan."""
        quiet = self._quiet
        if quiet is None or time.monotonic() - self._whole_at > self.REBUILD_S:
            return False
        mark = self._mark()
        if mark is None or mark[1] != quiet[1]:
            return False
        return mark[0] - quiet[0] == self._light_count() - self._quiet_light

    # --- a pass -------------------------------------------------------------------------------
    def schedule(self, wake: Callable[[], None] | None = None) -> list[Assignment]:
        """One pass: assign what fits, say why the rest waits. The assignments are written when
        this returns (in the caller's transaction, if one is open); the caller sends them.

        At most MAX_WRITES rows a pass: when `more` is set afterwards, a plan is left to
        commit and the caller should ask for another pass. wake: given by a caller on an event
        loop; a plan expected to take long (the last took OFFLOAD_S or more) is then made in a
        thread, and wake() is called on the loop once it is ready to commit."""
        pending = self._pending
        if (
            pending is not None
            and wake is not None
            and not self._planning
            and time.monotonic() - pending.made > self.REPLAN_S
            and self._mark() != pending.mark
        ):
            # Jobs arrived or nodes changed while a big plan is being committed: a fresh plan
            # (off the loop) takes over what is left of it, so a new high-priority job does not
            # wait for the whole backlog's plan to be written.
            self._offload(wake)
        if self._pending is None:
            if self._planning:
                return []  # its end calls wake
            if self._unchanged():
                return []
            if self.head_plan_s < self.OFFLOAD_S and self._only_light():
                # On the loop: it reads the fleet and the head of the queue. Once that takes
                # long (a fleet of many thousands), whole plans off the loop serve instead.
                mark = self._mark()
                started = time.perf_counter()
                head = self.plan(head=True, arrived=self.jobs.take_arrived())
                self.head_plan_s = time.perf_counter() - started
                self._pending = _Pending(head, mark)
                self._pending.whole = False
                return self._commit(fresh=True)
            self.jobs.take_arrived()  # a whole plan sees them all
            if wake is not None and self._long() and self._offload(wake):
                return []
            mark = self._mark()
            started = time.perf_counter()
            plan = self.plan()
            self.last_plan_s = time.perf_counter() - started
            if self.last_plan_s < self.OFFLOAD_S:  # a whole plan is quick: so is its head
                self.head_plan_s = 0.0
            self._pending = _Pending(plan, mark)
            return self._commit(fresh=True)
        return self._commit()

    def _long(self) -> bool:
        """Whether the next plan is expected to take OFFLOAD_S or more: as long as the last
        did, or, before the first, by the size of the queue."""
        if self.last_plan_s is None:
            row = self.store.db.query_one("SELECT COUNT(*) FROM jobs WHERE state = 'queued'")
            return row is not None and int(row[0]) >= self.OFFLOAD_JOBS
        return self.last_plan_s >= self.OFFLOAD_S

    def _offload(self, wake: Callable[[], None]) -> bool:
        """Make the next plan in a thread, from a snapshot read on a connection of its own."""
        db = self.store.db
        if db.dialect != "sqlite":
            return False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        generation, path = self._generation, db.path

        def make(mark: tuple[int, int] | None) -> tuple[_Pending, float]:
            started = time.perf_counter()
            # The plan builds ~10 objects per job and node. With the collector on, its full
            # collections ran in this thread holding the GIL for 35-70 ms at a time (100k
            # nodes x 100k jobs), stalling the loop; without it, the loop waited < 20 ms.
            # Reference counting still frees the plan's objects; cycles wait for the end.
            collecting = gc.isenabled()
            gc.disable()
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
            try:
                conn.row_factory = sqlite3.Row
                conn.execute("BEGIN")  # one snapshot for every query of the plan

                def read(sql: str, params: Sequence[Any]) -> list[Any]:
                    return conn.execute(sql, params).fetchall()

                pending = _Pending(self.plan(read), mark)
                conn.execute("ROLLBACK")
            finally:
                conn.close()
                if collecting:
                    gc.enable()
            gc.collect(0)  # here, not on the loop: what survives the plan is sorted out
            return pending, time.perf_counter() - started

        async def run() -> None:
            # The thread reads what is committed: the mark may only count writes it will see,
            # so it is taken once the transaction this pass runs in is durable.
            mark, ready, took = None, None, 0.0
            try:
                for _ in range(1000):
                    if db.committing and not await db.settled(1.0):
                        continue
                    if not db.conn.in_transaction:  # db.conn settles the COMMIT that ended
                        mark = self._mark()
                        break
                    await asyncio.sleep(0.001)
                ready, took = await loop.run_in_executor(None, make, mark)
            except Exception:
                log.exception("a scheduling plan made off the loop failed; planning again")
            finally:  # cancelled too (the loop stopping): never left `planning` for good
                if generation == self._generation:
                    self._planning = False
                    self.last_plan_s = took  # 0 after a failure: the next plan is on the loop
                    if ready is not None:
                        self._pending = ready
            if generation == self._generation:
                wake()

        self._planning = True
        task = loop.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    def _commit(self, fresh: bool = False) -> list[Assignment]:
        """Write the next slice of the pending plan, each decision checked against the rows.
        fresh: the plan was made just now, in this transaction, from the rows it would be
        checked against: its first slice needs no check."""
        pending = self._pending
        assert pending is not None
        out: list[Assignment] = []
        budget = self.MAX_WRITES
        before = self.changes()
        with self.store.db.transaction() as c:
            if pending.assign:
                decisions, pending.assign = pending.assign[:budget], pending.assign[budget:]
                budget -= len(decisions)
                room = None if fresh else self._room({decision[-1] for decision in decisions})
                for job_id, attempt, parent, need, node_id in decisions:
                    if room is not None and not room.take(need, node_id):
                        pending.doubt = True  # the node changed since the plan: plan again
                        continue
                    job = {"id": job_id, "attempt": attempt, "parent": parent}
                    assignment = self.jobs.assign(job, node_id)  # type: ignore[arg-type]
                    if assignment is None:  # no longer queued (cancelled, failed)
                        pending.doubt = True
                        continue
                    out.append(assignment)
            if budget > 0 and pending.wait:
                reasons, pending.wait = pending.wait[:budget], pending.wait[budget:]
                for job_id, why in reasons:  # only a job still waiting: it may be gone meanwhile
                    c.execute(
                        "UPDATE jobs SET reason = ? WHERE id = ? AND state = 'queued'",
                        (why, job_id),
                    )
        # What this pass wrote is the plan's own doing: it wakes no one.
        self.unimportant(before)
        if pending:
            self.more = True
            return out
        self._pending = None
        self.more = False
        mark = self._mark()
        if not pending.doubt and not pending.timely and mark is not None and mark == pending.mark:
            self._quiet, self._quiet_at = mark, time.monotonic()
            self._quiet_light = self._light_count()
            if pending.whole:
                self._whole_at = self._quiet_at
        else:
            self._quiet = None
        return out

    def _room(self, node_ids: set[str]) -> _Room:
        """What the nodes of a slice of decisions have room for now, read from their rows."""
        ids = sorted(node_ids)
        if not ids:
            return _Room([], {})
        marks = ",".join("?" * len(ids))
        rows = self.store.db.query(
            f"SELECT {_NODE_COLUMNS} FROM nodes WHERE id IN ({marks}) AND state = ?"
            " AND revoked_at IS NULL",
            (*ids, protocol.IDLE),
        )
        return _Room([offer(r) for r in rows], self._held(f"AND node IN ({marks})", ids))

    def plan(
        self, query: Query | None = None, head: bool = False, arrived: Sequence[str] = ()
    ) -> Plan:
        """Decide, without writing anything: which queued job goes to which idle node, and
        why each of the others waits. The matching half of a pass (bench/market.py times it
        on its own). query: how to read (by default the hub's connection; a thread passes a
        connection of its own).

        head: plan only the head of the queue, read a page at a time until no idle node has
        a slot left, then the `arrived` jobs (for their reasons): enough when, since the last
        whole plan, jobs only arrived, started and ended (`light` changes). The jobs further
        back still wait for the reason they were given, which only a change of what the
        nodes offer can alter, and such a change makes the next plan a whole one."""
        q: Query = query if query is not None else self.store.db.query
        queued: Iterable[Any]
        if head:
            pages = self._head(q)
            first = next(pages, None)
            if first is None and not arrived:
                return Plan([], [])
            queued = itertools.chain([] if first is None else [first], pages)
        else:
            queued = q(_QUEUED, ())
            if not queued:
                return Plan([], [])
        plan = Plan([], [])
        online = [offer(n) for n in self._online_nodes(q)]
        free = Free([n for n in online if n.idle], self._held(query=q))
        capabilities = functools.cache(lambda: Capabilities(online))  # for reasons only
        whys: dict[tuple[Kind, int, int, int, int, int], str] = {}
        apart: dict[str, set[str]] | None = None  # verified job -> people of its replicas
        humans: dict[str, str] = {}  # agent -> the person who owns it
        timely = False

        @functools.cache
        def suspended() -> Sequence[Any]:  # read once a plan, when a reason needs them
            return q(
                "SELECT id, cpu, memory_mb, suspended FROM nodes WHERE state = ?",
                (protocol.SUSPENDED,),
            )

        def decide(job: Any) -> None:
            nonlocal apart, humans, timely
            kind, cpu_milli, memory_mb, files, gpu, size = _need(job)
            parent = job["parent"]
            if parent is None:
                pick = free.pick(kind, cpu_milli, memory_mb, files, gpu, size)
            else:
                if apart is None:
                    humans = self.store.humans(q)
                    apart = self._replica_owners(humans, q)
                owners = apart.setdefault(parent, set())
                pick = free.pick_apart(kind, cpu_milli, memory_mb, owners, humans, files, size)
                if pick is not None:
                    owner = free.nodes[pick].owner
                    owners.add(humans.get(owner, owner))
            if pick is not None:
                free.take(pick, cpu_milli, memory_mb, gpu)
                plan.assign.append((job, free.nodes[pick].id))
                return
            key = (kind, cpu_milli, memory_mb, files, gpu, size)
            why = whys.get(key)
            if why is None:
                why, soon = self._why(kind, job, online, capabilities(), suspended)
                whys[key] = why
                timely = timely or soon
            if parent is not None and why.startswith("every node"):
                why = (
                    "waiting for an idle node whose owner runs no other replica of job"
                    f" {parent} (replicas go to nodes of distinct owners)"
                )
            plan.wait.append((job, why))

        seen: set[str] = set()
        for job in queued:
            if head and not free.left:
                break
            seen.add(str(job["id"]))
            decide(job)
        if head:  # the jobs that arrived further back: why they wait
            rest = sorted({i for i in arrived if i not in seen})
            for at in range(0, len(rest), 500):
                ids = rest[at : at + 500]
                marks = ",".join("?" * len(ids))
                for job in q(_QUEUED_BY_ID.format(marks=marks), ids):
                    decide(job)
        return plan._replace(timely=timely)

    def _head(self, q: Query) -> Iterator[Any]:
        """The queue in order, a page at a time, for as long as the caller reads on."""
        offset = 0
        while True:
            page = q(_QUEUED + " LIMIT ? OFFSET ?", (self.HEAD_PAGE, offset))
            yield from page
            if len(page) < self.HEAD_PAGE:
                return
            offset += self.HEAD_PAGE

    def _held(
        self, where: str = "", params: Sequence[Any] = (), query: Query | None = None
    ) -> dict[str, tuple[int, int, int, int]]:
        """What the jobs the hub has given each node hold of it: (jobs, milli-CPUs, MB, GPUs)."""
        q: Query = query if query is not None else self.store.db.query
        return {
            str(r[0]): (int(r[1]), int(r[2]), int(r[3]), int(r[4]))
            for r in q(
                "SELECT node, COUNT(*), SUM(cpu_milli), SUM(memory_mb), SUM(gpu) FROM jobs"
                f" WHERE state IN ('assigned', 'running') AND node IS NOT NULL {where}"
                " GROUP BY node",
                params,
            )
        }

    def _replica_owners(self, humans: dict[str, str], q: Query) -> dict[str, set[str]]:
        """For each verified job with a replica waiting: the people who own the nodes its
        replicas are on, or ran an attempt on. A replica never goes to a node of one of them.
        People, not accounts: an agent's nodes are its owner's (`humans`), or one person could
        put each node under an agent of their own and agree with themselves."""
        owners: dict[str, set[str]] = {}
        waiting = "SELECT DISTINCT parent FROM jobs WHERE state = 'queued' AND parent IS NOT NULL"
        for r in q(
            "SELECT r.parent, n.owner FROM jobs r JOIN nodes n ON n.id = r.node"
            f" WHERE r.parent IN ({waiting})"
            " UNION SELECT r.parent, n.owner FROM jobs r JOIN attempts a ON a.job = r.id"
            f" JOIN nodes n ON n.id = a.node WHERE r.parent IN ({waiting})",
            (),
        ):
            owner = str(r["owner"])
            owners.setdefault(str(r["parent"]), set()).add(humans.get(owner, owner))
        return owners

    def _online_nodes(self, q: Query) -> Sequence[Any]:
        """Online, not revoked (a revoked node has lost its broker login; it gets nothing even
        if a stale state still says online), in order of preference: nodes in good standing,
        the one given a job longest ago first (never given one: first of all), then the
        others, the most reputable first; ties to the longest enrolled."""
        return q(
            f"SELECT {_NODE_COLUMNS} FROM nodes WHERE state != ?1 AND revoked_at IS NULL"
            " ORDER BY reputation < ?2,"
            " CASE WHEN reputation < ?2 THEN -reputation ELSE COALESCE(last_job_at, 0) END,"
            " created_at",
            (protocol.OFFLINE, GOOD_STANDING),
        )

    def _why(
        self,
        kind: Kind,
        job: Any,
        online: list[Offer],
        capable: Capabilities,
        suspended: Callable[[], Sequence[Any]],
    ) -> tuple[str, bool]:
        """Why a job waits, naming what does not fit when no online node could run it; and
        whether the words name a time (they go stale as the clock moves)."""
        if not online:
            return "no node is online", False
        files = int(job["files_bytes"] or 0)
        gpu = int(job["gpu"] or 0)
        size = message_need(job["message_bytes"])
        cpu, memory_mb = job["cpu_milli"] / 1000, int(job["memory_mb"])
        if capable.fit(kind, cpu, memory_mb, files, gpu, size):
            return "every node that can run it is busy or its owner is using it", False
        # A suspended node offers nothing (cpu 0, memory 0) while its owner uses the machine,
        # so the misfit would blame the job's CPUs. Judge those nodes by what they enrolled
        # with (and the GPUs their hello listed) and say what really keeps the job waiting.
        rows = suspended()
        had = {row["id"]: (float(row["cpu"]), int(row["memory_mb"])) for row in rows}
        away = [
            n._replace(cpu=had[n.id][0], memory_mb=had[n.id][1], gpu=n.gpus_had)
            for n in online
            if n.id in had
        ]
        if away and Capabilities(away).fit(kind, cpu, memory_mb, files, gpu, size):
            why = (
                "every node that could run it is suspended: its owner is using the machine"
                " (it runs once the owner leaves the machine idle)"
            )
            when = soonest(rows, [n.id for n in away], self.jobs.clock())
            return why + when, bool(when)
        return misfit(kind, job, capable), False

    def sweep(self, now: float | None = None) -> list[str]:
        """Mark silent nodes offline, requeue their jobs, fail jobs past timeout + grace.
        Returns the ids of nodes that went offline. Runs every tick: each question is one
        query for the rows concerned, not a walk over every node and job."""
        now = time.time() if now is None else now
        db = self.store.db
        silent = db.query(
            "SELECT id FROM nodes WHERE state != ? AND (last_seen IS NULL OR last_seen < ?)"
            " ORDER BY created_at",
            (protocol.OFFLINE, now - self.offline_after_s()),
        )
        gone: list[str] = []
        for node in silent:
            self.node_offline(node["id"], "missed heartbeats")
            gone.append(node["id"])
        # The wait is measured from when the job last entered the queue: a retried job
        # (its node went away after hours of work) gets the whole limit again. A verified
        # job waits as long as its replicas do.
        stale = db.query(
            "SELECT id, reason FROM jobs WHERE state = 'queued' AND replicas = 1"
            " AND COALESCE(queued_at, submitted_at) < ? ORDER BY submitted_at",
            (now - self.config.queue_ttl_s,),
        )
        for job in stale:
            self.jobs.fail(
                job["id"],
                f"no node could run it within {self.config.queue_ttl_s:g}s: {job['reason']}",
            )
        late = db.query(  # a node that says nothing past the timeout has lost the attempt
            "SELECT * FROM jobs WHERE state IN ('assigned', 'running') AND node IS NOT NULL"
            " AND COALESCE(assigned_at, submitted_at) + timeout_s + ? < ?",
            (self.config.result_grace_s, now),
        )
        for job in late:
            why = (
                f"no result from node {job['node']} within "
                f"{job['timeout_s']}s (+{self.config.result_grace_s:g}s grace)"
            )
            if job["kind"] == "service":  # its lifetime is over: not to be run again
                self.jobs.fail(job["id"], "timeout: " + why)
            else:
                self.jobs.node_failed(job, why)
        return gone

    def node_offline(self, node_id: str, why: str) -> list[sqlite3.Row]:
        """Mark the node offline; what it was running is lost to it. Returns those jobs (as
        they were on the node: the attempt a cancel must name)."""
        self.store.update_node(node_id, state=protocol.OFFLINE)
        lost = self.store.jobs_on_node(node_id)
        for job in lost:
            if self.jobs.node_failed(job, f"node {node_id} went offline ({why})"):
                log.info("job %s lost: node %s offline", job["id"], node_id)
        return lost

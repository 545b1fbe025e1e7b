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

A pass decides first (`plan()`, which writes nothing) and then commits every decision in one
transaction (`schedule()`). It is built for fleets: about O(nodes log nodes + jobs +
distinct requirements x idle nodes), not O(nodes x jobs) as a scan per job was.
`bench/market.py` measures it on 10,000 nodes and 10,000 queued jobs.
"""

from __future__ import annotations

import functools
import json
import logging
import sqlite3
import time
from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate
from typing import NamedTuple

from edge.core import protocol
from hub.config import HubConfig
from hub.market.jobs import Assignment, Jobs
from hub.market.reputation import GOOD_STANDING
from hub.store.rows import Store

log = logging.getLogger(__name__)


# A requirement's kind: its engine, whether the job asks for network access, and whether it
# is a file job. A node serves (engine, False, False) when it runs the engine, (engine, True,
# _) when its owner also lets that engine's jobs use the network (the `allow_network` of its
# hello and heartbeats), (engine, _, True) when it takes file jobs on that engine (the
# `files` of its hello), up to its max_input_bytes.
Kind = tuple[str, bool, bool]


UNLIMITED = 2**62  # a node that announced no max_message takes any assignment the hub sends


def message_need(size: int | None) -> int:
    """A job's assignment size as the scheduler asks for it: rounded up to 4 significant bits
    (at most 1/8 more), so jobs of about one size share a cursor in _Free.pick."""
    n = int(size or 0)
    if n <= 16:
        return n
    shift = n.bit_length() - 4
    return -(-n >> shift) << shift


class Offer(NamedTuple):
    """What one online node can take, parsed once per scheduling pass."""

    id: str
    idle: bool
    engines: frozenset[str]
    cpu: float
    memory_mb: int
    owner: str
    kinds: tuple[Kind, ...] = ()  # the kinds of requirement it serves, see Kind
    files_max: int = 0  # the most input bytes of a file job it takes
    gpu: int = 0  # GPUs offered now (none while the owner keeps them: gpu_only_when_idle)
    gpus_had: int = 0  # GPUs it has (its hello): what it could offer
    slots: int = 1  # jobs it runs at once
    max_message: int = UNLIMITED  # the largest assignment it takes (bytes; its hello)


@functools.lru_cache(maxsize=4096)
def _capacity(
    resources: str,
    engines: str,
    cpu: float,
    memory_mb: int,
    network: str,
    files: str | None,
    gpus: str | None,
) -> tuple[frozenset[str], float, int, tuple[Kind, ...], int, int, int]:
    """A node row's offer, parsed. Most nodes of a fleet offer the same few shapes, so the
    JSON is parsed once per distinct shape rather than once per node and pass."""
    try:  # validated by hub/mqtt/wire.py before it was stored; a bad row offers nothing
        res = json.loads(resources or "{}")
        runs = frozenset(json.loads(engines))
        allowed = runs & frozenset(json.loads(network or "[]"))
        caps = json.loads(files) if files else {}
        with_files = runs & frozenset(caps.get("engines") or ())
        had = len(json.loads(gpus)) if gpus else 0
        kinds = [
            (e, net, f)
            for e in sorted(runs)
            for net in (False, True)
            for f in (False, True)
            if (not net or e in allowed) and (not f or e in with_files)
        ]
        return (
            runs,
            float(res.get("cpu", cpu)),
            int(res.get("memory_mb", memory_mb)),
            tuple(kinds),
            int(caps.get("max_input_bytes") or 0) if with_files else 0,
            min(int(res.get("gpu") or 0), had),  # a node never offers GPUs it did not list
            had,
        )
    except (TypeError, ValueError, AttributeError):
        return frozenset(), 0.0, 0, (), 0, 0, 0


def offer(node: sqlite3.Row) -> Offer:
    engines, cpu, mem, kinds, files_max, gpu, had = _capacity(
        node["resources"],
        node["engines"],
        node["cpu"],
        node["memory_mb"],
        node["allow_network"],
        node["files"],
        node["gpus"],
    )
    idle = node["state"] == protocol.IDLE
    return Offer(
        node["id"], idle, engines, cpu, mem, node["owner"], kinds, files_max, gpu, had,
        int(node["slots"] or 1), int(node["max_message"] or UNLIMITED),
    )  # fmt: skip


def _misfit(kind: Kind, job: sqlite3.Row, capable: Capabilities) -> str:
    """What no online node offers that the job needs, in words (when capable says none fits):
    the engine, then network access, then files, then CPUs, then RAM."""
    engine, network, files = kind
    cpu, memory_mb = job["cpu_milli"] / 1000, int(job["memory_mb"])
    gpu = int(job["gpu"] or 0)
    if gpu and not capable.gpus_anywhere:
        return "no node with a GPU online"
    if not capable.runs((engine, False, False)):
        return f"no online node runs the {engine} engine"
    if network and not capable.runs((engine, True, False)):
        return (
            f"no online node allows network access to {engine} jobs (its owner's"
            " allow_network); submit it without `network` if it can do without"
        )
    if files and not capable.runs(kind):
        return (
            f"no online node takes file jobs on the {engine} engine (wasmtime, wasm3-run,"
            " docker and native nodes do, where their owner did not turn files off)"
        )
    need = int(job["files_bytes"] or 0)
    if files and capable.most_files(kind) < need:
        return (
            f"no online node takes {need} bytes of input files"
            f" (the most offered: {capable.most_files(kind)})"
        )
    size = message_need(job["message_bytes"])
    if capable.most_message(kind) < size:
        kib = -(-int(job["message_bytes"]) // 1024)
        return (
            f"no online node takes an assignment of {kib} KiB (the most a node"
            f" announced: {capable.most_message(kind) // 1024} KiB; boards take a quarter of"
            " their free heap)"
        )
    which = "no online node that allows network access" if network else "no online node"
    if gpu:
        most = capable.most_gpus(kind)
        if most == 0:
            return f"no online node with a GPU runs the {engine} engine"
        if most < gpu:
            return f"{which} has {gpu} GPUs (the most: {most})"
        return f"{which} has {gpu} GPUs, {cpu:g} CPUs and {memory_mb} MB of RAM at once"
    most_cpu, most_ram = capable.most(kind)
    if most_cpu < cpu:
        return f"{which} offers {cpu:g} CPUs"
    if most_ram < memory_mb:
        return f"{which} offers {memory_mb} MB of RAM"
    return f"{which} offers {cpu:g} CPUs and {memory_mb} MB of RAM at once"


def _soonest(rows: Sequence[sqlite3.Row], ids: list[str], now: float) -> str:
    """When the suspended node that may resume first may take the job, and why it waits, from
    what its heartbeats said (nodes.suspended); "" when none said."""
    best: tuple[float, str] | None = None
    for row in rows:
        if row["id"] not in ids or not row["suspended"]:
            continue
        try:
            said = json.loads(row["suspended"])
            at = said.get("resume_at")
            why = str(said.get("why") or "")
        except (TypeError, ValueError, AttributeError):
            continue
        if at is not None and (best is None or float(at) < best[0]):
            best = (float(at), why)
    if best is None:
        return ""
    wait = max(0, round(best[0] - now))
    return f"; the soonest may take it in about {wait} s if its owner stays away ({best[1]})"


class Capabilities:
    """Whether any online node, busy or not, could run a job: O(log n) per question.

    Per requirement kind (engine, network), the nodes sorted by CPU (most first) with the
    running maximum of their RAM: some node offers >= cpu and >= memory iff, among those with
    >= cpu, the most RAM does.
    """

    def __init__(self, online: Sequence[Offer]) -> None:
        shapes: dict[Kind, list[tuple[float, int]]] = {}
        self._files: dict[Kind, int] = {}  # the most input bytes offered, per file kind
        self._message: dict[Kind, int] = {}  # the largest assignment taken, per kind
        # GPU jobs are few and so are GPU nodes: a GPU question is a scan of these
        self._gpu_nodes = [n for n in online if n.gpus_had > 0]
        self.gpus_anywhere = bool(self._gpu_nodes)
        for n in online:
            for kind in n.kinds:
                shapes.setdefault(kind, []).append((n.cpu, n.memory_mb))
                if kind[2]:
                    self._files[kind] = max(self._files.get(kind, 0), n.files_max)
                self._message[kind] = max(self._message.get(kind, 0), n.max_message)
        self._index: dict[Kind, tuple[list[float], list[int]]] = {}
        for kind, nodes in shapes.items():
            nodes.sort(key=lambda s: -s[0])
            neg_cpu = [-cpu for cpu, _ in nodes]  # ascending, for bisect
            most_ram = list(accumulate((mem for _, mem in nodes), max))
            self._index[kind] = (neg_cpu, most_ram)

    def runs(self, kind: Kind) -> bool:
        return kind in self._index

    def most(self, kind: Kind) -> tuple[float, int]:
        """The most CPU and the most RAM (not necessarily on one node) offered for kind."""
        neg_cpu, most_ram = self._index.get(kind, ([0.0], [0]))
        return -neg_cpu[0], most_ram[-1]

    def most_files(self, kind: Kind) -> int:
        return self._files.get(kind, 0)

    def most_message(self, kind: Kind) -> int:
        return self._message.get(kind, 0)

    def most_gpus(self, kind: Kind) -> int:
        """The most GPUs one online node of this kind has."""
        return max((n.gpus_had for n in self._gpu_nodes if kind in n.kinds), default=0)

    def fit(
        self,
        kind: Kind,
        cpu: float,
        memory_mb: int,
        files_bytes: int = 0,
        gpu: int = 0,
        message: int = 0,
    ) -> bool:
        if self._message.get(kind, 0) < message:
            return False
        if gpu:
            return any(
                kind in n.kinds and n.gpus_had >= gpu and n.cpu >= cpu
                and n.memory_mb >= memory_mb and n.files_max >= files_bytes
                for n in self._gpu_nodes
            )  # fmt: skip
        index = self._index.get(kind)
        if index is None or self._files.get(kind, 0) < files_bytes:
            return False
        neg_cpu, most_ram = index
        n = bisect_right(neg_cpu, -cpu)  # how many offer at least cpu
        return n > 0 and most_ram[n - 1] >= memory_mb


class _Free:
    """The nodes with room of one pass, in order of preference, per requirement kind (engine,
    network, files), and what each has left: slots, milli-CPUs, RAM and GPUs.

    A job takes the first node of its kind's list that has room for it. Within a pass room is
    only ever taken, never given back, so a node skipped for a requirement stays unfit for it:
    a cursor per requirement (kind, CPU, RAM, files, GPUs) resumes where the last job with that
    requirement stopped. Each list is walked about once per distinct requirement.
    """

    def __init__(self, nodes: Sequence[Offer], held: dict[str, tuple[int, int, int, int]]) -> None:
        """held: node id -> (jobs, milli-CPUs, MB of RAM, GPUs) of the jobs it runs now."""
        self.nodes = nodes
        self.slots: list[int] = []
        self.cpu: list[int] = []
        self.ram: list[int] = []
        self.gpu: list[int] = []
        self._by_kind: dict[Kind, list[int]] = {}
        for i, n in enumerate(nodes):
            jobs, cpu, ram, gpu = held.get(n.id, (0, 0, 0, 0))
            self.slots.append(max(0, n.slots - jobs))
            self.cpu.append(round(n.cpu * 1000) - cpu)
            self.ram.append(n.memory_mb - ram)
            self.gpu.append(n.gpu - gpu)
            for kind in n.kinds:
                self._by_kind.setdefault(kind, []).append(i)
        self.left = sum(1 for s in self.slots if s > 0)
        self._cursor: dict[tuple[Kind, int, int, int, int, int], int] = {}

    def _fits(
        self, c: int, cpu_milli: int, memory_mb: int, files: int, gpu: int, message: int = 0
    ) -> bool:
        n = self.nodes[c]
        return (
            self.slots[c] > 0 and self.cpu[c] >= cpu_milli and self.ram[c] >= memory_mb
            and self.gpu[c] >= gpu and n.files_max >= files and n.max_message >= message
        )  # fmt: skip

    def pick(
        self,
        kind: Kind,
        cpu_milli: int,
        memory_mb: int,
        files: int = 0,
        gpu: int = 0,
        message: int = 0,
    ) -> int | None:
        """The index of the preferred node with room for this requirement, or None. files:
        the input bytes of a file job (0 for others); message: its assignment's size, as
        message_need() rounds it."""
        candidates = self._by_kind.get(kind)
        if candidates is None or not self.left:
            return None
        key = (kind, cpu_milli, memory_mb, files, gpu, message)
        i = self._cursor.get(key, 0)
        end = len(candidates)
        fits = self._fits
        while i < end and not fits(candidates[i], cpu_milli, memory_mb, files, gpu, message):
            i += 1
        self._cursor[key] = i
        return candidates[i] if i < end else None

    def pick_apart(
        self,
        kind: Kind,
        cpu_milli: int,
        memory_mb: int,
        owners: set[str],
        humans: dict[str, str],
        files: int = 0,
        message: int = 0,
    ) -> int | None:
        """Like pick, for a replica: the preferred node with room whose person (its owner, or
        the owner's owner for an agent: `humans`) is not in `owners` (the people of its sibling
        replicas). A plain scan: verified jobs are few, and the cursors of pick() must not
        skip nodes that were only unfit for this job's owners."""
        for c in self._by_kind.get(kind, ()):
            if not self._fits(c, cpu_milli, memory_mb, files, 0, message):
                continue
            owner = self.nodes[c].owner
            if humans.get(owner, owner) not in owners:
                return c
        return None

    def take(self, index: int, cpu_milli: int, memory_mb: int, gpu: int = 0) -> None:
        self.slots[index] -= 1
        self.cpu[index] -= cpu_milli
        self.ram[index] -= memory_mb
        self.gpu[index] -= gpu
        if self.slots[index] == 0:
            self.left -= 1


class Plan(NamedTuple):
    """A pass's decisions: (job, node id) to assign, (job, reason) for those that wait."""

    assign: list[tuple[sqlite3.Row, str]]
    wait: list[tuple[sqlite3.Row, str]]


class Scheduler:
    def __init__(self, config: HubConfig, store: Store, jobs: Jobs) -> None:
        self.config = config
        self.store = store
        self.jobs = jobs

    def offline_after_s(self) -> float:
        return self.config.heartbeat_interval_s * self.config.missed_beats_offline

    def plan(self) -> Plan:
        """Decide, without writing anything: which queued job goes to which idle node, and
        why each of the others waits. The matching half of a pass (bench/market.py times it
        on its own)."""
        # A verified job (replicas > 1) is never placed itself: its replicas are.
        queued = self.store.db.query(
            "SELECT id, attempt, cpu_milli, memory_mb, gpu, reason, parent, files_bytes,"
            " message_bytes,"
            " json_extract(spec, '$.engine.type') AS engine,"
            " json_extract(spec, '$.engine.network') AS network"
            " FROM jobs WHERE state = 'queued' AND replicas = 1"
            " ORDER BY CASE priority WHEN 'high' THEN 0 ELSE 1 END, submitted_at"
        )
        plan = Plan([], [])
        if not queued:
            return plan
        online = [offer(n) for n in self._online_nodes()]
        free = _Free([n for n in online if n.idle], self._held())
        capable = Capabilities(online)
        whys: dict[tuple[Kind, int, int, int, int, int], str] = {}
        apart: dict[str, set[str]] | None = None  # verified job -> people of its replicas
        humans: dict[str, str] = {}  # agent -> the person who owns it
        for job in queued:
            # json_extract gives JSON true as 1 (on PostgreSQL: 'true'); wasm jobs have no
            # `network` (NULL).
            files = job["files_bytes"]
            kind = (
                str(job["engine"] or "unknown"),
                job["network"] in (1, "true"),
                files is not None,
            )
            cpu_milli, memory_mb = int(job["cpu_milli"]), int(job["memory_mb"])
            files, gpu = int(files or 0), int(job["gpu"] or 0)
            size = message_need(job["message_bytes"])
            parent = job["parent"]
            if parent is None:
                pick = free.pick(kind, cpu_milli, memory_mb, files, gpu, size)
            else:
                if apart is None:
                    humans = self.store.humans()
                    apart = self._replica_owners(humans)
                owners = apart.setdefault(parent, set())
                pick = free.pick_apart(kind, cpu_milli, memory_mb, owners, humans, files, size)
                if pick is not None:
                    owner = free.nodes[pick].owner
                    owners.add(humans.get(owner, owner))
            if pick is not None:
                free.take(pick, cpu_milli, memory_mb, gpu)
                plan.assign.append((job, free.nodes[pick].id))
                continue
            key = (kind, cpu_milli, memory_mb, files, gpu, size)
            why = whys.get(key)
            if why is None:
                why = whys[key] = self._why(kind, job, online, capable)
            if parent is not None and why.startswith("every node"):
                why = (
                    "waiting for an idle node whose owner runs no other replica of job"
                    f" {parent} (replicas go to nodes of distinct owners)"
                )
            plan.wait.append((job, why))
        return plan

    def _held(self) -> dict[str, tuple[int, int, int, int]]:
        """What the jobs the hub has given each node hold of it: (jobs, milli-CPUs, MB, GPUs)."""
        return {
            str(r[0]): (int(r[1]), int(r[2]), int(r[3]), int(r[4]))
            for r in self.store.db.query(
                "SELECT node, COUNT(*), SUM(cpu_milli), SUM(memory_mb), SUM(gpu) FROM jobs"
                " WHERE state IN ('assigned', 'running') AND node IS NOT NULL GROUP BY node"
            )
        }

    def _replica_owners(self, humans: dict[str, str]) -> dict[str, set[str]]:
        """For each verified job with a replica waiting: the people who own the nodes its
        replicas are on, or ran an attempt on. A replica never goes to a node of one of them.
        People, not accounts: an agent's nodes are its owner's (`humans`), or one person could
        put each node under an agent of their own and agree with themselves."""
        owners: dict[str, set[str]] = {}
        waiting = "SELECT DISTINCT parent FROM jobs WHERE state = 'queued' AND parent IS NOT NULL"
        for r in self.store.db.query(
            "SELECT r.parent, n.owner FROM jobs r JOIN nodes n ON n.id = r.node"
            f" WHERE r.parent IN ({waiting})"
            " UNION SELECT r.parent, n.owner FROM jobs r JOIN attempts a ON a.job = r.id"
            f" JOIN nodes n ON n.id = a.node WHERE r.parent IN ({waiting})"
        ):
            owner = str(r["owner"])
            owners.setdefault(str(r["parent"]), set()).add(humans.get(owner, owner))
        return owners

    def schedule(self) -> list[Assignment]:
        """One pass over the queue: assign what fits, say why the rest waits, in one
        transaction. The assignments are committed when this returns; the caller sends them."""
        plan = self.plan()
        out: list[Assignment] = []
        if not (plan.assign or plan.wait):
            return out
        with self.store.db.transaction() as c:
            for job, node_id in plan.assign:
                assignment = self.jobs.assign(job, node_id)
                if assignment is not None:  # None: no longer queued; the node waits a pass
                    out.append(assignment)
            for job, why in plan.wait:
                if job["reason"] != why:
                    c.execute("UPDATE jobs SET reason = ? WHERE id = ?", (why, job["id"]))
        return out

    def _online_nodes(self) -> list[sqlite3.Row]:
        """Online, not revoked (a revoked node has lost its broker login; it gets nothing even
        if a stale state still says online), in order of preference: nodes in good standing,
        the one given a job longest ago first (never given one: first of all), then the
        others, the most reputable first; ties to the longest enrolled. Only the columns
        matching reads: at fleet scale building rows of every column costs more than the
        matching."""
        return self.store.db.query(
            "SELECT id, state, resources, engines, allow_network, files, gpus, slots, cpu,"
            " memory_mb, owner, max_message FROM nodes WHERE state != ?1 AND revoked_at IS NULL"
            " ORDER BY reputation < ?2,"
            " CASE WHEN reputation < ?2 THEN -reputation ELSE COALESCE(last_job_at, 0) END,"
            " created_at",
            (protocol.OFFLINE, GOOD_STANDING),
        )

    def _why(self, kind: Kind, job: sqlite3.Row, online: list[Offer], capable: Capabilities) -> str:
        """Why a job waits, naming what does not fit when no online node could run it."""
        if not online:
            return "no node is online"
        files = int(job["files_bytes"] or 0)
        gpu = int(job["gpu"] or 0)
        size = message_need(job["message_bytes"])
        cpu, memory_mb = job["cpu_milli"] / 1000, int(job["memory_mb"])
        if capable.fit(kind, cpu, memory_mb, files, gpu, size):
            return "every node that can run it is busy or its owner is using it"
        # A suspended node offers nothing (cpu 0, memory 0) while its owner uses the machine,
        # so the misfit would blame the job's CPUs. Judge those nodes by what they enrolled
        # with (and the GPUs their hello listed) and say what really keeps the job waiting.
        rows = self.store.db.query(
            "SELECT id, cpu, memory_mb, suspended FROM nodes WHERE state = ?",
            (protocol.SUSPENDED,),
        )
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
            return why + _soonest(rows, [n.id for n in away], self.jobs.clock())
        return _misfit(kind, job, capable)

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

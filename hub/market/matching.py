"""Matching: what a node offers, what a job needs, and which fits which.

The parts of a scheduling pass that read no database: a node row parsed into an `Offer`; the
`Capabilities` of the online fleet (could any node run this job, and if not, why not: `misfit`);
and `Free`, the nodes with room in order of preference, from which each job takes the first
that fits. hub/market/scheduler.py feeds them rows and commits what they decide.
"""

from __future__ import annotations

import functools
import json
import sqlite3
from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate
from typing import NamedTuple

from edge.core import protocol

# A requirement's kind: its engine, whether the job asks for network access, and whether it
# is a file job. A node serves (engine, False, False) when it runs the engine, (engine, True,
# _) when its owner also lets that engine's jobs use the network (the `allow_network` of its
# hello and heartbeats), (engine, _, True) when it takes file jobs on that engine (the
# `files` of its hello), up to its max_input_bytes.
Kind = tuple[str, bool, bool]


UNLIMITED = 2**62  # a node that announced no max_message takes any assignment the hub sends


def message_need(size: int | None) -> int:
    """A job's assignment size as the scheduler asks for it: rounded up to 4 significant bits
    (at most 1/8 more), so jobs of about one size share a cursor in Free.pick."""
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


def same_offer(
    before: sqlite3.Row, state: str, resources: str, allow_network: str, suspended: str | None
) -> bool:
    """Whether a heartbeat leaves its node as a plan sees it: the same state, the same CPUs,
    RAM and GPUs offered (the load it also reports is not read), network access and
    suspension. Its other fields (last seen, running jobs, sequence) no plan reads."""
    if (before["state"], before["allow_network"], before["suspended"]) != (
        state,
        allow_network,
        suspended,
    ):
        return False
    if before["resources"] == resources:
        return True
    try:
        old, new = json.loads(before["resources"] or "{}"), json.loads(resources)
        return all(old.get(k) == new.get(k) for k in ("cpu", "memory_mb", "gpu"))
    except (TypeError, ValueError, AttributeError):
        return False


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


def misfit(kind: Kind, job: sqlite3.Row, capable: Capabilities) -> str:
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


def soonest(rows: Sequence[sqlite3.Row], ids: list[str], now: float) -> str:
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


class Free:
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

    def fits(
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
        fits = self.fits
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
            if not self.fits(c, cpu_milli, memory_mb, files, 0, message):
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

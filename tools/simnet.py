"""simnet: N simulated nodes speaking the real protocol over a real broker.

    python tools/simnet.py --hub http://127.0.0.1:8765 --token dpt_... --nodes 20 \\
        [--fail 0.01] [--broken 0] [--cheat 0] [--silent 0 --silent-for 30] [--speed 10-50] \\
        [--slots 1] [--gpus 0 --gpu-share 1] [--engines wasm,native] \\
        [--wasm] [--duration 60] [--identities sim.json] [--json]

For tests, benchmarks and demos. Each simulated node is what `edge-run` is on the wire:

- it enrolls through the hub's REST API (`POST /api/v1/nodes/enroll`) and connects to the
  broker with its own credentials, client id and last will (`status` offline, retained);
- it subscribes to its `assign` and `cancel` topics, announces itself (`status` online,
  `hello`) and sends a `heartbeat` every interval the hub gave it at enrollment;
- assignments go through the node's own state machine (`edge/core/jobs.py`: duplicates ignored,
  finished results re-sent, a busy node turns jobs down), which publishes `accepted` and
  `running` events and the result, signed with the node's secret (`edge/core/protocol.py`);
- a job "runs" for a time drawn from `--speed`, or for real on wasm3 with `--wasm`
  (`hold`, for callers of the library: until they let it finish, `SimNode.release()`);
- `--slots N`: it runs up to N jobs at once (hello's `slots`; heartbeats say what is `free`);
- `--gpus N`: it has N simulated GPUs (`--gpu-share F`: only that share of the nodes does),
  listed in its hello with the name "simulated GPU (simnet)" and a uuid that says simnet, so
  no dashboard can take them for hardware. GPU jobs run on the docker or native engine:
  offer one (`--engines wasm,native`). Nothing touches a GPU; the job is simulated like any
  other, and the state machine gives it GPUs of the node's as edge-run does.

Misbehaviour, drawn per job with the node's own seeded random generator:
- `--fail P`: the job fails (`trap: simulated failure`); the hub refunds its submitter;
- `--broken P`: the node's executor breaks (`executor error: ...`): the node's fault, not the
  job's, so the hub retries the job on another node;
- `--cheat P`: the node returns a wrong output, validly signed (only replicas catch that);
- `--repeat N`: every result is sent N times (QoS 1 is "at least once"): the hub pays once;
- `--silent P`: the node freezes right after it took the job (its `accepted` and `running`
  events went out): its connection stays up, so no last will fires, but it sends nothing, no
  heartbeat, no result, for `--silent-for` seconds (default: for good). Then it wakes, sends
  what it held back (a result the hub may no longer want) and says hello again.

`--flood RATE` turns the nodes into a load generator: RATE heartbeats a second in all, for
`--duration` seconds, as a fleet far larger than the connections would send them.

`--token` takes the owner's API token (`dpt_...`: one enrollment token is made per node) or
enrollment tokens (`dpe_...`, one per node, repeat the option). `--identities FILE` keeps the
enrolled identities, so the next run reuses the same nodes instead of enrolling new ones.

One process, one thread: every node's paho client is driven by one asyncio loop (socket
readiness callbacks, no thread per node). Measured on a 2-core VM: 3,000 nodes connect in
about a second and heartbeat once a second on 17% of a core (52 MiB); with a paho thread per
node, 300 nodes took 10% of a core and 600 were not all connected after 90 s.
Prints a progress line every few seconds (and `--json`: one JSON object per line, the last
one the totals). The library: `SimNet` (asyncio) and `Background` (a SimNet on a thread of
its own, for synchronous callers such as tests).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import math
import random
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

if __package__ in (None, ""):  # run as a script: python tools/simnet.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge.core import jobs as edge_jobs
from edge.core import protocol

T = TypeVar("T")
# The node's state machine, as edge-run runs it (MicroPython-subset code, so untyped).
JobRunner: Any = edge_jobs.JobRunner
VERSION = "simnet-0.1"
FAILURE = "trap: simulated failure (simnet)"
BROKEN = "executor error: simulated broken executor (simnet)"


# --- what a node does -------------------------------------------------------------------
class RunTime:
    """How long a simulated job runs, in milliseconds: `20` (always 20), `10-50` (uniform),
    `exp:20` (exponential with mean 20, like a service time), `0` (at once), or `hold`: until
    the caller releases it (SimNode.release()), which is how a test decides when jobs end."""

    def __init__(self, spec: str | float = 0) -> None:
        text = str(spec).strip()
        self.spec = text
        try:
            if text == "hold":
                self.kind, self.a, self.b = "hold", 0.0, 0.0
            elif text.startswith("exp:"):
                self.kind, self.a, self.b = "exp", float(text[4:]), 0.0
            elif "-" in text.lstrip("-"):
                lo, hi = text.split("-", 1)
                self.kind, self.a, self.b = "uniform", float(lo), float(hi)
            else:
                self.kind, self.a, self.b = "fixed", float(text), 0.0
        except ValueError:
            raise ValueError(
                f"speed {text!r}: expected milliseconds like 20, 10-50 or exp:20, or hold"
            ) from None
        if not (math.isfinite(self.a) and math.isfinite(self.b)):
            raise ValueError(f"speed {text!r}: times must be finite")
        if self.a < 0 or self.b < 0 or (self.kind == "uniform" and self.b < self.a):
            raise ValueError(f"speed {text!r}: times must be >= 0 and low-high in order")

    def sample_s(self, rng: random.Random) -> float:
        """Seconds the job runs; math.inf for `hold` (it ends when released)."""
        if self.kind == "hold":
            return math.inf
        if self.kind == "fixed":
            ms = self.a
        elif self.kind == "uniform":
            ms = rng.uniform(self.a, self.b)
        else:
            ms = rng.expovariate(1 / self.a) if self.a > 0 else 0.0
        return ms / 1000

    def __repr__(self) -> str:
        return f"RunTime({self.spec!r})"


@dataclass
class Behaviour:
    """How a simulated node behaves. Probabilities are per job, each in [0, 1]."""

    fail: float = 0.0
    cheat: float = 0.0
    broken: float = 0.0
    repeat: int = 1  # copies of each result sent, as a flaky QoS 1 link may deliver them
    silent: float = 0.0
    silent_s: float = math.inf  # how long a node that froze stays silent
    speed: RunTime = field(default_factory=RunTime)
    engines: tuple[str, ...] = ("wasm",)
    cpu: float = 2.0
    memory_mb: int = 1024
    slots: int = 1  # jobs at once
    gpus: int = 0  # simulated GPUs; GPU jobs need a docker or native engine in `engines`

    def __post_init__(self) -> None:
        for name in ("fail", "cheat", "broken", "silent"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} is a probability: between 0 and 1, not {p!r}")
        if self.fail + self.cheat + self.broken > 1.0:
            raise ValueError("fail + cheat + broken must not exceed 1 (each job does one)")
        if self.repeat < 1:
            raise ValueError(
                f"repeat is how many copies of a result to send: 1 or more, not {self.repeat!r}"
            )
        if self.silent_s <= 0:
            raise ValueError("silent_s must be positive (math.inf: silent for good)")
        if not 1 <= self.slots <= 256:  # what a hello may say (hub/mqtt/wire.py)
            raise ValueError(f"slots is jobs at once: 1 to 256, not {self.slots!r}")
        if not 0 <= self.gpus <= edge_jobs.MAX_GPUS:
            raise ValueError(f"gpus: 0 to {edge_jobs.MAX_GPUS} per node, not {self.gpus!r}")
        if self.gpus and not {"docker", "native"} & set(self.engines):
            raise ValueError(
                "a node with GPUs needs the docker or native engine (GPU jobs run only on "
                "those): add one to the engines, e.g. wasm,native"
            )


@dataclass
class Stats:
    assigned: int = 0  # assignments that started a job
    completed: int = 0  # honest results sent
    failed: int = 0
    cheated: int = 0
    broken: int = 0  # results that blamed the node's executor
    results: int = 0  # result messages sent, copies included (--repeat)
    silenced: int = 0  # times a node froze
    rejected: int = 0
    gpu_jobs: int = 0  # jobs that were given simulated GPUs
    duplicates: int = 0  # assignments seen before (ignored or answered from the cache)
    cancelled: int = 0
    heartbeats: int = 0
    published: int = 0
    reconnects: int = 0

    def add(self, other: Stats) -> None:
        for k, v in vars(other).items():
            setattr(self, k, getattr(self, k) + v)


class _Run:
    """One job on a simulated node: the handle its executor gives the state machine."""

    __slots__ = ("fate", "job", "outcome", "real", "started", "timer", "wall_s")

    def __init__(self, job: dict[str, Any], fate: str, wall_s: float) -> None:
        self.job = job
        self.fate = fate  # ok | fail | cheat | broken
        self.wall_s = wall_s
        self.started = time.monotonic()
        self.outcome: dict[str, Any] | None = None
        self.real: Any = None  # the wasm3 handle, with --wasm
        self.timer: asyncio.TimerHandle | None = None


def simulated_gpus(node_id: str, count: int) -> list[dict[str, Any]]:
    """A simulated node's GPUs as its hello lists them: named and numbered so that nobody
    mistakes them for hardware (edge/gpu.py reports real ones)."""
    return [
        {"index": i, "name": "simulated GPU (simnet)", "uuid": f"GPU-simnet-{node_id}-{i}",
         "memory_mb": 16384}
        for i in range(count)
    ]  # fmt: skip


def honest_output(job: dict[str, Any]) -> bytes:
    """What an honest simulated node prints for a job: a function of the job alone, so honest
    nodes agree with each other (as replicas of a deterministic Wasm job do)."""
    h = hashlib.sha256()
    for part in (
        job.get("module") or b"",
        str(job.get("entrypoint")).encode(),
        json.dumps(job.get("args") or job.get("command") or []).encode(),
        job.get("stdin") or b"",
    ):
        h.update(hashlib.sha256(part).digest())
    return b"simnet " + h.hexdigest()[:32].encode() + b"\n"


class _SimExecutor:
    """The executor interface edge/core/jobs.py drives (submit/poll/cancel), simulated."""

    def __init__(self, node: SimNode) -> None:
        self.node = node
        self.engines = node.behaviour.engines

    def submit(self, job: dict[str, Any]) -> _Run:
        node, b = self.node, self.node.behaviour
        roll = node.rng.random()
        fates = (("fail", b.fail), ("cheat", b.cheat), ("broken", b.broken))
        fate, edge = "ok", 0.0
        for name, p in fates:
            edge += p
            if roll < edge:
                fate = name
                break
        run = _Run(job, fate, b.speed.sample_s(node.rng))
        if job.get("gpus"):
            node.stats.gpu_jobs += 1
        wasm = node.net.wasm
        if wasm is not None and job.get("engine") == "wasm":
            run.real = wasm.submit(job)
            node.net.watch(run, node)
        elif math.isinf(run.wall_s):
            node.held.append(run)  # `hold`: it ends when the caller releases it
        else:
            run.timer = node.net.loop.call_later(run.wall_s, node.finish, run)
        return run

    def poll(self, run: _Run) -> dict[str, Any] | None:
        return run.outcome

    def cancel(self, run: _Run) -> None:
        if run.timer is not None:
            run.timer.cancel()
        if run.real is not None and self.node.net.wasm is not None:
            self.node.net.wasm.cancel(run.real)
        self.node.net.unwatch(run)
        if run in self.node.held:
            self.node.held.remove(run)
        run.outcome = {"status": "cancelled"}


def _outcome(run: _Run, rng: random.Random, real: dict[str, Any] | None) -> dict[str, Any]:
    wall_ms = int(run.wall_s * 1000) if real is None else int(real.get("wall_ms") or 0)
    if run.fate in ("fail", "broken"):
        return {
            "status": "failed",
            "exit_code": None,
            "error": FAILURE if run.fate == "fail" else BROKEN,
            "stdout": b"",
            "stderr": b"",
            "returns": None,
            "wall_ms": wall_ms,
            "cpu_ms": wall_ms,
        }
    if real is not None:
        out = dict(real)
    else:
        out = {
            "status": "completed",
            "exit_code": 0,
            "stdout": honest_output(run.job),
            "stderr": b"",
            "returns": None,
            "error": None,
            "wall_ms": wall_ms,
            "cpu_ms": wall_ms,
        }
    if run.fate == "cheat":  # a plausible answer that is wrong, signed like any other
        out["status"] = "completed"
        out["exit_code"] = 0
        out["error"] = None
        out["stdout"] = b"simnet " + rng.randbytes(16).hex().encode() + b"\n"
        if out.get("returns"):
            out["returns"] = [int(r) + 1 for r in out["returns"]]
    return out


# --- paho on one asyncio loop ---------------------------------------------------------------
def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url.strip())
    return parts.hostname or "127.0.0.1", parts.port or 1883


def _tcp_no_delay(sock: Any) -> None:
    if isinstance(sock, socket.socket):  # small QoS 1 messages must not wait out Nagle
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Driver:
    """Drives many paho clients from one asyncio loop: reads when a socket is readable,
    writes inline (and on writability when the kernel buffer was full), and one ticker runs
    every client's keepalive. Nothing is published from inside paho callbacks."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.clients: set[mqtt.Client] = set()
        self._writing: set[mqtt.Client] = set()
        self._ticker: asyncio.Task[None] | None = None

    def attach(self, client: mqtt.Client) -> None:
        client.on_socket_open = self._opened
        client.on_socket_close = self._closed
        self.clients.add(client)
        if self._ticker is None:
            self._ticker = self.loop.create_task(self._tick())

    def _opened(self, client: mqtt.Client, _u: Any, sock: Any) -> None:
        _tcp_no_delay(sock)
        self.loop.add_reader(sock, self._read, client)

    def _closed(self, client: mqtt.Client, _u: Any, sock: Any) -> None:
        self.loop.remove_reader(sock)
        if client in self._writing:
            self._writing.discard(client)
            self.loop.remove_writer(sock)

    def _read(self, client: mqtt.Client) -> None:
        client.loop_read()
        self.flush(client)  # acks paho queued while reading

    def flush(self, client: mqtt.Client) -> None:
        """Write what paho has queued; wait for writability only when the socket is full."""
        if client.want_write():
            client.loop_write()
        sock = client.socket()
        if sock is None:
            return
        if client.want_write():
            if client not in self._writing:
                self._writing.add(client)
                self.loop.add_writer(sock, self._write, client)
        elif client in self._writing:
            self._writing.discard(client)
            self.loop.remove_writer(sock)

    def _write(self, client: mqtt.Client) -> None:
        self.flush(client)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            for client in list(self.clients):
                if client.socket() is not None:
                    client.loop_misc()  # keepalive pings; notices a dead connection
                    self.flush(client)

    def detach(self, client: mqtt.Client) -> None:
        """Stop driving a client (its socket is left open, for the caller to close)."""
        self.clients.discard(client)
        sock = client.socket()
        if sock is not None:
            self.loop.remove_reader(sock)
            if client in self._writing:
                self._writing.discard(client)
                self.loop.remove_writer(sock)

    def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()


# --- a node --------------------------------------------------------------------------------
class SimNode:
    """One simulated node: an enrolled identity, an MQTT session and the node's job state
    machine (edge/core/jobs.py) around a simulated executor."""

    def __init__(
        self, net: SimNet, identity: dict[str, Any], behaviour: Behaviour, seed: int
    ) -> None:
        self.net = net
        self.identity = identity
        self.id: str = identity["node_id"]
        self.name: str = identity.get("name", self.id)
        self.secret: str = identity["node_secret"]
        self.behaviour = behaviour
        self.rng = random.Random(seed)
        self.interval_s = float(net.heartbeat_s or identity.get("heartbeat_interval_s") or 5.0)
        self.stats = Stats()
        self.seq = 0
        self.online = asyncio.Event()
        self.silent_until: float | None = None  # monotonic; math.inf: for good
        self._held: list[tuple[str, bytes, int, bool]] = []  # sent when it wakes
        self._beat: asyncio.TimerHandle | None = None
        self._stopping = False
        creds = identity["mqtt"]
        # A broker cluster's servers (a comma-separated list, docs/broker-cluster.md): the
        # nodes spread over them, and each moves to the next when its server is gone.
        self.brokers = [_host_port(u) for u in str(creds["url"]).split(",") if u.strip()]
        self.at = seed % len(self.brokers)
        self.host, self.port = self.brokers[self.at]
        self._tries = 0  # reconnects since the last connection: past one, try the next server
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=creds.get("client_id") or self.id,
            clean_session=True,
        )
        if creds.get("username"):
            self.client.username_pw_set(creds["username"], creds.get("password"))
        self.client.will_set(
            self.topic(protocol.STATUS),
            protocol.encode(protocol.status(self.id, protocol.OFFLINE)),
            qos=1,
            retain=True,
        )
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.held: list[_Run] = []  # jobs run with `--speed hold`, until release()
        self.gpus = simulated_gpus(self.id, behaviour.gpus)
        self.runner = JobRunner(
            self.id, self.secret, _SimExecutor(self), self.publish, slots=behaviour.slots,
            gpus=self.gpus,
        )  # fmt: skip

    def topic(self, kind: str) -> str:
        return protocol.node_topic(self.id, kind)

    @property
    def silent(self) -> bool:
        return self.silent_until is not None

    # -- connection ------------------------------------------------------------------------
    def connect(self) -> None:
        self.net.driver.attach(self.client)
        self.client.connect(self.host, self.port, keepalive=30)  # a blocking TCP connect
        self.net.driver.flush(self.client)

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            self.net.log(f"{self.name}: the broker refused us: {rc}")
            return
        self._tries = 0
        self.net.loop.call_soon(self._announce)

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        self.online.clear()
        if self._beat is not None:
            self._beat.cancel()
        if not self._stopping:
            self.net.loop.call_later(1.0, self._reconnect)

    def _reconnect(self) -> None:
        if self._stopping or self.client.is_connected():
            return
        self.stats.reconnects += 1
        try:
            self._tries += 1
            if len(self.brokers) > 1 and self._tries > 1:
                self.at = (self.at + 1) % len(self.brokers)  # that server is gone: the next
                self.host, self.port = self.brokers[self.at]
                self.client.connect(self.host, self.port, keepalive=30)
            else:
                self.client.reconnect()
            self.net.driver.flush(self.client)
        except OSError as e:
            self.net.log(f"{self.name}: reconnect to {self.host}:{self.port} failed ({e})")
            self.net.loop.call_later(0.5 if len(self.brokers) > 1 else 2.0, self._reconnect)

    def _announce(self) -> None:
        """As docs/protocol.md says: subscribe, then status online (retained), hello, and
        heartbeats from now on."""
        for kind in protocol.NODE_IN:
            self.client.subscribe(self.topic(kind), qos=1)
        self._send(
            self.topic(protocol.STATUS),
            protocol.encode(protocol.status(self.id, protocol.ONLINE)),
            1,
            True,
        )
        if self.silent:
            return
        self._hello()
        self.online.set()

    def _hello(self) -> None:
        b = self.behaviour
        self.publish(
            protocol.HELLO,
            protocol.hello(
                self.id,
                b.engines,
                {"cpu": b.cpu, "memory_mb": b.memory_mb, "gpu": len(self.gpus)},
                VERSION,
                self.runner.running_ids(),
                slots=self.runner.slots,
                gpus=self.gpus or None,
            ),
        )
        self.heartbeat()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self.net.loop.call_soon(self.handle, msg.topic, bytes(msg.payload))

    # -- sending ---------------------------------------------------------------------------
    def publish(self, kind: str, msg: dict[str, Any]) -> None:
        """What the state machine and the heartbeat send; QoS as docs/protocol.md says."""
        copies = self.behaviour.repeat if kind == protocol.RESULT else 1
        if kind == protocol.RESULT:
            self.stats.results += copies
        for _ in range(copies):
            self._send(
                self.topic(kind),
                protocol.encode(msg),
                0 if kind == protocol.HEARTBEAT else 1,
                False,
            )

    def _send(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if self.silent:  # frozen: what it would have sent waits (heartbeats are just lost)
            if qos:
                self._held.append((topic, payload, qos, retain))
            return
        self.client.publish(topic, payload, qos=qos, retain=retain)
        self.stats.published += 1
        self.net.driver.flush(self.client)

    def heartbeat(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
        if self._stopping:
            return
        self._beat = self.net.loop.call_later(self.interval_s, self.heartbeat)
        if self.silent or not self.client.is_connected():
            return
        self.seq += 1
        self.stats.heartbeats += 1
        busy = self.runner.busy()
        b = self.behaviour
        # As edge-run (edge/resources.py): the whole offer, busy or not (the state says busy,
        # and the hub subtracts the shares of the jobs it gave); `free` is what is left.
        offer = {
            "cpu": b.cpu,
            "memory_mb": b.memory_mb,
            "gpu": len(self.gpus),
            "load": round(len(self.runner.running) / self.runner.slots, 3),
        }
        free = self.runner.free(offer)
        self.publish(
            protocol.HEARTBEAT,
            protocol.heartbeat(
                self.id,
                self.seq,
                protocol.BUSY if busy else protocol.IDLE,
                offer,
                self.runner.running_ids(),
                free=free,
            ),
        )

    # -- jobs ------------------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes) -> str:
        try:
            msg = protocol.decode(payload)
        except ValueError as e:
            self.net.log(f"{self.name}: dropped a message on {topic}: {e}")
            return "dropped"
        if topic == self.topic(protocol.CANCEL):
            outcome = str(self.runner.on_cancel(msg))
            if outcome == "cancelled":
                self.stats.cancelled += 1
            return outcome
        if topic != self.topic(protocol.ASSIGN):
            return "dropped"
        outcome = str(self.runner.on_assign(msg))
        if outcome == "accepted":
            self.stats.assigned += 1
            b = self.behaviour
            if b.silent and not self.silent and self.rng.random() < b.silent:
                self.freeze(b.silent_s)  # took the job (accepted, running), then nothing
            self.heartbeat()  # busy now: tell the hub at once, as edge-run does
        elif outcome == "rejected":
            self.stats.rejected += 1
        elif outcome in ("resent", "duplicate"):
            self.stats.duplicates += 1
        return outcome

    def finish(self, run: _Run, real: dict[str, Any] | None = None) -> None:
        """The simulated (or real) run is over: decide its outcome and let the state machine
        send the signed result."""
        run.outcome = _outcome(run, self.rng, real)
        if self.runner.poll():
            if run.fate == "fail":
                self.stats.failed += 1
            elif run.fate == "broken":
                self.stats.broken += 1
            elif run.fate == "cheat":
                self.stats.cheated += 1
            else:
                self.stats.completed += 1
            self.heartbeat()  # idle again: the hub can send the next job now

    def release(self, count: int | None = None) -> int:
        """Let `count` (None: all) of the jobs held by `--speed hold` finish now, oldest first;
        each reports the time it ran. Returns how many were released."""
        runs = self.held[:count] if count is not None else list(self.held)
        for run in runs:
            self.held.remove(run)
            run.wall_s = time.monotonic() - run.started
            self.finish(run)
        return len(runs)

    # -- misbehaviour ----------------------------------------------------------------------
    def freeze(self, seconds: float = math.inf) -> None:
        """Go silent: no heartbeats, no events, no results; the connection stays up."""
        self.stats.silenced += 1
        self.silent_until = time.monotonic() + seconds
        self.net.log(
            f"{self.name}: goes silent" + ("" if math.isinf(seconds) else f" for {seconds:g}s")
        )
        if not math.isinf(seconds):
            self.net.loop.call_later(seconds, self.wake)

    def wake(self) -> None:
        """Back from a freeze: send what was held back (late, for the hub to ignore), then
        hello (with the jobs still running) and a heartbeat."""
        if not self.silent:
            return
        self.silent_until = None
        held, self._held = self._held, []
        for topic, payload, qos, retain in held:
            self._send(topic, payload, qos, retain)
        self.net.log(f"{self.name}: wakes up, {len(held)} held messages sent")
        if self.client.is_connected():
            self._hello()
            self.online.set()

    # -- stopping --------------------------------------------------------------------------
    def stop(self, goodbye: bool = True) -> None:
        """goodbye: status offline and a clean disconnect (the hub requeues at once); else
        the socket just closes, and the broker publishes the last will."""
        self._stopping = True
        if self._beat is not None:
            self._beat.cancel()
        if goodbye and self.client.is_connected():
            self.silent_until = None
            self._send(
                self.topic(protocol.STATUS),
                protocol.encode(protocol.status(self.id, protocol.OFFLINE)),
                1,
                True,
            )
            self.client.disconnect()
            self.net.driver.flush(self.client)
            self.net.driver.detach(self.client)
        else:
            self.net.driver.detach(self.client)
            sock = self.client.socket()
            if isinstance(sock, socket.socket):  # a crash: no DISCONNECT, the will fires
                with contextlib.suppress(OSError):
                    sock.close()


# --- the network -----------------------------------------------------------------------------
class Tokens:
    """Where enrollment tokens come from: made one per node with the owner's API token
    (`dpt_...`), or taken from a list of enrollment tokens (`dpe_...`)."""

    def __init__(self, tokens: list[str]) -> None:
        if not tokens:
            raise ValueError("no token: pass the owner's API token (dpt_...) or enrollment tokens")
        self.api = [t for t in tokens if not t.startswith("dpe_")]
        self.enroll = [t for t in tokens if t.startswith("dpe_")]
        if len(self.api) > 1:
            raise ValueError("pass one API token (dpt_...), or enrollment tokens (dpe_...)")
        self._jwt: str | None = None

    async def next(self, http: aiohttp.ClientSession, hub: str) -> str:
        if self.enroll:
            return self.enroll.pop(0)
        if not self.api:
            raise ValueError("out of enrollment tokens: pass one per node, or an API token")
        if self._jwt is None:
            answer = await _post(http, hub + "/api/v1/auth/token", {"token": self.api[0]})
            self._jwt = str(answer["jwt"])
        answer = await _post(http, hub + "/api/v1/enrollment-tokens", None, self._jwt)
        return str(answer["token"])


async def _post(
    http: aiohttp.ClientSession, url: str, body: Any, jwt: str | None = None
) -> dict[str, Any]:
    headers = {"Authorization": "Bearer " + jwt} if jwt else {}
    async with http.post(url, json=body, headers=headers) as resp:
        data = await resp.json(content_type=None)
        if resp.status >= 400:
            raise RuntimeError(f"{url}: the hub said {resp.status}: {data.get('error', data)}")
        return dict(data)


class SimNet:
    """Many simulated nodes on this asyncio loop. Create it inside the running loop."""

    def __init__(
        self,
        hub: str,
        *,
        seed: int = 1,
        wasm_workers: int = 0,
        heartbeat_s: float | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.hub = hub.rstrip("/")
        self.loop = asyncio.get_running_loop()
        self.driver = _Driver(self.loop)
        self.seed = seed
        self.heartbeat_s = heartbeat_s
        self.log = log or (lambda _m: None)
        self.nodes: list[SimNode] = []
        self.wasm: Any = None
        if wasm_workers:
            from edge.executors import wasm3  # only for --wasm: real runs

            executor: Any = wasm3.Wasm3Executor
            self.wasm = executor(workers=wasm_workers)
        self._watched: dict[_Run, SimNode] = {}
        self._poller: asyncio.Task[None] | None = None

    async def enroll(
        self,
        count: int,
        tokens: Tokens,
        behaviour: Behaviour | None = None,
        prefix: str = "sim",
        concurrency: int = 8,
    ) -> list[dict[str, Any]]:
        """Enroll `count` nodes through the REST API; returns their identities."""
        b = behaviour or Behaviour()
        sem = asyncio.Semaphore(concurrency)
        start = len(self.nodes)

        async def one(http: aiohttp.ClientSession, i: int) -> dict[str, Any]:
            async with sem:
                token = await tokens.next(http, self.hub)
                name = f"{prefix}-{start + i}"
                ident = await _post(
                    http,
                    self.hub + "/api/v1/nodes/enroll",
                    {
                        "token": token,
                        "name": name,
                        "engines": list(b.engines),
                        "arch": "simnet",
                        "cpu": b.cpu,
                        "memory_mb": b.memory_mb,
                    },
                )
                return {**ident, "name": name}

        async with aiohttp.ClientSession() as http:
            return list(await asyncio.gather(*(one(http, i) for i in range(count))))

    def add(self, identity: dict[str, Any], behaviour: Behaviour | None = None) -> SimNode:
        """Start one node (connects at once; it announces itself when the broker accepts)."""
        node = SimNode(
            self, identity, behaviour or Behaviour(), self.seed * 1_000_003 + len(self.nodes)
        )
        self.nodes.append(node)
        node.connect()
        return node

    async def start(
        self,
        identities: list[dict[str, Any]],
        behaviour: Behaviour | None = None,
        timeout_s: float = 60.0,
    ) -> list[SimNode]:
        """Start nodes and wait until every one has announced itself."""
        nodes = [self.add(ident, behaviour) for ident in identities]
        await self.wait_online(nodes, timeout_s)
        return nodes

    async def wait_online(self, nodes: list[SimNode], timeout_s: float = 60.0) -> None:
        try:
            await asyncio.wait_for(asyncio.gather(*(n.online.wait() for n in nodes)), timeout_s)
        except TimeoutError:
            late = [n.name for n in nodes if not n.online.is_set()]
            raise TimeoutError(
                f"{len(late)} simulated nodes did not come online within {timeout_s:g}s "
                f"(first: {late[:3]}); is the broker at {nodes[0].host}:{nodes[0].port} up, "
                "and does it accept their credentials?"
            ) from None

    # -- real wasm runs (--wasm) -----------------------------------------------------------
    def watch(self, run: _Run, node: SimNode) -> None:
        self._watched[run] = node
        if self._poller is None or self._poller.done():
            self._poller = self.loop.create_task(self._poll_wasm())

    def unwatch(self, run: _Run) -> None:
        self._watched.pop(run, None)

    async def _poll_wasm(self) -> None:
        while self._watched:
            for run, node in list(self._watched.items()):
                real = self.wasm.poll(run.real)
                if real is not None:
                    del self._watched[run]
                    node.finish(run, real)
            await asyncio.sleep(0.002)

    # -- load ------------------------------------------------------------------------------
    async def flood(self, rate: float, seconds: float) -> dict[str, Any]:
        """Heartbeats from every node, round robin, at `rate` per second in total for
        `seconds` (on top of the regular ones): the load of a much larger fleet. Returns
        what was sent and when (wall clock, for comparing with the hub's timestamps)."""
        nodes = [n for n in self.nodes if n.online.is_set() and not n.silent]
        if not nodes:
            raise RuntimeError("no online node to send heartbeats from")
        if not (0 < rate < math.inf and 0 < seconds < math.inf):
            raise ValueError("flood needs a finite positive rate and duration")
        total = max(1, int(rate * seconds))
        t0_wall, t0 = time.time(), time.monotonic()
        sent = 0
        last: dict[str, float] = {}
        while sent < total:
            # At most 500 at a time, so acks and assignments are read in between.
            due = min(total, int((time.monotonic() - t0) * rate) + 1, sent + 500)
            while sent < due:
                n = nodes[sent % len(nodes)]
                last[n.id] = time.time()  # before it leaves: the hub's stamp comes after
                n.seq += 1
                n.client.publish(
                    n.topic(protocol.HEARTBEAT),
                    protocol.encode(
                        protocol.heartbeat(
                            n.id,
                            n.seq,
                            protocol.IDLE,
                            {"cpu": n.behaviour.cpu, "memory_mb": n.behaviour.memory_mb},
                            [],
                        )
                    ),
                    qos=0,
                )
                self.driver.flush(n.client)
                sent += 1
            await asyncio.sleep(0.001)
        return {
            "last_sent": last,  # node -> when its last beat left (wall clock)
            "sent": sent,
            "start": t0_wall,
            "end": time.time(),
            "seconds": time.monotonic() - t0,
        }

    def stats(self) -> dict[str, Any]:
        total = Stats()
        for n in self.nodes:
            total.add(n.stats)
        return {
            "nodes": len(self.nodes),
            "online": sum(1 for n in self.nodes if n.online.is_set() and not n.silent),
            "silent": sum(1 for n in self.nodes if n.silent),
            **vars(total),
        }

    async def stop(self, goodbye: bool = True) -> None:
        for n in self.nodes:
            n.stop(goodbye)
        await asyncio.sleep(0.05)  # let the goodbyes leave
        self.driver.close()
        if self._poller is not None:
            self._poller.cancel()
        if self.wasm is not None:
            self.wasm.close()


class Background:
    """A SimNet on an event loop thread of its own, for synchronous callers.

    with Background(hub_url) as bg:
        nodes = bg.start_nodes(3, tokens, Behaviour(fail=0.1))
        bg.call(lambda: nodes[0].freeze())
    """

    def __init__(self, hub: str, **options: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="simnet", daemon=True)
        self._thread.start()

        async def make() -> SimNet:
            return SimNet(hub, **options)

        self.net: SimNet = self.run(make())

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def call(self, fn: Callable[[], T], timeout_s: float = 30.0) -> T:
        """Run fn on the simulator's loop (nodes are not thread-safe) and return its result."""

        async def on_loop() -> T:
            return fn()

        return self.run(on_loop(), timeout_s)

    def start_nodes(
        self,
        count: int,
        tokens: Tokens | list[str],
        behaviour: Behaviour | None = None,
        prefix: str = "sim",
    ) -> list[SimNode]:
        """Enroll count nodes and start them; returns once all have announced themselves."""
        if not isinstance(tokens, Tokens):
            tokens = Tokens(list(tokens))
        idents = self.run(self.net.enroll(count, tokens, behaviour, prefix))
        return self.run(self.net.start(idents, behaviour))

    def stats(self) -> dict[str, Any]:
        return self.call(self.net.stats)

    def stop(self, goodbye: bool = True) -> None:
        if not self.loop.is_running():
            return
        with contextlib.suppress(Exception):
            self.run(self.net.stop(goodbye), 10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def __enter__(self) -> Background:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- the command line ----------------------------------------------------------------------
def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python tools/simnet.py",
        description="Start N simulated nodes speaking the DEparrow protocol over the hub's broker.",
    )
    ap.add_argument("--hub", required=True, help="hub URL, e.g. http://127.0.0.1:8765")
    ap.add_argument(
        "--token",
        action="append",
        default=[],
        metavar="TOKEN",
        help="the owner's API token (dpt_..., one enrollment per node), or an "
        "enrollment token (dpe_...; repeat: one per node)",
    )
    ap.add_argument("--nodes", type=int, default=10, help="how many nodes (default 10)")
    ap.add_argument("--fail", type=float, default=0.0, help="P(a job fails), per job")
    ap.add_argument(
        "--cheat", type=float, default=0.0, help="P(a wrong but validly signed result), per job"
    )
    ap.add_argument(
        "--broken", type=float, default=0.0, help="P(the node's executor breaks), per job"
    )
    ap.add_argument("--repeat", type=int, default=1, help="copies of each result sent (default 1)")
    ap.add_argument(
        "--silent", type=float, default=0.0, help="P(the node freezes when a job arrives), per job"
    )
    ap.add_argument(
        "--silent-for",
        type=float,
        default=math.inf,
        metavar="S",
        help="seconds a frozen node stays silent (default: for good)",
    )
    ap.add_argument(
        "--speed",
        default="10",
        metavar="MS",
        help="how long a job runs, ms: 20, 10-50 (uniform) or exp:20 (default 10)",
    )
    ap.add_argument(
        "--wasm",
        type=int,
        default=0,
        metavar="WORKERS",
        nargs="?",
        const=2,
        help="run wasm jobs for real on wasm3 with this many worker processes",
    )
    ap.add_argument("--engines", default="wasm", help="comma-separated engines offered")
    ap.add_argument("--slots", type=int, default=1, help="jobs each node runs at once (default 1)")
    ap.add_argument(
        "--gpus",
        type=int,
        default=0,
        metavar="N",
        help="simulated GPUs per node (default 0); GPU jobs need --engines with docker or native",
    )
    ap.add_argument(
        "--gpu-share",
        type=float,
        default=1.0,
        metavar="F",
        help="the share of the nodes that have the --gpus GPUs, 0 to 1 (default 1: all)",
    )
    ap.add_argument("--cpu", type=float, default=2.0, help="CPUs each node offers")
    ap.add_argument("--memory", type=int, default=1024, help="MB each node offers")
    ap.add_argument(
        "--heartbeat",
        type=float,
        default=None,
        metavar="S",
        help="heartbeat interval (default: what the hub said at enrollment)",
    )
    ap.add_argument(
        "--identities",
        type=Path,
        default=None,
        metavar="FILE",
        help="keep enrolled identities here and reuse them next time",
    )
    ap.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="S",
        help="stop after S seconds (default: until Ctrl-C or SIGTERM)",
    )
    ap.add_argument(
        "--crash",
        action="store_true",
        help="at the end, drop connections without a goodbye (last wills fire)",
    )
    ap.add_argument(
        "--flood",
        type=float,
        default=None,
        metavar="RATE",
        help="once online, send RATE heartbeats/s in all for --duration seconds (default 5), "
        "then stop: a much larger fleet's heartbeat load from these connections",
    )
    ap.add_argument(
        "--seed", type=int, default=1, help="random seed: the same seed, the same misbehaviour"
    )
    ap.add_argument("--every", type=float, default=5.0, metavar="S", help="progress interval")
    ap.add_argument("--json", action="store_true", help="JSON lines on stdout")
    ap.add_argument("-v", "--verbose", action="store_true", help="log each node's events")
    return ap.parse_args(argv)


def _load_identities(path: Path | None) -> list[dict[str, Any]]:
    if path is None or not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise SystemExit(
            f"simnet: {path} is not valid JSON ({e}); remove it to enroll anew"
        ) from None
    if not isinstance(data, list):
        raise SystemExit(f"simnet: {path} must hold a JSON list of identities")
    return [d for d in data if isinstance(d, dict) and "node_id" in d]


async def main_async(args: argparse.Namespace) -> int:
    try:
        behaviour = Behaviour(
            fail=args.fail,
            cheat=args.cheat,
            broken=args.broken,
            repeat=args.repeat,
            silent=args.silent,
            silent_s=args.silent_for,
            speed=RunTime(args.speed),
            engines=tuple(e for e in args.engines.split(",") if e),
            cpu=args.cpu,
            memory_mb=args.memory,
            slots=args.slots,
            gpus=args.gpus,
        )
        if not 0.0 <= args.gpu_share <= 1.0:
            raise ValueError(f"--gpu-share is a share of the nodes, 0 to 1, not {args.gpu_share}")
    except ValueError as e:
        print(f"simnet: {e}", file=sys.stderr)
        return 2
    with_gpus = round(args.nodes * args.gpu_share) if args.gpus else 0

    def emit(obj: dict[str, Any], line: str) -> None:
        print(json.dumps(obj) if args.json else line, flush=True)

    log = (lambda m: print("simnet: " + m, file=sys.stderr, flush=True)) if args.verbose else None
    net = SimNet(
        args.hub, seed=args.seed, wasm_workers=args.wasm or 0, heartbeat_s=args.heartbeat, log=log
    )
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        net.loop.add_signal_handler(sig, stop.set)
    t0 = time.monotonic()
    try:
        idents = _load_identities(args.identities)[: args.nodes]
        if len(idents) < args.nodes:
            if not args.token:
                print(
                    "simnet: pass --token (the owner's dpt_ API token, or dpe_ enrollment "
                    "tokens) to enroll nodes",
                    file=sys.stderr,
                )
                return 2
            idents += await net.enroll(args.nodes - len(idents), Tokens(args.token), behaviour)
            if args.identities is not None:
                args.identities.write_text(json.dumps(idents, indent=1))
        plain = dataclasses.replace(behaviour, gpus=0)
        await net.start(idents[:with_gpus], behaviour)
        await net.start(idents[with_gpus:], plain)
    except (RuntimeError, ValueError, TimeoutError, aiohttp.ClientError, OSError) as e:
        print(f"simnet: {e}", file=sys.stderr)
        await net.stop(goodbye=False)
        return 1
    emit(
        {
            "event": "ready",
            "nodes": [n.id for n in net.nodes],
            "gpu_nodes": [n.id for n in net.nodes if n.gpus],
            "slots": args.slots,
            "seconds": round(time.monotonic() - t0, 3),
        },
        f"{len(net.nodes)} simulated nodes online at {args.hub} "
        f"({time.monotonic() - t0:.1f}s to enroll and connect; {args.slots} slots each, "
        f"{with_gpus} with {args.gpus} simulated GPUs)",
    )
    if args.flood:
        sent = await net.flood(args.flood, args.duration or 5.0)
        emit(
            {"event": "flood", **sent},
            f"flooded {sent['sent']} heartbeats in {sent['seconds']:.2f} s "
            f"({sent['sent'] / sent['seconds']:,.0f}/s)",
        )
        stop.set()
    deadline = None if args.duration is None else time.monotonic() + args.duration
    while not stop.is_set():
        wait = args.every if deadline is None else min(args.every, deadline - time.monotonic())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, wait))
        if deadline is not None and time.monotonic() >= deadline:
            break
        s = net.stats()
        emit(
            {"event": "progress", **s},
            f"{s['online']}/{s['nodes']} online, {s['silent']} silent: {s['assigned']} jobs "
            f"taken, {s['completed']} done, {s['failed']} failed, {s['cheated']} cheated",
        )
    await net.stop(goodbye=not args.crash)
    s = net.stats()
    emit(
        {"event": "stopped", **s},
        f"stopped: {s['assigned']} jobs taken, {s['completed']} completed, {s['failed']} "
        f"failed, {s['cheated']} cheated, {s['silenced']} freezes",
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(main_async(_parse(argv)))


if __name__ == "__main__":
    sys.exit(main())

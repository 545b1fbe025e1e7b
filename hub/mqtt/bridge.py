"""The MQTT bridge: node and agent messages in, assignments and replies out.

paho-mqtt runs on the hub's event loop, without a network thread of its own: the loop reads
its socket when it is readable, paho writes inline, and a ticker keeps the connection alive
and reconnects (after 1 s, then up to 5 s apart). So all MQTT and database work happens on one
thread (the ledger's single writer), and no second Python thread competes for the GIL (with
one, every message crossed threads, and a thread that wants the GIL back can wait up to the
interpreter's 5 ms switch interval). Whatever arrives is checked: malformed, oversized or
foreign messages are logged and dropped, never fatal.

Group commit: the consumer takes every message that has arrived (up to `max_batch`) and
handles them in ONE transaction, each message in a savepoint of its own (one that fails rolls
back alone), with one scheduling pass at the end for all of them; then it commits, and only
then publishes what the batch decided (assignments, replies, cancels) and reports the changes.
So nothing is announced before it is durable, and a busy hub pays one fsync per batch instead
of one per message: under load batches grow, and the cost per message falls (up to 64 a
batch, so an API request waits for one batch at most a few milliseconds). The COMMIT itself
runs in a thread (`Database.write_batch()`), so a slow disk does not stall the loop: keepalives,
reads from the broker and GET requests go on meanwhile. The scheduler's ticks (liveness sweep,
service billing, expiry of agent calls) and the API's requests for a pass queue up behind the
messages and run in a batch the same way, each step of a tick in a savepoint of its own.

Nothing here may die quietly: a message, a publish, a change report or a tick step that fails
is logged and skipped alone; the long-running tasks (consumer, ticker, keepalive) are
supervised, restarted when one dies, and counted in `stats.restarts`. The inbox is bounded
(`max_inbox`): past it, messages are dropped, logged and counted in `dropped` rather than
pile up without limit behind a consumer that cannot keep up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import select
import socket
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import urlsplit

import msgspec
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge.core import protocol
from hub.agents.registry import Agents
from hub.ledger import economy
from hub.ledger.money import InsufficientFunds, format_micro
from hub.market.errors import JobConflict, JobError
from hub.market.jobs import Jobs
from hub.market.scheduler import Scheduler
from hub.market.spec import JobSpec, error_field
from hub.mqtt import wire
from hub.store.rows import Store

log = logging.getLogger(__name__)

SIZE_LIMITS = {
    protocol.HELLO: protocol.MAX_HEARTBEAT,
    protocol.HEARTBEAT: protocol.MAX_HEARTBEAT,
    protocol.STATUS: protocol.MAX_HEARTBEAT,
    protocol.EVENT: protocol.MAX_EVENT,
    protocol.RESULT: protocol.MAX_RESULT,
    protocol.SUBMIT: protocol.MAX_SUBMIT,
    protocol.INVOKE: protocol.MAX_CALL,
    protocol.RESPONSE: protocol.MAX_CALL,
}


def _no_delay(_client: Any, _userdata: Any, sock: Any) -> None:
    """Small QoS 1 messages and their acks must not wait out Nagle + delayed ACK (~40 ms)."""
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# Items the bridge queues for itself, behind the messages: never valid MQTT topics.
_TICK = "\x00tick"
_PASS = "\x00pass"


class BridgeStats:
    """How the consumer is doing: batches, messages, time spent (for logs and benchmarks),
    and what went wrong without stopping it."""

    def __init__(self) -> None:
        self.batches = 0
        self.items = 0
        self.largest = 0
        self.busy_s = 0.0
        self.restarts = 0  # a supervised task died of an exception and was started again
        self.overflowed = 0  # messages dropped because the inbox was full (also in dropped)
        self.announce_failures = 0  # publishes and change reports that raised after a commit
        self.tick_failures = 0  # tick steps rolled back (sweep, billing, agent calls)

    def note(self, size: int, seconds: float) -> None:
        self.batches += 1
        self.items += size
        self.largest = max(self.largest, size)
        self.busy_s += seconds


def parse_mqtt_url(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "tcp") or not parts.hostname:
        raise ValueError(f"MQTT URL must look like mqtt://host:port, got {url!r}")
    return parts.hostname, parts.port or 1883


class Bridge:
    def __init__(
        self,
        url: str,
        store: Store,
        jobs: Jobs,
        scheduler: Scheduler,
        tick_s: float = 1.0,
        on_change: Callable[[str, dict[str, Any]], None] | None = None,
        max_batch: int = 64,
        agents: Agents | None = None,
        max_inbox: int = 100_000,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        if max_inbox < 1:
            raise ValueError(f"max_inbox must be at least 1, not {max_inbox}")
        self.host, self.port = parse_mqtt_url(url)
        self.store = store
        self.jobs = jobs
        self.scheduler = scheduler
        self.agents = agents  # service calls between agents (hub/agents/registry.py)
        self.tick_s = tick_s
        self.on_change = on_change
        self.max_batch = max_batch
        # Far above any backlog a working hub has (a batch takes up to 64): reached only when
        # the consumer is stuck or far behind, and then memory stays bounded.
        self.max_inbox = max_inbox
        self.dropped = 0
        self.stats = BridgeStats()
        # Filled by paho's callbacks and the ticker, drained by the consumer.
        self._inbox: deque[tuple[str, bytes | bytearray]] = deque()
        self._in_hand = 0  # items the consumer took from the inbox and has not finished
        self._overflow_logged = 0.0  # when the last "inbox full" line was logged
        self._overflow_unlogged = 0
        self._wake = asyncio.Event()
        self._pass_wanted = False  # a scheduling pass at the end of this batch
        self._pass_queued = False  # a request for one is in the inbox
        self._tick_queued = False
        self._batch: list[tuple[str, dict[str, Any]]] | None = None  # to publish after COMMIT
        self._batch_changes: list[tuple[str, dict[str, Any]]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._connected = asyncio.Event()
        self._stopping = False
        self._reconnecting: asyncio.Task[None] | None = None
        self._writing = False
        # hub.writer.Writer, when the hub runs one: batches then commit together with it.
        self.writer: Any = None
        self._resent: dict[str, float] = {}
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"deparrow-hub-{int(time.time() * 1000) % 10**9}",
            clean_session=True,
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        self.client.on_socket_open = self._on_socket_open
        self.client.on_socket_close = self._on_socket_close

    @property
    def restarts(self) -> int:
        return self.stats.restarts

    # --- lifecycle -----------------------------------------------------------------
    async def start(self, timeout_s: float = 15.0) -> None:
        self._loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.client.connect(self.host, self.port, keepalive=30)
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    raise ConnectionError(
                        f"cannot reach the MQTT broker at {self.host}:{self.port}: {e}"
                    ) from e
                await asyncio.sleep(0.2)
        self._flush()
        self._tasks = [self._start_task("keepalive", self._keepalive)]
        try:
            await asyncio.wait_for(self._connected.wait(), max(1.0, deadline - time.monotonic()))
        except TimeoutError:
            await self._cancel_tasks()
            self._forget_socket()
            raise ConnectionError(
                f"the MQTT broker at {self.host}:{self.port} did not accept the hub"
            ) from None
        self._tasks += [
            self._start_task("consumer", self._consume),
            self._start_task("ticker", self._ticker),
        ]

    def _start_task(
        self, name: str, body: Callable[[], Coroutine[Any, Any, None]]
    ) -> asyncio.Task[None]:
        return asyncio.create_task(self._supervise(name, body), name=f"bridge-{name}")

    async def _supervise(self, name: str, body: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run body; when it dies of an exception, log it, count it and run it again. A task
        that dies again at once is restarted after a pause (up to 5 s), not spun on."""
        quick_failures = 0
        while True:
            started = time.monotonic()
            try:
                await body()
                return
            except Exception:
                self.stats.restarts += 1
                log.exception(
                    "the MQTT bridge's %s task failed; restarting it (%d restarts so far)",
                    name,
                    self.stats.restarts,
                )
            if name == "consumer":
                self._consumer_died()
            quick_failures = quick_failures + 1 if time.monotonic() - started < 1 else 1
            if quick_failures > 1:
                await asyncio.sleep(min(0.1 * 2 ** (quick_failures - 2), 5.0))

    def _consumer_died(self) -> None:
        if self._in_hand:
            self.dropped += self._in_hand
            log.error("%d messages the consumer had taken were lost with it", self._in_hand)
            self._in_hand = 0
        # A tick or a pass request may have been lost with them: let the next be queued
        # (at worst one runs twice, which is harmless; one never queued again is not).
        self._tick_queued = self._pass_queued = False
        self._wake.set()  # what is still in the inbox is handled at once, not on the next put

    async def _cancel_tasks(self) -> None:
        tasks, self._tasks = self._tasks, []
        if self._reconnecting is not None:
            tasks.append(self._reconnecting)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def stop(self) -> None:
        self._stopping = True
        await self._cancel_tasks()
        self.client.disconnect()
        self._flush()
        self._forget_socket()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # --- paho on the event loop ----------------------------------------------------------
    def _on_socket_open(self, _c: Any, _u: Any, sock: Any) -> None:
        _no_delay(_c, _u, sock)
        if self._loop is not None:
            self._loop.add_reader(sock, self._read)

    def _on_socket_close(self, _c: Any, _u: Any, sock: Any) -> None:
        if self._loop is not None:
            self._loop.remove_reader(sock)
            if self._writing:
                self._writing = False
                self._loop.remove_writer(sock)

    def _forget_socket(self) -> None:
        sock = self.client.socket()
        if sock is not None:
            self._on_socket_close(None, None, sock)

    def _read(self) -> None:
        # paho reads one packet per loop_read(); take all that have arrived (up to a batch),
        # so they reach the consumer together and share one commit.
        client = self.client
        for _ in range(self.max_batch):
            if client.loop_read() != mqtt.MQTT_ERR_SUCCESS:
                break
            sock = client.socket()
            if sock is None or not select.select([sock], [], [], 0)[0]:
                break
        self._flush()  # acks, and anything paho queued inside its callbacks

    def _flush(self) -> None:
        """Write what paho queued; wait for writability only when the socket is full."""
        client = self.client
        if client.want_write():
            client.loop_write()
        sock = client.socket()
        if sock is None or self._loop is None:
            return
        if client.want_write():
            if not self._writing:
                self._writing = True
                self._loop.add_writer(sock, self._flush)
        elif self._writing:
            self._writing = False
            self._loop.remove_writer(sock)

    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self.client.socket() is not None:
                self.client.loop_misc()  # pings; notices a connection that died quietly
                self._flush()

    async def _reconnect(self) -> None:
        """After 1 s, then twice as long after each failure, up to 5 s. The TCP connection is
        tried without blocking the loop first; paho's own connect then finds the broker up."""
        delay = 1.0
        while not self._stopping and not self.client.is_connected():
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            try:
                _r, w = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), 5)
                w.close()
                self.client.reconnect()
            except (OSError, TimeoutError) as e:
                log.info("the MQTT broker at %s:%d is still away: %s", self.host, self.port, e)
                continue
            self._flush()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._connected.wait(), 5)
        self._reconnecting = None

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            log.error("broker refused the hub: %s", rc)
            return
        subs = [(protocol.node_topic("+", kind), 1) for kind in protocol.NODE_OUT]
        subs.append((protocol.agent_topic("+", protocol.SUBMIT), 1))
        subs += [(protocol.agent_topic("+", k), 1) for k in (protocol.INVOKE, protocol.RESPONSE)]
        client.subscribe(subs)
        if self._reconnecting is not None or self._tasks:
            log.info("hub reconnected to the MQTT broker")
        self._connected.set()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        self._connected.clear()
        if self._stopping or self._loop is None:
            return
        log.warning("hub lost the MQTT broker (%s); reconnecting", rc)
        if self._reconnecting is None:
            self._reconnecting = self._loop.create_task(self._reconnect())

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if len(self._inbox) >= self.max_inbox:
            self._overflow(msg.topic)
            return
        self._put(msg.topic, msg.payload)

    def _overflow(self, topic: str) -> None:
        """The inbox is full: drop the message (paho has acknowledged it: it is lost). One log
        line a second at most, with the count, so a flood does not flood the log too."""
        self.dropped += 1
        self.stats.overflowed += 1
        self._overflow_unlogged += 1
        now = time.monotonic()
        if now - self._overflow_logged >= 1.0:
            log.warning(
                "the MQTT inbox is full (%d messages waiting, max_inbox=%d): dropped %d"
                " message(s) since the last report, the latest on %s",
                len(self._inbox),
                self.max_inbox,
                self._overflow_unlogged,
                topic,
            )
            self._overflow_logged, self._overflow_unlogged = now, 0

    def _put(self, topic: str, payload: bytes | bytearray) -> None:
        """Queue an item for the consumer (on the loop's thread, like everything here)."""
        self._inbox.append((topic, payload))
        self._wake.set()

    # --- event loop --------------------------------------------------------------------
    async def _consume(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._inbox:
                batch: list[tuple[str, bytes | bytearray]] = []
                while self._inbox and len(batch) < self.max_batch:
                    batch.append(self._inbox.popleft())
                self._in_hand = len(batch)
                writer = self.writer
                if writer is not None and writer.running:
                    await self.run_batch_shared(batch, writer)
                else:
                    await self.run_batch(batch)
                self._in_hand = 0
                await asyncio.sleep(0)  # let the API and the writer in between batches

    async def run_batch(self, batch: list[tuple[str, bytes | bytearray]]) -> list[str]:
        """Handle messages (and queued ticks and pass requests) in one transaction, then
        publish what they decided once its COMMIT (run off the loop) is durable. Returns
        what happened to each, as handle() says."""
        out: list[tuple[str, dict[str, Any]]] = []
        changes: list[tuple[str, dict[str, Any]]] = []
        started = time.perf_counter()
        outcomes: list[str] = []
        try:
            async with self.store.db.write_batch():
                outcomes = self._batch_body(batch, out, changes)
        except Exception:  # COMMIT failed (disk full...): nothing of the batch was stored
            self._batch_lost(batch, out, changes)
        self._announce(batch, started, out, changes)
        return outcomes

    async def run_batch_shared(
        self, batch: list[tuple[str, bytes | bytearray]], writer: Any
    ) -> list[str]:
        """run_batch inside the writer's next transaction: the messages share one durable
        commit with the REST submissions and transfers queued meanwhile, instead of each
        side paying an fsync on the event loop of its own."""
        out: list[tuple[str, dict[str, Any]]] = []
        changes: list[tuple[str, dict[str, Any]]] = []
        started = time.perf_counter()
        outcomes: list[str] = []
        try:
            outcomes = await writer.run(lambda _c: self._batch_body(batch, out, changes))
        except Exception:
            self._batch_lost(batch, out, changes)
        self._announce(batch, started, out, changes)
        return outcomes

    def _batch_body(
        self,
        batch: list[tuple[str, bytes | bytearray]],
        out: list[tuple[str, dict[str, Any]]],
        changes: list[tuple[str, dict[str, Any]]],
    ) -> list[str]:
        """The messages, each in a savepoint, in the caller's open transaction."""
        self._batch, self._batch_changes = out, changes
        self._pass_wanted = False
        try:
            outcomes = [self._savepoint(self._handle_item, t, p) for t, p in batch]
            if self._pass_wanted:
                self._pass_wanted = False
                self._savepoint(lambda _t, _p: str(self._schedule()), _PASS, b"")
            return outcomes
        finally:
            self._batch = None
            self._batch_changes = []

    def _batch_lost(
        self,
        batch: list[tuple[str, bytes | bytearray]],
        out: list[tuple[str, dict[str, Any]]],
        changes: list[tuple[str, dict[str, Any]]],
    ) -> None:
        log.exception("a batch of %d messages could not be committed; dropped", len(batch))
        self.dropped += len(batch)
        out.clear()
        changes.clear()

    def _announce(
        self,
        batch: list[tuple[str, bytes | bytearray]],
        started: float,
        out: list[tuple[str, dict[str, Any]]],
        changes: list[tuple[str, dict[str, Any]]],
    ) -> None:
        self.stats.note(len(batch), time.perf_counter() - started)
        # Durable now: tell the nodes and agents, then the dashboard. Each on its own: one
        # that fails (a paho error, a broken listener) is logged and the others still go.
        for topic, msg in out:
            try:
                self.publish(topic, msg)
            except Exception:
                self.stats.announce_failures += 1
                log.exception("could not publish on %s after its commit; not sent", topic)
        for kind, data in changes:
            try:
                self._changed(kind, data)
            except Exception:
                self.stats.announce_failures += 1
                log.exception("reporting a %s change (%s) failed", kind, data.get("id"))

    def _savepoint(
        self, fn: Callable[[str, bytes | bytearray], str], topic: str, payload: bytes | bytearray
    ) -> str:
        """fn(topic, payload) in a savepoint of the batch: when it fails, its writes are
        undone and so are the messages and changes it meant to announce."""
        what = {_TICK: "the scheduler's tick", _PASS: "a scheduling pass"}.get(topic, topic)
        ok, outcome = self._undoable(f"error handling {what}; dropped", lambda: fn(topic, payload))
        if not ok:  # one bad message must never stop the bridge
            self.dropped += 1
            return "error"
        return outcome

    def _undoable(self, failed: str, fn: Callable[[], str]) -> tuple[bool, str]:
        """fn() in a savepoint of the batch; when it raises, its writes, and the messages and
        changes it meant to announce, are undone and `failed` is logged: (False, "")."""
        assert self._batch is not None
        sent, changed = len(self._batch), len(self._batch_changes)
        try:
            with self.store.db.transaction():
                return True, fn()
        except Exception:
            del self._batch[sent:]
            del self._batch_changes[changed:]
            log.exception("%s", failed)
            return False, ""

    def _handle_item(self, topic: str, payload: bytes | bytearray) -> str:
        if topic == _TICK:
            self._tick_queued = False
            self._tick()
            for node_id, job_id, attempt in self.jobs.take_cancels():
                self.cancel_on_node(node_id, job_id, attempt)
            return "tick"
        if topic == _PASS:
            self._pass_queued = False
            self._pass_wanted = True
            return "pass"
        try:
            outcome = self.handle(topic, payload)
        except Exception:
            self.jobs.take_cancels()  # decided in what is rolled back: they never happened
            raise
        # Replicas a verdict made useless (also any an API call left): stop them.
        for node_id, job_id, attempt in self.jobs.take_cancels():
            self.cancel_on_node(node_id, job_id, attempt)
        return outcome

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            if not self._tick_queued:  # a busy hub runs one tick when it can, not a pile
                self._put(_TICK, b"")
                self._tick_queued = True

    def _tick(self) -> None:
        """The tick's steps, each in a savepoint of its own: a step that fails (one bad row)
        is rolled back and logged alone, and the others still commit, every tick."""
        now = self.jobs.clock()  # the hub's clock: tests move it instead of sleeping
        self._tick_step("the liveness sweep", lambda: self._sweep(now))
        self._tick_step("service billing", lambda: self._bill(now))
        agents = self.agents
        if agents is not None:  # calls past their deadline are refunded
            self._tick_step("the expiry of agent calls", lambda: agents.tick(now))
        self._pass_wanted = True

    def _tick_step(self, what: str, step: Callable[[], object]) -> None:
        def run() -> str:
            try:
                step()
            except Exception:
                self.jobs.take_cancels()  # decided in what is rolled back: never happened
                raise
            for node_id, job_id, attempt in self.jobs.take_cancels():
                self.cancel_on_node(node_id, job_id, attempt)
            return what

        ok, _ = self._undoable(f"the scheduler's tick: {what} failed and was rolled back", run)
        if not ok:
            self.stats.tick_failures += 1

    def _sweep(self, now: float) -> None:
        for node_id in self.scheduler.sweep(now=now):
            self._changed("node", {"id": node_id, "state": protocol.OFFLINE})

    def _bill(self, now: float) -> None:
        for node_id, job_id, attempt in self.jobs.bill_services(now=now):
            log.info("service job %s stopped: its owner cannot pay on", job_id)
            self.cancel_on_node(node_id, job_id, attempt)
            self._changed("job", {"id": job_id, "state": "cancelled"})
            if self.agents is not None:
                self.agents.service_stopped(job_id)

    def dispatch(self) -> None:
        """Ask for a scheduling pass: at the end of the batch being handled, or else in the
        next one (the API calls this after a submission). Passes asked for together run once."""
        if self._batch is not None:
            self._pass_wanted = True
        elif not self._pass_queued:
            self._pass_queued = True
            self._put(_PASS, b"")

    def _schedule(self) -> int:
        """One scheduling pass; its assignments go out (QoS 1) after the batch commits."""
        assignments = self.scheduler.schedule()
        for a in assignments:
            self.publish(protocol.node_topic(a.node_id, protocol.ASSIGN), a.message)
            log.info("job %s -> node %s", a.message["job_id"], a.node_id)
            self._changed("job", {"id": a.message["job_id"], "state": "assigned"})
        return len(assignments)

    def resend_assignments(self) -> int:
        """After a hub restart: assignments made but maybe never sent go out again; nodes
        ignore ones they are running (same job id and attempt) and re-send finished results."""
        n = 0
        for job in self.store.active_jobs():
            # Running ones too: a result sent while the hub was down was lost with its clean
            # session; the node answers a re-sent assignment from its result cache.
            msg = self.jobs.assign_message(job["id"])
            self.publish(protocol.node_topic(job["node"], protocol.ASSIGN), msg)
            self._resent[job["id"]] = time.time()
            n += 1
        return n

    def publish(self, topic: str, msg: dict[str, Any], qos: int = 1) -> None:
        """Send at once, or, inside a batch, once the batch has committed."""
        if self._batch is not None:
            self._batch.append((topic, msg))
            return
        self.client.publish(topic, json.dumps(msg, separators=(",", ":")), qos=qos)
        self._flush()

    def cancel_on_node(self, node_id: str, job_id: str, attempt: int) -> None:
        self.publish(
            protocol.node_topic(node_id, protocol.CANCEL), protocol.cancel(job_id, attempt)
        )

    def _changed(self, kind: str, data: dict[str, Any]) -> None:
        if self._batch is not None:
            self._batch_changes.append((kind, data))
        elif self.on_change is not None:
            self.on_change(kind, data)

    def _drop(self, topic: str, why: str) -> str:
        self.dropped += 1
        log.warning("dropped message on %s: %s", topic, why)
        return "dropped: " + why

    def handle(self, topic: str, payload: bytes | bytearray) -> str:
        """Process one message; returns what happened (for logs and tests)."""
        parsed = protocol.parse_topic(topic)
        if parsed is None:
            return self._drop(topic, "not a DEparrow topic")
        space, ident, kind = parsed
        limit = SIZE_LIMITS.get(kind)
        if limit is None or (space == "nodes" and kind not in wire.NODE_TYPES):
            return self._drop(topic, f"unknown message kind {kind!r}")
        if len(payload) > limit:
            return self._drop(topic, f"{len(payload)} bytes is over the {limit}-byte limit")
        if space == "agents":
            if kind in (protocol.INVOKE, protocol.RESPONSE) and self.agents is not None:
                return self.agents.handle(ident, kind, payload)
            if kind != protocol.SUBMIT:
                return self._drop(topic, "agents may only publish submit, invoke and response")
            return self._on_submit(topic, ident, payload)
        if not payload and kind == protocol.STATUS:
            return "ignored: retained status cleared"
        try:
            msg = msgspec.json.decode(payload, type=wire.NODE_TYPES[kind])
        except msgspec.DecodeError as e:
            return self._drop(topic, f"malformed {kind}: {e}")
        if msg.v != protocol.VERSION:  # type: ignore[attr-defined]
            return self._drop(topic, f"protocol version {msg.v} is not {protocol.VERSION}")  # type: ignore[attr-defined]
        if msg.node_id != ident:  # type: ignore[attr-defined]
            return self._drop(topic, "node_id in payload does not match the topic")
        node = self.store.node(ident)
        if node is None:
            return self._drop(topic, f"unknown node {ident}")
        if node["revoked_at"] is not None:  # an outside broker may still let it speak
            return self._drop(topic, f"node {ident} was removed by its owner")
        now = self.jobs.clock()
        if isinstance(msg, wire.Hello):
            self.store.update_node(
                ident,
                state=protocol.IDLE,
                last_seen=now,
                engines=json.dumps(msg.engines),
                resources=msgspec.json.encode(msg.resources).decode(),
                allow_network=json.dumps(msg.allow_network),
            )
            for job in self.store.jobs_on_node(ident):
                if job["id"] not in msg.running:
                    self.jobs.node_failed(job, f"node {ident} restarted without it")
            self._changed("node", {"id": ident, "state": protocol.IDLE})
            self.dispatch()
            return "hello"
        if isinstance(msg, wire.Heartbeat):
            # One transaction: the uptime credited and the last_seen it was measured from move
            # together, so no beat can be paid twice.
            with self.store.db.transaction():
                if self._available(node) and node["last_seen"]:
                    # Availability since the previous beat; suspended time and gaps don't pay.
                    gap = economy.counted_gap_ms(
                        int((now - float(node["last_seen"])) * 1000),
                        int(self.scheduler.offline_after_s() * 1000),
                    )
                    self.jobs.accrue_uptime(ident, gap, now)
                self.store.update_node(
                    ident,
                    state=msg.state,
                    last_seen=now,
                    resources=msgspec.json.encode(msg.resources).decode(),
                    running=json.dumps(msg.running),
                    last_seq=msg.seq,
                    allow_network=json.dumps(msg.allow_network),
                )
            if msg.state == protocol.IDLE:
                self._redeliver_lost(ident, msg.running, now)
            res = msg.resources
            self._changed("beat", {"id": ident, "t": now, "state": msg.state, "load": res.load,
                                   "cpu": res.cpu, "memory_mb": res.memory_mb,
                                   "running": len(msg.running)})  # fmt: skip
            if node["state"] != msg.state:
                self._changed("node", {"id": ident, "state": msg.state})
            if msg.state == protocol.IDLE:
                self.dispatch()
            return "heartbeat"
        if isinstance(msg, wire.Status):
            if msg.state == protocol.OFFLINE:
                self.scheduler.node_offline(ident, "it said goodbye or its connection dropped")
                self._changed("node", {"id": ident, "state": protocol.OFFLINE})
            else:
                self.store.update_node(ident, last_seen=now)
            return "status " + msg.state
        if isinstance(msg, wire.Event):
            changed = self.jobs.on_event(ident, msgspec.structs.asdict(msg))
            if changed:
                self._changed("job", {"id": msg.job_id, "state": "running"})
            return "event" if changed else "ignored: stale event"
        if isinstance(msg, wire.Result):
            outcome = self.jobs.on_result(ident, msgspec.structs.asdict(msg))
            if outcome.startswith("dropped"):
                return self._drop(topic, outcome[len("dropped: ") :])
            settled = self.store.job(msg.job_id)
            if settled is not None:
                self._changed("job", {"id": msg.job_id, "state": settled["state"]})
            log.info("result for %s from %s: %s", msg.job_id, ident, outcome)
            self.dispatch()
            return outcome
        return self._drop(topic, "unhandled")

    def _available(self, node: Any) -> bool:
        """Was the node available to the network since its last beat? Idle, or busy with work
        the hub gave it. A node busy with its owner's own work (or one that only says so) was
        not, and earns no uptime for it (docs/economy.md, "Staying online")."""
        if node["state"] == protocol.IDLE:
            return True
        return node["state"] == protocol.BUSY and bool(self.store.jobs_on_node(node["id"]))

    def _redeliver_lost(self, node_id: str, running: list[str], now: float) -> None:
        """An idle node that does not list a job the hub gave it a while ago either never got
        the assignment or finished it and its result was lost. Sending the same assignment
        again (same attempt) settles both: the node runs it, or answers from its result cache.
        Rate-limited per job, so a slow network sees one re-send per grace period."""
        grace = 3 * self.scheduler.config.heartbeat_interval_s
        for job in self.store.jobs_on_node(node_id):
            if job["id"] in running or now - float(job["assigned_at"] or now) < grace:
                continue
            if now - self._resent.get(job["id"], 0.0) < grace:
                continue
            self._resent[job["id"]] = now
            log.warning("job %s: node %s is idle without it; sending it again", job["id"], node_id)
            self.publish(protocol.node_topic(node_id, protocol.ASSIGN),
                         self.jobs.assign_message(job["id"]))  # fmt: skip
        if len(self._resent) > 10_000:
            self._resent.clear()

    def _on_submit(self, topic: str, agent_id: str, payload: bytes | bytearray) -> str:
        try:
            req = msgspec.json.decode(payload, type=wire.Submit)
        except msgspec.DecodeError as e:
            return self._drop(topic, f"malformed submit: {e}")
        reply_topic = protocol.agent_topic(agent_id, protocol.REPLY)

        def answer(ok: bool, body: dict[str, Any]) -> str:
            self.publish(reply_topic, protocol.reply(req.request_id, ok, body))
            return "submit " + ("accepted" if ok else "rejected: " + str(body.get("error")))

        user = self.store.user_by_token(req.token)
        if user is None or user["id"] != agent_id:
            return answer(False, {"error": "token does not belong to this agent", "status": 401})
        try:
            spec = msgspec.convert(req.spec, type=JobSpec)
        except msgspec.ValidationError as e:
            return answer(
                False,
                {"error": f"invalid job spec: {e}", "field": error_field(str(e)), "status": 400},
            )
        try:
            job = self.jobs.submit(agent_id, spec, submit_key="mqtt:" + req.request_id)
        except InsufficientFunds as e:
            return answer(
                False, {"error": str(e), "shortfall": format_micro(e.shortfall), "status": 402}
            )
        except JobConflict as e:
            return answer(False, {"error": str(e), "status": 409})
        except JobError as e:
            return answer(False, {"error": str(e), "field": e.field, "status": 400})
        self._changed("job", {"id": job["id"], "state": job["state"]})
        self.dispatch()
        return answer(
            True, {"id": job["id"], "state": job["state"], "hold": format_micro(int(job["hold"]))}
        )

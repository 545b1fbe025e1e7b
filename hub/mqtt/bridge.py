"""The MQTT bridge: node and agent messages in, assignments and replies out.

Three parts, one per module: the connection (link.py: paho-mqtt driven by the hub's event
loop, so all MQTT and database work happens on one thread, the ledger's single writer), what
each message does to the market (messages.py: node hellos, heartbeats, status, events and
results, agents' submissions, the scheduler's tick), and here the bridge that joins them: a
bounded inbox, a consumer that handles it in batches, a ticker, and the supervision of them all.
After each batch, finished jobs are told to the agents that submitted them over MQTT
(finals.py: one final reply per job, the job row its outbox).

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
is logged and skipped alone; the long-running tasks (consumer, ticker, the link's keepalive)
are supervised, restarted when one dies, and counted in `stats.restarts`. The inbox is bounded
(`max_inbox`): past it, messages are dropped, logged and counted in `dropped` rather than
pile up without limit behind a consumer that cannot keep up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt

from hub.agents.registry import Agents
from hub.market.jobs import Jobs
from hub.market.scheduler import Scheduler
from hub.mqtt.finals import Finals
from hub.mqtt.link import Link
from hub.mqtt.messages import SIZE_LIMITS as SIZE_LIMITS  # here too: tests check the docs by it
from hub.mqtt.messages import Messages
from hub.store.rows import Store
from hub.tasks import supervise

log = logging.getLogger(__name__)

# Items the bridge queues for itself, behind the messages: never valid MQTT topics.
_TICK = "\x00tick"
_PASS = "\x00pass"

# What a batch publishes after its COMMIT: topic, message, and the job id of a final reply.
Outgoing = tuple[str, dict[str, Any], str | None]


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


class MqttServer(NamedTuple):
    """One broker server the hub connects to, and the login it uses there (None: anonymous)."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None


def parse_mqtt_urls(text: str) -> list[MqttServer]:
    """`--mqtt`: one mqtt://[user:password@]host:port URL, or several separated by commas
    (the servers of a broker cluster, docs/broker-cluster.md). ValueError names a bad one."""
    servers = []
    for url in (u.strip() for u in text.split(",")):
        parts = urlsplit(url)
        try:
            port = parts.port or 1883
        except ValueError:  # a port that is not a number, or out of range
            port = 0
        if parts.scheme not in ("mqtt", "tcp") or not parts.hostname or not port:
            raise ValueError(f"MQTT URL must look like mqtt://host:port, got {url!r}")
        login = (unquote(parts.username), unquote(parts.password or "")) if parts.username else None
        servers.append(MqttServer(parts.hostname, port, *(login or (None, None))))
    if len({(s.host, s.port) for s in servers}) < len(servers):
        raise ValueError(f"an MQTT server is listed twice in {text!r}")
    return servers


def parse_mqtt_url(url: str) -> tuple[str, int]:
    """(host, port) of the first server of `--mqtt`; every URL of a list is checked."""
    first = parse_mqtt_urls(url)[0]
    return first.host, first.port


class Receipts:
    """paho's receipts of one message published on several servers: the message is out once
    one server has acknowledged it (the node it is for is connected to one of them)."""

    def __init__(self, receipts: list[mqtt.MQTTMessageInfo]) -> None:
        self.receipts = receipts

    def is_published(self) -> bool:
        return any(_published(r) for r in self.receipts)


def _published(receipt: mqtt.MQTTMessageInfo) -> bool:
    """paho raises for a publish it queued while disconnected, even once it has sent it."""
    try:
        return receipt.is_published()
    except (RuntimeError, ValueError):
        return False


# A server of a cluster away for less than this is taken for a blip: what the hub publishes is
# queued for it (paho sends it on reconnecting), as for a single broker. One away for longer is
# taken for down: its nodes have moved to other servers, and a queue for it would only grow.
QUEUE_WHILE_AWAY_S = 30.0


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
        share_group: str | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        if max_inbox < 1:
            raise ValueError(f"max_inbox must be at least 1, not {max_inbox}")
        self.servers = parse_mqtt_urls(url)
        self.host, self.port = self.servers[0].host, self.servers[0].port
        self.store = store
        self.jobs = jobs
        self.scheduler = scheduler
        self.agents = agents  # service calls between agents (hub/agents/calls.py)
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
        self._batch: list[Outgoing] | None = None  # to publish after COMMIT
        self._batch_changes: list[tuple[str, dict[str, Any]]] = []
        self._tasks: list[asyncio.Task[None]] = []
        # hub.writer.Writer, when the hub runs one: batches then commit together with it.
        self.writer: Any = None
        # One connection per server: the servers of a cluster do not pass messages to each
        # other (docs/broker-cluster.md), so the hub listens on each, where nodes publish, and
        # says what it has to say on each, where the node or agent it is for may be.
        self.links = [
            Link(s.host, s.port, self._on_message, max_read=max_batch, share_group=share_group)
            for s in self.servers
        ]
        for server, link in zip(self.servers, self.links, strict=True):
            if server.username is not None:
                link.client.username_pw_set(server.username, server.password)
        self.link = self.links[0]
        self.messages = Messages(
            store,
            jobs,
            scheduler,
            agents,
            publish=self.publish,
            changed=self._changed,
            dispatch=self.dispatch,
            drop=self._drop,
        )
        self.finals = Finals(store, jobs)

    @property
    def client(self) -> mqtt.Client:
        """The first server's paho client (the app sets the hub's login on it before start():
        its own broker is the one server; a cluster's logins come with its URLs, or login())."""
        return self.link.client

    def login(self, username: str, password: str) -> None:
        """Log in to every server as username (before start())."""
        for link in self.links:
            link.client.username_pw_set(username, password)

    @property
    def restarts(self) -> int:
        return self.stats.restarts

    # --- lifecycle -----------------------------------------------------------------
    async def start(self, timeout_s: float = 15.0) -> None:
        """Connect to the broker; with several servers, to each that answers before the
        deadline (at least one must accept the hub), and to the others in the background."""
        deadline = time.monotonic() + timeout_s
        if len(self.links) == 1:
            await self.link.open(deadline)
        else:
            await asyncio.gather(*(self._open_or_keep_trying(link) for link in self.links))
        self._tasks = [
            self._start_task("keepalive" if i == 0 else f"keepalive-{i}", link.keepalive)
            for i, link in enumerate(self.links)
        ]
        try:
            await self._first_accepted(max(1.0, deadline - time.monotonic()))
        except TimeoutError:
            await self._cancel_tasks()
            for link in self.links:
                link.forget_socket()
            where = ", ".join(f"{s.host}:{s.port}" for s in self.servers)
            raise ConnectionError(f"the MQTT broker at {where} did not accept the hub") from None
        self._tasks += [
            self._start_task("consumer", self._consume),
            self._start_task("ticker", self._ticker),
        ]

    async def _open_or_keep_trying(self, link: Link) -> None:
        """One try now: a server that is down must not hold up the others (it is tried again
        in the background, and start() waits for any to accept until its deadline)."""
        try:
            await link.open(time.monotonic())
        except ConnectionError as e:
            log.warning("%s; the other servers carry the traffic meanwhile", e)
            link.keep_trying()

    async def _first_accepted(self, timeout_s: float) -> None:
        """Until one server has accepted the hub; TimeoutError if none does in time."""
        waits = [asyncio.ensure_future(link.accepted(timeout_s)) for link in self.links]
        try:
            for done in asyncio.as_completed(waits):
                with contextlib.suppress(TimeoutError):
                    await done
                    return
            raise TimeoutError
        finally:
            for w in waits:
                w.cancel()

    def _start_task(
        self, name: str, body: Callable[[], Coroutine[Any, Any, None]]
    ) -> asyncio.Task[None]:
        return asyncio.create_task(self._supervise(name, body), name=f"bridge-{name}")

    async def _supervise(self, name: str, body: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run body; when it dies of an exception, log it, count it and run it again."""

        def died(_error: Exception) -> None:
            self.stats.restarts += 1
            log.exception(
                "the MQTT bridge's %s task failed; restarting it (%d restarts so far)",
                name,
                self.stats.restarts,
            )
            if name == "consumer":
                self._consumer_died()

        await supervise(body, died)

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
        tasks += [link.reconnecting for link in self.links if link.reconnecting is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def stop(self) -> None:
        for link in self.links:
            link.stopping = True
        await self._cancel_tasks()
        for link in self.links:
            link.close()

    @property
    def connected(self) -> bool:
        """Connected to the broker: to at least one of its servers."""
        return any(link.connected for link in self.links)

    # --- the inbox, filled by paho's callbacks and the ticker ------------------------------
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

    def requeue(self, topic: str, payload: bytes | bytearray) -> None:
        """Put a message back in the inbox (a submit whose inputs were fetched meanwhile)."""
        self._put(topic, payload)

    def _put(self, topic: str, payload: bytes | bytearray) -> None:
        """Queue an item for the consumer (on the loop's thread, like everything here)."""
        self._inbox.append((topic, payload))
        self._wake.set()

    # --- the consumer: batches, savepoints, announcing after the commit -------------------
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

    async def run_batch(
        self, batch: list[tuple[str, bytes | bytearray]], writer: Any = None
    ) -> list[str]:
        """Handle messages (and queued ticks and pass requests) in one transaction, then
        publish what they decided once its COMMIT (run off the loop) is durable: in the
        writer's next transaction when one is given. Returns what happened to each, as
        handle() says."""
        out: list[Outgoing] = []
        changes: list[tuple[str, dict[str, Any]]] = []
        started = time.perf_counter()
        outcomes: list[str] = []
        try:
            if writer is None:
                async with self.store.db.write_batch():
                    outcomes = self._batch_body(batch, out, changes)
            else:
                outcomes = await writer.run(lambda _c: self._batch_body(batch, out, changes))
        except Exception:  # COMMIT failed (disk full...): nothing of the batch was stored
            self._batch_lost(batch, out, changes)
        self._announce(batch, started, out, changes)
        return outcomes

    async def run_batch_shared(
        self, batch: list[tuple[str, bytes | bytearray]], writer: Any
    ) -> list[str]:
        """run_batch inside the writer's next transaction: the messages share one durable
        commit with the REST submissions and transfers queued meanwhile, instead of each
        side paying an fsync of its own."""
        return await self.run_batch(batch, writer)

    def _batch_body(
        self,
        batch: list[tuple[str, bytes | bytearray]],
        out: list[Outgoing],
        changes: list[tuple[str, dict[str, Any]]],
    ) -> list[str]:
        """The messages, each in a savepoint, in the caller's open transaction."""
        self._batch, self._batch_changes = out, changes
        self._pass_wanted = False
        try:
            outcomes = [self._savepoint(self._handle_item, t, p) for t, p in batch]
            if self._pass_wanted:
                self._pass_wanted = False
                self._savepoint(lambda _t, _p: str(self.messages.schedule()), _PASS, b"")
            # Last: jobs this batch (or anything since the last one) finished, to their agents.
            self._undoable(
                "the agents' final replies failed and were rolled back",
                lambda: str(self.finals.step(self._queue_final)),
            )
            return outcomes
        finally:
            self._batch = None
            self._batch_changes = []

    def _batch_lost(
        self,
        batch: list[tuple[str, bytes | bytearray]],
        out: list[Outgoing],
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
        out: list[Outgoing],
        changes: list[tuple[str, dict[str, Any]]],
    ) -> None:
        self.stats.note(len(batch), time.perf_counter() - started)
        # Durable now: tell the nodes and agents, then the dashboard. Each on its own: one
        # that fails (a paho error, a broken listener) is logged and the others still go.
        for topic, msg, final_of in out:
            receipt = None
            try:
                receipt = self._send(topic, msg)
            except Exception:
                self.stats.announce_failures += 1
                log.exception("could not publish on %s after its commit; not sent", topic)
            if final_of is not None:  # a final reply is sent again until it is acknowledged
                self.finals.sent(final_of, receipt)
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
            self._tick()  # each step sends its cancels (_tick_step)
            return "tick"
        if topic == _PASS:
            self._pass_queued = False
            self._pass_wanted = True
            return "pass"
        return self._cancelling(lambda: self.handle(topic, payload))

    def _cancelling(self, fn: Callable[[], str]) -> str:
        """fn(), then stop the replicas it made useless (also any an API call left) on their
        nodes. When fn raises, the cancels it decided are rolled back with it: never sent."""
        try:
            outcome = fn()
        except Exception:
            self.jobs.take_cancels()  # decided in what is rolled back: they never happened
            raise
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
        for what, step in self.messages.tick_steps(now):
            self._tick_step(what, step)
        self._pass_wanted = True

    def _tick_step(self, what: str, step: Callable[[], object]) -> None:
        def run() -> str:
            step()
            return what

        ok, _ = self._undoable(
            f"the scheduler's tick: {what} failed and was rolled back",
            lambda: self._cancelling(run),
        )
        if not ok:
            self.stats.tick_failures += 1

    def dispatch(self) -> None:
        """Ask for a scheduling pass: at the end of the batch being handled, or else in the
        next one (the API calls this after a submission). Passes asked for together run once."""
        if self._batch is not None:
            self._pass_wanted = True
        elif not self._pass_queued:
            self._pass_queued = True
            self._put(_PASS, b"")

    def resend_assignments(self) -> int:
        """After a hub restart: assignments made but maybe never sent go out again (see
        Messages.resend_assignments)."""
        return self.messages.resend_assignments()

    def publish(self, topic: str, msg: dict[str, Any], qos: int = 1) -> None:
        """Send at once, or, inside a batch, once the batch has committed."""
        if self._batch is not None:
            self._batch.append((topic, msg, None))
            return
        self._send(topic, msg, qos)

    def _send(
        self, topic: str, msg: dict[str, Any], qos: int = 1
    ) -> mqtt.MQTTMessageInfo | Receipts:
        """Publish on every server the hub is connected to or lost only just now (on all
        when none is: paho sends a QoS 1 message once one is back); paho's receipt, or Receipts
        for several."""
        payload = json.dumps(msg, separators=(",", ":"))
        links = [
            link for link in self.links if link.connected or link.away_s() < QUEUE_WHILE_AWAY_S
        ] or self.links
        receipts = []
        for link in links:
            receipts.append(link.client.publish(topic, payload, qos=qos))
            link.flush()
        return receipts[0] if len(receipts) == 1 else Receipts(receipts)

    def _queue_final(self, job_id: str, topic: str, msg: dict[str, Any]) -> None:
        """A job's final reply, to publish once the batch has committed (finals.py)."""
        assert self._batch is not None
        self._batch.append((topic, msg, job_id))

    def cancel_on_node(self, node_id: str, job_id: str, attempt: int) -> None:
        self.messages.cancel_on_node(node_id, job_id, attempt)

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
        return self.messages.handle(topic, payload)

"""The MQTT bridge: node and agent messages in, assignments and replies out.

paho-mqtt runs its network loop in its own thread; every message is handed to the event loop,
so all database work stays on one thread (the ledger's single writer). Whatever arrives is
checked: malformed, oversized or foreign messages are logged and dropped, never fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import msgspec
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge import protocol
from hub import economy, wire
from hub.jobs import JobConflict, JobError, Jobs
from hub.ledger import InsufficientFunds, format_micro
from hub.models import JobSpec, error_field
from hub.scheduler import Scheduler
from hub.store import Store

log = logging.getLogger(__name__)

SIZE_LIMITS = {
    protocol.HELLO: protocol.MAX_HEARTBEAT,
    protocol.HEARTBEAT: protocol.MAX_HEARTBEAT,
    protocol.STATUS: protocol.MAX_HEARTBEAT,
    protocol.EVENT: protocol.MAX_EVENT,
    protocol.RESULT: protocol.MAX_RESULT,
    protocol.SUBMIT: protocol.MAX_SUBMIT,
}


def _no_delay(_client: Any, _userdata: Any, sock: Any) -> None:
    """Small QoS 1 messages and their acks must not wait out Nagle + delayed ACK (~40 ms)."""
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


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
    ) -> None:
        self.host, self.port = parse_mqtt_url(url)
        self.store = store
        self.jobs = jobs
        self.scheduler = scheduler
        self.tick_s = tick_s
        self.on_change = on_change
        self.dropped = 0
        self._queue: asyncio.Queue[tuple[str, bytes | bytearray]] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._connected = asyncio.Event()
        self._stopping = False
        self._resent: dict[str, float] = {}
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"deparrow-hub-{int(time.time() * 1000) % 10**9}",
            clean_session=True,
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        self.client.on_socket_open = _no_delay

    # --- lifecycle -----------------------------------------------------------------
    async def start(self, timeout_s: float = 15.0) -> None:
        self._loop = asyncio.get_running_loop()
        self.client.reconnect_delay_set(min_delay=1, max_delay=5)
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
        self.client.loop_start()
        try:
            await asyncio.wait_for(self._connected.wait(), max(1.0, deadline - time.monotonic()))
        except TimeoutError:
            raise ConnectionError(
                f"the MQTT broker at {self.host}:{self.port} did not accept the hub"
            ) from None
        self._tasks = [
            asyncio.create_task(self._consume()),
            asyncio.create_task(self._ticker()),
        ]

    async def stop(self) -> None:
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self.client.disconnect()
        self.client.loop_stop()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # --- paho thread -----------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            log.error("broker refused the hub: %s", rc)
            return
        subs = [(protocol.node_topic("+", kind), 1) for kind in protocol.NODE_OUT]
        subs.append((protocol.agent_topic("+", protocol.SUBMIT), 1))
        client.subscribe(subs)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._connected.set)

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if self._stopping:
            return
        log.warning("hub lost the MQTT broker (%s); paho reconnects", rc)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._connected.clear)

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (msg.topic, msg.payload))

    # --- event loop --------------------------------------------------------------------
    async def _consume(self) -> None:
        while True:
            topic, payload = await self._queue.get()
            try:
                self.handle(topic, payload)
            except Exception:  # one bad message must never stop the bridge
                self.dropped += 1
                log.exception("error handling a message on %s; dropped", topic)

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                for node_id in self.scheduler.sweep():
                    self._changed("node", {"id": node_id, "state": protocol.OFFLINE})
                for node_id, job_id, attempt in self.jobs.bill_services():
                    log.info("service job %s stopped: its owner cannot pay on", job_id)
                    self.cancel_on_node(node_id, job_id, attempt)
                    self._changed("job", {"id": job_id, "state": "cancelled"})
                self.dispatch()
            except Exception:
                log.exception("scheduler tick failed")

    def dispatch(self) -> int:
        """Assign queued jobs to idle nodes and send the assignments (QoS 1)."""
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
        self.client.publish(topic, json.dumps(msg, separators=(",", ":")), qos=qos)

    def cancel_on_node(self, node_id: str, job_id: str, attempt: int) -> None:
        self.publish(
            protocol.node_topic(node_id, protocol.CANCEL), protocol.cancel(job_id, attempt)
        )

    def _changed(self, kind: str, data: dict[str, Any]) -> None:
        if self.on_change is not None:
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
            if kind != protocol.SUBMIT:
                return self._drop(topic, "agents may only publish submit")
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
        data = msgspec.structs.asdict(msg)
        now = time.time()
        if isinstance(msg, wire.Hello):
            self.store.update_node(
                ident,
                state=protocol.IDLE,
                last_seen=now,
                engines=json.dumps(msg.engines),
                resources=msgspec.json.encode(msg.resources).decode(),
            )
            for job in self.store.jobs_on_node(ident):
                if job["id"] not in msg.running:
                    self.jobs.requeue(job, f"node {ident} restarted; waiting for another")
            self._changed("node", {"id": ident, "state": protocol.IDLE})
            self.dispatch()
            return "hello"
        if isinstance(msg, wire.Heartbeat):
            # One transaction: the uptime credited and the last_seen it was measured from move
            # together, so no beat can be paid twice.
            with self.store.db.transaction():
                if node["state"] in (protocol.IDLE, protocol.BUSY) and node["last_seen"]:
                    # Availability since the previous beat; suspended time and gaps don't pay.
                    gap = economy.counted_gap_ms(
                        int((now - float(node["last_seen"])) * 1000),
                        int(self.scheduler.offline_after_s() * 1000),
                    )
                    self.jobs.accrue_uptime(ident, gap)
                self.store.update_node(
                    ident,
                    state=msg.state,
                    last_seen=now,
                    resources=msgspec.json.encode(msg.resources).decode(),
                    running=json.dumps(msg.running),
                    last_seq=msg.seq,
                )
            if msg.state == protocol.IDLE:
                self._redeliver_lost(ident, msg.running, now)
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
            changed = self.jobs.on_event(ident, data)
            if changed:
                self._changed("job", {"id": msg.job_id, "state": "running"})
            return "event" if changed else "ignored: stale event"
        if isinstance(msg, wire.Result):
            outcome = self.jobs.on_result(ident, data)
            if outcome.startswith("dropped"):
                return self._drop(topic, outcome[len("dropped: ") :])
            settled = self.store.job(msg.job_id)
            if settled is not None:
                self._changed("job", {"id": msg.job_id, "state": settled["state"]})
            log.info("result for %s from %s: %s", msg.job_id, ident, outcome)
            self.dispatch()
            return outcome
        return self._drop(topic, "unhandled")

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

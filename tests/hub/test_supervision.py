"""Nothing in the MQTT bridge or the ledger writer dies quietly.

The real app factory, a real SQLite file, a real Mosquitto; nodes and agents are ordinary paho
clients. Each failure is injected by making one method raise (once, or every time for a step
that keeps failing); the hub logs it, counts it where it keeps its stats, and goes on. Time is
moved with the hub's clock (`Jobs.clock`), never slept through; waits are on conditions with
a deadline.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge.core import protocol
from hub.ledger.writer import BatchAborted
from hub.mqtt.bridge import _TICK, parse_mqtt_url
from tests.hub.conftest import login

FIB = {"engine": {"type": "wasm", "module": "example:fib", "entrypoint": "fib"}, "timeout": 10}
SERVICE = {
    "type": "service",
    "engine": {"type": "wasm", "module": "example:loop", "entrypoint": "_start"},
    "timeout": 86400,
}
HOUR = 3600.0


async def eventually(what: str, check: Callable[[], bool], timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


class Peer:
    """An MQTT client on the hub's broker, speaking as a node or an agent."""

    def __init__(self, url: str) -> None:
        self.inbox: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self._subscribed = threading.Event()
        self.c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=uuid.uuid4().hex
        )
        self.c.on_message = lambda _c, _u, m: self.inbox.put((m.topic, json.loads(m.payload)))
        self.c.on_subscribe = lambda *_a: self._subscribed.set()
        host, port = parse_mqtt_url(url)
        self.c.connect(host, port)
        self.c.loop_start()

    def subscribe(self, topics: list[str]) -> None:
        self._subscribed.clear()
        self.c.subscribe([(t, 1) for t in topics])
        assert self._subscribed.wait(10), "the broker did not confirm the subscription"

    def publish(self, topic: str, msg: dict[str, Any]) -> None:
        self.c.publish(topic, protocol.encode(msg), qos=1).wait_for_publish(5)

    async def next(self, suffix: str, timeout_s: float = 15) -> dict[str, Any]:
        """The next message on a topic ending in /suffix (polled: the hub runs on this loop)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                topic, msg = self.inbox.get_nowait()
            except queue.Empty:
                assert time.monotonic() < deadline, f"no {suffix} message"
                await asyncio.sleep(0.02)
                continue
            if topic.endswith("/" + suffix):
                return msg

    def stop(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


class Agent(Peer):
    """A user submitting jobs over MQTT and reading the replies."""

    def __init__(self, url: str, user_id: str, token: str) -> None:
        super().__init__(url)
        self.id, self.token = user_id, token
        self.subscribe([protocol.agent_topic(user_id, protocol.REPLY)])

    @property
    def topic(self) -> str:
        return protocol.agent_topic(self.id, protocol.SUBMIT)

    def payload(self, request_id: str, spec: dict[str, Any] | None = None) -> bytes:
        data: bytes = protocol.encode(protocol.submit(request_id, self.token, spec or FIB))
        return data

    def submit(self, request_id: str) -> None:
        self.publish(self.topic, protocol.submit(request_id, self.token, FIB))

    async def reply(self, request_id: str) -> dict[str, Any]:
        while True:
            msg = await self.next(protocol.REPLY)
            if msg["request_id"] == request_id:
                return msg


class Hub:
    """The app under test, its services, and the clients the tests open on it."""

    def __init__(self, api: Any) -> None:
        self.api = api
        self.services = api.services
        self.bridge = api.services.bridge
        self.peers: list[Peer] = []

    async def user(self, name: str) -> tuple[str, str, dict[str, str]]:
        """(id, API token, Authorization header) of a new user with the welcome grant."""
        admin = await login(self.api, self.services.admin_token)
        r = await self.api.post("/api/v1/users", json={"name": name}, headers=admin)
        assert r.status == 201, await r.text()
        body = await r.json()
        return body["id"], body["token"], await login(self.api, body["token"])

    async def agent(self, name: str = "agent") -> Agent:
        user_id, token, _ = await self.user(name)
        agent = Agent(self.services.mqtt_url, user_id, token)
        self.peers.append(agent)
        return agent

    async def node(self, owner: dict[str, str]) -> tuple[str, Peer]:
        """A node enrolled through the API, idle after its hello."""
        t = await (await self.api.post("/api/v1/enrollment-tokens", headers=owner)).json()
        r = await self.api.post("/api/v1/nodes/enroll", json={"token": t["token"], "name": "n"})
        assert r.status == 201, await r.text()
        node_id = (await r.json())["node_id"]
        peer = Peer(self.services.mqtt_url)
        self.peers.append(peer)
        peer.subscribe([protocol.node_topic(node_id, kind) for kind in protocol.NODE_IN])
        hello = protocol.hello(node_id, ["wasm"], {"cpu": 2, "memory_mb": 512}, "test")
        peer.publish(protocol.node_topic(node_id, protocol.HELLO), hello)
        await eventually("the node idle", lambda: self.node_state(node_id) == protocol.IDLE)
        return node_id, peer

    def node_state(self, node_id: str) -> str:
        node = self.services.store.node(node_id)
        return str(node["state"]) if node is not None else "?"

    def job_state(self, job_id: str) -> str:
        job = self.services.store.job(job_id)
        return str(job["state"]) if job is not None else "?"

    def move_clock(self, seconds: float) -> None:
        """The hub's clock (its ticks' too) runs `seconds` ahead from now on."""
        self.services.jobs.clock = lambda: time.time() + seconds


@pytest.fixture
def hub(api: Any) -> Iterator[Hub]:
    h = Hub(api)
    yield h
    for peer in h.peers:
        peer.stop()


def logged(caplog: pytest.LogCaptureFixture, needle: str) -> bool:
    return any(needle in r.getMessage() for r in caplog.records)


# --- per item: a publish, a change report ---------------------------------------------------
async def test_a_publish_that_raises_loses_that_message_only(
    hub: Hub, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    agent = await hub.agent()
    real_publish = hub.bridge.client.publish
    failed: list[str] = []

    def publish_fails_once(topic: str, *args: Any, **kwargs: Any) -> Any:
        if topic.endswith("/" + protocol.REPLY) and not failed:
            failed.append(topic)
            raise RuntimeError("injected: the broker connection broke mid-publish")
        return real_publish(topic, *args, **kwargs)

    monkeypatch.setattr(hub.bridge.client, "publish", publish_fails_once)
    changes: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(hub.bridge, "on_change", lambda kind, data: changes.append((kind, data)))

    agent.submit("r1")
    await eventually("the failed publish", lambda: bool(failed))
    # Its job was committed, and the change after the failed publish was still reported.
    await eventually("the job's change report", lambda: "job" in {k for k, _ in changes})
    assert logged(caplog, f"could not publish on {failed[0]} after its commit")
    # The consumer lives on: the next submission is answered...
    agent.submit("r2")
    assert (await agent.reply("r2"))["ok"]
    # ...and the agent's retry of the lost one gets its answer, for the same single job.
    agent.submit("r1")
    first = await agent.reply("r1")
    assert first["ok"] and first["body"]["id"] == next(d["id"] for k, d in changes if k == "job")
    assert hub.bridge.stats.announce_failures == 1 and hub.bridge.restarts == 0


async def test_a_change_report_that_raises_stops_no_other(
    hub: Hub, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    agent = await hub.agent()
    reported: list[str] = []

    def on_change(kind: str, data: dict[str, Any]) -> None:
        if kind == "job" and not reported:
            reported.append("raised")
            raise RuntimeError("injected: a dashboard listener is broken")
        if kind == "job":
            reported.append(data["id"])

    monkeypatch.setattr(hub.bridge, "on_change", on_change)
    # Two submissions in one batch: two change reports after one commit.
    batch = [(agent.topic, agent.payload("r1")), (agent.topic, agent.payload("r2"))]
    outcomes = await hub.bridge.run_batch_shared(batch, hub.services.writer)
    assert outcomes == ["submit accepted", "submit accepted"]
    r1, r2 = await agent.reply("r1"), await agent.reply("r2")
    assert reported == ["raised", r2["body"]["id"]]  # the second report went out
    assert logged(caplog, f"reporting a job change ({r1['body']['id']}) failed")
    agent.submit("r3")  # and the consumer goes on
    assert (await agent.reply("r3"))["ok"]
    assert hub.bridge.stats.announce_failures == 1 and hub.bridge.restarts == 0


# --- the tick: each step in its own savepoint ------------------------------------------------
@pytest.mark.parametrize("failing", ["jobs.bill_services", "agents.tick"])
async def test_a_failing_tick_step_does_not_undo_the_sweep(
    hub: Hub, failing: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _, _, owner = await hub.user("owner")
    node_id, _ = await hub.node(owner)
    service, method = failing.split(".")

    def broken(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError(f"injected: one bad row in {failing}")

    monkeypatch.setattr(getattr(hub.services, service), method, broken)
    hub.move_clock(HOUR)  # the node has been silent for an hour
    await eventually("the node offline", lambda: hub.node_state(node_id) == protocol.OFFLINE)
    what = {"jobs": "service billing", "agents": "the expiry of agent calls"}[service]
    assert logged(caplog, f"the scheduler's tick: {what} failed and was rolled back")
    assert hub.bridge.stats.tick_failures >= 1 and hub.bridge.restarts == 0


async def test_a_failing_sweep_does_not_undo_billing(
    hub: Hub, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _, _, owner = await hub.user("owner")
    node_id, node = await hub.node(owner)
    _, _, agent = await hub.user("agent")  # 10 credits: one hour of the service, held
    r = await hub.api.post("/api/v1/jobs", json=SERVICE, headers=agent)
    assert r.status == 201, await r.text()
    job_id = (await r.json())["id"]
    assign = await node.next(protocol.ASSIGN)
    assert assign["job_id"] == job_id
    event = protocol.event(node_id, job_id, assign["attempt"], protocol.RUNNING)
    node.publish(protocol.node_topic(node_id, protocol.EVENT), event)
    await eventually("the service running", lambda: hub.job_state(job_id) == "running")

    def broken(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("injected: one bad row in the sweep")

    monkeypatch.setattr(hub.services.scheduler, "sweep", broken)
    hub.move_clock(1.5 * HOUR)  # the first hour is over; the wallet cannot hold the next
    # Billing committed although the sweep failed in the same tick: the hour is paid, the
    # service stopped, and its node told.
    await eventually("the service stopped", lambda: hub.job_state(job_id) == "cancelled")
    cancel = await node.next(protocol.CANCEL)
    assert cancel["job_id"] == job_id
    job = hub.services.store.job(job_id)
    assert job is not None and int(job["periods_billed"]) == 1
    assert logged(caplog, "the scheduler's tick: the liveness sweep failed and was rolled back")
    assert hub.node_state(node_id) != protocol.OFFLINE  # the sweep's own work was undone
    assert hub.services.ledger.audit().balanced


# --- supervised tasks ----------------------------------------------------------------------
async def test_the_consumer_is_restarted_when_it_dies(
    hub: Hub, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    agent = await hub.agent()
    real = hub.bridge.run_batch_shared
    died: list[int] = []

    async def dies_once(batch: list[tuple[str, bytes]], writer: Any) -> list[str]:
        if any(topic == agent.topic for topic, _ in batch) and not died:
            died.append(len(batch))
            raise RuntimeError("injected: the consumer dies")
        return await real(batch, writer)

    monkeypatch.setattr(hub.bridge, "run_batch_shared", dies_once)
    dropped = hub.bridge.dropped
    agent.submit("r1")
    await eventually("the consumer restarted", lambda: hub.bridge.restarts == 1)
    assert logged(caplog, "the MQTT bridge's consumer task failed; restarting it")
    assert hub.bridge.dropped == dropped + died[0]  # what it held was lost, and counted
    agent.submit("r2")
    assert (await agent.reply("r2"))["ok"]
    agent.submit("r1")  # the lost one, retried
    assert (await agent.reply("r1"))["ok"]
    r = await hub.api.get("/api/v1/status")  # what an operator sees
    health = (await r.json())["health"]
    assert health["bridge_restarts"] == 1 and health["messages_dropped"] >= died[0]


async def test_the_ticker_is_restarted_when_it_dies(
    hub: Hub, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _, _, owner = await hub.user("owner")
    node_id, _ = await hub.node(owner)
    real_put = hub.bridge._put
    died: list[str] = []

    def put(topic: str, payload: bytes | bytearray) -> None:
        if topic == _TICK and not died:
            died.append(topic)
            raise RuntimeError("injected: the ticker dies")
        real_put(topic, payload)

    monkeypatch.setattr(hub.bridge, "_put", put)
    await eventually("the ticker restarted", lambda: hub.bridge.restarts == 1)
    assert logged(caplog, "the MQTT bridge's ticker task failed; restarting it")
    hub.move_clock(HOUR)  # and the ticks go on: the silent node is found out
    await eventually("the node offline", lambda: hub.node_state(node_id) == protocol.OFFLINE)


async def test_the_keepalive_is_restarted_when_it_dies(
    hub: Hub, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    agent = await hub.agent()
    real = hub.bridge.client.loop_misc
    calls: list[str] = []

    def loop_misc() -> Any:
        if not calls:
            calls.append("raised")
            raise RuntimeError("injected: the keepalive dies")
        calls.append("ran")
        return real()

    monkeypatch.setattr(hub.bridge.client, "loop_misc", loop_misc)
    await eventually("the keepalive restarted", lambda: hub.bridge.restarts == 1)
    assert logged(caplog, "the MQTT bridge's keepalive task failed; restarting it")
    await eventually("a keepalive after the restart", lambda: "ran" in calls)
    agent.submit("r1")  # the connection is still looked after
    assert (await agent.reply("r1"))["ok"]


async def test_the_writer_task_is_restarted_when_it_dies(
    hub: Hub, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    writer = hub.services.writer
    real = writer._commit

    def marker(_c: Any) -> str:
        return "never committed"

    async def dies_once(batch: list[Any]) -> None:
        if any(fn is marker for fn, _ in batch):
            raise RuntimeError("injected: the writer task dies")
        await real(batch)

    monkeypatch.setattr(writer, "_commit", dies_once)
    with pytest.raises(BatchAborted, match="retry with the same key"):
        await writer.run(marker)
    assert writer.restarts == 1 and writer.stats.restarts == 1 and writer.running
    assert logged(caplog, "the ledger writer task failed; restarting it")
    # Later calls are served: a transfer through the writer over HTTP.
    _, _, alice = await hub.user("alice")
    bob_id, _, _ = await hub.user("bob")
    r = await hub.api.post(
        "/api/v1/wallet/transfer",
        json={"to": bob_id, "amount": "1"},
        headers={**alice, "Idempotency-Key": "after-restart"},
    )
    assert r.status == 201, await r.text()
    assert (await r.json())["balance"] == "9"
    assert writer.restarts == 1


# --- a bounded inbox -------------------------------------------------------------------------
async def test_the_inbox_is_bounded(
    hub: Hub, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    agent = await hub.agent()
    monkeypatch.setattr(hub.bridge, "max_inbox", 3)
    overflowed, dropped = hub.bridge.stats.overflowed, hub.bridge.dropped
    room = 3 - len(hub.bridge._inbox)
    # Six messages arrive before the consumer gets a turn (as paho delivers them).
    for i in range(6):
        msg = mqtt.MQTTMessage(topic=agent.topic.encode())
        msg.payload = agent.payload(f"r{i}")
        hub.bridge._on_message(None, None, msg)
    assert len(hub.bridge._inbox) == 3
    assert hub.bridge.stats.overflowed == overflowed + 6 - room
    assert hub.bridge.dropped == dropped + 6 - room
    assert logged(caplog, "the MQTT inbox is full")
    for i in range(room):  # those let in are handled
        assert (await agent.reply(f"r{i}"))["ok"]
    agent.submit("r5")  # a dropped one, sent again
    assert (await agent.reply("r5"))["ok"]

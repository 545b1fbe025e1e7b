"""Results over MQTT: an agent that submitted a job over MQTT gets the finished job (state,
result, cost) on its reply topic, once per job, without polling.

The real app factory, a real SQLite file, a real Mosquitto; the agent and the nodes are
ordinary paho clients speaking edge/core/protocol.py. Every wait is on an MQTT message (or on
the hub's own counters) with a deadline; nothing polls the REST API for a job's state.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from deparrow import Agent as SdkAgent
from deparrow import JobFailed
from edge.core import protocol
from hub.api import types
from hub.api.services import SERVICES
from hub.app import create_app
from hub.config import HubConfig
from hub.mqtt.finals import FINAL, final_reply
from tests.conftest import require_mosquitto, start_hub, start_node
from tests.hub.conftest import login
from tests.hub.test_supervision import SERVICE, Agent, Hub, Peer, eventually

FIB = {
    "name": "fib",
    "engine": {"type": "wasm", "module": "example:fib", "entrypoint": "fib", "args": ["20"]},
    "timeout": 10,
}


class Node(Peer):
    """A node enrolled through the API: it takes assignments and sends signed results."""

    def __init__(self, url: str, node_id: str, secret: str) -> None:
        super().__init__(url)
        self.id, self.secret = node_id, secret
        self.subscribe([protocol.node_topic(node_id, kind) for kind in protocol.NODE_IN])

    def send(self, kind: str, msg: dict[str, Any]) -> None:
        self.publish(protocol.node_topic(self.id, kind), msg)

    def result(
        self, assign: dict[str, Any], status: str = "completed", **how: Any
    ) -> dict[str, Any]:
        code = 0 if status == "completed" else None
        outcome = protocol.outcome(
            status, how.get("error"), b"6765\n", b"", 1200, 1100, code, how.get("returns")
        )
        return protocol.result(self.id, self.secret, assign["job_id"], assign["attempt"], outcome)

    def running(self, assign: dict[str, Any]) -> None:
        job_id, attempt = assign["job_id"], assign["attempt"]
        self.send(protocol.EVENT, protocol.event(self.id, job_id, attempt, protocol.RUNNING))


class Finals:
    """What the agent's reply topic brought: submit answers and final replies, in order."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.replies: list[dict[str, Any]] = []

    def drained(self) -> list[dict[str, Any]]:
        while True:
            try:
                topic, msg = self.agent.inbox.get_nowait()
            except queue.Empty:
                return self.replies
            if topic.endswith("/" + protocol.REPLY):
                self.replies.append(msg)

    def of(self, job_id: str) -> list[dict[str, Any]]:
        return [m for m in self.drained() if m.get(FINAL) and m["body"]["id"] == job_id]

    async def accepted(self, request_id: str) -> str:
        """The job id the hub answered request_id's submit with."""
        deadline = time.monotonic() + 15
        while True:
            for m in self.drained():
                if m.get("request_id") == request_id and not m.get(FINAL):
                    assert m["ok"], m
                    return str(m["body"]["id"])
            assert time.monotonic() < deadline, f"no answer to submit {request_id}"
            await asyncio.sleep(0.02)

    async def final(self, job_id: str, timeout_s: float = 15) -> dict[str, Any]:
        """The final reply for job_id, waited for on MQTT."""
        deadline = time.monotonic() + timeout_s
        while not (got := self.of(job_id)):
            assert time.monotonic() < deadline, f"no final reply for {job_id}"
            await asyncio.sleep(0.02)
        return got[0]


def marked_sent(hub: Hub, job_id: str) -> bool:
    """The hub's books say the job's final reply was delivered (the broker acknowledged it)."""
    job = hub.services.store.job(job_id)
    return job is not None and job["final_sent_at"] is not None


def submit(agent: Agent, spec: dict[str, Any]) -> str:
    request_id = uuid.uuid4().hex
    agent.publish(agent.topic, protocol.submit(request_id, agent.token, spec))
    return request_id


async def enroll(hub: Hub, owner: dict[str, str]) -> Node:
    t = await (await hub.api.post("/api/v1/enrollment-tokens", headers=owner)).json()
    r = await hub.api.post("/api/v1/nodes/enroll", json={"token": t["token"], "name": "n"})
    assert r.status == 201, await r.text()
    body = await r.json()
    node = Node(hub.services.mqtt_url, body["node_id"], body["node_secret"])
    hub.peers.append(node)
    node.send(protocol.HELLO, protocol.hello(node.id, ["wasm"], {"cpu": 2, "memory_mb": 512}, "t"))
    await eventually("the node idle", lambda: hub.node_state(node.id) == protocol.IDLE)
    return node


async def settled_down(hub: Hub, finals: Finals, n: int = 2) -> None:
    """n more batches of the bridge ran (each looks for finals owed, so one that was going to
    be sent has been), and all the hub sent the agent before them has arrived: the hub's
    marker, published after them on the same topic, has (the broker keeps the order)."""
    start = hub.bridge.stats.batches
    for i in range(1, n + 1):
        hub.bridge.dispatch()
        await eventually("a batch", lambda: hub.bridge.stats.batches >= start + i)  # noqa: B023
    marker = uuid.uuid4().hex
    hub.bridge.publish(protocol.agent_topic(finals.agent.id, protocol.REPLY), {"marker": marker})
    deadline = time.monotonic() + 15
    while not any(m.get("marker") == marker for m in finals.drained()):
        assert time.monotonic() < deadline, "the hub's marker did not arrive"
        await asyncio.sleep(0.02)


class Setup:
    def __init__(self, hub: Hub, agent: Agent, node: Node) -> None:
        self.hub, self.agent, self.node = hub, agent, node
        self.finals = Finals(agent)


@pytest.fixture
async def setup(api: Any) -> AsyncIterator[Setup]:
    hub = Hub(api)
    _, _, owner = await hub.user("owner")
    node = await enroll(hub, owner)
    agent = await hub.agent()
    yield Setup(hub, agent, node)
    for peer in hub.peers:
        peer.stop()


async def test_a_completed_job_is_told_once_and_a_duplicate_result_sends_nothing(
    setup: Setup,
) -> None:
    hub, agent, node, finals = setup.hub, setup.agent, setup.node, setup.finals
    request_id = submit(agent, FIB)
    job_id = await finals.accepted(request_id)
    assign = await node.next(protocol.ASSIGN)
    assert assign["job_id"] == job_id
    node.running(assign)
    result = node.result(assign, returns=[6765])
    node.send(protocol.RESULT, result)

    final = await finals.final(job_id)
    assert set(final) == set(final_reply("r", {"state": "completed"}))
    assert final["v"] == 1 and final["request_id"] == request_id
    assert final["ok"] is True and final[FINAL] is True
    body = final["body"]
    msgspec.convert(body, type=types.JobView)  # the job as the REST API shows it
    assert body["state"] == "completed" and body["cost"] == "0.002777"  # 1 started second
    assert body["result"]["returns"] == [6765] and body["result"]["stdout"] == "6765\n"
    assert body["hold"] == "0.027777" and body["timings"]["finished_at"] is not None
    # The broker acknowledged it: the hub's books say it was delivered.
    await eventually("the final marked sent", lambda: marked_sent(hub, job_id))

    # The node sends its result again (as for a re-sent assignment): nothing moves, and
    # nothing more reaches the agent.
    handled = hub.bridge.stats.items
    node.send(protocol.RESULT, result)
    await eventually("the duplicate handled", lambda: hub.bridge.stats.items > handled)
    await settled_down(hub, finals)
    assert len(finals.of(job_id)) == 1
    assert hub.services.ledger.audit().balanced


async def test_a_failed_job_is_told_with_its_reason(setup: Setup) -> None:
    agent, node, finals = setup.agent, setup.node, setup.finals
    job_id = await finals.accepted(submit(agent, FIB))
    assign = await node.next(protocol.ASSIGN)
    node.send(protocol.RESULT, node.result(assign, "failed", error="trap: unreachable"))
    final = await finals.final(job_id)
    assert final["ok"] is False and final[FINAL] is True
    body = final["body"]
    assert body["state"] == "failed" and body["cost"] == "0"  # refunded in full
    assert "trap: unreachable" in body["reason"] and body["result"]["error"] == "trap: unreachable"
    assert "status" not in body  # not a refused submit: that one has an HTTP status


async def test_a_job_cancelled_over_rest_is_told(setup: Setup) -> None:
    hub, agent, node, finals = setup.hub, setup.agent, setup.node, setup.finals
    job_id = await finals.accepted(submit(agent, FIB))
    assign = await node.next(protocol.ASSIGN)
    node.running(assign)
    # The agent's owner (here: the agent itself, over REST) cancels it: outside the bridge's
    # batches, and the final still goes out, with the next one.
    auth = await login(hub.api, agent.token)
    r = await hub.api.post(f"/api/v1/jobs/{job_id}/cancel", headers=auth)
    assert r.status == 200, await r.text()
    assert (await node.next(protocol.CANCEL))["job_id"] == job_id
    final = await finals.final(job_id)
    assert final["ok"] is False and final["body"]["state"] == "cancelled"
    assert final["body"]["cost"] == "0"
    # A result the node sends anyway is ignored, and tells the agent nothing more.
    node.send(protocol.RESULT, node.result(assign, returns=[6765]))
    await settled_down(hub, finals)
    assert len(finals.of(job_id)) == 1


async def test_a_verified_job_is_told_once_not_per_replica(setup: Setup) -> None:
    hub, agent, finals = setup.hub, setup.agent, setup.finals
    _, _, other = await hub.user("other-owner")
    nodes = [setup.node, await enroll(hub, other)]  # two owners: two replicas can be placed
    job_id = await finals.accepted(submit(agent, {**FIB, "verify": {"replicas": 2}}))
    assigns = [await n.next(protocol.ASSIGN) for n in nodes]
    assert job_id not in {a["job_id"] for a in assigns}  # each node runs a replica
    for n, a in zip(nodes, assigns, strict=True):
        n.send(protocol.RESULT, n.result(a, returns=[6765]))
    final = await finals.final(job_id)
    assert final["ok"] and final["body"]["state"] == "completed"
    assert final["body"]["verification"]["outcome"] == "agreed"
    await settled_down(hub, finals)
    assert len(finals.of(job_id)) == 1
    assert [m["body"]["id"] for m in finals.drained() if m.get(FINAL)] == [job_id]


async def test_a_service_is_told_when_it_ends(setup: Setup) -> None:
    agent, node, finals = setup.agent, setup.node, setup.finals
    job_id = await finals.accepted(submit(agent, {**SERVICE, "timeout": 3600}))
    assign = await node.next(protocol.ASSIGN)
    node.running(assign)
    node.send(protocol.RESULT, node.result(assign))  # the service's program ended by itself
    final = await finals.final(job_id)
    assert final["ok"] and final["body"]["state"] == "completed"
    assert final["body"]["billing"] is not None and final["body"]["cost"] is not None


async def test_a_job_submitted_over_rest_gets_no_final_reply(setup: Setup) -> None:
    hub, agent, node, finals = setup.hub, setup.agent, setup.node, setup.finals
    r = await hub.api.post("/api/v1/jobs", json=FIB, headers=await login(hub.api, agent.token))
    assert r.status == 201, await r.text()
    job_id = (await r.json())["id"]
    assign = await node.next(protocol.ASSIGN)
    node.send(protocol.RESULT, node.result(assign, returns=[6765]))
    await eventually("the job settled", lambda: hub.job_state(job_id) == "completed")
    await settled_down(hub, finals)
    assert finals.of(job_id) == []


async def test_a_final_the_broker_did_not_acknowledge_is_sent_again(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub, agent, node, finals = setup.hub, setup.agent, setup.node, setup.finals
    monkeypatch.setattr(hub.bridge.finals, "resend_after_s", 0.3)
    real_publish = hub.bridge.client.publish
    broken: list[str] = []

    def publish(topic: str, payload: Any, *args: Any, **kwargs: Any) -> Any:
        if b'"final":true' in payload.encode() and not broken:
            broken.append(topic)
            raise RuntimeError("injected: the broker connection broke mid-publish")
        return real_publish(topic, payload, *args, **kwargs)

    monkeypatch.setattr(hub.bridge.client, "publish", publish)
    job_id = await finals.accepted(submit(agent, FIB))
    assign = await node.next(protocol.ASSIGN)
    node.send(protocol.RESULT, node.result(assign, returns=[6765]))
    final = await finals.final(job_id)
    assert broken and final["body"]["state"] == "completed"
    assert hub.bridge.finals.resent == 1
    await settled_down(hub, finals)
    assert len(finals.of(job_id)) == 1


async def test_a_final_owed_across_a_hub_restart_is_sent_once(
    aiohttp_client: Any, tmp_path: Path, mosquitto: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = HubConfig(data_dir=tmp_path / "hub", mqtt_url=mosquitto, welcome_grant_credits=10)

    async def start() -> Hub:
        app = create_app(config)
        client = await aiohttp_client(app)
        client.services = app[SERVICES]
        return Hub(client)

    hub = await start()
    _, _, owner = await hub.user("owner")
    node = await enroll(hub, owner)
    agent = await hub.agent()
    finals = Finals(agent)
    try:
        # Job A is told before the restart, and its final marked sent.
        done = await finals.accepted(submit(agent, FIB))
        assign = await node.next(protocol.ASSIGN)
        node.send(protocol.RESULT, node.result(assign, returns=[6765]))
        await finals.final(done)
        await eventually("A marked sent", lambda: marked_sent(hub, done))

        # Job B finishes, but its final never leaves the hub before it stops (as if it died
        # between the commit and the publish).
        real_publish = hub.bridge.client.publish

        def publish(topic: str, payload: Any, *args: Any, **kwargs: Any) -> Any:
            if b'"final":true' in payload.encode():
                raise RuntimeError("injected: the hub dies before the final is out")
            return real_publish(topic, payload, *args, **kwargs)

        monkeypatch.setattr(hub.bridge.client, "publish", publish)
        owed = await finals.accepted(submit(agent, FIB))
        assign = await node.next(protocol.ASSIGN)
        node.send(protocol.RESULT, node.result(assign, returns=[6765]))
        await eventually("B settled", lambda: hub.job_state(owed) == "completed")
        await settled_down(hub, finals)
        assert finals.of(owed) == [] and not marked_sent(hub, owed)
        await hub.api.close()

        hub = await start()  # the same data directory: the finals owed go out on its start
        final = await finals.final(owed)
        assert final["ok"] and final["body"]["id"] == owed
        await eventually("B marked sent", lambda: marked_sent(hub, owed))
        await settled_down(hub, finals)
        assert len(finals.of(owed)) == 1 and len(finals.of(done)) == 1  # A not sent again
    finally:
        for peer in (node, agent):
            peer.stop()


# --- the SDK --------------------------------------------------------------------------------
def test_the_sdk_waits_on_the_final_reply_without_polling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """deparrow.Agent over MQTT: run_job and on_done get the finished job from its final reply;
    the SDK never asks REST for the job's state (the hub runs in a process of its own here:
    the SDK blocks, and would block an in-process hub's event loop)."""
    require_mosquitto()
    hub = start_hub(tmp_path, broker="mosquitto")
    try:
        owner_user, owner = hub.user("owner")
        node = start_node(hub, owner, tmp_path)
        buyer = SdkAgent.create(hub.url, owner_user["token"], "buyer", fund="1")
        asked: list[str] = []
        real_request = buyer.request

        def request(method: str, path: str, *args: Any, **kwargs: Any) -> Any:
            asked.append(f"{method} {path}")
            return real_request(method, path, *args, **kwargs)

        monkeypatch.setattr(buyer, "request", request)
        try:
            fib = {"engine": {"type": "wasm", "module": "example:fib", "entrypoint": "fib_iter",
                              "args": ["30"]}, "timeout": 10}  # fmt: skip
            job = buyer.run_job(fib, via="mqtt")
            assert job["state"] == "completed" and job["result"]["returns"] == [832040]
            assert job["cost"] == "0.002777"

            told: list[dict[str, Any]] = []
            arrived = threading.Event()

            def on_done(j: dict[str, Any]) -> None:
                told.append(j)
                arrived.set()

            trap = {"engine": {"type": "wasm", "module": "example:trap", "entrypoint": "_start"},
                    "timeout": 10}  # fmt: skip
            job_id = buyer.submit_job(trap, via="mqtt", on_done=on_done)
            assert arrived.wait(30), "on_done was not called"
            assert [j["id"] for j in told] == [job_id] and told[0]["state"] == "failed"
            assert "trap" in told[0]["reason"]
            with pytest.raises(JobFailed, match="trap"):
                buyer.run_job(trap, via="mqtt")
            assert buyer.wait_job(job_id)["state"] == "failed"  # remembered: no REST either
            assert not [a for a in asked if a.startswith("GET /api/v1/jobs")], asked
            assert len(told) == 1
        finally:
            buyer.close()
        node.stop()
    finally:
        hub.stop()

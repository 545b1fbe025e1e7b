"""Jobs that ask for network access go only to nodes whose owner allows it.

A node says which engines' jobs may use the network in its hello and heartbeats
(`allow_network`, docs/protocol.md); a node that does not say (older software) allows none.
The real app factory, a real SQLite file, a real Mosquitto: the nodes are ordinary MQTT clients
speaking the protocol, and the job goes in through the REST API.
"""

from __future__ import annotations

import asyncio
import json
import queue
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge.core import protocol
from hub.mqtt.bridge import parse_mqtt_url
from tests.hub.conftest import new_user

NETWORK_JOB = {
    "name": "fetch",
    "engine": {"type": "docker", "image": "localhost/busybox:latest",
               "command": ["wget", "-qO-", "http://example.org/"], "network": True},
    "timeout": 30,
}  # fmt: skip
REASON = (
    "no online node allows network access to docker jobs (its owner's allow_network);"
    " submit it without `network` if it can do without"
)


async def until(what: str, check: Callable[[], Any], timeout_s: float = 10) -> Any:
    """Wait without blocking the hub, which runs on this test's event loop."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Node:
    """An enrolled node on the broker: it announces itself and collects its assignments."""

    def __init__(self, creds: dict[str, Any], allow_network: list[str] | None, cpu: int) -> None:
        self.id = creds["node_id"]
        self.allow_network = allow_network
        self.res = {"cpu": cpu, "memory_mb": 512}
        self.assigned: queue.Queue[dict[str, Any]] = queue.Queue()
        self.c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=self.id)
        self.c.on_message = lambda _c, _u, m: self.assigned.put(json.loads(m.payload))
        host, port = parse_mqtt_url(creds["mqtt"]["url"])
        self.c.connect(host, port)
        self.c.loop_start()
        self.c.subscribe(protocol.node_topic(self.id, protocol.ASSIGN), qos=1)
        hello = protocol.hello(self.id, ["wasm", "docker"], self.res, "t", [], allow_network or [])
        self.send(protocol.HELLO, hello)
        self.beat()

    def beat(self) -> None:
        """An idle heartbeat: the hub tries to give this node a job."""
        beat = protocol.heartbeat(self.id, 1, protocol.IDLE, self.res, [], self.allow_network or [])
        self.send(protocol.HEARTBEAT, beat)

    def send(self, kind: str, msg: dict[str, Any]) -> None:
        if self.allow_network is None:  # a node from before the field: it says nothing
            del msg["allow_network"]
        topic = protocol.node_topic(self.id, kind)
        self.c.publish(topic, protocol.encode(msg), qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


async def enroll(api: Any, auth: dict[str, str], name: str) -> dict[str, Any]:
    t = await (await api.post("/api/v1/enrollment-tokens", headers=auth)).json()
    body = {"token": t["token"], "name": name, "engines": ["wasm", "docker"]}
    r = await api.post("/api/v1/nodes/enroll", json=body)
    assert r.status == 201, await r.text()
    creds: dict[str, Any] = await r.json()
    return creds


async def online(
    api: Any, owner: dict[str, str], allow: list[list[str] | None], cpu: int = 2
) -> list[Node]:
    """Nodes enrolled and announced in this order (the scheduler prefers the first)."""
    nodes = [Node(await enroll(api, owner, "node"), a, cpu) for a in allow]
    store = api.services.store
    await until("the nodes idle", lambda: all(store.node(n.id)["state"] == "idle" for n in nodes))
    return nodes


async def submit(api: Any, auth: dict[str, str], spec: dict[str, Any]) -> str:
    r = await api.post("/api/v1/jobs", json=spec, headers=auth)
    assert r.status == 201, await r.text()
    job_id: str = (await r.json())["id"]
    return job_id


async def test_a_network_job_goes_to_the_node_that_allows_it(api: Any) -> None:
    _, owner = await new_user(api, "owner")
    _, alice = await new_user(api, "alice")
    # The node that forbids network comes first in the scheduler's order: it would get the job
    # if the scheduler did not look at the network.
    closed, open_ = await online(api, owner, [[], ["docker"]])
    try:
        assert json.loads(api.services.store.node(open_.id)["allow_network"]) == ["docker"]
        job_id = await submit(api, alice, NETWORK_JOB)
        msg = await until(
            "an assignment", lambda: not open_.assigned.empty() and open_.assigned.get()
        )
        assert msg["job_id"] == job_id and msg["engine"]["network"] is True
        assert api.services.store.job(job_id)["node"] == open_.id
        assert closed.assigned.empty()
        # A job without network still goes to the node that forbids it, now the only idle one.
        other = await submit(api, alice, {**NETWORK_JOB, "engine": {
            **NETWORK_JOB["engine"], "network": False}})  # fmt: skip
        msg = await until(
            "an assignment", lambda: not closed.assigned.empty() and closed.assigned.get()
        )
        assert msg["job_id"] == other and msg["engine"]["network"] is False
    finally:
        closed.close()
        open_.close()


async def test_with_no_node_allowing_network_the_job_waits_and_says_why(api: Any) -> None:
    _, owner = await new_user(api, "owner")
    _, alice = await new_user(api, "alice")
    # One node forbids it outright; the other is older than the field, which counts as no.
    nodes = await online(api, owner, [[], None], cpu=8)
    try:
        job_id = await submit(api, alice, NETWORK_JOB)
        await until("the reason", lambda: api.services.store.job(job_id)["reason"] == REASON)
        r = await api.get(f"/api/v1/jobs/{job_id}", headers=alice)
        view = await r.json()
        assert view["state"] == "queued" and view["reason"] == REASON, view
        for n in nodes:  # idle again and again: still not theirs
            n.beat()
        await asyncio.sleep(0.3)
        assert all(n.assigned.empty() for n in nodes)
        assert api.services.store.job(job_id)["state"] == "queued"

        # A node that allows it comes: the job goes there.
        nodes += await online(api, owner, [["docker"]])
        msg = await until(
            "an assignment", lambda: not nodes[2].assigned.empty() and nodes[2].assigned.get()
        )
        assert msg["job_id"] == job_id and all(n.assigned.empty() for n in nodes)
        # Only the nodes that forbid network offer 4 CPUs: the reason says which fall short.
        big = await submit(api, alice, {**NETWORK_JOB, "resources": {"cpu": 4}})
        why = "no online node that allows network access offers 4 CPUs"
        await until("the reason", lambda: api.services.store.job(big)["reason"] == why)
    finally:
        for n in nodes:
            n.close()

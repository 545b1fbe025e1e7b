"""The MQTT contract, spoken by an ordinary MQTT client acting as a node and as an agent,
against a real hub process on real Mosquitto and on the embedded broker."""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge.core import protocol
from hub.mqtt.bridge import parse_mqtt_url
from tests.conftest import HubProc, wait_until

FIB = {
    "name": "fib",
    "engine": {"type": "wasm", "module": "example:fib", "entrypoint": "fib", "args": ["20"]},
    "timeout": 10,
}


class FakeNode:
    """A node made of protocol.py and paho: what mosquitto_pub/sub could do by hand."""

    def __init__(self, hub: HubProc, owner: Any) -> None:
        token = owner.enrollment_token()["token"]
        self.creds = hub.admin.request(
            "POST", "/api/v1/nodes/enroll", {"token": token, "name": "fake"}, auth=False
        )
        self.id = self.creds["node_id"]
        self.secret = self.creds["node_secret"]
        self.inbox: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        host, port = parse_mqtt_url(self.creds["mqtt"]["url"])
        self.c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=self.id)
        self.c.username_pw_set(self.id, self.creds["mqtt"]["password"])
        self.c.will_set(
            protocol.node_topic(self.id, "status"),
            protocol.encode(protocol.status(self.id, "offline")),
            1,
            True,
        )
        self.c.on_message = lambda _c, _u, m: self.inbox.put((m.topic, json.loads(m.payload)))
        self.c.connect(host, port)
        self.c.loop_start()
        for kind in protocol.NODE_IN:
            self.c.subscribe(protocol.node_topic(self.id, kind), qos=1)
        time.sleep(0.2)
        self.send("hello", protocol.hello(self.id, ["wasm"], {"cpu": 2, "memory_mb": 512}, "t"))
        self.state = "idle"
        self.beating = True
        self.beat()
        threading.Thread(target=self._beats, daemon=True).start()

    def _beats(self) -> None:
        while self.beating:
            time.sleep(0.3)
            if self.beating:
                self.beat(self.state)

    def send(self, kind: str, msg: Any, raw: bytes | None = None) -> None:
        payload = raw if raw is not None else protocol.encode(msg)
        self.c.publish(protocol.node_topic(self.id, kind), payload, qos=1).wait_for_publish(5)

    def beat(self, state: str = "idle") -> None:
        self.state = state
        self.send(
            "heartbeat", protocol.heartbeat(self.id, 1, state, {"cpu": 2, "memory_mb": 512}, [])
        )

    def next(self, kind: str, timeout_s: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                topic, msg = self.inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            if topic.endswith("/" + kind):
                return msg
        raise AssertionError(f"no {kind} message within {timeout_s}s")

    def result(
        self,
        assign: dict[str, Any],
        stdout: bytes = b"",
        returns: Any = None,
        status: str = "completed",
        error: str | None = None,
        secret: str | None = None,
    ) -> dict[str, Any]:
        outcome = {
            "status": status,
            "exit_code": 0 if status == "completed" else None,
            "stdout": stdout,
            "stderr": b"",
            "returns": returns,
            "error": error,
            "wall_ms": 1200,
            "cpu_ms": 1100,
        }
        return protocol.result(
            self.id, secret or self.secret, assign["job_id"], assign["attempt"], outcome
        )

    def close(self) -> None:
        self.beating = False
        self.c.loop_stop()
        self.c.disconnect()


@pytest.fixture
def setup(hub: HubProc) -> Any:
    _, owner_c = hub.user("owner")
    _, alice_c = hub.user("alice")
    node = FakeNode(hub, owner_c)
    wait_until("node idle", lambda: owner_c.nodes()[0]["state"] == "idle")
    yield hub, node, owner_c, alice_c
    node.close()


def audit(hub: HubProc) -> dict[str, Any]:
    result: dict[str, Any] = hub.admin.request("GET", "/api/v1/ledger/audit")
    return result


def test_assignment_result_settlement_exactly_once(setup: Any) -> None:
    hub, node, owner, alice = setup
    job = alice.submit(FIB)
    assign = node.next("assign")
    assert assign["job_id"] == job["id"] and assign["attempt"] == 1
    assert assign["engine"]["entrypoint"] == "fib" and assign["module_sha256"]
    node.send("event", protocol.event(node.id, job["id"], 1, "running"))
    wait_until("running", lambda: alice.job(job["id"])["state"] == "running")
    time.sleep(1.3)  # the hub bills min(reported, observed): let it observe > 1.2 s
    res = node.result(assign, returns=[6765])
    for _ in range(3):  # QoS 1 may deliver twice; a retrying node may send again
        node.send("result", res)
    done = wait_until(
        "completed", lambda: (j := alice.job(job["id"]))["state"] == "completed" and j
    )
    assert done["result"]["returns"] == [6765]
    # 2 billable seconds of 1 CPU at 10 credits/hour = 5,555 µc.
    assert done["cost"] == "0.005555"
    time.sleep(0.5)
    assert owner.wallet()["balance"] == "100.005555"
    assert alice.wallet() == {**alice.wallet(), "balance": "99.994445", "held": "0"}
    assert owner.nodes()[0]["earned"] == "0.005555"
    assert audit(hub)["balanced"]


def test_failed_result_refunds(setup: Any) -> None:
    hub, node, owner, alice = setup
    job = alice.submit(FIB)
    assign = node.next("assign")
    node.send("result", node.result(assign, status="failed", error="invalid module: bad magic"))
    done = wait_until("failed", lambda: (j := alice.job(job["id"]))["state"] == "failed" and j)
    assert done["reason"] == "invalid module: bad magic"
    assert done["cost"] == "0"
    assert alice.wallet()["balance"] == "100" and owner.wallet()["balance"] == "100"
    assert audit(hub)["balanced"]


def test_forged_and_malformed_messages_are_dropped(setup: Any) -> None:
    hub, node, _owner, alice = setup
    job = alice.submit(FIB)
    assign = node.next("assign")
    # Wrong secret, tampered output, and garbage: none may settle or crash the hub.
    node.send("result", node.result(assign, returns=[1], secret="0" * 64))
    tampered = node.result(assign, returns=[6765])
    tampered["returns"] = [1]
    node.send("result", tampered)
    node.send("result", None, raw=b"\xff\x00not json")
    node.send("result", None, raw=b"[1, 2, 3]")
    node.send("heartbeat", None, raw=b'{"v": 1, "node_id": "' + node.id.encode() + b'"}')
    node.send("heartbeat", None, raw=b"x" * (protocol.MAX_HEARTBEAT + 1))
    node.send("result", None, raw=b"{" + b" " * protocol.MAX_RESULT + b"}")
    # Someone else's topic: the payload names another node.
    node.send("heartbeat", protocol.heartbeat("n_other", 1, "idle", {}, []))
    time.sleep(1.0)
    assert alice.job(job["id"])["state"] in ("assigned", "running")
    assert hub.admin.status()["hub"] == "ok"
    # The honest result still settles afterwards.
    node.send("result", node.result(assign, returns=[6765]))
    wait_until("completed", lambda: alice.job(job["id"])["state"] == "completed")
    assert audit(hub)["balanced"]
    log = hub.proc.output()
    assert "signature does not verify" in log and "malformed result" in log
    assert "over the" in log and "does not match the topic" in log


def test_busy_node_gets_nothing_and_offline_node_loses_its_job(setup: Any) -> None:
    _hub, node, owner, alice = setup
    node.beat("busy")
    wait_until("busy", lambda: owner.nodes()[0]["state"] == "busy")
    job = alice.submit(FIB)
    time.sleep(1.0)
    assert alice.job(job["id"])["state"] == "queued"
    assert "busy" in alice.job(job["id"])["reason"]
    node.beat("idle")
    assign = node.next("assign")
    assert assign["job_id"] == job["id"]
    # The node vanishes without a goodbye: its socket just closes; the last will fires.
    node.beating = False
    sock = node.c.socket()
    assert isinstance(sock, socket.socket)
    node.c.loop_stop()
    sock.close()
    wait_until("offline", lambda: owner.nodes()[0]["state"] == "offline", 15)
    requeued = wait_until(
        "requeued", lambda: (j := alice.job(job["id"]))["state"] == "queued" and j
    )
    # The requeue says why; the next scheduling pass may already say what it waits for.
    assert "offline" in requeued["reason"] or requeued["reason"] == "no node is online"
    assert alice.wallet()["held"] != "0"  # still held for the next attempt


def test_agent_submits_over_mqtt(hub: HubProc) -> None:
    agent, client = hub.user("agent-7")
    host, port = parse_mqtt_url(hub.admin.status()["broker"]["url"])
    replies: queue.Queue[dict[str, Any]] = queue.Queue()
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    c.on_message = lambda _c, _u, m: replies.put(json.loads(m.payload))
    c.connect(host, port)
    c.loop_start()
    c.subscribe(protocol.agent_topic(agent["id"], "reply"), qos=1)
    time.sleep(0.3)
    topic = protocol.agent_topic(agent["id"], "submit")
    rid = str(uuid.uuid4())
    for _ in range(2):  # a duplicate delivery must not submit twice
        c.publish(topic, protocol.encode(protocol.submit(rid, agent["token"], FIB)), qos=1)
    first, second = replies.get(timeout=10), replies.get(timeout=10)
    assert first["ok"] and first["request_id"] == rid
    assert second["body"]["id"] == first["body"]["id"]
    assert len(client.jobs()) == 1
    # Bad spec, wrong token, too expensive: clear replies.
    c.publish(topic, protocol.encode(protocol.submit("r2", agent["token"], {"engine": {}})), 1)
    bad = replies.get(timeout=10)
    assert not bad["ok"] and bad["body"]["status"] == 400 and "engine" in bad["body"]["error"]
    c.publish(topic, protocol.encode(protocol.submit("r3", "dpt_wrong-token", FIB)), 1)
    assert replies.get(timeout=10)["body"]["status"] == 401
    pricey = {**FIB, "timeout": 86400, "resources": {"cpu": 10}}
    c.publish(topic, protocol.encode(protocol.submit("r4", agent["token"], pricey)), 1)
    poor = replies.get(timeout=10)
    assert poor["body"]["status"] == 402 and poor["body"]["shortfall"]
    c.loop_stop()
    c.disconnect()
    assert len(client.jobs()) == 1


def test_hub_restart_keeps_state(tmp_path: Path, mosquitto: str) -> None:
    from tests.conftest import start_hub

    hub = start_hub(tmp_path, mqtt_url=mosquitto)
    _, alice = hub.user("alice")
    job = alice.submit(FIB)
    hub.proc.kill()  # SIGKILL: no clean shutdown
    hub2 = start_hub(tmp_path, mqtt_url=mosquitto)
    alice.hub = hub2.url
    assert alice.job(job["id"])["state"] == "queued"
    assert alice.wallet()["held"] == job["hold"]
    assert audit(hub2)["balanced"]
    hub2.proc.stop()


def test_out_of_range_numbers_are_dropped_and_pay_nothing(setup: Any) -> None:
    hub, node, owner, _alice = setup
    node.beating = False
    time.sleep(0.3)
    before = owner.nodes()[0]
    huge = protocol.heartbeat(node.id, 2**63, "idle", {"cpu": 2, "memory_mb": 512}, [])
    for _ in range(20):
        node.send("heartbeat", huge)
    node.send("event", {**protocol.event(node.id, "j_x", 1, "running"), "attempt": 10**30})
    bad_hello = protocol.hello(node.id, ["wasm"], {"cpu": "x"}, "t")
    node.send("hello", bad_hello)
    time.sleep(0.5)
    after = owner.nodes()[0]
    assert after["uptime_s"] == before["uptime_s"] and after["earned"] == before["earned"]
    log = hub.proc.output()
    assert log.count("malformed heartbeat") >= 20 and "malformed event" in log
    assert "malformed hello" in log and "Traceback" not in log


def test_a_job_no_node_can_run_says_why_and_is_refunded(tmp_path: Path, mosquitto: str) -> None:
    from tests.conftest import start_hub

    hub = start_hub(tmp_path, mqtt_url=mosquitto, extra=("--queue-ttl", "2"))
    try:
        _, owner = hub.user("owner")
        _, alice = hub.user("alice")
        node = FakeNode(hub, owner)
        job = alice.submit({**FIB, "resources": {"cpu": 8}})
        wait_until("a reason", lambda: "CPU" in (alice.job(job["id"])["reason"] or ""))
        assert alice.job(job["id"])["reason"] == "no online node offers 8 CPUs"
        done = wait_until("failed", lambda: (j := alice.job(job["id"]))["state"] == "failed" and j)
        assert done["reason"].startswith("no node could run it within 2s: no online node offers")
        assert alice.wallet() == {**alice.wallet(), "balance": "100", "held": "0"}
        node.close()
    finally:
        hub.stop()

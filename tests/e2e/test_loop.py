"""The whole loop with real processes: a hub, real `edge-run` nodes, real wasm3 workers, on
real Mosquitto and on the embedded broker."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import wasm_jobs
from deparrow.client import Client
from deparrow.localnet import Proc
from tests.conftest import HubProc, start_hub, start_node, wait_until


def spec(name: str, **over: Any) -> dict[str, Any]:
    entry = wasm_jobs.manifest()[name]
    s: dict[str, Any] = {
        "name": name,
        "engine": {
            "type": "wasm",
            "module": "example:" + name,
            "entrypoint": entry["entrypoint"],
            "args": entry["args"],
            "env": entry["env"],
        },
        "timeout": 20,
    }
    s.update(over)
    return s


def finished(client: Any, job_id: str, timeout_s: float = 60) -> dict[str, Any]:
    return client.wait(job_id, timeout_s=timeout_s)


@pytest.fixture
def one_node(hub: HubProc, tmp_path: Path) -> Iterator[tuple[Client, Client, Proc]]:
    """(node owner, a submitter, the owner's running edge-run node), stopped afterwards."""
    _, owner = hub.user("owner")
    _, alice = hub.user("alice")
    node = start_node(hub, owner, tmp_path, "n1")
    yield owner, alice, node
    node.stop()


def test_jobs_run_on_a_real_node_and_pay_its_owner(hub: HubProc, one_node: Any) -> None:
    owner, alice, _node = one_node
    fib = alice.submit(spec("fib"))
    sieve = alice.submit(spec("sieve"))
    job = finished(alice, fib["id"])
    assert job["state"] == "completed", job
    assert job["result"]["returns"] == [75025]
    assert job["node"] == owner.nodes()[0]["id"]
    job2 = finished(alice, sieve["id"])
    assert job2["result"]["stdout"] == "primes below 100000: 9592\n"
    assert job2["result"]["exit_code"] == 0
    earned = owner.nodes()[0]["earned"]
    assert earned == "0.005554"  # two jobs, one started second each: 2 x 2,777 µc
    assert owner.wallet()["balance"] == "100.005554"
    assert alice.wallet()["balance"] == "99.994446"
    assert alice.wallet()["held"] == "0"
    audit = hub.admin.request("GET", "/api/v1/ledger/audit")
    assert audit["balanced"], audit


def test_invalid_module_fails_and_refunds(one_node: Any) -> None:
    owner, alice, _node = one_node
    bad = "base64:" + base64.b64encode(b"\x00asm\x01\x00\x00\x00garbage").decode()
    job = alice.submit(spec("fib", engine={"type": "wasm", "module": bad}))
    done = finished(alice, job["id"])
    assert done["state"] == "failed"
    assert done["reason"].startswith("invalid module: "), done["reason"]
    assert done["cost"] == "0"
    assert alice.wallet() == {**alice.wallet(), "balance": "100", "held": "0"}
    assert owner.wallet()["balance"] == "100"


def test_runaway_job_is_killed_and_the_node_keeps_serving(one_node: Any) -> None:
    _owner, alice, _node = one_node
    loop = alice.submit(spec("loop", timeout=2))
    done = finished(alice, loop["id"])
    assert done["state"] == "failed"
    assert done["reason"].startswith("timeout"), done["reason"]
    assert alice.wallet()["balance"] == "100"  # a timeout is not charged
    fib = alice.submit(spec("fib"))
    assert finished(alice, fib["id"])["result"]["returns"] == [75025]


def test_node_restart_keeps_its_identity(hub: HubProc, tmp_path: Path) -> None:
    _, owner = hub.user("owner")
    node = start_node(hub, owner, tmp_path, "n1")
    node_id = owner.nodes()[0]["id"]
    node.stop()
    wait_until("offline", lambda: owner.nodes()[0]["state"] == "offline", 10)
    import sys

    from tests.conftest import Proc

    again = Proc(
        [sys.executable, "-m", "edge.cli", "--data-dir", str(tmp_path / "n1")],
        tmp_path / "n1-again.log",
    )
    try:
        wait_until("back online", lambda: owner.nodes()[0]["state"] == "idle", 20, (again,))
        assert [n["id"] for n in owner.nodes()] == [node_id]
    finally:
        again.stop()


def test_hub_killed_mid_job_settles_once_after_restart(tmp_path: Path, mosquitto: str) -> None:
    """SIGKILL the hub while a node runs a job: the node's result is lost with the hub's
    session; the restarted hub re-sends the assignment, the node answers from its result
    cache, and the job settles exactly once without running twice."""
    hub = start_hub(tmp_path, mqtt_url=mosquitto)
    _, owner = hub.user("owner")
    _, alice = hub.user("alice")
    node = start_node(hub, owner, tmp_path, "n1")
    try:
        job = alice.submit(spec("sieve", engine={**spec("sieve")["engine"], "args": ["30000000"]}))
        wait_until("running", lambda: alice.job(job["id"])["state"] == "running", 20)
        hub.proc.kill()
        wait_until("the node to finish", lambda: "completed" in node.output(), 60, (node,))
        hub2 = start_hub(tmp_path, mqtt_url=mosquitto)
        alice.hub = owner.hub = hub2.url
        done = alice.wait(job["id"], timeout_s=30)
        assert done["state"] == "completed" and done["attempt"] == 1, done
        assert done["result"]["stdout"] == "primes below 30000000: 1857859\n"
        assert node.output().count("running") == 1  # ran once
        assert "result re-sent" in node.output()
        cost = done["cost"]
        assert owner.nodes()[0]["earned"] == cost
        audit = hub2.admin.request("GET", "/api/v1/ledger/audit")
        assert audit["balanced"], audit
        hub2.stop()
    finally:
        node.stop()


def test_node_killed_mid_job_the_job_moves_to_another_node(hub: HubProc, tmp_path: Path) -> None:
    _, owner = hub.user("owner")
    _, alice = hub.user("alice")
    first = start_node(hub, owner, tmp_path, "first")
    job = alice.submit(spec("sieve", engine={**spec("sieve")["engine"], "args": ["30000000"]}))
    wait_until("running", lambda: alice.job(job["id"])["state"] == "running", 20)
    first.kill()  # SIGKILL: the broker's last will tells the hub
    second = start_node(hub, owner, tmp_path, "second")
    try:
        done = alice.wait(job["id"], timeout_s=60)
        assert done["state"] == "completed" and done["attempt"] == 2, done
        names = {n["id"]: n["name"] for n in owner.nodes()}
        assert names[done["node"]] == "second"
        assert done["result"]["stdout"] == "primes below 30000000: 1857859\n"
        assert alice.wallet()["held"] == "0"
        assert hub.admin.request("GET", "/api/v1/ledger/audit")["balanced"]
    finally:
        second.stop()


def test_malformed_assignment_fails_its_job_and_the_node_lives(
    hub: HubProc, tmp_path: Path
) -> None:
    import json

    import paho.mqtt.publish as publish

    from edge.core import protocol
    from hub.mqtt.bridge import parse_mqtt_url

    _, owner = hub.user("owner")
    _, alice = hub.user("alice")
    node = start_node(hub, owner, tmp_path, "n1")
    try:
        node_id = owner.nodes()[0]["id"]
        host, port = parse_mqtt_url(hub.admin.status()["broker"]["url"])
        for bad in ({"job_id": "j_1", "attempt": 1, "engine": "wasm"}, b"\xff not json",
                    {"job_id": "j_2", "attempt": 1, "engine": {"type": "wasm"},
                     "timeout_s": "soon"}):  # fmt: skip
            payload = bad if isinstance(bad, bytes) else json.dumps(bad)
            publish.single(protocol.node_topic(node_id, "assign"), payload, qos=1,
                           hostname=host, port=port)  # fmt: skip
        job = alice.submit(spec("fib"))
        assert alice.wait(job["id"], timeout_s=30)["result"]["returns"] == [75025]
        assert node.alive()
        assert "invalid assignment: engine must be an object" in node.output()
    finally:
        node.stop()

"""tools/simnet.py against a real hub and the real Mosquitto it starts (with its logins and
ACLs): simulated nodes enroll over REST, connect with their own credentials, run jobs, fail,
cheat and go silent, and the hub's books stay right."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import wasm_jobs
from deparrow.client import Client
from tests.conftest import ROOT, HubProc, require_mosquitto, start_hub, wait_until
from tools.simnet import FAILURE, Background, Behaviour, RunTime, honest_output

SPEC = {
    "name": "noop",
    "engine": {"type": "wasm", "module": "example:fib", "entrypoint": "fib", "args": ["1"]},
    "timeout": 10,
}


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubProc]:
    """A hub with its own Mosquitto: nodes get in only with the logins enrollment gave them."""
    require_mosquitto()
    h = start_hub(tmp_path, broker="mosquitto")  # heartbeats every 0.5 s
    yield h
    h.stop()


@pytest.fixture
def sim(hub: HubProc) -> Iterator[Background]:
    with Background(hub.url, seed=5) as bg:
        yield bg


def settled(client: Client, job_id: str) -> dict[str, Any]:
    return client.wait(job_id, timeout_s=60, poll_s=0.05)


def node_view(client: Client, node_id: str) -> dict[str, Any]:
    return next(n for n in client.nodes() if n["id"] == node_id)


def test_simulated_nodes_run_jobs_and_their_owner_is_paid_once_each(
    hub: HubProc, sim: Background
) -> None:
    u, owner = hub.user("owner")
    _, alice = hub.user("alice")
    nodes = sim.start_nodes(4, [u["token"]], Behaviour(speed=RunTime("5-30")))
    assert {n["state"] for n in owner.nodes()} == {"idle"}
    ids = [alice.submit(SPEC)["id"] for _ in range(24)]
    jobs = [settled(alice, i) for i in ids]

    assert {j["state"] for j in jobs} == {"completed"}
    assert {j["node"] for j in jobs} <= {n.id for n in nodes}
    module = wasm_jobs.path("fib.wasm").read_bytes()
    honest = honest_output({"module": module, "entrypoint": "fib", "args": ["1"], "stdin": b""})
    assert {j["result"]["stdout"] for j in jobs} == {honest.decode()}
    # Each job paid its node's owner once: what alice paid is what the owner earned.
    paid = sum(float(j["cost"]) for j in jobs)
    earned = sum(float(n["earned"]) for n in owner.nodes())
    assert paid == pytest.approx(earned) and paid > 0
    assert alice.wallet()["held"] == "0"
    assert float(alice.wallet()["balance"]) == pytest.approx(100 - paid)
    stats = sim.stats()
    assert stats["completed"] == 24 and stats["failed"] == stats["cheated"] == 0
    assert hub.admin.audit()["balanced"]


def test_a_silent_node_loses_its_job_to_another_and_nobody_is_paid_twice(
    hub: HubProc, sim: Background
) -> None:
    """The node takes the job, says it runs it, then goes quiet with its connection up: no
    last will fires, only the missing heartbeats tell. It wakes later and sends its result
    for the attempt the hub took away: ignored."""
    u1, frozen_owner = hub.user("frozen-owner")
    u2, healthy_owner = hub.user("healthy-owner")
    _, alice = hub.user("alice")
    [frozen] = sim.start_nodes(1, [u1["token"]], Behaviour(silent=1.0, silent_s=8.0), "frozen")
    job = alice.submit(SPEC)
    wait_until("the frozen node took the job", lambda: sim.call(lambda: frozen.silent), 20)
    assert alice.job(job["id"])["node"] == frozen.id

    [healthy] = sim.start_nodes(1, [u2["token"]], Behaviour(), "healthy")
    done = settled(alice, job["id"])
    assert done["state"] == "completed"
    assert done["node"] == healthy.id and done["attempt"] == 2
    assert node_view(frozen_owner, frozen.id)["state"] == "offline"

    # It wakes: its held-back events and result go out, then hello. The broker keeps its
    # messages in order, so once the hub has its hello it has seen the stale result too.
    wait_until(
        "the frozen node back",
        lambda: node_view(frozen_owner, frozen.id)["state"] == "idle",
        30,
    )
    assert sim.call(lambda: frozen.stats.completed) == 1  # it did send a result, late
    again = alice.job(job["id"])
    assert again["state"] == "completed" and again["node"] == healthy.id
    assert node_view(frozen_owner, frozen.id)["earned"] == "0"
    assert node_view(healthy_owner, healthy.id)["earned"] == done["cost"]
    wallet = alice.wallet()
    assert wallet["held"] == "0"
    assert float(wallet["balance"]) == pytest.approx(100 - float(done["cost"]))
    assert hub.admin.audit()["balanced"]


def test_failed_jobs_are_refunded_and_cheats_are_signed_like_honest_results(
    hub: HubProc, sim: Background
) -> None:
    u, owner = hub.user("owner")
    _, alice = hub.user("alice")
    # One node, one seeded generator: the same jobs fail on every run.
    [node] = sim.start_nodes(1, [u["token"]], Behaviour(fail=0.4, cheat=0.3))
    jobs = [settled(alice, alice.submit(SPEC)["id"]) for _ in range(12)]
    failed = [j for j in jobs if j["state"] == "failed"]
    completed = [j for j in jobs if j["state"] == "completed"]
    assert failed and completed and len(failed) + len(completed) == len(jobs)
    for j in failed:
        assert j["reason"] == FAILURE and j["cost"] == "0"
    stats = sim.stats()
    assert stats["failed"] == len(failed)
    # A cheat is validly signed: the hub settles it (only replicas can tell it is wrong).
    module = wasm_jobs.path("fib.wasm").read_bytes()
    honest = honest_output({"module": module, "entrypoint": "fib", "args": ["1"], "stdin": b""})
    wrong = [j for j in completed if j["result"]["stdout"] != honest.decode()]
    assert len(wrong) == stats["cheated"] > 0
    # Refunds in full; the completed ones are paid once.
    paid = sum(float(j["cost"]) for j in completed)
    assert float(node_view(owner, node.id)["earned"]) == pytest.approx(paid)
    assert alice.wallet()["held"] == "0"
    assert float(alice.wallet()["balance"]) == pytest.approx(100 - paid)
    assert hub.admin.audit()["balanced"]


def test_the_command_line_enrolls_runs_and_reports(hub: HubProc, tmp_path: Path) -> None:
    u, owner = hub.user("owner")
    ids = tmp_path / "identities.json"
    cmd = [sys.executable, str(ROOT / "tools" / "simnet.py"), "--hub", hub.url,
           "--token", u["token"], "--nodes", "3", "--duration", "1.5", "--every", "0.5",
           "--identities", str(ids), "--json"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)
    lines = [json.loads(x) for x in out.stdout.splitlines()]
    assert lines[0]["event"] == "ready" and len(lines[0]["nodes"]) == 3
    assert lines[-1]["event"] == "stopped" and lines[-1]["nodes"] == 3
    assert any(x["event"] == "progress" and x["online"] == 3 for x in lines)
    assert {n["id"] for n in owner.nodes()} == set(lines[0]["nodes"])
    # The identities were kept: a second run is the same three nodes, no new enrollment.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(again.stdout.splitlines()[0])["nodes"] == lines[0]["nodes"]
    assert len(owner.nodes()) == 3
    # A bad rate is refused with a reason, before anything is enrolled.
    bad = subprocess.run([*cmd[:-1], "--fail", "1.5"], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "probability" in bad.stderr

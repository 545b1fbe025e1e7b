"""Slots, GPUs and fair spreading with tools/simnet.py against a real hub and its Mosquitto: a
GPU job waits for a node with a GPU and is billed for it, a node with two slots runs two jobs
at once, and identical nodes share a stream of jobs."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deparrow.client import Client
from hub.ledger import economy
from hub.ledger.money import MICRO, format_micro
from tests.conftest import ROOT, HubProc, require_mosquitto, start_hub, wait_until
from tools.simnet import Background, Behaviour, RunTime

SPEC = {
    "name": "noop",
    "engine": {"type": "wasm", "module": "example:fib", "entrypoint": "fib", "args": ["1"]},
    "timeout": 10,
}
GPU_SPEC = {
    "name": "gpu",
    "engine": {"type": "native", "command": ["nvidia-smi", "-L"]},
    "resources": {"cpu": 1, "gpu": 1},
    "timeout": 10,
}
BUSY = "every node that can run it is busy or its owner is using it"


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubProc]:
    require_mosquitto()
    h = start_hub(tmp_path, broker="mosquitto")  # heartbeats every 0.5 s
    yield h
    h.stop()


@pytest.fixture
def sim(hub: HubProc) -> Iterator[Background]:
    with Background(hub.url, seed=11) as bg:
        yield bg


def settled(client: Client, job_id: str) -> dict[str, Any]:
    return client.wait(job_id, timeout_s=60, poll_s=0.02)


def node_view(owner: Client, node_id: str) -> dict[str, Any]:
    return next(n for n in owner.nodes() if n["id"] == node_id)


def earned(owner: Client) -> dict[str, str]:
    return {n["id"]: n["earned"] for n in owner.nodes()}


def test_a_gpu_job_waits_for_a_gpu_node_then_runs_there_billed_for_its_gpu(
    hub: HubProc, sim: Background
) -> None:
    u, owner = hub.user("owner")
    _, alice = hub.user("alice")
    # The job runs 1.5 s on the node's word (its result's wall_ms): billed as 2 started seconds.
    engines, speed = ("wasm", "native"), RunTime("1500")
    [plain] = sim.start_nodes(1, [u["token"]], Behaviour(engines=engines, speed=speed), "plain")
    job = alice.submit(GPU_SPEC)
    waiting = wait_until(
        "the hub to say why the GPU job waits",
        lambda: (j := alice.job(job["id"]))["reason"] == "no node with a GPU online" and j,
        20,
    )
    assert waiting["state"] == "queued" and waiting["node"] is None

    gpu_behaviour = Behaviour(engines=engines, speed=speed, gpus=1)
    [gpu] = sim.start_nodes(1, [u["token"]], gpu_behaviour, "gpu")
    listed = node_view(owner, gpu.id)["gpus"]
    assert [(g["index"], g["name"]) for g in listed] == [(0, "simulated GPU (simnet)")]
    assert node_view(owner, plain.id)["gpus"] == []
    done = settled(alice, job["id"])
    assert done["state"] == "completed" and done["node"] == gpu.id
    assert sim.call(lambda: (gpu.stats.gpu_jobs, plain.stats.assigned)) == (1, 0)

    cpu_part = economy.node_pay(1000, 1500, 10)
    pay = economy.node_pay(1000, 1500, 10, gpus=1)
    assert pay == cpu_part + economy.gpu_pay(1, 1500, 10) and economy.gpu_pay(1, 1500, 10) > 0
    assert done["cost"] == format_micro(pay)  # normal priority: charged what the node earns
    assert earned(owner) == {gpu.id: format_micro(pay), plain.id: "0"}
    wallet = alice.wallet()
    assert wallet["held"] == "0"
    assert wallet["balance"] == format_micro(100 * MICRO - pay)
    assert hub.admin.audit()["balanced"]


def test_a_node_with_two_slots_runs_two_jobs_at_once_and_a_third_waits(
    hub: HubProc, sim: Background
) -> None:
    u, owner = hub.user("owner")
    _, alice = hub.user("alice")
    # Jobs run until the test releases them: no timing decides what overlaps.
    [node] = sim.start_nodes(
        1, [u["token"]], Behaviour(slots=2, cpu=2.0, speed=RunTime("hold"))
    )  # fmt: skip
    ids = [alice.submit(SPEC)["id"] for _ in range(3)]

    def states() -> list[tuple[str, str | None, str | None]]:
        return sorted((j["state"], j["node"], j["reason"]) for j in map(alice.job, ids))

    two_running = [("queued", None, BUSY), ("running", node.id, None), ("running", node.id, None)]
    wait_until("two jobs running and one waiting", lambda: states() == two_running, 20)
    assert sim.call(lambda: len(node.held)) == 2
    view = wait_until(
        "the node's heartbeat after its second job: busy",
        lambda: (v := node_view(owner, node.id))["state"] == "busy" and v,
        10,
    )
    assert (view["slots"], view["jobs_running"], view["free"]["slots"]) == (2, 2, 0)

    assert sim.call(lambda: node.release(1)) == 1  # a slot frees: the third job takes it
    wait_until(
        "the third job running beside the second",
        lambda: Counter(s for s, _, _ in states()) == {"running": 2, "completed": 1},
        20,
    )
    assert sim.call(lambda: len(node.held)) == 2
    sim.call(node.release)
    jobs = [settled(alice, i) for i in ids]
    assert {j["state"] for j in jobs} == {"completed"} and {j["node"] for j in jobs} == {node.id}
    paid = sum(float(j["cost"]) for j in jobs)
    assert float(earned(owner)[node.id]) == pytest.approx(paid) and paid > 0
    assert alice.wallet()["held"] == "0"
    assert hub.admin.audit()["balanced"]


def test_identical_nodes_share_a_stream_of_jobs(hub: HubProc, sim: Background) -> None:
    """Jobs one after another, each settled before the next: at that load both nodes are
    always idle, and the hub's old rule (the most reputable first) gave every job to the one
    that finished the first job. Now the one given a job longest ago goes first."""
    u, owner = hub.user("owner")
    _, alice = hub.user("alice")
    nodes = sim.start_nodes(2, [u["token"]], Behaviour(speed=RunTime("5")))
    jobs = [settled(alice, alice.submit(SPEC)["id"]) for _ in range(40)]
    assert {j["state"] for j in jobs} == {"completed"}

    per_node = Counter(j["node"] for j in jobs)
    pay = {n.id: float(earned(owner)[n.id]) for n in nodes}
    assert all(pay[n.id] > 0 for n in nodes), (per_node, pay)
    assert max(pay.values()) / min(pay.values()) <= 1.5, (per_node, pay)
    assert sum(pay.values()) == pytest.approx(sum(float(j["cost"]) for j in jobs))
    assert hub.admin.audit()["balanced"]


def test_the_command_line_gives_a_share_of_the_nodes_simulated_gpus(hub: HubProc) -> None:
    u, owner = hub.user("owner")
    _, alice = hub.user("alice")
    cmd = [sys.executable, str(ROOT / "tools" / "simnet.py"), "--hub", hub.url,
           "--token", u["token"], "--nodes", "2", "--slots", "3", "--gpus", "2",
           "--gpu-share", "0.5", "--engines", "wasm,native", "--json"]  # fmt: skip
    sim = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert sim.stdout is not None
        ready = json.loads(sim.stdout.readline())
        assert ready["event"] == "ready" and ready["slots"] == 3
        [with_gpus] = ready["gpu_nodes"]
        views = {n["id"]: n for n in owner.nodes()}
        assert {v["slots"] for v in views.values()} == {3}
        assert [g["name"] for g in views[with_gpus]["gpus"]] == ["simulated GPU (simnet)"] * 2
        # Only the node with two GPUs can take a job that asks for two.
        spec = {**GPU_SPEC, "resources": {"cpu": 1, "gpu": 2}}
        done = [settled(alice, alice.submit(spec)["id"]) for _ in range(3)]
        assert {(j["state"], j["node"]) for j in done} == {("completed", with_gpus)}
    finally:
        sim.terminate()
        out, err = sim.communicate(timeout=30)
    stopped = json.loads(out.splitlines()[-1])
    assert stopped["event"] == "stopped" and stopped["gpu_jobs"] == 3, err
    assert {n["id"] for n in owner.nodes()} == set(ready["nodes"])
    # GPUs without an engine that runs GPU jobs: refused with the reason, nothing enrolled.
    bad = subprocess.run([*cmd, "--engines", "wasm", "--duration", "1"], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "docker or native" in bad.stderr
    assert len(owner.nodes()) == 2

"""A full machine gives what it has: one real `edge-run` node runs as many jobs at once as its
slots allow, and a GPU job on a machine without a GPU waits for one, named as such, and is
priced at the GPU rate. Real hub, real broker, real node and wasm3 workers."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from deparrow.client import HubError
from deparrow.localnet import Proc, wait_for
from hub.ledger import economy
from hub.ledger.money import format_micro
from tests.conftest import HubProc
from tests.e2e.test_loop import spec


def running_together(client: Any, ids: list[str]) -> bool:
    return all(client.job(i)["state"] == "running" for i in ids)


def test_a_node_with_two_slots_runs_two_jobs_at_once_and_queues_the_third(
    hub: HubProc, tmp_path: Path
) -> None:
    _, owner = hub.user("owner")
    _, alice = hub.user("alice")
    token = owner.enrollment_token()["token"]
    cmd = [sys.executable, "-m", "edge.cli", "--hub", hub.url, "--token", token, "--name", "n",
           "--data-dir", str(tmp_path / "node"), "--always-run", "--dashboard-port", "0",
           "--max-jobs", "2", "-v"]  # fmt: skip
    node = Proc("n", cmd, tmp_path / "node.log")
    try:
        wait_for("the node", lambda: any(n["state"] == "idle" for n in owner.nodes()), 60, [node])
        assert "up to 2 jobs at once" in node.output()
        # three endless jobs of one CPU each; the machine may have more cores, the owner
        # allows two jobs at once
        loops = [alice.submit(spec("loop", timeout=120))["id"] for _ in range(3)]
        wait_for(
            "two jobs running at once",
            lambda: sum(alice.job(i)["state"] == "running" for i in loops) == 2,
            30,
            [node, hub.proc],
        )
        [waiting] = [i for i in loops if alice.job(i)["state"] == "queued"]
        assert "busy" in alice.job(waiting)["reason"], alice.job(waiting)
        # both slots taken: the node's next heartbeat says so
        wait_for("busy", lambda: owner.nodes()[0]["state"] == "busy", 10, [node, hub.proc])
        first = next(i for i in loops if i != waiting)
        alice.cancel(first)  # a slot frees: the third job takes it
        others = [i for i in loops if i != first]
        wait_for("the third job", lambda: running_together(alice, others), 30, [node, hub.proc])
        for i in others:
            alice.cancel(i)
    finally:
        node.stop()
    audit = hub.admin.request("GET", "/api/v1/ledger/audit")
    assert audit["balanced"], audit
    assert alice.wallet()["held"] == "0"


def test_a_gpu_job_waits_for_a_gpu_priced_at_the_gpu_rate(hub: HubProc, tmp_path: Path) -> None:
    """This machine has no GPU, so its node announces none: a GPU job waits, saying so."""
    _, owner = hub.user("owner")
    _, alice = hub.user("alice")
    node = hub.start_node(owner, tmp_path / "node", "plain", wait_s=60)
    try:
        [view] = owner.nodes()
        gpu_spec = {
            "name": "smi",
            "engine": {"type": "native", "command": ["nvidia-smi", "-L"]},
            "resources": {"cpu": 1, "gpu": 1},
            "timeout": 60,
        }
        job = alice.submit(gpu_spec)
        hold = economy.max_price(1000, 60, "normal", gpus=1)
        # one CPU and one GPU for 60 s: 10/h + 50/h
        assert hold == 1000 * 60 * 10 * 10**6 // (1000 * 3600) + 60 * 50 * 10**6 // 3600
        assert alice.wallet()["held"] == format_micro(hold)
        wait_for(
            "the reason",
            lambda: alice.job(job["id"])["reason"] == "no node with a GPU online",
            20,
            [node, hub.proc],
        )
        assert alice.job(job["id"])["state"] == "queued"
        assert view["state"] == "idle"
        alice.cancel(job["id"])
        assert alice.wallet()["held"] == "0"
        assert alice.wallet()["balance"] == "100"
        try:
            alice.submit({**spec("fib"), "resources": {"gpu": 1}})
            raise AssertionError("a wasm GPU job was admitted")
        except HubError as e:
            assert e.status == 400 and "resources.gpu" in str(e), e
    finally:
        node.stop()

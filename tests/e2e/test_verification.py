"""Verification, reputation and retries end to end: a real hub, the real Mosquitto it starts
(with its logins and ACLs), simulated nodes from tools/simnet.py speaking the real protocol.

Every test ends with the ledger audit. Nodes run jobs at once (no simulated run time) and
heartbeat every 0.5 s, so each test takes a few seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

import wasm_jobs
from deparrow.client import Client, HubError
from tests.conftest import HubProc, require_mosquitto, start_hub, wait_until
from tools.simnet import FAILURE, Background, Behaviour, SimNode, honest_output

FIB = {"type": "wasm", "module": "example:fib", "entrypoint": "fib", "args": ["1"]}
VERIFIED = {"name": "fib-verified", "engine": FIB, "timeout": 10, "verify": {"replicas": 3}}
HONEST = honest_output(
    {"module": wasm_jobs.path("fib.wasm").read_bytes(), "entrypoint": "fib", "args": ["1"],
     "stdin": b""}
).decode()  # fmt: skip


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubProc]:
    require_mosquitto()
    h = start_hub(tmp_path, broker="mosquitto")  # heartbeats every 0.5 s
    yield h
    h.stop()


@pytest.fixture
def sim(hub: HubProc) -> Iterator[Background]:
    with Background(hub.url, seed=7) as bg:
        yield bg


def node_of(
    hub: HubProc, sim: Background, name: str, behaviour: Behaviour | None = None
) -> tuple[Client, SimNode]:
    """A user of its own with one simulated node."""
    user, client = hub.user(name)
    [node] = sim.start_nodes(1, [user["token"]], behaviour or Behaviour(), name)
    return client, node


def node_view(client: Client, node_id: str) -> dict[str, Any]:
    return next(n for n in client.nodes() if n["id"] == node_id)


def credits(text: str | None) -> Decimal:
    return Decimal(text or "0")


def runs_by_node(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["node"]: r for r in job["verification"]["runs"]}


def test_one_cheater_of_three_is_outvoted_unpaid_and_loses_reputation(
    hub: HubProc, sim: Background
) -> None:
    honest = [node_of(hub, sim, f"honest{i}") for i in range(2)]
    cheat_owner, cheater = node_of(hub, sim, "cheater", Behaviour(cheat=1.0))
    _, alice = hub.user("alice")
    job = alice.submit(VERIFIED)
    done = alice.wait(job["id"], timeout_s=30, poll_s=0.05)

    assert done["state"] == "completed", done["reason"]
    assert done["result"]["stdout"] == HONEST  # the quorum's result, not the cheat's
    v = done["verification"]
    assert (v["replicas"], v["quorum"], v["outcome"]) == (3, 2, "agreed")
    runs = runs_by_node(done)
    assert set(runs) == {n.id for _, n in honest} | {cheater.id}  # 3 nodes, 3 owners
    assert runs[cheater.id]["verdict"] == "dissented" and runs[cheater.id]["paid"] == "0"
    assert runs[cheater.id]["result_hash"] != v["result_hash"]
    for owner, node in honest:
        assert runs[node.id]["verdict"] == "agreed"
        assert runs[node.id]["result_hash"] == v["result_hash"]
        assert node_view(owner, node.id)["earned"] == runs[node.id]["paid"]
        assert credits(runs[node.id]["paid"]) > 0
        assert node_view(owner, node.id)["reputation"] > 0.5
    cheat_view = node_view(cheat_owner, cheater.id)
    assert cheat_view["earned"] == "0" and cheat_view["reputation"] < 0.5
    # The submitter paid for three runs, each as a job of its own, and nothing more.
    cost = credits(done["cost"])
    assert cost == sum(credits(r["cost"]) for r in v["runs"])
    assert cost == 3 * credits(runs[cheater.id]["cost"])
    wallet = alice.wallet()
    assert wallet["held"] == "0" and credits(wallet["balance"]) == 100 - cost
    assert hub.admin.audit()["balanced"]


def test_two_different_results_and_a_failure_are_no_quorum_and_a_refund(
    hub: HubProc, sim: Background
) -> None:
    owners = [
        node_of(hub, sim, "honest"),
        node_of(hub, sim, "cheater", Behaviour(cheat=1.0)),
        node_of(hub, sim, "failing", Behaviour(fail=1.0)),
    ]
    _, alice = hub.user("alice")
    done = alice.wait(alice.submit(VERIFIED)["id"], timeout_s=30, poll_s=0.05)
    assert done["state"] == "failed"
    assert done["reason"] == (
        f"no quorum: of 3 replicas, 2 gave 2 different results and 1 failed ({FAILURE});"
        " 2 had to agree"
    )
    assert done["verification"]["outcome"] == "no quorum"
    assert done["cost"] == "0"
    assert alice.wallet() | {"owner": None} == {
        **alice.wallet(), "owner": None, "balance": "100", "held": "0"}  # fmt: skip
    for owner, node in owners:
        assert node_view(owner, node.id)["earned"] == "0"
    assert hub.admin.audit()["balanced"]


def test_a_replica_whose_node_goes_silent_runs_again_elsewhere_and_is_paid_once(
    hub: HubProc, sim: Background
) -> None:
    silent_owner, silent = node_of(hub, sim, "silent", Behaviour(silent=1.0))
    others = [node_of(hub, sim, f"honest{i}") for i in range(2)]
    _, alice = hub.user("alice")
    job = alice.submit(VERIFIED)
    wait_until("the silent node took its replica", lambda: sim.call(lambda: silent.silent), 20)
    spare_owner, spare = node_of(hub, sim, "spare")  # a fourth owner comes online
    done = alice.wait(job["id"], timeout_s=30, poll_s=0.05)

    assert done["state"] == "completed" and done["result"]["stdout"] == HONEST
    runs = runs_by_node(done)
    assert silent.id not in runs and spare.id in runs
    assert runs[spare.id]["attempt"] == 2  # the replica the silent node lost
    assert {r["verdict"] for r in runs.values()} == {"agreed"}
    replica = alice.job(runs[spare.id]["job"])
    assert replica["replica_of"] == job["id"]
    [lost] = replica["retries"]["history"]
    assert lost["node"] == silent.id and "went offline" in lost["outcome"]
    silent_view = node_view(silent_owner, silent.id)
    assert silent_view["earned"] == "0" and silent_view["reputation"] < 0.5
    assert node_view(spare_owner, spare.id)["earned"] == runs[spare.id]["paid"]
    paid = sum(credits(node_view(o, n.id)["earned"]) for o, n in [*others, (spare_owner, spare)])
    assert paid == credits(done["cost"])  # three runs paid, once each
    assert credits(alice.wallet()["balance"]) == 100 - paid
    assert hub.admin.audit()["balanced"]


def test_duplicated_results_are_paid_once(hub: HubProc, sim: Background) -> None:
    nodes = [node_of(hub, sim, f"dup{i}", Behaviour(repeat=3)) for i in range(3)]
    _, alice = hub.user("alice")
    verified = alice.wait(alice.submit(VERIFIED)["id"], timeout_s=30, poll_s=0.05)
    plain = alice.wait(
        alice.submit({"engine": FIB, "timeout": 10})["id"], timeout_s=30, poll_s=0.05
    )
    assert verified["state"] == plain["state"] == "completed"
    spent = credits(verified["cost"]) + credits(plain["cost"])
    earned = sum(credits(node_view(o, n.id)["earned"]) for o, n in nodes)
    assert earned == spent and credits(alice.wallet()["balance"]) == 100 - spent
    # Four runs (three replicas and the plain job), each result sent three times.
    assert sum(sim.call(lambda n=n: n.stats.results) for _, n in nodes) == 4 * 3
    assert hub.admin.audit()["balanced"]


def test_replicas_never_land_on_one_owner_and_bad_specs_are_refused(
    hub: HubProc, sim: Background
) -> None:
    many, _ = hub.user("many")
    crowd = sim.start_nodes(3, [many["token"]], Behaviour(), "many")
    _, lone = node_of(hub, sim, "lone")
    _, alice = hub.user("alice")
    job = alice.submit(VERIFIED)

    def waiting() -> dict[str, Any]:
        return alice.job(job["id"])

    wait_until(
        "two replicas done, one waiting",
        lambda: sum(r["state"] == "completed" for r in waiting()["verification"]["runs"]) == 2,
        20,
    )
    view = waiting()
    assert view["state"] == "running"
    assert "owner runs no other replica of job " + job["id"] in view["reason"]
    nodes = {r["node"] for r in view["verification"]["runs"] if r["node"]}
    assert lone.id in nodes and len(nodes & {n.id for n in crowd}) == 1

    _, third = node_of(hub, sim, "third")  # another owner: the last replica runs there
    done = alice.wait(job["id"], timeout_s=30, poll_s=0.05)
    assert done["state"] == "completed"
    assert third.id in runs_by_node(done)

    for bad, words in [
        ({"replicas": 9}, "verify.replicas: 9 is not between 1 and 5"),
        ({"replicas": 0}, "verify.replicas: 0 is not between 1 and 5"),
    ]:
        with pytest.raises(HubError) as e:
            alice.submit({**VERIFIED, "verify": bad})
        assert e.value.status == 400 and words in str(e.value)
    with pytest.raises(HubError) as e:
        alice.submit({**VERIFIED, "engine": {"type": "docker", "image": "busybox"}})
    assert e.value.status == 400 and "only wasm jobs can be verified, not docker" in str(e.value)
    assert alice.wallet()["held"] == "0"
    assert hub.admin.audit()["balanced"]

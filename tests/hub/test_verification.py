"""Verification by replicas: k nodes of distinct owners, quorum on the result hash, the credits.

Real SQLite and the real job lifecycle: the scheduler places the replicas, signed results go
through Jobs.on_result as the bridge hands them over, and the ledger is audited after each
test. The REST checks use the real app factory (and a real Mosquitto, which it connects to).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from edge.core import protocol
from hub.api.services import Services
from hub.app import open_services
from hub.config import HubConfig
from hub.ledger import economy
from hub.ledger.economy import REVENUE
from hub.ledger.money import MICRO, format_micro
from hub.market import verification
from hub.market.errors import JobError
from hub.market.jobs import wallet_of
from hub.market.spec import JobSpec
from tests.hub.conftest import db_url, new_user
from tests.hub.test_earnings import add_node

pytestmark = pytest.mark.both_stores

FIB = {"type": "wasm", "module": "example:fib", "entrypoint": "fib", "args": ["20"]}
CHARGE = economy.job_charge(1000, 10, 10, "normal")  # one started second of one CPU
PAY = economy.node_pay(1000, 10, 10)
HOLD = economy.max_price(1000, 10, "normal")


@pytest.fixture
def services(tmp_path: Path, store: str | Path) -> Services:
    return open_services(
        HubConfig(data_dir=tmp_path, db_url=db_url(store), welcome_grant_credits=10)
    )


def spec(k: int | None = 3, **over: Any) -> JobSpec:
    raw: dict[str, Any] = {"engine": FIB, "timeout": 10, **over}
    if k is not None:
        raw["verify"] = {"replicas": k}
    return msgspec.convert(raw, JobSpec)


def owners_with_nodes(s: Services, *counts: int) -> list[tuple[str, list[Any]]]:
    out = []
    for i, n in enumerate(counts):
        owner, _, _ = s.create_user(f"owner{i}", "user")
        out.append((owner, [add_node(s, owner) for _ in range(n)]))
    return out


def placed(s: Services) -> dict[str, Any]:
    """One scheduling pass: replica id -> the node row it went to."""
    return {a.message["job_id"]: s.store.node(a.node_id) for a in s.scheduler.schedule()}


def result(
    s: Services, replica_id: str, stdout: bytes = b"6765\n", status: str = "completed",
    error: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The signed result message the replica's node sends for its current attempt."""
    job = s.store.job(replica_id)
    assert job is not None and job["node"] is not None
    node = s.store.node(job["node"])
    assert node is not None
    return protocol.result(node["id"], node["secret"], replica_id, job["attempt"], {
        "status": status, "exit_code": 0 if status == "completed" else None, "stdout": stdout,
        "returns": None, "error": error, "wall_ms": 10, "cpu_ms": 10})  # fmt: skip


def send(s: Services, replica_id: str, **kw: Any) -> str:
    msg = result(s, replica_id, **kw)
    return s.jobs.on_result(msg["node_id"], msg)


def balance(s: Services, user: str) -> int:
    return s.ledger.balance(wallet_of(user))


def replicas(s: Services, job_id: str) -> list[Any]:
    return s.store.replicas(job_id)


def test_replicas_go_to_nodes_of_distinct_owners_never_two_on_one(services: Services) -> None:
    s = services
    (a, a_nodes), (b, _), (c, _) = owners_with_nodes(s, 3, 1, 1)
    user, _, _ = s.create_user("alice", "user")
    job = s.jobs.submit(user, spec(3))
    assert int(job["hold"]) == 3 * HOLD  # k times the maximum price
    assert balance(s, user) == 10 * MICRO - 3 * HOLD
    first = placed(s)
    assert set(first) == {r["id"] for r in replicas(s, job["id"])}
    assert sorted(n["owner"] for n in first.values()) == sorted([a, b, c])
    assert s.store.job(job["id"])["state"] == "running"

    # A second verified job finds only owner a's two other nodes free: one replica there,
    # the other two wait, and say why.
    second = s.jobs.submit(user, spec(3))
    more = placed(s)
    assert len(more) == 1 and next(iter(more.values()))["owner"] == a
    waiting = [r for r in replicas(s, second["id"]) if r["state"] == "queued"]
    assert len(waiting) == 2
    for r in waiting:
        assert "owner runs no other replica of job " + second["id"] in r["reason"]
    # Even with owner a's node free again, no second replica of a job goes to owner a.
    assert len(a_nodes) == 3 and placed(s) == {}
    assert s.ledger.audit().balanced


def test_one_persons_nodes_under_agents_of_their_own_get_one_replica(services: Services) -> None:
    s = services
    mallory, _, _ = s.create_user("mallory", "user")
    # Each node under an agent of its own (one an agent's agent): all of them mallory's.
    first, _ = s.agents.create_agent(mallory, "a1")
    second, _ = s.agents.create_agent(first, "a2")
    nodes = [add_node(s, mallory), add_node(s, first), add_node(s, second)]
    honest, _, _ = s.create_user("honest", "user")
    user, _, _ = s.create_user("alice", "user")
    job = s.jobs.submit(user, spec(3))
    placed_on = placed(s)
    assert len(placed_on) == 1 and next(iter(placed_on.values()))["id"] in {n["id"] for n in nodes}
    waiting = [r for r in replicas(s, job["id"]) if r["state"] == "queued"]
    assert len(waiting) == 2 and all("distinct owners" in r["reason"] for r in waiting)
    # An honest person's node takes one more; mallory still cannot take the third.
    add_node(s, honest)
    assert [n["owner"] for n in placed(s).values()] == [honest]
    assert placed(s) == {}
    assert s.ledger.audit().balanced


def test_a_lost_replicas_node_owner_does_not_get_it_again(services: Services) -> None:
    s = services
    (a, _), *_ = owners_with_nodes(s, 2, 1, 1, 1)
    user, _, _ = s.create_user("alice", "user")
    job = s.jobs.submit(user, spec(3))
    first = placed(s)
    on_a = next((r for r, n in first.items() if n["owner"] == a), None)
    assert on_a is not None
    s.scheduler.node_offline(first[on_a]["id"], "missed heartbeats")  # a1 or a2 lost it
    retry = placed(s)
    assert list(retry) == [on_a] and retry[on_a]["owner"] != a
    assert s.ledger.audit().balanced and job is not None


def test_the_quorum_pays_agreeing_nodes_and_not_the_dissenter(services: Services) -> None:
    s = services
    (o1, _), (o2, _), (cheat, [cheat_node]) = owners_with_nodes(s, 1, 1, 1)
    user, _, _ = s.create_user("alice", "user")
    job = s.jobs.submit(user, spec(3))
    nodes = placed(s)
    start = {o: balance(s, o) for o in (o1, o2, cheat)}
    revenue = s.ledger.balance(REVENUE)
    outcomes = []
    for rid, node in nodes.items():
        wrong = node["id"] == cheat_node["id"]
        outcomes.append(send(s, rid, stdout=b"6766\n" if wrong else b"6765\n"))
    assert outcomes == ["replica recorded"] * 3

    done = s.jobs.view(s.store.job(job["id"]))
    assert done["state"] == "completed" and done["reason"] is None
    assert done["result"]["stdout"] == "6765\n"  # the quorum's result
    v = done["verification"]
    assert v["replicas"] == 3 and v["quorum"] == 2 and v["outcome"] == "agreed"
    by_node = {r["node"]: r for r in v["runs"]}
    assert by_node[cheat_node["id"]]["verdict"] == "dissented"
    assert by_node[cheat_node["id"]]["paid"] == "0"
    assert v["result_hash"] not in (None, by_node[cheat_node["id"]]["result_hash"])
    assert sorted(r["verdict"] for r in v["runs"]) == ["agreed", "agreed", "dissented"]

    # The submitter pays for the 3 replicas that ran, each as a job of its own.
    assert done["cost"] == format_micro(3 * CHARGE)
    assert balance(s, user) == 10 * MICRO - 3 * CHARGE
    assert s.ledger.held_for(wallet_of(user)) == 0
    assert balance(s, o1) - start[o1] == PAY and balance(s, o2) - start[o2] == PAY
    assert balance(s, cheat) == start[cheat]  # not paid
    assert s.ledger.balance(REVENUE) - revenue == CHARGE  # its share stays with the network
    assert s.store.node(cheat_node["id"])["earned"] == 0
    # Reputation: the agreeing nodes rise a little, the dissenter is halved.
    reps = {n["id"]: s.store.node(n["id"])["reputation"] for n in nodes.values()}
    assert reps.pop(cheat_node["id"]) == pytest.approx(0.25)
    assert list(reps.values()) == [pytest.approx(0.525)] * 2
    assert s.ledger.audit().balanced


def test_duplicates_and_a_hub_restart_between_replicas_move_credits_once(
    tmp_path: Path,
) -> None:
    config = HubConfig(data_dir=tmp_path, welcome_grant_credits=10)
    s = open_services(config)
    (o1, _), (o2, _), (o3, _) = owners_with_nodes(s, 1, 1, 1)
    user, _, _ = s.create_user("alice", "user")
    job = s.jobs.submit(user, spec(3))
    r1, r2, r3 = placed(s)
    m1 = result(s, r1)
    assert s.jobs.on_result(m1["node_id"], m1) == "replica recorded"
    assert s.jobs.on_result(m1["node_id"], m1) == "ignored: job already completed"
    s.db.close()

    s = open_services(config)  # the hub restarts between replicas
    assert s.store.job(job["id"])["state"] == "running"
    m2, m3 = result(s, r2), result(s, r3)
    for m in (m2, m2, m3, m3, m1):
        s.jobs.on_result(m["node_id"], m)
    assert s.store.job(job["id"])["state"] == "completed"
    s.db.close()

    s = open_services(config)  # and again after settling: late copies change nothing
    for m in (m1, m2, m3):
        assert s.jobs.on_result(m["node_id"], m) == "ignored: job already completed"
    for n in (1, 2, 3):  # one ledger entry per replica, under its own key
        entry = s.ledger.entry(f"replica:{job['id']}:{n}")
        assert entry is not None
    assert balance(s, user) == 10 * MICRO - 3 * CHARGE
    assert [balance(s, o) for o in (o1, o2, o3)] == [10 * MICRO + PAY] * 3
    assert s.ledger.audit().balanced


def test_no_quorum_fails_the_job_and_refunds_the_whole_hold(services: Services) -> None:
    s = services
    owners_with_nodes(s, 1, 1, 1)
    user, _, _ = s.create_user("alice", "user")
    job = s.jobs.submit(user, spec(3))
    r1, r2, r3 = placed(s)
    send(s, r1, stdout=b"one\n")
    send(s, r2, stdout=b"two\n")
    assert send(s, r3, status="failed", error="trap: unreachable") == "replica failed"
    done = s.jobs.view(s.store.job(job["id"]))
    assert done["state"] == "failed"
    assert done["reason"] == (
        "no quorum: of 3 replicas, 2 gave 2 different results and 1 failed"
        " (trap: unreachable); 2 had to agree"
    )
    assert done["verification"]["outcome"] == "no quorum"
    assert sorted(r["verdict"] for r in done["verification"]["runs"]) == [
        "failed", "no quorum", "no quorum"]  # fmt: skip
    assert balance(s, user) == 10 * MICRO and s.ledger.held_for(wallet_of(user)) == 0
    assert all(n["earned"] == 0 for n in s.store.nodes())
    assert s.ledger.audit().balanced

    other = s.jobs.submit(user, spec(3))
    for i, rid in enumerate(placed(s)):
        send(s, rid, stdout=f"answer {i}\n".encode())
    assert s.store.job(other["id"])["reason"] == "no quorum: 3 replicas gave 3 different results"
    assert balance(s, user) == 10 * MICRO
    assert s.ledger.audit().balanced


def test_a_quorum_out_of_reach_ends_the_job_early_and_stops_the_rest(services: Services) -> None:
    s = services
    owners_with_nodes(s, 1, 1, 1)
    user, _, _ = s.create_user("alice", "user")
    job = s.jobs.submit(user, spec(3))
    nodes = placed(s)
    r1, r2, r3 = nodes
    send(s, r1, status="failed", error="trap: out of bounds")
    assert s.store.job(job["id"])["state"] == "running"  # 2 of 3 could still agree
    assert s.jobs.take_cancels() == []
    send(s, r2, status="failed", error="trap: out of bounds")
    assert s.store.job(job["id"])["state"] == "failed"
    assert s.store.job(r3)["state"] == "cancelled"
    assert s.jobs.take_cancels() == [(nodes[r3]["id"], r3, 1)]  # its node is told to stop
    assert send(s, r3) == "ignored: job already cancelled"
    assert balance(s, user) == 10 * MICRO
    assert s.ledger.audit().balanced


def test_cancelling_a_verified_job_stops_its_replicas_once(services: Services) -> None:
    s = services
    owners_with_nodes(s, 1, 1)
    user, _, _ = s.create_user("alice", "user")
    job = s.jobs.submit(user, spec(3))
    nodes = placed(s)  # two owners online: two replicas run, one waits
    assert len(nodes) == 2
    waiting = next(r for r in replicas(s, job["id"]) if r["state"] == "queued")
    with pytest.raises(JobError, match=f"replica {waiting['replica']} of job {job['id']}"):
        s.jobs.cancel(user, waiting["id"], False)
    row, node = s.jobs.cancel(user, job["id"], False)
    assert row["state"] == "cancelled" and node is None
    assert sorted(s.jobs.take_cancels()) == sorted((n["id"], r, 1) for r, n in nodes.items())
    s.jobs.cancel(user, job["id"], False)  # again: nothing more
    assert s.jobs.take_cancels() == []
    assert {r["state"] for r in replicas(s, job["id"])} == {"cancelled"}
    assert balance(s, user) == 10 * MICRO
    assert s.ledger.audit().balanced


def test_a_lost_replica_is_retried_on_a_node_of_yet_another_owner(services: Services) -> None:
    s = services
    (_, [lost]), _, _, (d, [spare]) = owners_with_nodes(s, 1, 1, 1, 1)
    s.store.update_node(spare["id"], state="busy")  # not free at first
    user, _, _ = s.create_user("alice", "user")
    job = s.jobs.submit(user, spec(3))
    nodes = placed(s)
    rid = next(r for r, n in nodes.items() if n["id"] == lost["id"])
    s.scheduler.node_offline(lost["id"], "missed heartbeats")
    again = s.store.job(rid)
    assert again["state"] == "queued" and again["failures"] == 1
    assert "retrying on another node (attempt 2 of at most 3)" in again["reason"]
    s.store.update_node(spare["id"], state="idle")
    assert {n["id"] for n in placed(s).values()} == {spare["id"]}
    for r in nodes:
        send(s, r)
    view = s.jobs.view(s.store.job(job["id"]))
    assert view["state"] == "completed"
    run = next(r for r in view["verification"]["runs"] if r["job"] == rid)
    assert run["node"] == spare["id"] and run["attempt"] == 2 and run["verdict"] == "agreed"
    replica = s.jobs.view(s.store.job(rid))
    assert replica["replica_of"] == job["id"]
    assert [t["node"] for t in replica["retries"]["history"]] == [lost["id"]]
    assert balance(s, d) == 10 * MICRO + PAY
    assert s.store.node(lost["id"])["earned"] == 0
    assert s.store.node(lost["id"])["reputation"] == pytest.approx(0.45)
    assert balance(s, user) == 10 * MICRO - 3 * CHARGE  # three runs paid for, not four
    assert s.ledger.audit().balanced


def test_replicas_one_is_an_ordinary_job(services: Services) -> None:
    owners_with_nodes(services, 1)
    user, _, _ = services.create_user("alice", "user")
    job = services.jobs.submit(user, spec(1))
    assert int(job["hold"]) == HOLD and replicas(services, job["id"]) == []
    assert set(placed(services)) == {job["id"]}
    assert send(services, job["id"]) == "settled"
    assert services.jobs.view(services.store.job(job["id"]))["verification"] is None


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"verify": {"replicas": 0}}, "verify.replicas", "0 is not between 1 and 5"),
        ({"verify": {"replicas": 6}}, "verify.replicas", "6 is not between 1 and 5"),
        ({"verify": {"replicas": "3"}}, "verify.replicas", "Expected `int`"),
        ({"verify": {"copies": 3}}, "verify", "unknown field `copies`"),
        (
            {"verify": {"replicas": 3}, "engine": {"type": "docker", "image": "busybox"}},
            "verify",
            "only wasm jobs can be verified, not docker",
        ),
        (
            {"verify": {"replicas": 3}, "engine": {"type": "native", "command": ["date"]}},
            "verify",
            "a native job may read the clock",
        ),
        (
            {"verify": {"replicas": 3}, "type": "service"},
            "verify",
            "a service runs until stopped",
        ),
    ],
)
async def test_bad_verify_specs_get_400_naming_the_problem(
    api: Any, body: dict[str, Any], field: str, words: str
) -> None:
    _, auth = await new_user(api)
    r = await api.post("/api/v1/jobs", json={"engine": FIB, "timeout": 10, **body}, headers=auth)
    answer = await r.json()
    assert r.status == 400, answer
    assert words in answer["error"] and answer["field"] == field
    wallet = await (await api.get("/api/v1/wallet", headers=auth)).json()
    assert wallet["balance"] == "10" and wallet["held"] == "0"  # nothing held


async def test_a_verified_job_over_rest_holds_k_prices_and_shows_its_replicas(api: Any) -> None:
    _, auth = await new_user(api)
    body = {"engine": FIB, "timeout": 10, "verify": {"replicas": 3}}
    r = await api.post("/api/v1/jobs", json=body, headers=auth)
    assert r.status == 201
    job = await r.json()
    assert job["hold"] == format_micro(3 * HOLD)
    view = await (await api.get(f"/api/v1/jobs/{job['id']}", headers=auth)).json()
    v = view["verification"]
    assert v["replicas"] == 3 and v["quorum"] == 2 and v["outcome"] == "pending"
    assert [r["replica"] for r in v["runs"]] == [1, 2, 3]
    assert view["retries"] == {"max_attempts": 3, "node_failures": 0, "history": []}
    listed = await (await api.get("/api/v1/jobs", headers=auth)).json()
    assert [j["id"] for j in listed["jobs"]] == [job["id"]]  # replicas show inside it
    r = await api.post(f"/api/v1/jobs/{job['id']}/cancel", headers=auth)
    assert r.status == 200
    cancelled = await r.json()
    assert cancelled["state"] == "cancelled"
    assert cancelled["verification"]["outcome"] == "cancelled"
    assert {r["state"] for r in cancelled["verification"]["runs"]} == {"cancelled"}
    wallet = await (await api.get("/api/v1/wallet", headers=auth)).json()
    assert wallet["balance"] == "10" and wallet["held"] == "0"
    r = await api.post(f"/api/v1/jobs/{v['runs'][0]['job']}/cancel", headers=auth)
    assert r.status == 400
    assert f"cancel {job['id']}, which stops all its replicas" in (await r.json())["error"]


def test_the_docs_worked_examples_are_what_the_hub_computes() -> None:
    root = Path(__file__).resolve().parents[2]
    protocol_doc = (root / "docs" / "protocol.md").read_text()
    digest = "6e00e1f6cbc739c35bda5fabe7ab9639eb4461caaebf5edb1e4ee3ae5949fa7d"
    assert f"printf '%s' 'v1|0|{digest}' | sha256sum" in protocol_doc
    assert verification.result_hash(0, digest) + "  -" in protocol_doc
    economy_doc = " ".join((root / "docs" / "economy.md").read_text().split())
    hold = 3 * economy.max_price(1000, 10, "normal")
    charge = economy.job_charge(1000, 40, 10, "normal")
    assert f"Hold: 3 \N{MULTIPLICATION SIGN} 27,777 = {hold:,} µc" in economy_doc
    assert f"pays {3 * charge:,} µc and gets {hold - 3 * charge:,} µc back" in economy_doc

"""Node reputation and retries: the score's rule, the scheduler's preference, lost attempts.

Real SQLite and the real job lifecycle (signed results through Jobs.on_result, the scheduler's
own passes and sweep); the node views come from the REST API of the real app factory.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.core import protocol
from hub.api.services import Services
from hub.app import open_services
from hub.config import HubConfig
from hub.ledger import economy
from hub.ledger.money import MICRO
from hub.market import reputation
from hub.market.jobs import wallet_of
from hub.market.spec import JobSpec
from tests.hub.conftest import db_url, login, new_user
from tests.hub.test_earnings import add_node

pytestmark = pytest.mark.both_stores

FIB = {"type": "wasm", "module": "example:fib", "entrypoint": "fib", "args": ["20"]}
PAY = economy.node_pay(1000, 10, 10)


@pytest.fixture
def services(tmp_path: Path, store: str | Path) -> Services:
    return open_services(
        HubConfig(data_dir=tmp_path, db_url=db_url(store), welcome_grant_credits=10)
    )


def submit(s: Services, user: str) -> Any:
    return s.jobs.submit(user, msgspec.convert({"engine": FIB, "timeout": 10}, JobSpec))


def placed(s: Services) -> dict[str, str]:
    return {a.message["job_id"]: a.node_id for a in s.scheduler.schedule()}


def send(s: Services, job_id: str, status: str = "completed", error: str | None = None) -> str:
    job = s.store.job(job_id)
    node = s.store.node(job["node"])
    msg = protocol.result(node["id"], node["secret"], job_id, job["attempt"], {
        "status": status, "exit_code": 0 if status == "completed" else None, "stdout": b"ok",
        "returns": None, "error": error, "wall_ms": 10, "cpu_ms": 10})  # fmt: skip
    return s.jobs.on_result(node["id"], msg)


def score(s: Services, node: Any) -> float:
    return float(s.store.node(node["id"])["reputation"])


EVENTS = st.sampled_from([*reputation.GAINS, *reputation.LOSSES])


@given(st.lists(EVENTS, max_size=300))
def test_the_score_stays_between_0_and_1_whatever_happens(events: list[str]) -> None:
    r = reputation.NEUTRAL
    for e in events:
        before, r = r, reputation.after(r, e)
        assert 0 < r < 1
        assert (r >= before) if e in reputation.GAINS else (r <= before)


def test_the_rule_in_the_database_is_the_documented_one(services: Services) -> None:
    s = services
    owner, _, _ = s.create_user("owner", "user")
    node = add_node(s, owner)
    assert score(s, node) == reputation.NEUTRAL == 0.5  # a new node starts neutral
    expected = 0.5
    for event in ("completed", "agreed", "dissented", "lost", "completed"):
        with s.db.transaction() as c:
            reputation.record(c, node["id"], event)
        expected = reputation.after(expected, event)
        assert score(s, node) == pytest.approx(expected)
    row = s.store.node(node["id"])
    assert (row["jobs_completed"], row["replicas_agreed"]) == (2, 1)
    assert (row["replicas_dissented"], row["jobs_lost"]) == (1, 1)
    # docs/economy.md's worked example: 0.5 -> 0.51 -> 0.5345 -> 0.26725 -> 0.240525 -> ...
    assert reputation.after(0.5, "completed") == pytest.approx(0.51)
    assert reputation.after(0.51, "agreed") == pytest.approx(0.5345)
    assert reputation.after(0.5345, "dissented") == pytest.approx(0.26725)
    assert reputation.after(0.26725, "lost") == pytest.approx(0.240525)


def test_nodes_in_good_standing_take_turns_never_a_busy_or_suspended_one(
    services: Services,
) -> None:
    s = services
    owner, _, _ = s.create_user("owner", "user")
    user, _, _ = s.create_user("alice", "user")
    first, second = add_node(s, owner), add_node(s, owner)
    with s.db.transaction() as c:  # a better score does not jump the queue: both are good
        reputation.record(c, second["id"], "agreed")
    order = []
    for _ in range(4):  # one job at a time: each goes to the node that waited longest
        job = submit(s, user)
        [(job_id, node_id)] = placed(s).items()
        assert job_id == job["id"]
        order.append(node_id)
        assert send(s, job["id"]) == "settled"
    assert order == [first["id"], second["id"], first["id"], second["id"]]
    assert score(s, second) == pytest.approx(
        reputation.after(reputation.after(0.525, "completed"), "completed")
    )

    for state in ("busy", "suspended", "offline"):
        s.store.update_node(second["id"], state=state)
        job = submit(s, user)
        assert placed(s) == {job["id"]: first["id"]}, state
        assert send(s, job["id"]) == "settled"
    s.store.update_node(first["id"], state="suspended")
    job = submit(s, user)
    assert placed(s) == {}
    assert "busy or its owner is using it" in s.store.job(job["id"])["reason"]


def test_a_node_below_good_standing_works_only_when_no_good_node_can(
    services: Services,
) -> None:
    s = services
    owner, _, _ = s.create_user("owner", "user")
    user, _, _ = s.create_user("alice", "user")
    outvoted, worse, good = add_node(s, owner), add_node(s, owner), add_node(s, owner)
    with s.db.transaction() as c:
        reputation.record(c, outvoted["id"], "dissented")  # 0.25
        reputation.record(c, worse["id"], "dissented")
        reputation.record(c, worse["id"], "lost")  # 0.225
    assert score(s, outvoted) < reputation.GOOD_STANDING <= score(s, good)
    for _ in range(2):  # good is preferred however recently it worked
        job = submit(s, user)
        assert placed(s) == {job["id"]: good["id"]}
        assert send(s, job["id"]) == "settled"
    s.store.update_node(good["id"], state="busy")
    job = submit(s, user)
    assert placed(s) == {job["id"]: outvoted["id"]}  # below standing: the most reputable


def test_a_broken_executor_is_the_nodes_fault_the_job_moves_on(services: Services) -> None:
    s = services
    owner, _, _ = s.create_user("owner", "user")
    user, _, _ = s.create_user("alice", "user")
    broken, healthy = add_node(s, owner), add_node(s, owner)
    job = submit(s, user)
    assert placed(s) == {job["id"]: broken["id"]}
    outcome = send(s, job["id"], "failed", "executor error: worker process killed by SIGSEGV")
    assert outcome == "retrying: node error"
    assert score(s, broken) == pytest.approx(0.45)
    again = s.store.job(job["id"])
    assert again["state"] == "queued"
    assert again["reason"] == (
        f"node {broken['id']} could not run it (executor error: worker process killed by"
        " SIGSEGV); retrying on another node (attempt 2 of at most 3)"
    )
    assert placed(s) == {job["id"]: healthy["id"]}  # the less reputable node waits its turn
    assert send(s, job["id"]) == "settled"
    view = s.jobs.view(s.store.job(job["id"]))
    assert view["attempt"] == 2 and view["retries"]["node_failures"] == 1
    [lost] = view["retries"]["history"]
    assert lost["attempt"] == 1 and lost["node"] == broken["id"]
    assert "executor error" in lost["outcome"]
    assert s.store.node(broken["id"])["earned"] == 0
    assert s.store.node(healthy["id"])["earned"] == PAY  # paid once, for the run that counted
    assert s.ledger.audit().balanced

    # The job's own failure (a trap) is not the node's: no retry, a refund.
    other = submit(s, user)
    placed(s)
    assert send(s, other["id"], "failed", "trap: unreachable") == "refunded"
    assert s.store.job(other["id"])["state"] == "failed"


def test_after_max_attempts_lost_the_job_fails_and_is_refunded(services: Services) -> None:
    s = services
    owner, _, _ = s.create_user("owner", "user")
    user, _, _ = s.create_user("alice", "user")
    nodes = [add_node(s, owner) for _ in range(3)]
    job = submit(s, user)
    for _ in range(3):
        [(jid, node_id)] = placed(s).items()
        assert jid == job["id"]
        s.scheduler.node_offline(node_id, "missed heartbeats")
    done = s.jobs.view(s.store.job(job["id"]))
    assert done["state"] == "failed"
    assert done["reason"].startswith("3 attempts lost by their nodes, the last: node ")
    assert [t["node"] for t in done["retries"]["history"]] == [n["id"] for n in nodes]
    assert s.ledger.balance(wallet_of(user)) == 10 * MICRO  # nobody paid, all refunded
    assert all(score(s, n) == pytest.approx(0.45) for n in nodes)
    assert s.ledger.audit().balanced


def test_a_node_silent_past_the_timeout_loses_the_attempt_to_another(services: Services) -> None:
    s = services
    owner, _, _ = s.create_user("owner", "user")
    user, _, _ = s.create_user("alice", "user")
    silent = add_node(s, owner)
    job = submit(s, user)
    assert placed(s) == {job["id"]: silent["id"]}
    now = time.time()
    s.store.update_node(silent["id"], last_seen=now + 100)  # it heartbeats, says nothing else
    s.scheduler.sweep(now + 10 + s.config.result_grace_s + 1)
    again = s.store.job(job["id"])
    assert again["state"] == "queued" and again["failures"] == 1
    assert again["reason"].startswith(f"no result from node {silent['id']} within 10s")
    late = protocol.result(silent["id"], silent["secret"], job["id"], 1, {
        "status": "completed", "exit_code": 0, "stdout": b"ok", "returns": None,
        "error": None, "wall_ms": 10, "cpu_ms": 10})  # fmt: skip
    assert s.jobs.on_result(silent["id"], late) == "ignored: not this node's current attempt"
    assert s.store.node(silent["id"])["earned"] == 0


async def test_nodes_show_their_reputation_over_rest(api: Any) -> None:
    _, auth = await new_user(api, "owner")
    token = await (await api.post("/api/v1/enrollment-tokens", headers=auth)).json()
    r = await api.post("/api/v1/nodes/enroll", json={"token": token["token"], "name": "n1"})
    assert r.status == 201, await r.text()
    node_id = (await r.json())["node_id"]
    listed = await (await api.get("/api/v1/nodes", headers=auth)).json()
    assert [n["reputation"] for n in listed["nodes"]] == [0.5]
    s = api.services
    with s.db.transaction() as c:
        reputation.record(c, node_id, "dissented")
    one = await (await api.get(f"/api/v1/nodes/{node_id}", headers=auth)).json()
    assert one["reputation"] == 0.25
    admin = await login(api, s.admin_token)
    listed = await (await api.get("/api/v1/nodes", headers=admin)).json()
    assert [n["reputation"] for n in listed["nodes"]] == [0.25]

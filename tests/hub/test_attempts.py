"""Each attempt settled once, whatever fails: the money and job rules of issue 12.

Real SQLite, the real job lifecycle (signed results through Jobs.on_result, the scheduler's
own passes and sweep) and real protocol messages; time moves by setting the hub's clock
(`Jobs.clock`, `sweep(now=)`, `bill_services(now=)`), never by sleeping.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import msgspec
import pytest

import wasm_jobs
from edge.core import protocol
from hub.api.services import Services
from hub.app import open_services
from hub.config import HubConfig
from hub.ledger import economy
from hub.ledger.money import MICRO
from hub.market.errors import JobError
from hub.market.jobs import wallet_of
from hub.market.spec import JobSpec
from tests.hub.conftest import db_url
from tests.hub.test_earnings import add_node
from tests.hub.test_reputation import placed, score

pytestmark = pytest.mark.both_stores

HOUR = 3600
T0 = 1_800_000_000.0


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def services(tmp_path: Path, store: str | Path) -> Services:
    s = open_services(HubConfig(data_dir=tmp_path, db_url=db_url(store), welcome_grant_credits=100))
    s.jobs.clock = Clock()
    return s


def clock(s: Services) -> Clock:
    assert isinstance(s.jobs.clock, Clock)
    return s.jobs.clock


def result(s: Services, job_id: str, status: str, error: str | None, wall_ms: int) -> str:
    job = s.store.job(job_id)
    node = s.store.node(job["node"])
    msg = protocol.result(node["id"], node["secret"], job_id, job["attempt"], {
        "status": status, "exit_code": 0 if status == "completed" else None, "stdout": b"ok",
        "returns": None, "error": error, "wall_ms": wall_ms, "cpu_ms": 10})  # fmt: skip
    return s.jobs.on_result(node["id"], msg)


def running(s: Services, job_id: str) -> None:
    job = s.store.job(job_id)
    msg = {"job_id": job_id, "attempt": job["attempt"], "state": protocol.RUNNING}
    assert s.jobs.on_event(job["node"], msg)


def service(s: Services, owner: str, timeout: int = 5 * 86400) -> Any:
    engine = {"type": "wasm", "module": "example:loop", "entrypoint": "_start"}
    spec = {"type": "service", "timeout": timeout, "engine": engine}
    return s.jobs.submit(owner, msgspec.convert(spec, JobSpec))


def batch(s: Services, owner: str, timeout: int = 10) -> Any:
    spec = {"timeout": timeout, "engine": {"type": "wasm", "module": "example:fib",
                                           "entrypoint": "fib", "args": ["20"]}}  # fmt: skip
    return s.jobs.submit(owner, msgspec.convert(spec, JobSpec))


def beat_all(s: Services) -> None:
    """Every node heartbeats now: none goes offline in a sweep."""
    with s.db.transaction() as c:
        c.execute("UPDATE nodes SET last_seen = ?", (clock(s).t,))


# --- 3: a service that reaches its lifetime is paid -----------------------------------------
@pytest.mark.parametrize(
    "error",
    [
        "timeout: job exceeded its 7200s limit",  # wasm3, wasmtime, docker, native
        "timeout: job exceeded its 7200s limit (CPU time)",
    ],
)
def test_a_service_reaching_its_lifetime_pays_its_last_partial_hour(
    services: Services, error: str
) -> None:
    s = services
    owner, _, _ = s.create_user("owner", "user")
    agent, _, _ = s.create_user("agent", "agent")
    node = add_node(s, owner)
    job = service(s, agent, timeout=2 * HOUR)
    assert placed(s) == {job["id"]: node["id"]}
    running(s, job["id"])
    clock(s).t += HOUR
    s.jobs.bill_services()
    clock(s).t += HOUR  # the lifetime is reached: the executor stops it with its timeout
    assert result(s, job["id"], "failed", error, 2 * HOUR * 1000) == "settled"
    row = s.store.job(job["id"])
    assert row["state"] == "completed" and int(row["cost"]) == 2 * 10 * MICRO
    assert s.store.node(node["id"])["earned"] == 2 * 10 * MICRO  # both hours, not one
    assert s.ledger.held_for(wallet_of(agent)) == 0
    assert s.ledger.audit().balanced


# --- 4: a moved service's last partial hour is paid on the node that ran it ----------------
def test_a_moved_service_pays_its_last_partial_hour_on_the_new_node(services: Services) -> None:
    s = services
    owner, _, _ = s.create_user("owner", "user")
    agent, _, _ = s.create_user("agent", "agent")
    first = add_node(s, owner)
    job = service(s, agent)
    assert placed(s) == {job["id"]: first["id"]}
    running(s, job["id"])
    clock(s).t += 1.5 * HOUR
    s.jobs.bill_services()  # hour 1 paid on the first node
    s.scheduler.node_offline(first["id"], "missed heartbeats")  # the half hour is lost
    second = add_node(s, owner)
    assert placed(s) == {job["id"]: second["id"]}
    running(s, job["id"])
    clock(s).t += 20 * 60  # twenty minutes on the new node, then the service ends
    assert result(s, job["id"], "completed", None, 20 * 60 * 1000) == "settled"
    twenty = economy.node_pay(1000, 20 * 60 * 1000, HOUR)
    assert s.store.node(second["id"])["earned"] == twenty
    assert int(s.store.job(job["id"])["cost"]) == 10 * MICRO + twenty
    assert s.ledger.audit().balanced


# --- 5: a module that crashes its executor is blamed, not three nodes ----------------------
def test_a_module_that_crashes_two_nodes_the_same_way_is_blamed_not_the_nodes(
    services: Services,
) -> None:
    s = services
    owner, _, _ = s.create_user("owner", "user")
    other, _, _ = s.create_user("other", "user")
    user, _, _ = s.create_user("alice", "user")
    a, b, c = add_node(s, owner), add_node(s, other), add_node(s, owner)
    crash = "executor error: worker process killed by signal 11 (SIGSEGV)"
    job = batch(s, user)
    start = s.ledger.balance(wallet_of(user)) + int(job["hold"])
    [(_, n1)] = placed(s).items()
    clock(s).t += 2
    assert result(s, job["id"], "failed", crash, 2000) == "retrying: node error"
    [(_, n2)] = placed(s).items()
    assert n2 != n1
    clock(s).t += 3
    assert result(s, job["id"], "failed", crash, 3000) == "failed: blamed on the job"
    row = s.store.job(job["id"])
    assert row["state"] == "failed" and "SIGSEGV" in row["reason"]
    assert placed(s) == {}  # not tried on a third node
    assert [score(s, n) for n in (a, b, c)] == pytest.approx([0.5, 0.5, 0.5])
    # The submitter paid for the five seconds used; the two nodes' owners were paid for them.
    used = economy.job_charge(1000, 2000, 10, "normal") + economy.job_charge(
        1000, 3000, 10, "normal"
    )
    assert s.ledger.balance(wallet_of(user)) == start - used
    assert int(row["cost"]) == used
    earned = {n: s.store.node(n)["earned"] for n in (n1, n2)}
    assert earned == {n1: economy.node_pay(1000, 2000, 10), n2: economy.node_pay(1000, 3000, 10)}
    outcomes = [a["outcome"] for a in s.jobs.attempts.of_job(job["id"])]
    assert outcomes == ["blamed", "blamed"]
    assert s.ledger.audit().balanced


def test_one_node_crashing_twice_on_different_jobs_is_still_the_nodes_fault(
    services: Services,
) -> None:
    s = services
    owner, _, _ = s.create_user("owner", "user")
    user, _, _ = s.create_user("alice", "user")
    a, b = add_node(s, owner), add_node(s, owner)
    job = batch(s, user)
    assert len(placed(s)) == 1
    died = result(s, job["id"], "failed", "executor error: worker died", 10)
    assert died == "retrying: node error"
    assert len(placed(s)) == 1
    # Another way of breaking on the second node: still the nodes' fault, retried.
    assert result(s, job["id"], "failed", "executor error: other", 10) == "retrying: node error"
    assert s.store.job(job["id"])["state"] == "queued"
    assert score(s, a) == pytest.approx(0.45) and score(s, b) == pytest.approx(0.45)


# --- 6: a retried job's time in the queue starts again --------------------------------------
def test_a_retried_job_is_not_failed_by_the_queue_limit_of_its_first_wait(
    services: Services,
) -> None:
    s = services
    owner, _, _ = s.create_user("owner", "user")
    user, _, _ = s.create_user("alice", "user")
    silent = add_node(s, owner)
    job = batch(s, user, timeout=2 * HOUR)
    assert placed(s) == {job["id"]: silent["id"]}
    idle = add_node(s, owner)
    clock(s).t += 1.5 * HOUR  # the node went silent a while ago; the other beats
    s.store.update_node(idle["id"], last_seen=clock(s).t)
    assert s.scheduler.sweep(now=clock(s).t) == [silent["id"]]
    row = s.store.job(job["id"])
    assert row["state"] == "queued", row["reason"]  # not "no node could run it within 3600s"
    assert row["queued_at"] == clock(s).t
    # It still fails if it then waits the whole limit with no node to take it.
    s.store.update_node(idle["id"], state=protocol.BUSY)
    clock(s).t += s.config.queue_ttl_s + 1
    s.store.update_node(idle["id"], last_seen=clock(s).t)
    s.scheduler.sweep(now=clock(s).t)
    assert s.store.job(job["id"])["state"] == "failed"
    assert s.ledger.audit().balanced


# --- 9: an inline module is stored once, as a blob, not inside the spec --------------------
def test_an_inline_module_is_stored_by_reference(services: Services) -> None:
    s = services
    user, _, _ = s.create_user("alice", "user")
    module = wasm_jobs.path(wasm_jobs.manifest()["fib"]["module"]).read_bytes()
    inline = "base64:" + base64.b64encode(module).decode()
    engine = {"type": "wasm", "entrypoint": "fib", "args": ["20"], "module": inline}
    stdin = "base64:" + base64.b64encode(b"x" * 100_000).decode()
    raw = {"engine": engine, "input": stdin, "timeout": 10}
    spec = msgspec.convert(raw, JobSpec)
    job = s.jobs.submit(user, spec, submit_key="k1")
    assert len(job["spec"]) < 450, len(job["spec"])
    stored = msgspec.json.decode(job["spec"], type=JobSpec)
    assert stored.engine.module == "sha256:" + job["module_sha256"]
    assert stored.input == "sha256:" + job["input_sha256"]
    assert s.store.blob(job["module_sha256"]) == module
    # A retried submission with the same key and the same inline module is the same job.
    assert s.jobs.submit(user, spec, submit_key="k1")["id"] == job["id"]
    assert s.jobs.view(job)["spec"]["engine"]["module"].startswith("sha256:")


def test_an_example_input_is_its_sample_stdin_not_its_module(services: Services) -> None:
    s = services
    user, _, _ = s.create_user("alice", "user")
    engine = {"type": "wasm", "module": "example:sha256", "entrypoint": "_start"}
    job = s.jobs.submit(
        user, msgspec.convert({"engine": engine, "input": "example:sha256"}, JobSpec)
    )
    sample = wasm_jobs.path(wasm_jobs.manifest()["sha256"]["stdin"]).read_bytes()
    assert s.store.blob(job["input_sha256"]) == sample
    with pytest.raises(
        JobError, match=r"example job 'fib' has no sample input \(these do: sha256\)"
    ):
        s.jobs.submit(user, msgspec.convert({"engine": engine, "input": "example:fib"}, JobSpec))


def test_a_result_handled_before_its_running_event_still_says_when_the_job_started(
    services: Services,
) -> None:
    """With hub replicas the node's `running` event and its result can be handled by two
    replicas in either order: settled first, the job started wall_ms before it finished (and
    not before it was assigned); the late event then changes nothing."""
    s = services
    owner, _, _ = s.create_user("owner", "user")
    add_node(s, owner)
    job = batch(s, owner)
    clock(s).t += 1.0
    assert len(placed(s)) == 1
    assigned = float(s.store.job(job["id"])["assigned_at"])
    clock(s).t += 2.5
    assert result(s, job["id"], "completed", None, wall_ms=1500).startswith("settled")
    done = s.store.job(job["id"])
    assert done["state"] == "completed"
    assert float(done["started_at"]) == pytest.approx(float(done["finished_at"]) - 1.5)
    assert float(done["started_at"]) >= assigned
    job_row = s.store.job(job["id"])
    late = {"job_id": job["id"], "attempt": job_row["attempt"], "state": protocol.RUNNING}
    assert not s.jobs.on_event(job_row["node"], late)
    assert s.store.job(job["id"])["started_at"] == done["started_at"]

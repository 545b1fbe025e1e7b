"""A scheduling pass costs what changed: with nothing written since its last plan it reads
nothing, and whatever does change the picture (a job that arrives, a node that frees up, a
heartbeat that changes an offer, another process writing the file) is seen by the next pass.
Big plans are committed a slice a pass, each decision checked against the rows, and made off
the event loop. Real SQLite file, real hello and heartbeat messages through the bridge's
`handle`, a real second process writing to the store; the statements a pass runs are counted
with SQLite's own trace hook.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest

from edge.core import protocol
from hub.api.services import Services
from hub.app import open_services
from hub.config import HubConfig
from hub.market.spec import JobSpec
from hub.mqtt.bridge import Bridge

NOW = [1_800_000_000.0]


@pytest.fixture
def s(tmp_path: Path) -> Iterator[Services]:
    services = open_services(HubConfig(data_dir=tmp_path, welcome_grant_credits=100))
    services.jobs.clock = lambda: NOW[0]
    yield services
    services.db.close()


@pytest.fixture
def user(s: Services) -> str:
    return s.create_user("submitter", "user")[0]


def node(s: Services, name: str = "n", *, cpu: float = 2, slots: int = 1) -> str:
    """A node that said hello and is idle, offering `cpu` CPUs and 512 MB."""
    owner, _, _ = s.create_user(f"owner-{name}", "user")
    token, _ = s.store.create_enrollment_token(owner, 60)
    node_id, _ = s.store.create_node(
        token=token, owner=owner, name=name, engines=["wasm"], arch="x", cpu=4,
        memory_mb=512, mqtt_password="pw",
    )  # fmt: skip
    offer = {"cpu": cpu, "memory_mb": 512, "gpu": 0, "load": 0}
    hello = protocol.hello(node_id, ["wasm"], offer, "t", [], (), None, slots, None, None)
    assert handle(s, node_id, protocol.HELLO, hello) == "hello"
    beat(s, node_id, 1, cpu=cpu)
    return node_id


def handle(s: Services, node_id: str, kind: str, msg: dict[str, Any]) -> str:
    bridge = Bridge("mqtt://127.0.0.1:9", s.store, s.jobs, s.scheduler)
    return bridge.handle(protocol.node_topic(node_id, kind), protocol.encode(msg))


def beat(s: Services, node_id: str, seq: int, *, cpu: float = 2, load: float = 0) -> None:
    offer = {"cpu": cpu, "memory_mb": 512, "gpu": 0, "load": load}
    msg = protocol.heartbeat(node_id, seq, protocol.IDLE, offer, [])
    assert handle(s, node_id, protocol.HEARTBEAT, msg) == "heartbeat"


def submit(s: Services, user: str, cpu: float = 1, priority: str = "normal") -> str:
    spec = {
        "engine": {"type": "wasm", "module": "example:fib", "entrypoint": "fib"},
        "timeout": 10,
        "resources": {"cpu": cpu, "memory_mb": 64},
        "priority": priority,
    }
    return str(s.jobs.submit(user, msgspec.convert(spec, JobSpec))["id"])


def placed(s: Services, **kw: Any) -> dict[str, str]:
    with s.db.transaction():
        return {a.message["job_id"]: a.node_id for a in s.scheduler.schedule(**kw)}


@contextmanager
def statements(s: Services) -> Iterator[list[str]]:
    """The SQL statements run on the hub's connection meanwhile (SQLite's trace hook)."""
    seen: list[str] = []
    s.db.conn.set_trace_callback(seen.append)
    try:
        yield seen
    finally:
        s.db.conn.set_trace_callback(None)


def reads_of_jobs(seen: list[str]) -> list[str]:
    return [q for q in seen if "FROM jobs" in q or "FROM nodes" in q]


def row_of(s: Services, job_id: str) -> Any:
    row = s.store.job(job_id)
    assert row is not None
    return row


def reason(s: Services, job_id: str) -> str:
    return str(row_of(s, job_id)["reason"])


def test_a_pass_after_nothing_changed_reads_nothing(s: Services, user: str) -> None:
    n = node(s)
    first, second = submit(s, user), submit(s, user)
    assert placed(s) == {first: n}
    assert "busy" in reason(s, second)
    with statements(s) as seen:
        assert placed(s) == {}
    assert reads_of_jobs(seen) == []  # neither the queue nor the fleet was read again


def test_a_job_that_arrives_is_placed_by_the_next_pass(s: Services, user: str) -> None:
    n = node(s, slots=2)
    first = submit(s, user)
    assert placed(s) == {first: n}
    assert placed(s) == {}
    second = submit(s, user)
    assert placed(s) == {second: n}  # the quiet mark moved with the new row


def test_a_node_that_frees_up_takes_the_waiting_job(s: Services, user: str) -> None:
    n = node(s)
    first, second = submit(s, user), submit(s, user)
    assert placed(s) == {first: n}
    assert placed(s) == {}
    node_row = s.store.node(n)
    assert node_row is not None
    secret = node_row["secret"]
    result = protocol.result(n, secret, first, 1, {
        "status": "completed", "exit_code": 0, "stdout": b"", "returns": [1], "error": None,
        "wall_ms": 10, "cpu_ms": 10})  # fmt: skip
    assert s.jobs.on_result(n, result) == "settled"
    assert placed(s) == {second: n}


def test_a_heartbeat_that_changes_the_offer_wakes_the_pass(s: Services, user: str) -> None:
    n = node(s, cpu=1)
    job = submit(s, user, cpu=2)
    assert placed(s) == {}
    assert reason(s, job) == "no online node offers 2 CPUs"
    # The same offer again, another load: nothing a plan reads changed.
    beat(s, n, 2, cpu=1, load=0.7)
    with statements(s) as seen:
        assert placed(s) == {}
    assert reads_of_jobs(seen) == []
    beat(s, n, 3, cpu=4)  # its owner offers more now
    assert placed(s) == {job: n}


def test_another_process_writing_the_store_is_seen(s: Services, user: str) -> None:
    n = node(s, cpu=1)
    job = submit(s, user, cpu=2)
    assert placed(s) == {}
    assert placed(s) == {}
    # Another process (a tool, a replica) gives the node more CPUs in its row.
    script = (
        "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]);"
        ' c.execute("UPDATE nodes SET resources = ? WHERE id = ?",'
        """ ('{"cpu": 4, "memory_mb": 512, "gpu": 0}', sys.argv[2])); c.commit()"""
    )
    subprocess.run([sys.executable, "-c", script, s.db.path, n], check=True, timeout=30)
    assert placed(s) == {job: n}


def test_a_big_plan_is_committed_a_slice_a_pass(s: Services, user: str) -> None:
    nodes = [node(s, f"n{i}") for i in range(5)]
    jobs = [submit(s, user) for _ in range(5)]
    s.scheduler.MAX_WRITES = 2
    got = placed(s)
    assert len(got) == 2 and s.scheduler.more
    # Before the next slice, a planned node goes away: its decision no longer holds.
    planned = [d[-1] for d in s.scheduler._pending.assign]  # type: ignore[union-attr]
    s.store.update_node(planned[0], state=protocol.OFFLINE)
    got.update(placed(s))
    got.update(placed(s))
    assert not s.scheduler.more
    assert len(got) == 4 and planned[0] not in got.values()
    # In doubt, the next pass plans again from the store: the job left waits, with a reason
    # (the four other nodes are busy now).
    assert placed(s) == {}
    left = next(j for j in jobs if j not in got)
    assert "busy" in reason(s, left)
    assert sorted(got.values()) == sorted(set(nodes) - {planned[0]})


async def test_a_long_plan_is_made_off_the_loop(s: Services, user: str) -> None:
    n = node(s, slots=3)
    first = submit(s, user)
    s.scheduler.last_plan_s = 1.0  # as if the last plan had been long
    ready = asyncio.Event()
    assert placed(s, wake=ready.set) == {}  # planning in a thread; the loop goes on
    second = submit(s, user)  # arrives while the plan is being made
    await asyncio.wait_for(ready.wait(), 30)
    got = placed(s, wake=ready.set)
    if second not in got:  # made from a snapshot without it: the next plan sees it
        ready.clear()
        assert placed(s, wake=ready.set) == {}
        await asyncio.wait_for(ready.wait(), 30)
        got.update(placed(s, wake=ready.set))
    assert got == {first: n, second: n}


async def test_a_plan_from_a_snapshot_never_overfills_a_node(s: Services, user: str) -> None:
    n = node(s, slots=1)
    first = submit(s, user)
    s.scheduler.last_plan_s = 1.0
    ready = asyncio.Event()
    assert placed(s, wake=ready.set) == {}
    await asyncio.wait_for(ready.wait(), 30)
    # Meanwhile the node got a job by another way (another hub replica's pass, say).
    other = submit(s, user)
    with s.db.transaction():
        assert s.jobs.assign(row_of(s, other), n) is not None
    assert placed(s, wake=ready.set) == {}  # the planned decision no longer fits: not written
    assert row_of(s, first)["state"] == "queued"


async def test_a_job_arriving_during_a_long_commit_gets_a_fresh_plan(
    s: Services, user: str
) -> None:
    for i in range(3):
        node(s, f"n{i}")
    normal = [submit(s, user) for _ in range(3)]
    s.scheduler.MAX_WRITES = 1
    s.scheduler.last_plan_s = 1.0
    ready = asyncio.Event()
    assert placed(s, wake=ready.set) == {}
    await asyncio.wait_for(ready.wait(), 30)
    got = placed(s, wake=ready.set)  # the first slice of the plan
    assert list(got) == [normal[0]] and s.scheduler.more
    urgent = submit(s, user, priority="high")
    s.scheduler.REPLAN_S = 0.0  # as if the plan had been committed for a while
    ready.clear()
    got.update(placed(s, wake=ready.set))  # a slice, and a fresh plan begun off the loop
    await asyncio.wait_for(ready.wait(), 30)
    while s.scheduler.more:
        got.update(placed(s, wake=ready.set))
    assert urgent in got  # ahead of the last normal job, which the old plan had placed
    assert len(got) == 3 and len(set(got.values())) == 3


def test_forget_reads_the_store_again(s: Services, user: str) -> None:
    node(s)
    submit(s, user)
    placed(s)
    s.scheduler.forget()  # e.g. this replica leads again
    with statements(s) as seen:
        placed(s)
    assert reads_of_jobs(seen)

"""After light changes only (jobs that arrive, start and end; a node that goes idle or busy), a
pass plans from the head of the queue, a page at a time until no idle node has a slot left,
and says why each job that arrived meanwhile waits; anything else (an offer that moves, a node
gone, REBUILD_S) makes the next plan a whole one. Real SQLite, real messages through the
bridge's `handle`; the statements a pass runs are counted with SQLite's trace hook.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from edge.core import protocol
from hub.api.services import Services
from hub.market.spec import JobSpec
from tests.hub import test_scheduler_incremental as incremental
from tests.hub.test_scheduler_incremental import (
    beat,
    handle,
    node,
    placed,
    reason,
    statements,
    submit,
)

s, user = incremental.s, incremental.user  # its fixtures: a hub's services, a submitter


def whole_reads(seen: list[str]) -> list[str]:
    """The reads of the whole queue (no LIMIT) among statements."""
    return [
        q
        for q in seen
        if "FROM jobs WHERE state = 'queued'" in q and "LIMIT" not in q and " id IN (" not in q
    ]


def head_reads(seen: list[str]) -> list[str]:
    return [q for q in seen if "FROM jobs WHERE state = 'queued'" in q and "LIMIT" in q]


def drain(s: Services) -> dict[str, str]:
    """Passes until the plan is all written (MAX_WRITES rows a pass): what they placed."""
    out = placed(s)
    while s.scheduler.more:
        out.update(placed(s))
    return out


def finish(s: Services, node_id: str, job_id: str) -> None:
    row = s.store.node(node_id)
    assert row is not None
    result = protocol.result(node_id, row["secret"], job_id, 1, {
        "status": "completed", "exit_code": 0, "stdout": b"", "returns": [1], "error": None,
        "wall_ms": 10, "cpu_ms": 10})  # fmt: skip
    assert s.jobs.on_result(node_id, result) == "settled"


def big(s: Services, user: str, mb: int) -> str:
    spec = {
        "engine": {"type": "wasm", "module": "example:fib", "entrypoint": "fib"},
        "timeout": 10,
        "resources": {"cpu": 1, "memory_mb": mb},
    }
    return str(s.jobs.submit(user, msgspec.convert(spec, JobSpec))["id"])


def test_a_freed_node_takes_the_next_job_from_a_page_of_the_queue(s: Any, user: str) -> None:
    n = node(s)
    jobs = [submit(s, user) for _ in range(300)]
    assert drain(s) == {jobs[0]: n}  # a whole plan: everything else is told why it waits
    finish(s, n, jobs[0])  # light: a job ended
    with statements(s) as seen:
        assert placed(s) == {jobs[1]: n}
    assert whole_reads(seen) == [] and len(head_reads(seen)) == 1  # one page of 64, not 299
    high = submit(s, user, priority="high")
    finish(s, n, jobs[1])
    assert placed(s) == {high: n}  # the head is the head: high priority first


def test_a_job_that_arrives_behind_a_full_fleet_is_told_why_it_waits(s: Any, user: str) -> None:
    n = node(s)
    jobs = [submit(s, user) for _ in range(200)]
    assert drain(s) == {jobs[0]: n}
    fits, never = submit(s, user), big(s, user, 65536)  # light: they arrived, far back
    with statements(s) as seen:
        assert placed(s) == {}
    assert whole_reads(seen) == []
    assert "busy" in reason(s, fits)
    assert reason(s, never) == "no online node offers 65536 MB of RAM"


def test_a_heartbeat_that_frees_a_node_is_light_one_that_moves_its_offer_is_not(
    s: Any, user: str
) -> None:
    n = node(s)
    first, second = submit(s, user), submit(s, user)
    assert placed(s) == {first: n}
    busy = protocol.heartbeat(n, 2, protocol.BUSY, {"cpu": 2, "memory_mb": 512, "gpu": 0,
                                                    "load": 0}, [first])  # fmt: skip
    assert handle(s, n, protocol.HEARTBEAT, busy) == "heartbeat"
    with statements(s) as seen:
        assert placed(s) == {}
    assert whole_reads(seen) == []  # idle -> busy, the same offer: the head only
    finish(s, n, first)
    beat(s, n, 3, cpu=2)  # idle again, the same offer
    with statements(s) as seen:
        assert placed(s) == {second: n}
    assert whole_reads(seen) == []
    beat(s, n, 4, cpu=4)  # it offers more: what jobs may run where changed
    with statements(s) as seen:
        placed(s)
    assert len(whole_reads(seen)) == 1


def test_a_node_going_offline_or_time_makes_the_next_plan_a_whole_one(
    s: Any, user: str, monkeypatch: Any
) -> None:
    n, other = node(s, "a"), node(s, "b")
    jobs = [submit(s, user) for _ in range(5)]
    first = placed(s)
    assert set(first) == set(jobs[:2]) and set(first.values()) == {n, other}
    on_n = next(j for j, at in first.items() if at == n)
    on_other = next(j for j, at in first.items() if at == other)
    assert placed(s) == {}
    s.scheduler.node_offline(other, "its connection dropped")  # not light: a node is gone
    with statements(s) as seen:
        assert placed(s) == {}
    assert len(whole_reads(seen)) == 1
    assert s.store.job(on_other)["state"] == "queued"  # back in the queue, first in line
    finish(s, n, on_n)  # light, but the last whole plan is now older than REBUILD_S
    later = time.monotonic() + s.scheduler.REBUILD_S + 1
    monkeypatch.setattr("hub.market.scheduler.time.monotonic", lambda: later)
    with statements(s) as seen:
        assert placed(s) == {on_other: n}
    assert len(whole_reads(seen)) == 1


def test_once_a_head_plan_took_long_light_changes_get_whole_plans(s: Any, user: str) -> None:
    n = node(s)
    jobs = [submit(s, user) for _ in range(3)]
    assert drain(s) == {jobs[0]: n}
    s.scheduler.head_plan_s = s.scheduler.OFFLOAD_S  # as a fleet of many thousands makes it
    finish(s, n, jobs[0])  # light
    with statements(s) as seen:
        assert placed(s) == {jobs[1]: n}
    assert len(whole_reads(seen)) == 1 and head_reads(seen) == []  # (off the loop, given wake)
    assert s.scheduler.head_plan_s == 0.0  # the whole plan was quick: heads are again
    finish(s, n, jobs[1])
    with statements(s) as seen:
        assert placed(s) == {jobs[2]: n}
    assert whole_reads(seen) == [] and len(head_reads(seen)) == 1

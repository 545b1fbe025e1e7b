"""Leadership among hub replicas on one real PostgreSQL server (hub/cluster/leader.py): one
leads at a time, another takes over when its connection dies, and the replicas' notes (pass
requests, dashboard changes) cross between them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import psycopg

from deparrow.pgserver import LocalPostgres
from hub.cluster.leader import Leadership, PgLeadership, leadership_for


async def until(cond: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def replica(url: str) -> tuple[PgLeadership, dict[str, list[Any]]]:
    seen: dict[str, list[Any]] = {"lead": [], "pass": [], "change": []}
    lead = PgLeadership(url, retry_s=0.2)
    lead.on_lead = lambda: seen["lead"].append(time.monotonic())
    lead.on_pass = lambda: seen["pass"].append(1)
    lead.on_change = lambda kind, data: seen["change"].append((kind, data))
    return lead, seen


async def test_one_replica_leads_and_another_takes_over_when_it_dies(
    postgres_server: LocalPostgres,
) -> None:
    url = postgres_server.create_database("leader1")
    a, seen_a = replica(url)
    b, seen_b = replica(url)
    await a.start()
    await until(lambda: a.leading)
    await b.start()
    for _ in range(3):  # b keeps trying and keeps failing while a lives
        tries = len(seen_b["lead"])
        await asyncio.sleep(0.25)
        assert not b.leading and len(seen_b["lead"]) == tries
    assert seen_a["lead"] and not seen_b["lead"]

    # The leader's lock connection dies (as when its process is killed): b takes over.
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted"
        )
    died = time.monotonic()
    await until(lambda: b.leading)
    print(f"takeover {time.monotonic() - died:.2f} s after the leader's connection died")
    await until(lambda: not a.leading)
    assert seen_b["lead"] and len(seen_a["lead"]) == 1
    await a.stop()
    await b.stop()


async def test_pass_requests_reach_the_leader_and_changes_reach_the_others(
    postgres_server: LocalPostgres,
) -> None:
    url = postgres_server.create_database("leader2")
    a, seen_a = replica(url)
    await a.start()
    await until(lambda: a.leading)
    b, seen_b = replica(url)
    await b.start()
    await asyncio.sleep(0.3)
    assert not b.leading
    b.request_pass()
    b.request_pass()  # asked twice before it went out: one note
    await until(lambda: len(seen_a["pass"]) >= 1)
    b.share("job", {"id": "j1", "state": "queued"})
    b.share("beat", {"id": "n1", "t": 1.0})
    await until(lambda: len(seen_a["change"]) == 2)
    assert seen_a["change"] == [("job", {"id": "j1", "state": "queued"}),
                                ("beat", {"id": "n1", "t": 1.0})]  # fmt: skip
    assert seen_b["change"] == []  # a replica does not hear its own changes back
    a.request_pass()  # the leader asking itself is a no-op for the others
    await asyncio.sleep(0.3)
    assert seen_b["pass"] == []
    await a.stop()
    await b.stop()


def test_a_hub_on_sqlite_always_leads(tmp_path: Any) -> None:
    lead = leadership_for(tmp_path / "hub.sqlite")
    assert type(lead) is Leadership and lead.leading
    assert isinstance(leadership_for("postgresql://x@127.0.0.1/db"), PgLeadership)

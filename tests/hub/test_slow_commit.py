"""A slow disk does not stall the hub: a group commit's COMMIT (its fsync) runs off the event
loop, and the loop goes on answering reads meanwhile, from the last durable state.

The real app factory, a real SQLite file and a real Mosquitto. The slow disk is a deliberate
delay injected into the COMMIT: it waits until the test releases it, so what the test shows is
an order of events (a GET answered while the COMMIT has not ended), never a timing.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from edge.core import protocol
from tests.hub.conftest import login, new_user

FIB = {"engine": {"type": "wasm", "module": "example:fib", "entrypoint": "fib"}, "timeout": 10}


async def eventually(what: str, check: Callable[[], bool], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


class SlowDisk:
    """Holds every COMMIT the commit thread runs until released; records what happened when."""

    def __init__(self, db: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.events: list[str] = []
        real = db._finish_outer

        def finish_outer(statement: str) -> None:
            if statement == "COMMIT" and threading.current_thread().name.startswith(
                "sqlite-commit"
            ):
                self.events.append("commit started")
                self.started.set()
                assert self.release.wait(30), "the test never released the COMMIT"
                real(statement)
                self.events.append("commit done")
            else:
                real(statement)

        monkeypatch.setattr(db, "_finish_outer", finish_outer)

    async def wait_started(self) -> None:
        await eventually("a COMMIT in the commit thread", self.started.is_set)


@pytest.fixture
def slow_disk(api: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[SlowDisk]:
    disk = SlowDisk(api.services.db, monkeypatch)
    yield disk
    disk.release.set()  # never leave the hub's commit thread waiting


async def test_a_read_is_answered_while_a_commit_is_on_its_way_to_disk(
    api: Any, slow_disk: SlowDisk
) -> None:
    _, alice = await new_user(api, "alice")
    bob_id, bob = await new_user(api, "bob")
    admin = await login(api, api.services.admin_token)
    transfer = asyncio.create_task(
        api.post(
            "/api/v1/wallet/transfer",
            json={"to": bob_id, "amount": "3"},
            headers={**alice, "Idempotency-Key": "slow-1"},
        )
    )
    await slow_disk.wait_started()

    # The COMMIT of the transfer's batch is in flight: an unrelated GET is answered now...
    r = await api.get("/api/v1/wallet", headers=bob)
    assert r.status == 200
    assert not slow_disk.release.is_set() and api.services.db.committing
    # ...from what is durable: the transfer is not there yet, and the ledger it sees is whole
    # (an audit's several queries read one snapshot).
    assert (await r.json())["balance"] == "10"
    audit = await (await api.get("/api/v1/ledger/audit", headers=admin)).json()
    assert audit["balanced"] is True
    # The transfer itself is not acknowledged before its COMMIT is durable.
    assert not transfer.done()

    slow_disk.release.set()
    r = await transfer
    assert r.status == 201, await r.text()
    assert slow_disk.events == ["commit started", "commit done"]
    assert (await (await api.get("/api/v1/wallet", headers=bob)).json())["balance"] == "13"
    assert (await (await api.get("/api/v1/wallet", headers=alice)).json())["balance"] == "7"


async def test_a_write_that_comes_during_the_commit_waits_for_it(
    api: Any, slow_disk: SlowDisk
) -> None:
    """Code that writes synchronously on the loop never lands inside (or beside) the batch
    whose COMMIT is in flight: it waits for that COMMIT, then runs."""
    _, alice = await new_user(api, "alice")
    bob_id, _ = await new_user(api, "bob")
    services = api.services
    transfer = asyncio.create_task(
        api.post(
            "/api/v1/wallet/transfer",
            json={"to": bob_id, "amount": "1"},
            headers={**alice, "Idempotency-Key": "slow-2"},
        )
    )
    await slow_disk.wait_started()
    # The loop blocks in the transaction below until the COMMIT ends; a thread releases it.
    threading.Thread(target=slow_disk.release.set, daemon=True).start()
    with services.db.transaction():
        slow_disk.events.append("direct write")
        services.ledger.open_account("wallet:slow-test", "wallet", "slow-test")
    assert slow_disk.events == ["commit started", "commit done", "direct write"]
    assert (await transfer).status == 201
    assert services.ledger.audit().balanced


async def test_the_bridge_publishes_only_after_its_commit(
    api: Any, slow_disk: SlowDisk, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bridge's own batches (when no writer runs) commit off the loop too, and what they
    decided goes out only once durable."""
    admin = await login(api, api.services.admin_token)
    body = await (await api.post("/api/v1/users", json={"name": "agent"}, headers=admin)).json()
    agent_id, token = body["id"], body["token"]
    agent = await login(api, token)
    bridge = api.services.bridge
    real_publish = bridge.client.publish

    def publish(*args: Any, **kwargs: Any) -> Any:
        slow_disk.events.append("publish")
        return real_publish(*args, **kwargs)

    monkeypatch.setattr(bridge.client, "publish", publish)
    topic = protocol.agent_topic(agent_id, protocol.SUBMIT)
    payload = protocol.encode(protocol.submit("r1", token, FIB))
    batch = asyncio.create_task(bridge.run_batch([(topic, payload)]))
    await slow_disk.wait_started()
    jobs = await (await api.get("/api/v1/jobs", headers=agent)).json()
    assert jobs["jobs"] == [] and not batch.done()  # not durable yet, so not visible
    slow_disk.release.set()
    assert await batch == ["submit accepted"]
    assert slow_disk.events[:3] == ["commit started", "commit done", "publish"]
    jobs = await (await api.get("/api/v1/jobs", headers=agent)).json()
    assert len(jobs["jobs"]) == 1

"""SIGKILL the hub while transfers and job settlements stream at it; restart it: the books
balance and every movement acknowledged before the kill is there exactly once."""

from __future__ import annotations

import contextlib
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

from deparrow.client import Client, HubError
from tests.conftest import start_hub, start_node

FIB = {"name": "fib", "engine": {"type": "wasm", "module": "example:fib", "entrypoint": "fib",
                                 "args": ["15"]}, "timeout": 5}  # fmt: skip


def test_sigkill_mid_stream_loses_no_acknowledged_movement(tmp_path: Path, mosquitto: str) -> None:
    hub = start_hub(tmp_path, mqtt_url=mosquitto)
    users = [hub.user(f"u{i}") for i in range(3)]
    _, owner = hub.user("owner")
    node = start_node(hub, owner, tmp_path, "n1")
    acked_transfers: list[tuple[Client, str, str, str]] = []
    submitted: list[str] = []
    stop = threading.Event()

    def transfers(i: int) -> None:
        (_, me), (peer, _) = users[i], users[(i + 1) % 3]
        n = 0
        while not stop.is_set():
            key = f"t{i}-{n}"
            try:
                me.transfer(peer["id"], "0.01", key)
                acked_transfers.append((me, peer["id"], "0.01", key))
            except HubError:
                pass  # not acknowledged: may or may not have happened
            n += 1

    def jobs() -> None:
        _, me = users[0]
        while not stop.is_set():
            with contextlib.suppress(HubError):
                submitted.append(me.submit(FIB)["id"])
            time.sleep(0.05)

    threads = [threading.Thread(target=transfers, args=(i,)) for i in range(3)]
    threads.append(threading.Thread(target=jobs))
    for t in threads:
        t.start()
    time.sleep(3.0)
    hub.proc.kill()  # mid-stream
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join(30)
    completed_before = {j for j in submitted if _state(users[0][1], j) == "completed"}
    assert len(acked_transfers) > 50, len(acked_transfers)

    hub2 = start_hub(tmp_path, mqtt_url=mosquitto)
    try:
        for _, c in users:
            c.hub = hub2.url
        owner.hub = hub2.url
        audit = hub2.admin.audit()
        assert audit["balanced"], audit
        # Let every job finish first, so balances then move only by what this test does.
        # Jobs that had settled stay settled, paid once; the rest finish or are refunded.
        alice = users[0][1]
        for job_id in submitted:
            job = alice.wait(job_id, timeout_s=60)
            if job_id in completed_before:
                assert job["state"] == "completed"
        # Every acknowledged transfer is there: replaying its key is a no-op replay.
        balances = {id(c): c.wallet()["balance"] for _, c in users}
        for me, to, amount, key in acked_transfers[:: max(1, len(acked_transfers) // 60)]:
            again = me.transfer(to, amount, key)
            assert again["replayed"] is True, key
        assert {id(c): c.wallet()["balance"] for _, c in users} == balances
        # Wallets hold exactly what the acknowledged history says (welcome grants + moves).
        for u, c in users:
            total, before = Decimal(0), None
            while True:  # every page of the history
                page = c.history(limit=1000, before=before)
                total += sum(Decimal(i["amount"]) for i in page["items"])
                before = page["next_before"]
                if before is None:
                    break
            assert total == Decimal(c.wallet()["balance"]), u
        costs = sum(Decimal(alice.job(j)["cost"] or 0) for j in submitted)
        earned = Decimal(owner.nodes()[0]["earned"])
        assert earned >= costs  # node earnings: job pay (plus any uptime pay)
        assert hub2.admin.audit()["balanced"]
    finally:
        node.stop()
        hub2.stop()


def _state(client: Client, job_id: str) -> Any:
    try:
        return client.job(job_id)["state"]
    except HubError:
        return None

"""SIGKILL the hub while transfers and job settlements stream at it; restart it: the books
balance and every movement acknowledged before the kill is there exactly once. And a hub
killed with its own broker is back on the same ports at once."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from deparrow.client import Client, HubError
from deparrow.localnet import Proc, free_port, wait_for
from tests.conftest import require_mosquitto, start_hub, start_node

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


def _own_hub(data_dir: Path, broker: str, port: int, broker_port: int, log: Path) -> Proc:
    """`deparrow hub` with its own broker on fixed ports (localnet.LocalHub picks free ones)."""
    cmd = [
        sys.executable, "-m", "deparrow.cli", "hub", "--port", str(port), "--data-dir",
        str(data_dir), "--heartbeat", "0.5", "--broker", broker, "--broker-port", str(broker_port),
    ]  # fmt: skip
    return Proc("hub", cmd, log)


def _serving(url: str, data_dir: Path) -> bool:
    try:
        return bool(
            (data_dir / "admin-token").exists() and Client(url).status()["broker"]["connected"]
        )
    except (HubError, OSError):
        return False


@pytest.mark.parametrize("broker", ["mosquitto", "embedded"])
def test_a_hub_killed_mid_burst_is_back_at_once_on_its_ports(tmp_path: Path, broker: str) -> None:
    """Finding 5 of issue 15: the broker's port check bound without SO_REUSEADDR, so the
    connections the dead hub's broker had closed (TIME_WAIT) kept a new hub out for ~60 s."""
    if broker == "mosquitto":
        require_mosquitto()
    data_dir, port, broker_port = tmp_path / "hub", free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    hub = _own_hub(data_dir, broker, port, broker_port, tmp_path / "hub-1.log")
    wait_for("the hub to answer", lambda: _serving(url, data_dir), 60, [hub])
    admin = Client(url, (data_dir / "admin-token").read_text().strip())
    alice = Client(url, admin.create_user("alice")["token"])
    owner = Client(url, admin.create_user("owner")["token"])
    # A node on the hub's broker: when the broker goes, it closes the node's connection and
    # leaves it in TIME_WAIT on the broker's port.
    token = owner.enrollment_token()["token"]
    node = Proc("node", [
        sys.executable, "-m", "edge.cli", "--hub", url, "--token", token, "--name", "n1",
        "--data-dir", str(tmp_path / "n1"), "--always-run", "--dashboard-port", "0",
    ], tmp_path / "n1.log")  # fmt: skip
    try:
        wait_for("the node", lambda: [n["state"] for n in owner.nodes()] == ["idle"], 60, [node])
        acked: list[str] = []
        stop = threading.Event()

        def submit(i: int) -> None:
            n = 0
            while not stop.is_set():
                with contextlib.suppress(HubError, OSError):  # not acknowledged: may or may not be
                    acked.append(alice.submit(FIB, idempotency_key=f"s{i}-{n}")["id"])
                n += 1

        threads = [threading.Thread(target=submit, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        wait_for("a burst of jobs", lambda: len(acked) >= 30, 60, [hub])
        hub.kill()  # mid-burst; the hub's broker gets SIGTERM as its parent dies
        killed = time.monotonic()
        stop.set()
        for t in threads:
            t.join(30)

        started = time.monotonic()
        hub = _own_hub(data_dir, broker, port, broker_port, tmp_path / "hub-2.log")
        wait_for("the hub to serve again", lambda: _serving(url, data_dir), 30, [hub])
        back = time.monotonic()
        took = f"serving {back - started:.1f}s after its start, {back - killed:.1f}s after the kill"
        assert back - started < 5, took
        # Nothing acknowledged is lost, the books balance, and the node comes back to the same
        # broker port and runs what was queued.
        assert admin.audit()["balanced"]
        for job_id in acked:
            assert alice.job(job_id)["id"] == job_id
        for job_id in acked[-3:]:
            assert alice.wait(job_id, timeout_s=120)["state"] == "completed"
        assert admin.audit()["balanced"]
    finally:
        node.stop()
        hub.stop()


def _state(client: Client, job_id: str) -> Any:
    try:
        return client.job(job_id)["state"]
    except HubError:
        return None

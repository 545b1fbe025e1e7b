"""Moving a hub off its SQLite file (`deparrow copy-store`, docs/scale.md): a hub that has run
jobs, paid nodes and moved credits is stopped, its store copied into a new PostgreSQL
database, and started again on it with --db: the same users, nodes, jobs and balances, a
balanced ledger, and new work goes on from there."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from deparrow.client import Client
from deparrow.localnet import LocalHub
from deparrow.pgserver import LocalPostgres
from tools.simnet import Background, Behaviour, RunTime

SPEC = {
    "name": "fib",
    "engine": {"type": "wasm", "module": "example:fib", "entrypoint": "fib", "args": ["10"]},
    "timeout": 10,
}


def copy_store(data_dir: Path, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deparrow.cli", "copy-store", "--data-dir", str(data_dir),
         "--db", url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_a_hub_moves_from_sqlite_to_postgresql(
    tmp_path: Path, mosquitto: str, postgres_server: LocalPostgres
) -> None:
    data = tmp_path / "hub"
    hub = LocalHub(data, mqtt_url=mosquitto, heartbeat_s=0.5)
    owner_user, _ = hub.user("owner")
    alice_user, alice = hub.user("alice")
    with Background(hub.url, seed=2) as sim:
        sim.start_nodes(3, [owner_user["token"]], Behaviour(speed=RunTime("5-20")))
        ids = [alice.submit(SPEC)["id"] for _ in range(12)]
        done = [alice.wait(i, timeout_s=60, poll_s=0.05) for i in ids]
        alice.transfer(owner_user["id"], "1.5", "before-the-move")
        sim.stop()
    assert {j["state"] for j in done} == {"completed"}
    before = {"alice": alice.wallet(), "audit": hub.admin.audit()}
    nodes_before = sorted(
        (n["id"], n["earned"]) for n in Client(hub.url, owner_user["token"]).nodes()
    )
    hub.stop()

    url = postgres_server.create_database("moved")
    moved = copy_store(data, url)
    assert moved.returncode == 0, moved.stderr
    assert "the ledger balances" in moved.stderr and "jobs: 12 rows" in moved.stderr
    again = copy_store(data, url)  # never over data
    assert again.returncode == 1 and "already holds data" in again.stderr

    hub = LocalHub(data, mqtt_url=mosquitto, heartbeat_s=0.5, extra=("--db", url))
    try:
        alice = Client(hub.url, alice_user["token"])
        assert alice.wallet() == before["alice"]
        assert [alice.job(i)["state"] for i in ids] == ["completed"] * 12
        owner = Client(hub.url, owner_user["token"])
        assert sorted((n["id"], n["earned"]) for n in owner.nodes()) == nodes_before
        audit = hub.admin.audit()
        assert audit["balanced"] and audit == before["audit"]
        # New entries follow the copied ones: a transfer and a job on the moved hub.
        alice.transfer(owner_user["id"], "0.5", "after-the-move")
        with Background(hub.url, seed=3) as sim:
            sim.start_nodes(1, [owner_user["token"]], Behaviour(speed=RunTime("5")))
            job = alice.wait(alice.submit(SPEC)["id"], timeout_s=60, poll_s=0.05)
        assert job["state"] == "completed"
        assert hub.admin.audit()["balanced"]
    finally:
        hub.stop()

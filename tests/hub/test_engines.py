"""Docker and native jobs on the hub: admission without a module, scheduling by engine, the
assign message, and the store migration that made jobs' module optional (real SQLite)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import msgspec
import pytest

from hub.api.services import Services
from hub.app import open_services
from hub.config import HubConfig
from hub.market.spec import JobSpec
from hub.store.db import Database
from hub.store.rows import MIGRATIONS, Store


@pytest.fixture
def services(tmp_path: Path) -> Services:
    return open_services(HubConfig(data_dir=tmp_path))


def add_node(s: Services, owner: str, engines: list[str]) -> Any:
    token, _ = s.store.create_enrollment_token(owner, 60)
    node_id, _ = s.store.create_node(
        token=token, owner=owner, name="n", engines=engines, arch="x", cpu=2, memory_mb=512,
        mqtt_password="pw",
    )  # fmt: skip
    s.store.update_node(
        node_id, state="idle", last_seen=1.0, resources='{"cpu": 2, "memory_mb": 512}'
    )
    return s.store.node(node_id)


DOCKER = {
    "engine": {
        "type": "docker",
        "image": "localhost/busybox:latest",
        "command": ["sh", "-c", "echo hi"],
        "env": {"GREETING": "hi"},
    },
    "timeout": 30,
}


def test_a_docker_job_needs_no_module_and_reaches_only_docker_nodes(services: Services) -> None:
    owner, _, _ = services.create_user("owner", "user")
    user, _, _ = services.create_user("user", "user")
    add_node(services, owner, ["wasm"])
    job = services.jobs.submit(user, msgspec.convert(DOCKER, JobSpec))
    assert job["module_sha256"] is None
    assert services.scheduler.schedule() == []  # the only node runs wasm
    row = services.store.job(job["id"])
    assert row is not None and row["reason"] == "no online node runs the docker engine"

    docker_node = add_node(services, owner, ["wasm", "docker"])
    [assignment] = services.scheduler.schedule()
    assert assignment.node_id == docker_node["id"]
    msg = assignment.message
    assert msg["engine"] == {
        "type": "docker",
        "image": "localhost/busybox:latest",
        "command": ["sh", "-c", "echo hi"],
        "env": {"GREETING": "hi"},
        "network": False,
        "pids": 256,
    }
    assert msg["module_b64"] is None and msg["module_sha256"] is None


def test_a_native_job_message(services: Services) -> None:
    user, _, _ = services.create_user("user", "user")
    spec = {"engine": {"type": "native", "command": ["true"], "network": True}}
    job = services.jobs.submit(user, msgspec.convert(spec, JobSpec))
    msg = services.jobs.assign_message(job["id"])
    assert msg["engine"] == {"type": "native", "command": ["true"], "env": {}, "network": True}


def test_migration_4_keeps_every_job(tmp_path: Path) -> None:
    path = tmp_path / "hub.sqlite"
    db = Database(path)
    db.migrate("store", MIGRATIONS[:3])  # a database from before migration 4
    with db.transaction() as c:
        c.execute(
            "INSERT INTO users (id, name, role, token_hash, created_at)"
            " VALUES ('u1', 'u', 'user', 'h', 1)"
        )
        c.execute("INSERT INTO blobs VALUES ('m', 4, x'0061736d', 1)")
        c.execute(
            "INSERT INTO jobs (id, owner, name, spec, state, priority, cpu_milli, memory_mb,"
            " timeout_s, module_sha256, hold, submitted_at, kind, periods_billed)"
            " VALUES ('j1', 'u1', 'old', '{}', 'completed', 'normal', 1000, 64, 60, 'm', 5, 2,"
            " 'service', 3)"
        )
    db.close()
    db = Database(path)
    Store(db)  # applies migration 4
    row = db.query_one("SELECT * FROM jobs WHERE id = 'j1'")
    assert row is not None
    assert (row["module_sha256"], row["kind"], row["periods_billed"], row["hold"]) == (
        "m",
        "service",
        3,
        5,
    )
    with pytest.raises(sqlite3.IntegrityError), db.transaction() as c:  # constraints came along
        c.execute("UPDATE jobs SET kind = 'other' WHERE id = 'j1'")
    indexes = {r["name"] for r in db.query("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"jobs_state", "jobs_owner", "jobs_node", "jobs_kind_state"} <= indexes
    db.close()


def test_a_gas_budget_travels_with_a_wasm_job_only(services: Services) -> None:
    from hub.market.errors import JobError

    user, _, _ = services.create_user("user", "user")
    spec = {"engine": {"type": "wasm", "module": "example:fib", "entrypoint": "fib"}, "gas": 5000}
    job = services.jobs.submit(user, msgspec.convert(spec, JobSpec))
    assert services.jobs.assign_message(job["id"])["gas"] == 5000
    plain = {"engine": {"type": "wasm", "module": "example:fib", "entrypoint": "fib"}}
    job = services.jobs.submit(user, msgspec.convert(plain, JobSpec))
    assert "gas" not in services.jobs.assign_message(job["id"])
    with pytest.raises(JobError, match="wasm jobs only"):
        services.jobs.submit(user, msgspec.convert({**DOCKER, "gas": 10}, JobSpec))

"""Two hub replicas (two apps) on one real PostgreSQL database and one real Mosquitto: what
one writes the other serves, a JWT signed by one is good at the other, one of them leads."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

import wasm_jobs
from deparrow.cli import main
from deparrow.pgserver import LocalPostgres
from hub.api.services import SERVICES, Services
from hub.app import bootstrap_admin, create_app, open_services
from hub.config import HubConfig
from hub.mqtt import logins
from hub.store.pg import TURN, PgDatabase
from tests.hub.conftest import login
from tests.hub.test_leader import until
from tests.hub.test_node_auth import enroll


async def replica(aiohttp_client: Any, data_dir: Path, url: str, mqtt: str) -> Any:
    config = HubConfig(data_dir=data_dir, db_url=url, mqtt_url=mqtt, welcome_grant_credits=10)
    app = create_app(config)
    client = await aiohttp_client(app)
    client.services = app[SERVICES]
    return client


async def test_replicas_share_users_tokens_and_one_leader(
    aiohttp_client: Any, tmp_path: Path, mosquitto: str, postgres_server: LocalPostgres
) -> None:
    url = postgres_server.create_database("replicas")
    a = await replica(aiohttp_client, tmp_path / "a", url, mosquitto)
    # b logs in to the broker with a password (as replicas do on a broker cluster)
    b = await replica(aiohttp_client, tmp_path / "b", url, mosquitto.replace("//", "//u:s3cret@"))
    # One admin for the store: made by the first replica, whose data directory has its token.
    assert a.services.admin_token and b.services.admin_token is None
    admin = await login(a, a.services.admin_token)
    r = await a.post("/api/v1/users", json={"name": "alice"}, headers=admin)
    assert r.status == 201, await r.text()
    alice = await r.json()
    # Signed in at a, served at b: the JWT key is the store's, not each data directory's.
    at_a = await login(a, alice["token"])
    r = await b.get("/api/v1/wallet", headers=at_a)
    assert r.status == 200, await r.text()
    assert (await r.json())["balance"] == "10"
    assert a.services.config.jwt_secret == b.services.config.jwt_secret
    # Blobs live in the store: a module uploaded at a runs in a job submitted at b.
    module = wasm_jobs.path("fib.wasm").read_bytes()
    r = await a.post("/api/v1/blobs", data=module, headers=at_a)
    assert r.status == 201, await r.text()
    ref = (await r.json())["ref"]
    engine = {"type": "wasm", "module": ref, "entrypoint": "fib", "args": ["1"]}
    spec = {"name": "fib", "timeout": 10, "engine": engine}
    r = await b.post("/api/v1/jobs", json=spec, headers=at_a)
    assert r.status == 201, await r.text()
    assert (await r.json())["state"] == "queued"
    status = await (await b.get("/api/v1/status")).text()
    assert "s3cret" not in status and '"connected": true' in status.replace('":true', '": true')
    assert not (tmp_path / "a" / "jwt-secret").exists()
    await until(lambda: a.services.leadership.leading != b.services.leadership.leading)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--db", "sqlite:///hub.db"], "--db takes a postgresql:// URL"),
        (["--mqtt", "mqtt://127.0.0.1:1,mqtt://127.0.0.1:2"], "give --mqtt-public-url"),
        (["--mqtt-auth-dir", "/tmp/x"], "--mqtt-auth-dir is for a broker cluster"),
    ],
)
def test_cluster_flags_that_cannot_work_are_refused(args: list[str], says: str) -> None:
    result = CliRunner().invoke(main, ["hub", *args])
    assert result.exit_code == 2 and says in result.output, result.output


def test_replicas_starting_together_on_an_empty_store_make_one_admin(
    tmp_path: Path, postgres_server: LocalPostgres
) -> None:
    url = postgres_server.create_database("admins")
    starts = [HubConfig(data_dir=tmp_path / n, db_url=url) for n in ("a", "b", "c", "d")]
    barrier = threading.Barrier(len(starts))

    def start(config: HubConfig) -> Services:
        services = open_services(config)
        barrier.wait()  # all four look for an admin at the same moment
        bootstrap_admin(services)
        return services

    with ThreadPoolExecutor(len(starts)) as pool:
        started = list(pool.map(start, starts))
    admins = [u for u in started[0].store.users() if u["role"] == "admin"]
    assert len(admins) == 1
    assert sum(s.admin_token is not None for s in started) == 1
    for s in started:
        s.db.close()


async def test_a_replica_goes_on_after_postgresql_drops_its_connections(
    aiohttp_client: Any, tmp_path: Path, mosquitto: str, postgres_server: LocalPostgres
) -> None:
    """A database restart or failover ends every session: reads and new transactions open
    a new connection; only the work in flight at that moment fails."""
    url = postgres_server.create_database("dropped")
    a = await replica(aiohttp_client, tmp_path / "a", url, mosquitto)
    admin = await login(a, a.services.admin_token)
    with psycopg.connect(url, autocommit=True) as c:
        c.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid != pg_backend_pid()"
        )
    r = await a.post("/api/v1/users", json={"name": "bob"}, headers=admin)
    assert r.status == 201, await r.text()
    r = await a.get("/api/v1/wallet", headers=await login(a, (await r.json())["token"]))
    assert r.status == 200 and (await r.json())["balance"] == "10"
    assert a.services.db._conn.reconnects >= 1
    await until(lambda: a.services.leadership.leading)  # the lock's connection came back too


async def test_on_a_broker_cluster_a_new_nodes_login_is_written_before_its_answer(
    aiohttp_client: Any, tmp_path: Path, mosquitto: str, postgres_server: LocalPostgres
) -> None:
    """--mqtt-auth-dir: the cluster's login files hold an enrolled node before the node has
    its credentials (the servers then reload them), and the hub's own login is the same
    whichever replica wrote them."""
    url = postgres_server.create_database("authdir")
    auth = tmp_path / "broker-auth"
    mqtt = mosquitto.replace("//", f"//{logins.HUB_USER}:hub-secret@")
    apps = []
    for name in ("a", "b"):
        config = HubConfig(data_dir=tmp_path / name, db_url=url, mqtt_url=mqtt,
                           mqtt_auth_dir=auth, welcome_grant_credits=10)  # fmt: skip
        app = create_app(config)
        client = await aiohttp_client(app)
        client.services = app[SERVICES]
        apps.append(client)
    a, b = apps
    first = (auth / "passwd").read_text()
    assert f"\n{logins.HUB_USER}:$7$" in first
    b.services.sync_broker()
    assert (auth / "passwd").read_text() == first  # b writes exactly what a wrote
    admin = await login(a, a.services.admin_token)
    creds = await enroll(b, admin, "n1")  # at the other replica
    written = (auth / "passwd").read_text()
    assert creds["node_id"] + ":$7$" in written
    assert creds["node_id"] in (auth / "acl").read_text()


async def test_a_group_commit_waits_for_another_replicas_turn_with_its_loop_free(
    postgres_server: LocalPostgres,
) -> None:
    """While another replica's group commit has the turn, this replica's write_batch waits
    without blocking its event loop (HTTP and MQTT go on), then commits."""
    url = postgres_server.create_database("turns")
    db = PgDatabase(url)
    db.migrate("t", [(1, "t", "CREATE TABLE t (k TEXT PRIMARY KEY)")])
    other = psycopg.connect(url, autocommit=True)  # the other replica, mid-batch
    other.execute("SELECT pg_advisory_lock(%s)", (TURN,))
    ticks = 0

    async def loop_runs() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    async def batch() -> None:
        async with db.write_batch() as c:
            c.execute("INSERT INTO t (k) VALUES ('mine')")

    ticker = asyncio.create_task(loop_runs())
    writing = asyncio.create_task(batch())
    await until(lambda: ticks >= 20)  # the loop runs while the batch waits its turn
    assert not writing.done() and db.query("SELECT k FROM t") == []
    other.execute("SELECT pg_advisory_unlock(%s)", (TURN,))
    await asyncio.wait_for(writing, 10)
    assert [r["k"] for r in db.query("SELECT k FROM t")] == ["mine"]
    ticker.cancel()
    other.close()
    db.close()

"""The CLI and the SDK with a bootstrap URL, against two real hub processes sharing one real
PostgreSQL database (`deparrow hub --db postgresql://...`): they use the best replica, and
when it dies they go on through the other; what is not safe to send twice is never sent
twice. Plus the rules of what may be sent again (deparrow/bootstrap.py)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import pytest

from deparrow import Agent, DeparrowError
from deparrow.bootstrap import MAYBE_DONE, NOT_SENT, failure, resendable
from deparrow.client import Client, HubError
from deparrow.localnet import LocalHub, wait_for
from deparrow.pgserver import LocalPostgres
from hub.cluster.registry import Registry
from hub.store.db import open_database
from tests.conftest import require_mosquitto

FIB = {"engine": {"type": "wasm", "module": "example:fib", "entrypoint": "fib", "args": ["20"]},
       "timeout": 10}  # fmt: skip


class Pair:
    def __init__(self, db: str, eu: LocalHub, us: LocalHub) -> None:
        self.db, self.eu, self.us = db, eu, us


@pytest.fixture
def pair(tmp_path: Path, postgres_server: LocalPostgres) -> Iterator[Pair]:
    """Replica "eu" and replica "us" of one hub: one database, a broker each."""
    require_mosquitto()
    db = postgres_server.create_database(f"bootstrap_{os.getpid()}_{tmp_path.name}"[:60])

    def replica(name: str) -> LocalHub:
        return LocalHub(tmp_path / name, broker="mosquitto", heartbeat_s=1.0,
                        extra=["--db", db, "--region", name])  # fmt: skip

    eu = replica("eu")
    # The admin was made by the first replica; the second finds it in the database and reads
    # its token from its own data directory, as an operator copies it there.
    (tmp_path / "us").mkdir()
    shutil.copy(tmp_path / "eu" / "admin-token", tmp_path / "us" / "admin-token")
    try:
        us = replica("us")
    except BaseException:
        eu.stop()
        raise
    yield Pair(db, eu, us)
    for h in (eu, us):
        h.stop()


def cli(*args: str, token: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEPARROW_TOKEN": token}
    env.pop("DEPARROW_HUB", None)
    return subprocess.run([sys.executable, "-m", "deparrow.cli", *args], capture_output=True,
                          text=True, timeout=60, env=env)  # fmt: skip


def test_bootstrap_lists_both_replicas_region_first(pair: Pair) -> None:
    listed = Client(pair.us.url).request("GET", "/api/v1/bootstrap?region=eu", auth=False)
    assert [(r["url"], r["region"]) for r in listed["replicas"]] == [
        (pair.eu.url, "eu"), (pair.us.url, "us")
    ]  # fmt: skip
    assert len(listed["brokers"]) == 2 and listed["brokers"][0]["region"] == "eu"


def test_cli_goes_on_through_the_other_replica(pair: Pair) -> None:
    user, _ = pair.eu.user("carol")
    ok = cli("--bootstrap", pair.us.url, "--region", "eu", "wallet", "--json",
             token=user["token"])  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["balance"] == "100"
    pair.eu.proc.kill()  # no goodbye: its row stays listed (first, for region eu) a while
    run = cli("--bootstrap", f"{pair.eu.url},{pair.us.url}", "--region", "eu",
              "job", "run", "example:fib", "--invoke", "fib", "--json", "--", "20",
              token=user["token"])  # fmt: skip
    assert run.returncode == 0, run.stderr
    job = json.loads(run.stdout)
    mine = Client(pair.us.url, user["token"]).jobs()
    assert [j["id"] for j in mine] == [job["id"]]  # one job, one hold
    # With no replica left, the error says so.
    pair.us.proc.kill()
    gone = cli("--bootstrap", pair.us.url, "wallet", token=user["token"])
    assert gone.returncode == 1
    assert "no replica answered with the hub's replica list" in gone.stderr


def test_sdk_agent_and_client_go_on_through_the_other_replica(pair: Pair) -> None:
    user, _ = pair.eu.user("dave")
    other, _ = pair.eu.user("erin")
    agent = Agent(None, user["token"], bootstrap=pair.us.url, region="eu")
    client = Client(token=user["token"], bootstrap=pair.us.url, region="eu")
    assert agent.wallet().balance == 100 and agent.hub == pair.eu.url
    assert client.wallet()["balance"] == "100" and client.hub == pair.eu.url
    pair.eu.proc.kill()
    job_id = agent.submit_job(FIB, key="s-1")  # on us (eu's JWT is good there: one key)
    assert agent.hub == pair.us.url
    assert agent.submit_job(FIB, key="s-1") == job_id  # the same key: the same job
    assert client.job(job_id)["id"] == job_id and client.hub == pair.us.url
    assert [j["id"] for j in client.jobs()] == [job_id]
    held = client.wallet()
    assert held["held"] == client.job(job_id)["hold"]  # held once
    sent = agent.transfer(other["id"], "1", key="t-1")
    assert agent.transfer(other["id"], "1", key="t-1")["entry"] == sent["entry"]
    assert Client(pair.us.url, other["token"]).wallet()["balance"] == "101"  # moved once


def test_sdk_agent_mqtt_moves_to_the_broker_of_the_other_replica(pair: Pair) -> None:
    user, _ = pair.eu.user("gina")
    agent = Agent(None, user["token"], bootstrap=pair.us.url, region="eu")
    agent.broker_window_s = 1.0
    eu_broker, us_broker = (b["url"] for b in Client(pair.us.url).request(
        "GET", "/api/v1/bootstrap?region=eu", auth=False)["brokers"])  # fmt: skip
    serving = threading.Thread(target=agent.serve, daemon=True)
    serving.start()
    try:
        wait_for("the agent on eu's broker", lambda: agent.broker == eu_broker, 30)
        first = agent.submit_job(FIB, via="mqtt", key="m-1")  # handled by eu
        pair.eu.proc.kill()  # the replica and its broker
        # us's broker learns the agent's login from the shared store within its resync.
        wait_for("the agent on us's broker", lambda: agent.broker == us_broker
                 and agent._mqtt is not None and agent._mqtt.is_connected(), 60)  # fmt: skip
        assert agent.submit_job(FIB, via="mqtt", key="m-1") == first  # the same job
        second = agent.submit_job(FIB, via="mqtt", key="m-2")
        mine = Client(pair.us.url, user["token"]).jobs()
        assert sorted(j["id"] for j in mine) == sorted([first, second])
    finally:
        agent.stop()
        serving.join(10)


class Hole:
    """A "replica" that takes each connection and closes it without an answer: whatever was
    sent may or may not have been done, as far as a client can tell."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.recv(65536)
            self.accepted += 1
            conn.close()


def test_only_what_is_safe_is_sent_again_after_a_replica_fails_mid_request(pair: Pair) -> None:
    user, _ = pair.eu.user("frank")
    hole = Hole()
    registry = Registry(open_database(pair.db))
    registry.beat("r_hole", url=hole.url, region="aa", interval_s=60)
    # A submission carries an Idempotency-Key: after the hole, sent to the next replica.
    client = Client(token=user["token"], bootstrap=pair.us.url, region="aa")
    assert client.hub == hole.url
    job = client.submit(FIB)
    assert client.hub != hole.url and hole.accepted >= 1
    assert [j["id"] for j in client.jobs()] == [job["id"]]
    # An enrollment is not safe to repeat: the error says so and it is not sent elsewhere.
    before = hole.accepted
    blind = Client(bootstrap=pair.us.url, region="aa")
    with pytest.raises(HubError, match="may or may not have been done") as refused:
        blind.request("POST", "/api/v1/nodes/enroll", {"token": "dpe_x", "cpu": 1,
                      "memory_mb": 64}, auth=False)  # fmt: skip
    assert refused.value.failover == MAYBE_DONE
    assert blind.hub == hole.url and hole.accepted == before + 1
    agent = Agent(None, user["token"], bootstrap=pair.us.url, region="aa")
    agent._tls.hub = hole.url  # as if the JWT came from the hole's replica
    agent._jwt, agent._jwt_exp = "x.y.z", 2**40
    with pytest.raises(DeparrowError, match="may or may not have been done"):
        agent.request("POST", "/api/v1/agents", {"name": "twice?", "fund": "1"})
    registry.remove("r_hole")
    registry.db.close()


def test_what_may_be_sent_again() -> None:
    assert resendable("GET", "/api/v1/jobs/j_1")
    assert resendable("DELETE", "/api/v1/nodes/n_1")
    assert resendable("POST", "/api/v1/jobs", {"Idempotency-Key": "k"})
    assert resendable("POST", "/api/v1/auth/token")
    assert resendable("POST", "/api/v1/blobs")
    assert resendable("POST", "/api/v1/jobs/j_1/cancel")
    assert not resendable("POST", "/api/v1/jobs")
    assert not resendable("POST", "/api/v1/agents")
    assert not resendable("POST", "/api/v1/nodes/enroll")
    assert not resendable("POST", "/api/v1/jobs/j_1/cancel/x")
    refused = urllib.error.URLError(ConnectionRefusedError(111, "refused"))
    assert failure(refused) == NOT_SENT
    assert failure(urllib.error.URLError(ConnectionResetError())) == MAYBE_DONE
    assert failure(TimeoutError()) == MAYBE_DONE
    for code, kind in ((502, MAYBE_DONE), (503, MAYBE_DONE), (404, None), (500, None)):
        assert failure(urllib.error.HTTPError("http://x", code, "", {}, None)) == kind  # type: ignore[arg-type]

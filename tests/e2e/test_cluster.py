"""The whole cluster on this machine (issue 18): one real PostgreSQL, three Mosquitto servers,
three hub replicas on them (one leads: it schedules and ticks), twenty simulated nodes and one
real edge-run node, all on the real protocol. Mid-stream, the leading replica and one broker
server are SIGKILLed. Every job still completes or is refunded, each is paid once, the ledger
balances, and the time the cluster took to recover is printed. The servers take only the
logins the replicas write from the store."""

from __future__ import annotations

import secrets
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from deparrow.brokercluster import LocalBrokerCluster
from deparrow.client import Client, HubError
from deparrow.localnet import LocalHub, wait_for
from deparrow.pgserver import LocalPostgres
from hub.mqtt import logins
from tools.simnet import Background, Behaviour, RunTime

SPEC = {
    "name": "fib",
    "engine": {"type": "wasm", "module": "example:fib", "entrypoint": "fib", "args": ["20"]},
    "timeout": 5,
}
JOBS_BEFORE, JOBS_AFTER = 40, 40


def leading(hub: LocalHub) -> bool:
    try:
        return bool(Client(hub.url).request("GET", "/readyz", auth=False).get("leading"))
    except (HubError, OSError):
        return False


def the_leader(hubs: list[LocalHub]) -> LocalHub | None:
    leaders = [h for h in hubs if h.proc.alive() and leading(h)]
    return leaders[0] if len(leaders) == 1 else None


def test_the_cluster_survives_its_leader_and_a_broker_server(
    tmp_path: Path, postgres_server: LocalPostgres
) -> None:
    url = postgres_server.create_database("cluster")
    # Per-node logins on the cluster: the replicas write the servers' login files from the
    # store (--mqtt-auth-dir), and the servers reload them when they change.
    brokers = LocalBrokerCluster(tmp_path / "brokers", 3, auth=True)
    password = secrets.token_urlsafe(24)
    hub_login = logins.hub_account(logins.cluster_hub_hash(password))
    logins.AuthFiles(brokers.auth_dir).write([hub_login])  # until the first replica writes
    with brokers:
        brokers.follow_logins()
        hub_mqtt = brokers.hub_url_list(logins.HUB_USER, password)
        shared = ("--db", url, "--mqtt-share", "hubs", "--mqtt-public-url", ",".join(brokers.urls),
                  "--mqtt-auth-dir", str(brokers.auth_dir), "--result-grace", "3")  # fmt: skip
        hubs = [LocalHub(tmp_path / "a", mqtt_url=hub_mqtt, heartbeat_s=0.5,
                         extra=shared, log_path=tmp_path / "hub-a.log")]  # fmt: skip
        for name in ("b", "c"):  # the admin was made by the first; its token file is shared
            (tmp_path / name).mkdir()
            shutil.copy(tmp_path / "a" / "admin-token", tmp_path / name / "admin-token")
            hubs.append(LocalHub(tmp_path / name, mqtt_url=hub_mqtt,
                                 heartbeat_s=0.5, extra=shared,
                                 log_path=tmp_path / f"hub-{name}.log"))  # fmt: skip
        sim: Background | None = None
        real = None
        try:
            leader = wait_for("one replica to lead", lambda: the_leader(hubs), 30)
            owner_user, owner = hubs[0].user("owner")
            alice_user, _ = hubs[1].user("alice")
            sim = Background(hubs[0].url, seed=7)
            sim.start_nodes(20, [owner_user["token"]], Behaviour(speed=RunTime("50-300")))
            real = hubs[2].start_node(owner, tmp_path / "real", "real-node")
            real_id = next(n["id"] for n in owner.nodes() if n["name"] == "real-node")
            clients = [Client(h.url, alice_user["token"]) for h in hubs]
            ids = [clients[i % 3].submit(SPEC)["id"] for i in range(JOBS_BEFORE)]

            # The crash: the leading replica and the first broker server, at once, mid-stream.
            killed = time.monotonic()
            leader.proc.kill()
            brokers.kill(0)
            survivors = [h for h in hubs if h is not leader]
            wait_for("another replica to lead", lambda: the_leader(survivors), 30)
            took_lead = time.monotonic() - killed
            alive = [Client(h.url, alice_user["token"]) for h in survivors]
            later = [alive[i % 2].submit(SPEC)["id"] for i in range(JOBS_AFTER)]
            first_done = wait_for(
                "a job submitted after the crash to complete",
                lambda: any(alive[0].job(i)["state"] == "completed" for i in later),
                60,
            )
            recovered = time.monotonic() - killed
            jobs = [alive[0].wait(i, timeout_s=120, poll_s=0.1) for i in ids + later]
            retried = sum(1 for j in jobs if int(j.get("attempt") or 1) > 1)
            on_real = sum(1 for j in jobs if j.get("node_name") == "real-node"
                          or j.get("node") == real_id)  # fmt: skip
            print(f"\ncluster: new leader {took_lead:.2f} s after the kill; the first job "
                  f"submitted after it completed {recovered:.2f} s after the kill; "
                  f"{sum(s == 'completed' for s in (j['state'] for j in jobs))} of {len(jobs)} "
                  f"completed, {retried} on a second attempt, {on_real} on the real node, "
                  f"{sim.stats().get('reconnects', 0)} simulated reconnects")  # fmt: skip
            assert first_done and on_real >= 1

            states = [j["state"] for j in jobs]
            assert set(states) <= {"completed", "failed"}, states
            completed = [j for j in jobs if j["state"] == "completed"]
            assert len(completed) >= JOBS_AFTER, states  # those after the crash at least
            for j in jobs:
                if j["state"] == "failed":
                    assert float(j["cost"] or 0) == 0, j  # refunded: nothing charged
            # Each job paid once: what alice paid is what the owner's nodes earned.
            paid = sum(float(j["cost"] or 0) for j in jobs)
            owner_there = Client(survivors[0].url, owner_user["token"])
            earned = sum(float(n["earned"]) for n in owner_there.nodes())
            assert paid == pytest.approx(earned) and paid > 0
            wallet = alive[0].wallet()
            assert wallet["held"] == "0"
            assert float(wallet["balance"]) == pytest.approx(100 - paid)
            admin: Any = survivors[0].admin
            assert admin.audit()["balanced"]
        finally:
            if sim is not None:
                sim.stop()
            if real is not None:
                real.stop()
            for h in hubs:
                h.stop()

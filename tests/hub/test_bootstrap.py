"""The replica registry (hub/cluster/registry.py) on a real store, moved by an injected clock,
and GET /api/v1/bootstrap on the real app: live replicas best first, stale ones dropped, a
clean stop leaving at once, a bad region refused. On SQLite and on PostgreSQL."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from hub.api.bootstrap import CLUSTER, leave
from hub.cluster.registry import FORGET_INTERVALS, Presence, Registry
from hub.store.db import open_database

pytestmark = pytest.mark.both_stores


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def registry(store: str | Path) -> Any:
    db = open_database(store)
    yield Registry(db, clock=Clock())
    db.close()


def ids(registry: Registry) -> list[str]:
    return [r.id for r in registry.live()]


def test_rows_are_listed_for_three_of_their_own_intervals(registry: Registry) -> None:
    clock: Clock = registry.clock  # type: ignore[assignment]
    registry.beat("r_a", url="http://a:8765", brokers=["mqtt://a:1883"], interval_s=5)
    registry.beat("r_b", url="http://b:8765", region="eu", interval_s=1)
    (b,) = [r for r in registry.live() if r.id == "r_b"]
    assert (b.url, b.region, b.brokers, b.seen_at) == ("http://b:8765", "eu", (), clock.now)
    clock.now += 3.0
    assert ids(registry) == ["r_a", "r_b"]  # b's third interval ends now: still listed
    clock.now += 0.01
    assert ids(registry) == ["r_a"]
    registry.beat("r_b", url="http://b:8765", region="eu", interval_s=1)  # back again
    assert ids(registry) == ["r_a", "r_b"]
    clock.now += 12.0  # a: 15.01 s since its last beat, its interval 5 s
    assert ids(registry) == []


def test_a_beat_updates_the_row_and_a_clean_stop_deletes_it(registry: Registry) -> None:
    registry.beat("r_a", url="http://a:8765", requests_per_s=9, interval_s=5)
    registry.beat("r_a", url="http://a2:8765", brokers=["mqtt://x:1", "mqtt://y:2"],
                  requests_per_s=2, lag_ms=7, interval_s=5)  # fmt: skip
    (a,) = registry.live()
    assert (a.url, a.brokers, a.requests_per_s, a.lag_ms) == (
        "http://a2:8765",
        ("mqtt://x:1", "mqtt://y:2"),
        2.0,
        7.0,
    )
    registry.remove("r_a")
    assert registry.live() == []


def test_rows_of_replicas_that_vanished_are_forgotten(registry: Registry) -> None:
    clock: Clock = registry.clock  # type: ignore[assignment]
    registry.beat("r_dead", url="http://dead:1", interval_s=1)
    clock.now += FORGET_INTERVALS - 1
    registry.beat("r_live", url="http://live:1", interval_s=1)
    assert registry.db.query_one("SELECT id FROM replicas WHERE id = 'r_dead'") is not None
    clock.now += 2
    registry.beat("r_live", url="http://live:1", interval_s=1)
    assert registry.db.query_one("SELECT id FROM replicas WHERE id = 'r_dead'") is None


def test_presence_reports_requests_per_second_and_loop_lag(registry: Registry) -> None:
    count, mono = [0.0], [50.0]
    presence = Presence(registry, url="http://me:1", brokers=["mqtt://me:2"], region="home",
                        requests=lambda: count[0], interval_s=2,
                        monotonic=lambda: mono[0])  # fmt: skip
    assert presence.id.startswith("r_")
    first = presence.tick()
    assert (first.requests_per_s, first.lag_ms) == (0.0, 0.0)  # nothing to compare with yet
    count[0], mono[0] = 30.0, 52.0
    second = presence.tick(lag_s=0.25)
    assert (second.requests_per_s, second.lag_ms, second.region) == (15.0, 250.0, "home")
    (row,) = registry.live()
    assert (row.id, row.requests_per_s, row.interval_s) == (presence.id, 15.0, 2.0)
    presence.leave()
    assert registry.live() == []


def test_presence_refuses_a_zero_interval(registry: Registry) -> None:
    with pytest.raises(ValueError, match="interval_s must be positive"):
        Presence(registry, url="http://me:1", brokers=[], interval_s=0)


# --- GET /api/v1/bootstrap ------------------------------------------------------------------
def at(api: Any, now: float) -> None:
    """Set the hub's clock (the registry reads the hub's clock)."""
    api.services.jobs.clock = lambda: now


async def test_bootstrap_lists_this_replica_from_the_start(api: Any) -> None:
    r = await api.get("/api/v1/bootstrap")  # no token: it is open
    assert r.status == 200, await r.text()
    body = await r.json()
    assert body["refresh_s"] == 5.0
    (me,) = body["replicas"]
    assert me["url"] == "http://127.0.0.1:8765" and me["region"] == ""
    assert set(me) == {"url", "region", "load", "lag_ms", "seen_at"}
    assert body["brokers"] == [{"url": api.services.mqtt_url, "region": ""}]


async def test_bootstrap_orders_by_region_then_load_and_drops_stale(api: Any) -> None:
    now = time.time()
    at(api, now)
    registry = api.app[CLUSTER].registry
    registry.beat("r_eu_busy", url="http://eu-busy:1", region="eu", requests_per_s=50,
                  brokers=["mqtt://eu:1883", "mqtt://shared:1883"])  # fmt: skip
    registry.beat("r_eu_calm", url="http://eu-calm:1", region="eu", requests_per_s=1,
                  brokers=["mqtt://eu:1883"])  # fmt: skip
    registry.beat("r_us", url="http://us:1", region="us", requests_per_s=0.5, lag_ms=3,
                  brokers=["mqtt://us:1883", "mqtt://shared:1883"])  # fmt: skip
    body = await (await api.get("/api/v1/bootstrap?region=eu")).json()
    urls = [r["url"] for r in body["replicas"]]
    assert urls == ["http://eu-calm:1", "http://eu-busy:1", "http://127.0.0.1:8765", "http://us:1"]
    assert body["brokers"] == [
        {"url": "mqtt://eu:1883", "region": "eu"},
        {"url": "mqtt://shared:1883", "region": "eu"},
        {"url": api.services.mqtt_url, "region": ""},
        {"url": "mqtt://us:1883", "region": "us"},
    ]
    # No region: the least loaded first (this replica answered nothing in its interval).
    body = await (await api.get("/api/v1/bootstrap")).json()
    urls = [r["url"] for r in body["replicas"]]
    assert urls == ["http://127.0.0.1:8765", "http://us:1", "http://eu-calm:1", "http://eu-busy:1"]
    # Fifteen seconds later only the replica that beat again is listed.
    at(api, now + 15.5)
    registry.beat("r_us", url="http://us:1", region="us", brokers=["mqtt://us:1883"])
    body = await (await api.get("/api/v1/bootstrap?region=eu")).json()
    assert [r["url"] for r in body["replicas"]] == ["http://us:1"]
    assert body["brokers"] == [{"url": "mqtt://us:1883", "region": "us"}]


@pytest.mark.parametrize("region", ["", "eu west", "x" * 65, "é", "eu\n"])
async def test_bootstrap_refuses_a_bad_region(api: Any, region: str) -> None:
    r = await api.get("/api/v1/bootstrap", params={"region": region})
    assert r.status == 400
    body = await r.json()
    assert body["field"] == "region"
    assert "region must be 1 to 64 letters, digits" in body["error"]


async def test_a_replica_that_stops_leaves_the_list_at_once(api: Any) -> None:
    me = api.app[CLUSTER].presence.id
    assert me in ids(api.app[CLUSTER].registry)
    await leave(api.app)
    assert me not in ids(api.app[CLUSTER].registry)

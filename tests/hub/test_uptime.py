"""Uptime through the bridge: real heartbeat messages, the hub's clock injected, no sleeps.

The bridge is the real one (hub/mqtt/bridge.py) over a real SQLite file; it is fed the bytes a node
publishes (edge/core/protocol.py) through `Bridge.handle`, the function its MQTT consumer calls, and
the hub's clock (`Jobs.clock`) is moved between beats. So "a day of heartbeats" is a day of
the hub's time, and each rule is checked exactly, not within loose bounds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from edge.core import protocol
from hub.api.services import Services
from hub.api.views import node_view
from hub.app import open_services
from hub.config import HubConfig
from hub.ledger import economy
from hub.market.jobs import wallet_of
from hub.market.spec import JobSpec
from hub.mqtt.bridge import Bridge
from tests.hub.conftest import db_url
from tests.hub.test_earnings import add_node, run_job

pytestmark = pytest.mark.both_stores

DAY = 86_400
T0 = 20_000 * DAY  # a UTC midnight
BEAT = 60  # seconds between heartbeats (HubConfig.heartbeat_interval_s below)


class Hub:
    def __init__(self, s: Services) -> None:
        self.s = s
        self.t = float(T0)
        s.jobs.clock = lambda: self.t
        self.bridge = Bridge("mqtt://127.0.0.1:9", s.store, s.jobs, s.scheduler)

    def beat(self, node: Any, state: str = protocol.IDLE, running: tuple[str, ...] = ()) -> str:
        msg = protocol.heartbeat(node["id"], 1, state, {"cpu": 2, "memory_mb": 512}, list(running))
        topic = protocol.node_topic(node["id"], protocol.HEARTBEAT)
        return self.bridge.handle(topic, protocol.encode(msg))

    def hello(self, node: Any) -> str:
        msg = protocol.hello(node["id"], ["wasm"], {"cpu": 2, "memory_mb": 512}, "t")
        topic = protocol.node_topic(node["id"], protocol.HELLO)
        return self.bridge.handle(topic, protocol.encode(msg))

    def beats(self, node: Any, seconds: int, state: str = protocol.IDLE) -> None:
        for _ in range(seconds // BEAT):
            self.t += BEAT
            assert self.beat(node, state) == "heartbeat"

    def earned(self, node: Any) -> int:
        return int(self.s.store.node(node["id"])["earned"])


@pytest.fixture
def hub(tmp_path: Path, store: str | Path) -> Hub:
    config = HubConfig(
        data_dir=tmp_path, db_url=db_url(store), welcome_grant_credits=10, heartbeat_interval_s=BEAT
    )
    return Hub(open_services(config))


def users(h: Hub) -> tuple[str, str]:
    owner, _, _ = h.s.create_user("owner", "user")
    carol, _, _ = h.s.create_user("carol", "user")
    return owner, carol


def test_a_node_that_always_says_busy_earns_nothing_in_a_day(hub: Hub) -> None:
    owner, _ = users(hub)
    node = add_node(hub.s, owner)
    assert hub.hello(node) == "hello"
    start = hub.s.ledger.balance(wallet_of(owner))
    hub.beats(node, DAY, protocol.BUSY)  # busy with nothing the hub gave it: not available
    assert hub.s.ledger.balance(wallet_of(owner)) == start
    assert hub.earned(node) == 0
    assert hub.s.store.node(node["id"])["uptime_ms"] == 0


def test_an_idle_node_nobody_used_earns_nothing_a_proved_one_earns_its_day(hub: Hub) -> None:
    owner, carol = users(hub)
    idle, proved = add_node(hub.s, owner), add_node(hub.s, owner)
    for n in (idle, proved):
        hub.hello(n)
    run_job(hub.s, carol, proved)  # at 00:00 of the day: proved for the day
    paid_for_job = hub.earned(proved)
    for _ in range(DAY // BEAT - 1):  # the rest of the day, both beating idle
        hub.t += BEAT
        hub.beat(idle)
        hub.beat(proved)
    assert hub.earned(idle) == 0
    view = node_view(hub.s.store.node(idle["id"]))  # what GET /api/v1/nodes shows its owner
    assert view["uptime_s"] == 0 and view["uptime_waiting_s"] == DAY - BEAT
    uptime = hub.earned(proved) - paid_for_job
    # Every beat's minute of the day, paid as it went: all of it, exactly.
    assert uptime == economy.uptime_due((DAY - BEAT) * 1000, 0)
    assert hub.s.ledger.audit().balanced


def test_silence_and_suspension_count_nothing(hub: Hub) -> None:
    owner, carol = users(hub)
    node = add_node(hub.s, owner)
    hub.hello(node)
    run_job(hub.s, carol, node)
    hub.beats(node, 3600)
    up = hub.s.store.node(node["id"])["uptime_ms"]
    assert up == 3600 * 1000
    hub.t += 3600  # an hour silent: past the offline threshold (3 missed beats)
    hub.s.scheduler.sweep(now=hub.t)
    assert hub.s.store.node(node["id"])["state"] == protocol.OFFLINE
    hub.hello(node)
    hub.beats(node, 600, "suspended")  # its owner is using it
    hub.beats(node, 300)
    # Each beat counts the time since the one before in the state that one reported: the
    # first suspended beat's minute was idle, the first idle beat's minute was suspended.
    assert hub.s.store.node(node["id"])["uptime_ms"] == up + 300 * 1000


def test_a_node_busy_with_the_hubs_job_is_available(hub: Hub) -> None:
    owner, carol = users(hub)
    node = add_node(hub.s, owner)
    hub.hello(node)
    run_job(hub.s, carol, node)  # proves it today
    other = hub.s.jobs.submit(carol, _spec())
    assert hub.s.jobs.assign(other, node["id"]) is not None
    hub.beats(node, 600, protocol.BUSY)
    assert hub.s.store.node(node["id"])["uptime_ms"] == 600 * 1000
    assert hub.s.ledger.audit().balanced


def _spec() -> JobSpec:
    engine = {"type": "wasm", "module": "example:fib", "entrypoint": "fib"}
    return msgspec.convert({"engine": engine, "timeout": 900}, JobSpec)

"""Why a job waits when the only node that could run it is suspended because its owner is
using the machine (issue 19: it read "no online node offers 1 CPUs"). The node speaks real
hello and heartbeat messages through the bridge, as edge/core/session.py sends them: a
suspended node's heartbeat offers cpu 0 and memory 0."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edge.core import protocol
from hub.api.services import Services
from hub.app import open_services
from hub.config import HubConfig
from hub.mqtt.bridge import Bridge
from tests.hub.test_earnings import add_node
from tests.hub.test_slots import announce, placed, reason, submit, users


@pytest.fixture
def s(tmp_path: Path) -> Services:
    return open_services(HubConfig(data_dir=tmp_path, welcome_grant_credits=100))


def beat(s: Services, node: Any, state: str, cpu: float, memory_mb: int, held: Any = None) -> None:
    bridge = Bridge("mqtt://127.0.0.1:9", s.store, s.jobs, s.scheduler)
    offer = {"cpu": cpu, "memory_mb": memory_mb, "gpu": 0, "load": 0}
    msg = protocol.heartbeat(node["id"], 2, state, offer, [], (), None, held)
    topic = protocol.node_topic(node["id"], protocol.HEARTBEAT)
    assert bridge.handle(topic, protocol.encode(msg)) == "heartbeat"


def test_a_job_waiting_for_a_suspended_node_says_its_owner_is_using_it(s: Services) -> None:
    owner, alice = users(s)
    node = add_node(s, owner)
    announce(s, node, cpu=2, memory_mb=512)
    beat(s, node, protocol.SUSPENDED, 0, 0)  # its owner came back to the keyboard
    job = submit(s, alice, cpu=1, memory_mb=64)
    assert placed(s) == {}
    assert reason(s, job) == (
        "every node that could run it is suspended: its owner is using the machine"
        " (it runs once the owner leaves the machine idle)"
    )
    # A job no node could run even when idle still names what is missing.
    big = submit(s, alice, cpu=16, memory_mb=64)
    assert placed(s) == {}
    assert reason(s, big) == "no online node offers 16 CPUs"
    # The owner goes away: the node is idle again and the job runs.
    beat(s, node, protocol.IDLE, 2, 512)
    assert placed(s) == {job["id"]: node["id"]}


def test_the_reason_says_when_the_soonest_suspended_node_may_take_it(s: Services) -> None:
    """A suspended node's heartbeat says why and in how many seconds it may run jobs again
    (edge/idle.py's guess); the waiting job's reason names the soonest, in the hub's time."""
    now = [1_800_000_000.0]
    s.jobs.clock = lambda: now[0]
    owner, alice = users(s)
    typing, away = add_node(s, owner), add_node(s, owner)
    for node in (typing, away):
        announce(s, node, cpu=2, memory_mb=512)
    why = "the owner used the keyboard or mouse 12 s ago (jobs run after 60 s idle)"
    beat(s, typing, protocol.SUSPENDED, 0, 0, {"why": why, "resume_in_s": 48})
    beat(s, away, protocol.SUSPENDED, 0, 0, {"why": "outside the hours 22:00-07:00 set in"
                                             " the preferences", "resume_in_s": 3600})  # fmt: skip
    now[0] += 8  # the reason counts from when the node said it
    job = submit(s, alice, cpu=1, memory_mb=64)
    assert placed(s) == {}
    assert reason(s, job) == (
        "every node that could run it is suspended: its owner is using the machine (it runs"
        " once the owner leaves the machine idle); the soonest may take it in about 40 s if"
        f" its owner stays away ({why})"
    )
    beat(s, typing, protocol.IDLE, 2, 512)  # no longer suspended: what it said is gone
    assert s.store.node(typing["id"])["suspended"] is None
    assert placed(s) == {job["id"]: typing["id"]}

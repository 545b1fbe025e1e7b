"""A node with several slots and GPUs: a real session (edge/core/session.py, paho, the wasm3
executor's worker processes) on a real Mosquitto, with an ordinary MQTT client playing the hub.

The GPUs are the node's config (what edge/gpu.py would have found), not real devices: the wasm3
executor runs the jobs and ignores them. What is tested is the node's bookkeeping: each GPU is
one job's at a time, the jobs beyond the free GPUs are turned down, the heartbeat tells what is
free, and the owner's gpu_only_when_idle stops the GPU jobs (real SIGSTOP of their workers)
while the others run on.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from edge.core import jobs as edge_jobs
from edge.core import protocol
from edge.core.session import Session
from edge.executors.wasm3 import Wasm3Executor
from edge.mqtt_paho import PahoMqtt
from tests.edge.test_cancel_attempt import Link, assignment, spin  # noqa: F401  # a fixture

GPUS = [{"index": 0, "name": "A", "uuid": "GPU-a", "memory_mb": 1024},
        {"index": 1, "name": "B", "uuid": "GPU-b", "memory_mb": 1024}]  # fmt: skip


@pytest.fixture
def node(mosquitto: str) -> Iterator[Link]:
    link = Link.__new__(Link)
    offer: dict[str, Any] = {"cpu": 4, "memory_mb": 1024, "gpu": 2, "load": 0}
    link.node_id = "n_slots0000001"
    link.hub = PahoMqtt(mosquitto)
    link.hub.connect("hub-slots", None, None, "dp/v1/test/hub-slots", b"")
    link.hub.subscribe(protocol.node_topic(link.node_id, "+"))
    link.seen = []
    link.probed = False
    link.hub.publish(protocol.node_topic(link.node_id, "probe"), b"{}", 1, False)
    link._until("the hub's subscription", lambda: link.probed)
    link.executor = Wasm3Executor(workers=3)
    config = {"node_id": link.node_id, "node_secret": "s", "heartbeat_interval_s": 0.2,
              "mqtt": {"url": mosquitto}, "slots": 3, "gpus": GPUS}  # fmt: skip
    link.session = Session(
        config, PahoMqtt(mosquitto), link.executor, lambda busy: dict(offer),
        gate=lambda: (True, "the owner is idle"),
    )  # fmt: skip
    link.offer = offer  # type: ignore[attr-defined]
    link.session.start()
    yield link
    link.close()


def with_gpu(msg: dict[str, Any], gpu: int) -> dict[str, Any]:
    return {**msg, "gpu": gpu, "cpu": 1}


def stopped(link: Link, job_id: str) -> bool:
    handle = link.session.runner.running[job_id]["handle"]
    return bool(psutil.Process(handle.pid).status() == psutil.STATUS_STOPPED)


def test_each_gpu_is_one_jobs_and_the_owner_keeps_them_while_active(
    node: Link,
    spin: bytes,  # noqa: F811  # the fixture imported above
) -> None:
    hello = node.wait_for("hello")
    assert hello["slots"] == 3 and [g["uuid"] for g in hello["gpus"]] == ["GPU-a", "GPU-b"]
    for job_id in ("j_a", "j_b"):
        node.send(protocol.ASSIGN, with_gpu(assignment(job_id, 1, spin), 1))
        node.wait_for("event", job_id=job_id, state="running")
    node.send(protocol.ASSIGN, with_gpu(assignment("j_c", 1, spin), 1))
    turned = node.wait_for("event", job_id="j_c")
    assert turned["state"] == "rejected" and turned["detail"] == "not enough free GPUs (0 of 1)"
    node.send(protocol.ASSIGN, with_gpu(assignment("j_cpu", 1, spin), 0))
    node.wait_for("event", job_id="j_cpu", state="running")
    runner = node.session.runner
    assert sorted(runner.running["j_a"]["gpus"] + runner.running["j_b"]["gpus"]) == [0, 1]
    beat = node.wait_for("heartbeat", seq=node.session.seq + 1)
    assert beat["state"] == "busy" and sorted(beat["running"]) == ["j_a", "j_b", "j_cpu"]
    assert beat["free"] == {"cpu": 1, "memory_mb": 1024 - 3 * 32, "gpu": 0, "slots": 0}

    # The owner comes back; gpu_only_when_idle: the offer has no GPU any more
    node.offer["gpu"] = 0  # type: ignore[attr-defined]
    node._until("the GPU jobs stopped", lambda: stopped(node, "j_a") and stopped(node, "j_b"))
    assert not stopped(node, "j_cpu")  # the other job runs on
    node.send(protocol.CANCEL, protocol.cancel("j_cpu", 1))
    node.wait_for("event", job_id="j_cpu", state="cancelled")
    node.send(protocol.ASSIGN, with_gpu(assignment("j_d", 1, spin), 1))
    held = node.wait_for("event", job_id="j_d")
    assert held["state"] == "rejected" and held["detail"] == edge_jobs.GPU_HELD

    node.offer["gpu"] = 2  # type: ignore[attr-defined]  # idle again: they continue
    node._until(
        "the GPU jobs running", lambda: not stopped(node, "j_a") and not stopped(node, "j_b")
    )
    for job_id in ("j_a", "j_b"):
        node.send(protocol.CANCEL, protocol.cancel(job_id, 1))
        node.wait_for("event", job_id=job_id, state="cancelled")
    node.wait_for("heartbeat", state="idle", running=[])


def test_max_jobs_is_checked_and_defaults_to_one_job_per_usable_core() -> None:
    from edge.preferences import check_preferences, slots

    check_preferences({"max_jobs": 4})
    check_preferences({"max_jobs": None})
    for bad in (0, 257, 1.5, True, "2"):
        with pytest.raises(ValueError, match="max_jobs must be a whole number from 1 to 256"):
            check_preferences({"max_jobs": bad})
    assert slots({}, 16) == 16 and slots({"max_jobs": None}, 2) == 2
    assert slots({"max_jobs": 3}, 16) == 3 and slots({}, 0) == 1


class Held:
    """The node's gate (edge/idle.py's IdleGate does the same): the owner is at the keyboard."""

    def __call__(self) -> tuple[bool, str]:
        return False, "the owner used the keyboard or mouse 12 s ago (jobs run after 60 s idle)"

    def resume_in_s(self) -> float:
        return 48.4


def test_a_suspended_node_says_why_and_when_it_may_run_jobs_again(mosquitto: str) -> None:
    link = Link.__new__(Link)
    link.node_id = "n_held00000001"
    link.hub = PahoMqtt(mosquitto)
    link.hub.connect("hub-held", None, None, "dp/v1/test/hub-held", b"")
    link.hub.subscribe(protocol.node_topic(link.node_id, "+"))
    link.seen, link.probed = [], False
    link.hub.publish(protocol.node_topic(link.node_id, "probe"), b"{}", 1, False)
    link._until("the hub's subscription", lambda: link.probed)
    link.executor = Wasm3Executor(workers=1)
    config = {"node_id": link.node_id, "node_secret": "s", "heartbeat_interval_s": 0.2,
              "mqtt": {"url": mosquitto}}  # fmt: skip
    link.session = Session(config, PahoMqtt(mosquitto), link.executor,
                           lambda busy: {"cpu": 0, "memory_mb": 0}, gate=Held())  # fmt: skip
    link.session.start()
    try:
        beat = link.wait_for("heartbeat", state="suspended")
        assert beat["suspended"] == {
            "why": "the owner used the keyboard or mouse 12 s ago (jobs run after 60 s idle)",
            "resume_in_s": 48,
        }
    finally:
        link.close()


def test_every_executor_of_a_two_slot_node_runs_two_jobs_at_once(tmp_path: Path) -> None:
    """The node's executors from its preferences (edge/preferences.py) take as many jobs at
    once as its slots: the native executor queued the second job behind the first before."""
    import time

    from edge.preferences import build_executors

    config = {"node_id": "n_two", "slots": 2, "data_dir": str(tmp_path),
              "preferences": {"native": {"enabled": True}}}  # fmt: skip
    with build_executors(config, lambda warning: None) as ex:
        jobs = [{"job_id": f"j{i}", "engine": "native", "command": ["sleep", "30"],
                 "timeout_s": 60} for i in range(2)]  # fmt: skip
        handles = [ex.submit(job) for job in jobs]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(h.proc is not None for h in handles):
            for h in handles:
                ex.poll(h)
            time.sleep(0.02)
        assert all(h.proc is not None for h in handles), handles  # both started, none queued
        for h in handles:
            ex.cancel(h)

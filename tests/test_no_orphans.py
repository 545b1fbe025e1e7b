"""A crash (SIGKILL) of the hub or of a node takes its children with it: no orphan broker
holding the port, no wasm worker spinning on after its node is gone."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import start_hub, start_node


def _gone(pids: list[int], timeout_s: float = 10) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and
                 psutil.Process(p).status() != psutil.STATUS_ZOMBIE]  # fmt: skip
        if not alive:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("broker", ["mosquitto", "embedded"])
def test_hub_sigkill_takes_its_broker(tmp_path: Path, broker: str) -> None:
    hub = start_hub(tmp_path, broker=broker)
    children = [c.pid for c in psutil.Process(hub.proc.p.pid).children()]
    assert children, "the hub should have started a broker"
    hub.proc.kill()
    assert _gone(children)
    hub2 = start_hub(tmp_path, broker=broker)  # and the next start is clean
    hub2.stop()


def test_node_sigkill_takes_its_workers(tmp_path: Path, mosquitto: str) -> None:
    hub = start_hub(tmp_path, mqtt_url=mosquitto)
    try:
        _, owner = hub.user("owner")
        _, alice = hub.user("alice")
        node = start_node(hub, owner, tmp_path, "n1")
        job = alice.submit({"engine": {"type": "wasm", "module": "example:loop"}, "timeout": 60})
        deadline = time.monotonic() + 20
        while alice.job(job["id"])["state"] != "running" and time.monotonic() < deadline:
            time.sleep(0.1)
        workers = [c.pid for c in psutil.Process(node.p.pid).children(recursive=True)]
        assert workers, "the node should have a worker running the loop"
        node.kill()
        assert _gone(workers)
    finally:
        hub.stop()

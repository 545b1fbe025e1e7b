"""What a real `edge-run` node loads on its way online (issue 20): its hello and first heartbeat
need MQTT, the session and the machine's offer; no executor engine, no node page, no
subcommand, no GPU library where there is no NVIDIA driver. The wasm executor is made at the
first job, and that job runs. Read from the node's own `python -X importtime` lines, on a real
hub and real Mosquitto; no timing is asserted (bench/edge.py measures the start)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from deparrow.localnet import LocalHub, Proc
from edge.gpu import no_nvidia_driver
from tests.conftest import start_hub, wait_until

FIB = {
    "name": "fib",
    "engine": {"type": "wasm", "module": "example:fib", "entrypoint": "fib", "args": ["20"]},
    "timeout": 30,
}
# Not before the first heartbeat: engines and their node-side machinery, the page, the
# subcommands, failover (one broker here), TLS enrollment (plain mqtt:// here).
NOT_AT_START = {
    "wasm3", "wasmtime", "docker", "edge.executors.wasm3", "edge.executors.workerproc",
    "edge.executors.wasmtime_exec", "edge.executors.docker", "edge.executors.native",
    "http.server", "edge.dashboard", "edge.earnings", "edge.cli_job", "edge.cli_files",
    "edge.cli_service", "edge.node_failover", "edge.enroll",
}  # fmt: skip


def imported(log: str) -> tuple[set[str], set[str]]:
    """(modules imported before the node's "online" line, those imported after it)."""
    before: set[str] = set()
    after: set[str] = set()
    seen = before
    for line in log.splitlines():
        if " online at " in line:
            seen = after
        elif line.startswith("import time:") and "imported package" not in line:
            seen.add(line.rsplit("|", 1)[1].strip())
    return before, after


@pytest.fixture
def hub(tmp_path: Path, mosquitto: str) -> Iterator[LocalHub]:
    h = start_hub(tmp_path, mqtt_url=mosquitto)
    yield h
    h.stop()


def test_a_node_goes_online_without_engines_and_makes_its_executor_at_the_first_job(
    hub: LocalHub, tmp_path: Path
) -> None:
    _, owner = hub.user("owner")
    _, alice = hub.user("alice")
    hub.start_node(owner, tmp_path / "n1", "n1", verbose=False).stop()  # enrolled: node.json
    wait_until("the hub to see it gone", lambda: owner.nodes()[0]["state"] == "offline", 30)

    cmd = [sys.executable, "-X", "importtime", "-m", "edge.cli", "--data-dir",
           str(tmp_path / "n1"), "--always-run", "--dashboard-port", "0"]  # fmt: skip
    node = Proc("n1-importtime", cmd, tmp_path / "n1-importtime.log")
    try:
        wait_until("the node online", lambda: owner.nodes()[0]["state"] == "idle", 60,
                   [node, hub.proc])  # fmt: skip
        job = alice.submit(FIB)
        assert alice.wait(job["id"], 60)["state"] == "completed"
    finally:
        node.stop()
    before, after = imported(node.output())
    assert "edge.core.session" in before and "edge.mqtt_paho" in before  # the lines are there
    assert not before & NOT_AT_START, sorted(before & NOT_AT_START)
    if no_nvidia_driver():
        assert "pynvml" not in before
    # The first job made the wasm executor; its engine loads in the worker, never here.
    assert "edge.executors.wasm3" in after
    assert "wasm3" not in before | after


def test_gpu_probing_is_skipped_only_where_no_nvidia_driver_can_answer(tmp_path: Path) -> None:
    """A Linux /proc without the nvidia module, no /dev/nvidiactl and no WSL GPU bridge: no
    NVML, no nvidia-smi. Any one of them, or no /proc at all (not Linux): the probe runs."""
    proc, dev = tmp_path / "proc", tmp_path / "dev"
    (proc / "self").mkdir(parents=True)
    dev.mkdir()
    assert no_nvidia_driver(str(proc), str(dev))
    for sign in (proc / "driver" / "nvidia", dev / "nvidiactl", dev / "dxg"):
        sign.parent.mkdir(parents=True, exist_ok=True)
        sign.touch()
        assert not no_nvidia_driver(str(proc), str(dev)), sign
        sign.unlink()
    assert not no_nvidia_driver(str(tmp_path / "nowhere"), str(dev))

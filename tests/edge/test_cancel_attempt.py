"""A cancel names the attempt it cancels: a real node session (edge/core/session.py, paho, the
wasm3 executor) on a real Mosquitto, with an ordinary MQTT client playing the hub.

The hub gives a job to a node again as a new attempt when it thinks the node lost the
previous one. A cancel for the old attempt that arrives after that (QoS 1 delivers at least
once, and the hub's cancels and assignments take different paths) must leave the new attempt
running. tests/edge/mp/core_jobs.py checks the same rule in the job runner on MicroPython.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.core import compat, protocol
from edge.core.session import Session
from edge.executors.wasm3 import Wasm3Executor
from edge.mqtt_paho import PahoMqtt

SPIN = Path(__file__).parent / "fixtures" / "spin.wat"


@pytest.fixture
def spin(tmp_path: Path) -> bytes:
    if not shutil.which("wat2wasm"):
        pytest.fail("wat2wasm not installed: run `make test` (Debian package: wabt)")
    out = tmp_path / "spin.wasm"
    subprocess.run(["wat2wasm", str(SPIN), "-o", str(out)], check=True)
    return out.read_bytes()


class Link:
    """The node's session, and a hub-side client that reads what the node publishes."""

    def __init__(self, url: str) -> None:
        self.node_id = "n_cancelattempt01"
        self.hub = PahoMqtt(url)
        self.hub.connect("hub-cancel", None, None, "dp/v1/test/hub-cancel", b"")
        self.hub.subscribe(protocol.node_topic(self.node_id, "+"))
        self.seen: list[tuple[str, dict[str, Any]]] = []
        self.probed = False
        # The subscription is made in the background: a message to ourselves proves it is in.
        self.hub.publish(protocol.node_topic(self.node_id, "probe"), b"{}", 1, False)
        self._until("the hub's subscription", lambda: self.probed)
        self.executor = Wasm3Executor(workers=1)
        config = {"node_id": self.node_id, "node_secret": "s", "heartbeat_interval_s": 0.2,
                  "mqtt": {"url": url}}  # fmt: skip
        self.session = Session(config, PahoMqtt(url), self.executor, lambda busy: {"cpu": 1})
        self.session.start()

    def _poll(self) -> None:
        for topic, payload in self.hub.poll():
            kind = topic.rsplit("/", 1)[1]
            if kind in protocol.NODE_OUT:
                self.seen.append((kind, protocol.decode(payload)))
            self.probed = self.probed or kind == "probe"

    def _until(self, what: str, check: Callable[[], Any], timeout_s: float = 20) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if hasattr(self, "session"):
                self.session.step()
            self._poll()
            value = check()
            if value:
                return value
            time.sleep(0.005)
        raise AssertionError(f"timed out waiting for {what}; the node sent {self.seen[-5:]}")

    def find(self, kind: str, **fields: Any) -> dict[str, Any] | None:
        for k, msg in self.seen:
            if k == kind and all(msg.get(f) == v for f, v in fields.items()):
                return msg
        return None

    def wait_for(self, kind: str, **fields: Any) -> dict[str, Any]:
        return self._until(f"{kind} {fields}", lambda: self.find(kind, **fields))  # type: ignore[no-any-return]

    def send(self, kind: str, msg: dict[str, Any]) -> None:
        self.hub.publish(protocol.node_topic(self.node_id, kind), protocol.encode(msg), 1, False)

    def close(self) -> None:
        self.session.stop()
        self.executor.close()
        self.hub.disconnect()


@pytest.fixture
def link(mosquitto: str) -> Iterator[Link]:
    link = Link(mosquitto)
    yield link
    link.close()


def assignment(job_id: str, attempt: int, module: bytes) -> dict[str, Any]:
    return protocol.assign(
        job_id, attempt, {"type": "wasm", "entrypoint": "spin", "args": [], "env": {}},
        compat.b64encode(module), compat.hexlify(compat.sha256(module).digest()), None, 30, 32,
    )  # fmt: skip


def test_a_late_cancel_for_attempt_1_leaves_attempt_2_running(link: Link, spin: bytes) -> None:
    link.wait_for("hello")
    link.send(protocol.ASSIGN, assignment("j_spin", 1, spin))
    link.wait_for("event", job_id="j_spin", attempt=1, state="running")
    link.send(protocol.CANCEL, protocol.cancel("j_spin", 1))
    link.wait_for("event", job_id="j_spin", attempt=1, state="cancelled")
    link.wait_for("heartbeat", state="idle", running=[])

    # The hub gives the job to this node again, and its cancel for attempt 1 comes again.
    link.send(protocol.ASSIGN, assignment("j_spin", 2, spin))
    link.wait_for("event", job_id="j_spin", attempt=2, state="running")
    link.send(protocol.CANCEL, protocol.cancel("j_spin", 1))
    # An assignment sent after the cancel: its answer says the node has read the cancel.
    link.send(protocol.ASSIGN, assignment("j_probe", 1, spin))
    probe = link.wait_for("event", job_id="j_probe")
    assert link.find("event", job_id="j_spin", attempt=2, state="cancelled") is None, (
        "the late cancel for attempt 1 stopped attempt 2"
    )
    assert probe["state"] == "rejected" and probe["detail"] == "node busy", probe
    beat = link.wait_for("heartbeat", seq=link.session.seq + 1)
    assert beat["state"] == "busy" and beat["running"] == ["j_spin"]
    assert link.session.runner.running_ids() == ["j_spin"]

    # attempt 2's own cancel stops it; no result is sent for either attempt.
    link.send(protocol.CANCEL, protocol.cancel("j_spin", 2))
    link.wait_for("event", job_id="j_spin", attempt=2, state="cancelled")
    link.wait_for("heartbeat", state="idle", running=[])
    assert link.find("result", job_id="j_spin") is None

"""Offline operation with real processes: a hub, a real `edge-run` node and a Mosquitto this
test stops (SIGKILL) and starts again on the same port.

The node reaches the broker through a TCP relay the test owns, so the test decides when the
node may reconnect: after the hub has (the hub's clean MQTT session loses what is published
before it resubscribes). While the broker is away a job finishes; its result waits in the
node's outbox file and is delivered, and settled exactly once, when the broker is back — also
after the node was SIGKILLed in between. A node that vanishes is marked offline by its last
will. And the owner's activity (an idle gate) suspends a running job and turns new ones down.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from deparrow.localnet import LocalHub, Proc, wait_for
from edge.core import protocol
from edge.core.outbox import peek
from hub.mqtt.broker import die_with_parent, free_port, wait_port
from tests.conftest import require_mosquitto, start_hub

# Long enough (seconds of wasm3) that the broker is gone before it finishes.
FIB38 = {"name": "fib38", "engine": {"type": "wasm", "module": "example:fib",
         "entrypoint": "fib", "args": ["38"]}, "timeout": 300}  # fmt: skip
FIB38_RETURNS = [39088169]
# The hub hears no heartbeat while the broker is down; at 30 s a beat it waits 90 s before it
# calls the node lost, so an outage (the job's run, then the node's reconnect backoff, up to
# 30 s a try) must not look like one, even on a loaded machine.
HEARTBEAT_S = 30.0


class Broker:
    """Mosquitto on a fixed port, killed and started again by the test."""

    def __init__(self, workdir: Path) -> None:
        require_mosquitto()
        self.port = free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            f"user {pwd.getpwuid(os.getuid()).pw_name}\nmax_packet_size 16777216\n"
            "log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.workdir / "mosquitto.log", "ab") as log:
            self.proc = subprocess.Popen(
                [str(shutil.which("mosquitto")), "-c", str(self.conf)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_parent(signal.SIGTERM),
            )
        wait_port("127.0.0.1", self.port, 15.0, self.proc)

    def kill(self) -> None:
        """SIGKILL: no goodbye, no last wills: as a crashed broker or a cut network."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Relay:
    """A TCP relay from a port of its own to the broker: open() accepts, close() refuses new
    connections and cuts the ones it carries."""

    def __init__(self, upstream_port: int) -> None:
        self.port = free_port()
        self.upstream = upstream_port
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def open(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(16)
        s.settimeout(0.1)
        self._listener = s
        self._thread = threading.Thread(target=self._accept, args=(s,), daemon=True)
        self._thread.start()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                down, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                up = socket.create_connection(("127.0.0.1", self.upstream), timeout=2)
            except OSError:
                down.close()  # no broker behind us: the node sees its connection fail
                continue
            down.settimeout(None)
            up.settimeout(None)
            with self._lock:
                self._socks += [down, up]
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


class Net:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.broker = Broker(tmp_path / "broker")
        self.broker.start()
        self.relay = Relay(self.broker.port)
        self.relay.open()
        self.hub = LocalHub(
            tmp_path / "hub",
            mqtt_url=self.broker.url,
            heartbeat_s=HEARTBEAT_S,
            extra=("--mqtt-public-url", self.relay.url),
            log_path=tmp_path / "hub.log",
        )
        _, self.owner = self.hub.user("owner")
        _, self.alice = self.hub.user("alice")
        self.node_dir = tmp_path / "n1"
        self.node = self.hub.start_node(self.owner, self.node_dir, "n1", wait_s=60)
        self.node_id = self.owner.nodes()[0]["id"]
        self.procs = [self.node]

    @property
    def outbox(self) -> str:
        return str(self.node_dir / "outbox.log")

    def queued(self, kind: str) -> list[bytes]:
        return [p for _, topic, p, _ in peek(self.outbox) if topic.endswith("/" + kind)]

    def broker_down(self) -> None:
        # The broker first: were the relay cut first, the broker would see the node vanish
        # and publish its last will.
        self.broker.kill()
        self.relay.close()

    def broker_back(self) -> None:
        self.broker.start()
        wait_for("the hub to reconnect", lambda: self.hub.admin.status()["broker"]["connected"],
                 60, [self.hub.proc])  # fmt: skip
        self.relay.open()

    def start_job(self) -> dict[str, Any]:
        job = self.alice.submit(FIB38)
        wait_for("the job to run", lambda: self.alice.job(job["id"])["state"] == "running", 60,
                 [self.hub.proc, *self.procs])  # fmt: skip
        return job

    def settled_once(self, job_id: str) -> dict[str, Any]:
        done = self.alice.wait(job_id, timeout_s=120)
        assert done["state"] == "completed", done
        assert done["attempt"] == 1 and done["node"] == self.node_id, done
        assert done["result"]["returns"] == FIB38_RETURNS
        cost = Decimal(done["cost"])
        assert cost > 0
        # Charged once, paid once: one settlement entry for the job on each side.
        for who in (self.alice, self.owner):
            items = who.history(limit=1000)["items"]
            settled = [i for i in items if i["reason"] == "job completed " + job_id]
            assert len(settled) == 1, items
        wallet = self.alice.wallet()
        assert Decimal(wallet["balance"]) == 100 - cost and Decimal(wallet["held"]) == 0
        audit = self.hub.admin.audit()
        assert audit["balanced"], audit
        return done

    def close(self) -> None:
        for p in self.procs:
            if p.alive():
                p.stop()
        self.hub.stop()
        self.relay.close()
        self.broker.kill()


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    n = Net(tmp_path)
    yield n
    n.close()


def kill_group(p: Proc) -> None:
    """kill -9 the node and its wasm3 workers, as a power cut would."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.p.pid, signal.SIGKILL)
    p.p.wait(10)


def publish_once(url: str, topic: str, payload: bytes) -> None:
    host, port = url.removeprefix("mqtt://").split(":")
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    c.connect(host, int(port))
    c.loop_start()
    try:
        c.publish(topic, payload, qos=1).wait_for_publish(10)
    finally:
        c.disconnect()
        c.loop_stop()


@pytest.mark.timeout(300)
def test_result_finished_while_the_broker_is_down_is_delivered_once(net: Net) -> None:
    job = net.start_job()
    net.broker_down()
    (queued,) = wait_for("the result to wait in the outbox", lambda: net.queued("result"), 120,
                         net.procs)  # fmt: skip
    result = json.loads(queued)
    assert result["job_id"] == job["id"] and result["returns"] == FIB38_RETURNS
    assert net.alice.job(job["id"])["state"] == "running"  # the hub has not heard yet

    net.broker_back()
    net.settled_once(job["id"])
    wait_for("the outbox to drain", lambda: peek(net.outbox) == [], 30, net.procs)
    assert "reconnected to the broker" in net.node.output()
    assert "sending 1 queued messages" in net.node.output()  # from the outbox, not paho's queue
    assert net.node.output().count(f"job {job['id']} running") == 1  # ran once

    # The same result once more (a QoS 1 redelivery, a replay from a stale outbox): the hub
    # drops it and nothing moves.
    balances = (net.alice.wallet(), net.owner.wallet())
    publish_once(net.broker.url, protocol.node_topic(net.node_id, protocol.RESULT), queued)
    time.sleep(1.0)  # give a wrong second settlement the chance to show
    assert (net.alice.wallet(), net.owner.wallet()) == balances
    net.settled_once(job["id"])


@pytest.mark.timeout(300)
def test_result_queued_before_a_crash_is_delivered_after_restart(net: Net) -> None:
    job = net.start_job()
    net.broker_down()
    wait_for("the result to wait in the outbox", lambda: net.queued("result"), 120, net.procs)
    kill_group(net.node)  # the result was written before publish was even tried
    net.procs.remove(net.node)

    net.broker_back()
    again = Proc("n1-again", [sys.executable, "-m", "edge.cli", "--data-dir", str(net.node_dir),
                              "-v"], net.tmp_path / "n1-again.log")  # fmt: skip
    net.procs.append(again)
    net.settled_once(job["id"])
    wait_for("the outbox to drain", lambda: peek(net.outbox) == [], 30, net.procs)
    assert "queued messages to send: 1" in again.output()
    assert f"job {job['id']} running" not in again.output()  # delivered, not run again
    wait_for("the node to be idle", lambda: net.owner.nodes()[0]["state"] == "idle", 30,
             net.procs)  # fmt: skip


@pytest.mark.timeout(300)
def test_last_will_marks_a_killed_node_offline(net: Net) -> None:
    job = net.start_job()
    kill_group(net.node)  # the broker sees the connection drop and publishes the will
    net.procs.remove(net.node)
    # The will, not missed heartbeats (those take 3 x 30 s): the hub knows well before that.
    wait_for("the hub to mark the node offline",
             lambda: net.owner.nodes()[0]["state"] == "offline", 30)  # fmt: skip
    assert net.alice.job(job["id"])["state"] == "queued"  # back in the queue for another node

    got: list[bytes] = []
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    c.on_message = lambda _c, _u, m: got.append(bytes(m.payload))
    c.connect("127.0.0.1", net.broker.port)
    c.subscribe(protocol.node_topic(net.node_id, protocol.STATUS), qos=1)
    c.loop_start()
    try:
        wait_for("the retained status", lambda: got, 10)
    finally:
        c.disconnect()
        c.loop_stop()
    assert json.loads(got[0]) == protocol.status(net.node_id, protocol.OFFLINE)


# --- the owner's activity: the session's idle gate -----------------------------------------
@pytest.mark.parametrize("broker", ["mosquitto", "embedded"])
def test_owner_activity_suspends_jobs_and_turns_new_ones_down(tmp_path: Path, broker: str) -> None:
    """An in-process Session (real PahoMqtt, real Wasm3Executor) on a real hub, with a gate the
    test flips: suspended in heartbeats, an assignment refused with the reason, a running job
    stopped (its worker in state T) and continued, and it still completes. What the node does
    is read through the hub (REST): a login holds one connection, so nobody else can listen
    as the node or speak as the hub."""
    from edge.core.session import Session
    from edge.executors.wasm3 import Wasm3Executor
    from edge.mqtt_paho import PahoMqtt

    if broker == "mosquitto":
        require_mosquitto()
    hub = start_hub(tmp_path, broker=broker)
    try:
        _, owner = hub.user("owner")
        _, alice = hub.user("alice")
        creds = owner.request(
            "POST", "/api/v1/nodes/enroll",
            {"token": owner.enrollment_token()["token"], "name": "gated", "engines": ["wasm"],
             "cpu": 2, "memory_mb": 512}, auth=False,
        )  # fmt: skip
        config = {k: creds[k] for k in ("node_id", "node_secret", "mqtt", "heartbeat_interval_s")}
        node_id = config["node_id"]
        owner_active = threading.Event()
        owner_active.set()
        calls = []

        def gate() -> tuple[bool, str]:
            calls.append(1)
            active = owner_active.is_set()
            return (not active, "keyboard used 2 s ago" if active else "idle for 60 s")

        stop = threading.Event()
        steps = threading.Lock()  # held by the node's loop for each step, or by the test
        with Wasm3Executor(workers=1) as executor:
            link = PahoMqtt(config["mqtt"]["url"])
            session = Session(config, link, executor, lambda busy: {"cpu": 2, "memory_mb": 512},
                              gate=gate)  # fmt: skip
            session.start()

            def loop() -> None:
                while not stop.is_set():
                    with steps:
                        session.step()
                    link.wait(0.01)

            runner = threading.Thread(target=loop, daemon=True)
            runner.start()
            try:

                def node_state() -> str:
                    return str(owner.nodes()[0]["state"])

                wait_for("the hub to see the node suspended", lambda: node_state() == "suspended",
                         30, [hub.proc])  # fmt: skip
                job = alice.submit(FIB38)
                time.sleep(1.5)  # several scheduler ticks: nothing goes to a suspended node
                assert alice.job(job["id"])["state"] == "queued"

                # An assignment sent just before the owner came back: refused. The test steps
                # the node itself here (its loop waits on the lock), so the node reads the
                # assignment only after the owner is back.
                with steps:
                    owner_active.clear()
                    session.step()  # the gate opens: an idle heartbeat, and the hub assigns
                    wait_for("the assignment", lambda: alice.job(job["id"])["state"] == "assigned",
                             1, [hub.proc])  # fmt: skip
                    owner_active.set()
                    link.wait(1.0)  # the assignment in the node's inbox
                    session.step()  # the gate closes again, then the assignment is read
                refused = wait_for("the refusal", lambda: (j := alice.job(job["id"]))["state"]
                                   == "queued" and j, 10, [hub.proc])  # fmt: skip
                assert refused["reason"].startswith(
                    f"node {node_id} turned it down (owner is using the machine)"
                ), refused
                assert refused["attempt"] == 1
                wait_for("the hub to see the node suspended", lambda: node_state() == "suspended",
                         10)  # fmt: skip

                owner_active.clear()  # the owner leaves: the job is assigned and runs
                wait_for("the job to run", lambda: alice.job(job["id"])["state"] == "running", 30,
                         [hub.proc])  # fmt: skip
                (pid,) = wait_for("its worker", executor.job_pids, 10)

                owner_active.set()  # the owner is back mid-job
                wait_for("the worker to stop", lambda: _proc_state(pid) == "T", 10)
                wait_for("the hub to see the node suspended", lambda: node_state() == "suspended",
                         10)  # fmt: skip
                time.sleep(1.0)
                assert _proc_state(pid) == "T" and alice.job(job["id"])["state"] == "running"

                owner_active.clear()
                done = alice.wait(job["id"], timeout_s=120)
                assert done["state"] == "completed" and done["result"]["returns"] == FIB38_RETURNS
                assert done["node"] == node_id and done["attempt"] == 2
                assert hub.admin.audit()["balanced"]
                assert len(calls) > 10  # asked every step
            finally:
                stop.set()
                runner.join(10)
                session.stop()
    finally:
        hub.stop()


def _proc_state(pid: int) -> str:
    """The one-letter state of a process (R running, S sleeping, T stopped)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]

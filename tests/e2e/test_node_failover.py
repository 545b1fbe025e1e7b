"""edge-run --bootstrap: a real node moves to the other broker when its own is gone, and the
result it finished meanwhile is delivered, once (issue 18 item 4).

Two real Mosquitto servers joined by a bridge (dp/# both ways), as a broker cluster's servers
are: the hub is on the second and gives out both (--mqtt-public-url), so the node, taking the
bootstrap list's first broker, runs on the first and reaches the hub through the bridge. The
first broker is killed while a job runs: the node finishes the job cut off (its result waits
in the outbox), moves to the second broker after --failover-after, and the result arrives.
"""

from __future__ import annotations

import re
import shutil
import sys
import threading
from decimal import Decimal
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from deparrow.client import TERMINAL_STATES
from deparrow.localnet import LocalHub, Proc, free_port, wait_for
from hub.mqtt.broker import ChildBroker
from tests.conftest import require_mosquitto


def fib(n: int, timeout: int = 60) -> dict[str, object]:
    return {"engine": {"type": "wasm", "module": "example:fib", "entrypoint": "fib",
                       "args": [str(n)]}, "timeout": timeout}  # fmt: skip


def bridged_broker(tmp_path: Path, to_port: int) -> tuple[Proc, str]:
    """A Mosquitto server bridged to the one on to_port: dp/# crosses both ways."""
    port = free_port()
    conf = tmp_path / "m1.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n"
        f"connection to-m2\naddress 127.0.0.1:{to_port}\ntopic dp/# both 1\n"
        "cleansession true\nrestart_timeout 1\n"
    )
    exe = shutil.which("mosquitto")
    assert exe is not None
    return Proc("m1", [exe, "-c", str(conf)], tmp_path / "m1.log"), f"mqtt://127.0.0.1:{port}"


def bridge_works(m1: str, m2: str) -> bool:
    """A message published on m1 arrives on m2."""
    got = threading.Event()

    def client(url: str) -> mqtt.Client:
        c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
        host, port = url.removeprefix("mqtt://").split(":")
        c.connect(host, int(port))
        c.loop_start()
        return c

    try:
        sub = client(m2)
    except OSError:  # not listening yet
        return False
    sub.on_message = lambda *_a: got.set()
    subscribed = threading.Event()
    sub.on_subscribe = lambda *_a: subscribed.set()
    sub.subscribe("dp/v1/probe", 1)
    try:
        pub = client(m1)
    except OSError:
        sub.disconnect()
        sub.loop_stop()
        return False
    try:
        subscribed.wait(5)
        pub.publish("dp/v1/probe", b"1", qos=1).wait_for_publish(5)
        return got.wait(1)
    finally:
        for c in (pub, sub):
            c.disconnect()
            c.loop_stop()


def test_node_moves_to_the_other_broker_and_delivers_its_result_once(tmp_path: Path) -> None:
    require_mosquitto()
    m2 = ChildBroker("mosquitto", "127.0.0.1", free_port(), tmp_path / "m2")
    m2.start()
    m1, m1_url = bridged_broker(tmp_path, m2.port)
    hub = node = None
    try:
        wait_for("the bridge between the brokers", lambda: bridge_works(m1_url, m2.url), 30,
                 [m1])  # fmt: skip
        # Beats every 4 s: the hub judges the node gone only after 12 s without one, well
        # after the node has moved (4 s), so the job is not taken away from it meanwhile.
        hub = LocalHub(tmp_path / "hub", mqtt_url=m2.url, heartbeat_s=4.0,
                       extra=["--mqtt-public-url", f"{m1_url},{m2.url}"])  # fmt: skip
        listed = hub.admin.request("GET", "/api/v1/bootstrap", auth=False)
        assert [b["url"] for b in listed["brokers"]] == [m1_url, m2.url]
        _, owner = hub.user("owner")
        _, user = hub.user("submitter")
        token = owner.enrollment_token()["token"]
        # No --hub: the node enrolls with the best replica the bootstrap URL lists.
        node = Proc("node", [
            sys.executable, "-m", "edge.cli", "--bootstrap", hub.url, "--token", token,
            "--failover-after", "4", "--name", "n1", "--data-dir", str(tmp_path / "n1"), "-v",
            "--always-run", "--dashboard-port", "0",
        ], tmp_path / "node.log")  # fmt: skip
        wait_for("the node to come online", lambda: any(n["state"] == "idle"
                 for n in owner.nodes()), 60, [node, hub.proc])  # fmt: skip
        assert f"online at {m1_url}" in node.output()

        # A job of a second or so; the node's broker dies while it runs, and the job ends
        # before the node moves on: its result waits in the outbox.
        long = user.submit(fib(36))
        wait_for("the job to run", lambda: user.job(long["id"])["state"] == "running", 60,
                 [node, hub.proc, m1])  # fmt: skip
        m1.kill()
        done = wait_for("the job's result", lambda: (j := user.job(long["id"]))["state"]
                        in TERMINAL_STATES and j, 90, [node, hub.proc])  # fmt: skip
        assert done["state"] == "completed", done
        assert "14930352" in str(done["result"])
        assert done["attempt"] == 1  # not lost and run again: the result came through
        log = node.output()
        finished = log.index(f"job {long['id']} completed")
        moved = log.index(f"moved to {m2.url}")
        if finished < moved:  # the usual order: the result waited in the outbox, then went
            # (with it, on a loaded machine, an event that could not go out either)
            assert re.search(r"sending [12] queued messages", log[moved:]), log
        # else a loaded machine ran the job past the failover window: the node had moved
        # already and sent the result at once; either way it arrived once (attempt 1 above).
        assert f"connected to the hub's broker at {m2.url} again" in log

        # The node goes on on the second broker.
        wait_for("the node to be idle again", lambda: any(n["state"] == "idle"
                 for n in owner.nodes()), 30, [node, hub.proc])  # fmt: skip
        short = user.wait(user.submit(fib(20))["id"], timeout_s=60)
        assert short["state"] == "completed" and "6765" in str(short["result"])

        # Each job paid once: what is gone from the wallet is their two costs, nothing held.
        wallet = user.wallet()
        spent = Decimal(done["cost"]) + Decimal(short["cost"])
        assert Decimal(wallet["balance"]) == Decimal(100) - spent
        assert Decimal(wallet["held"]) == 0
        assert hub.admin.audit()["balanced"]

        # Started again, the node skips the listed broker that is gone and takes the next.
        node.stop()
        node = Proc("node2", [
            sys.executable, "-m", "edge.cli", "--bootstrap", hub.url, "--data-dir",
            str(tmp_path / "n1"), "-v", "--always-run", "--dashboard-port", "0",
        ], tmp_path / "node2.log")  # fmt: skip
        wait_for("the node to start on the second broker",
                 lambda: f"online at {m2.url}" in node.output(), 60, [node])  # fmt: skip
        again = user.wait(user.submit(fib(21))["id"], timeout_s=60)
        assert again["state"] == "completed" and "10946" in str(again["result"])
        # Without --bootstrap, the brokers the hub gave at enrollment (node.json) do the same.
        node.stop()
        node = Proc("node3", [
            sys.executable, "-m", "edge.cli", "--data-dir", str(tmp_path / "n1"), "-v",
            "--always-run", "--dashboard-port", "0",
        ], tmp_path / "node3.log")  # fmt: skip
        wait_for("the node to start on the second broker again",
                 lambda: f"online at {m2.url}" in node.output(), 60, [node])  # fmt: skip
    finally:
        if node is not None:
            node.stop()
        if hub is not None:
            hub.stop()
        if m1.alive():
            m1.stop()
        m2.stop()

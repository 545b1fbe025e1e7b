"""The node's MQTT session (edge/core/session.py) against a real Mosquitto, with the interpreter's
own MQTT adapter: umqtt.simple on MicroPython (edge/core/mqtt_umqtt.py), paho-mqtt on CPython.
A second client of the same adapter plays the hub: it sees what the node publishes and sends
it assignments and cancels as the hub would."""

from edge.core import compat, protocol
from edge.core.session import Session
from edge.executors.wasm3_cli import Wasm3CliExecutor
from tests.edge.mp import harness

URL = harness.setting("DP_MQTT_URL")
EX = Wasm3CliExecutor(harness.setting("DP_WORK") + "/session")
SECRET = "the-node-secret"


def make_mqtt():
    try:
        from edge.core.mqtt_umqtt import UmqttMqtt  # MicroPython
    except ImportError:
        from edge.mqtt_paho import PahoMqtt  # CPython

        return PahoMqtt(URL)
    return UmqttMqtt(URL)


def offered(busy):
    return {"cpu": 1.0, "memory_mb": 64, "gpu": 0, "load": 0.0}


class World:
    """A node session and a hub-side client watching the node's topics."""

    def __init__(self, name):
        self.node_id = "n_" + name
        config = {"node_id": self.node_id, "node_secret": SECRET, "heartbeat_interval_s": 0.2,
                  "mqtt": {"url": URL}}  # fmt: skip
        self.hub = make_mqtt()
        self.hub.connect("hub-" + name, None, None, "dp/v1/test/hub-" + name, b"")
        self.hub.subscribe(protocol.node_topic(self.node_id, "+"))
        self.seen = []  # (kind, msg) the hub received
        # paho subscribes in the background: a hello sent before the broker has the
        # subscription would be missed for good. A message to ourselves proves it is in place.
        probe = protocol.node_topic(self.node_id, "probe")
        self.hub.publish(probe, b"{}", 1, False)
        harness.eventually("the watcher's subscription", lambda: self._probed(probe), 20000)
        self.session = Session(config, make_mqtt(), EX, offered)
        self.session.start()

    def _probed(self, probe):
        for topic, _payload in self.hub.poll():
            if topic == probe:
                return True
        compat.sleep_ms(5)
        return False

    def step(self):
        self.session.step()
        for topic, payload in self.hub.poll():
            kind = protocol.parse_topic(topic)[2]
            if kind in protocol.NODE_OUT:
                self.seen.append((kind, protocol.decode(payload)))
        compat.sleep_ms(2)

    def find(self, kind, **fields):
        for k, msg in self.seen:
            if k == kind and all(msg.get(f) == v for f, v in fields.items()):
                return msg
        return None

    def wait_for(self, kind, **fields):
        return harness.eventually(
            kind + " " + repr(fields), lambda: self.find(kind, **fields), 20000, self.step
        )

    def send(self, kind, msg):
        self.hub.publish(protocol.node_topic(self.node_id, kind), protocol.encode(msg), 1, False)

    def close(self):
        self.session.stop()
        self.hub.disconnect()


def assignment(job_id, module, entrypoint="_start", args=None, timeout_s=10):
    return protocol.assign(
        job_id, 1, {"type": "wasm", "entrypoint": entrypoint, "args": args or [], "env": {}},
        compat.b64encode(module), compat.hexlify(compat.sha256(module).digest()), None,
        timeout_s, 32,
    )  # fmt: skip


def test_node_announces_itself_and_heartbeats():
    w = World("announce")
    try:
        assert w.wait_for("status", state="online")["node_id"] == w.node_id
        hello = w.wait_for("hello")
        assert hello["engines"] == ["wasm"] and hello["running"] == []
        first = w.wait_for("heartbeat", state="idle")
        later = w.wait_for("heartbeat", seq=first["seq"] + 2)  # they keep coming
        assert later["resources"]["memory_mb"] == 64 and later["running"] == []
    finally:
        w.close()
    harness.eventually("offline status", lambda: w.find("status", state="offline"), 10000, w.step)


def test_assigned_job_runs_and_a_signed_result_comes_back():
    w = World("job")
    try:
        w.wait_for("hello")
        w.send(protocol.ASSIGN, assignment("j_fib", harness.wasm_job("fib.wasm"), "fib", ["20"]))
        result = w.wait_for("result", job_id="j_fib")
        assert result["state"] == "completed" and result["returns"] == [6765], result
        assert protocol.verify_result(SECRET, result, b"")
        assert w.find("event", job_id="j_fib", state="accepted")
        assert w.find("event", job_id="j_fib", state="running")
        assert w.find("heartbeat", state="busy", running=["j_fib"])  # told at once
        w.wait_for("heartbeat", state="idle", running=[])
        # the hub's assignment again (it missed the result): the same result, not a rerun
        w.seen = []
        w.send(protocol.ASSIGN, assignment("j_fib", harness.wasm_job("fib.wasm"), "fib", ["20"]))
        assert w.wait_for("result", job_id="j_fib")["sig"] == result["sig"]
        assert not w.find("event", job_id="j_fib")
    finally:
        w.close()


def test_cancel_and_garbage():
    w = World("cancel")
    try:
        w.wait_for("hello")
        w.send(protocol.ASSIGN, {"not": "an assignment"})
        w.hub.publish(protocol.node_topic(w.node_id, protocol.ASSIGN), b"{garbage", 1, False)
        w.send(protocol.ASSIGN, assignment("j_spin", harness.fixture("spin"), "spin", None, 30))
        w.wait_for("event", job_id="j_spin", state="running")
        assert w.session.dropped >= 1  # the garbage, logged and dropped
        w.send(protocol.CANCEL, protocol.cancel("j_spin", 1))
        w.wait_for("event", job_id="j_spin", state="cancelled")
        w.wait_for("heartbeat", state="idle", running=[])
        assert not w.find("result", job_id="j_spin")
        w.send(protocol.ASSIGN, assignment("j_after", harness.wasm_job("fib.wasm"), "fib", ["10"]))
        assert w.wait_for("result", job_id="j_after")["returns"] == [55]
    finally:
        w.close()


harness.run(globals())

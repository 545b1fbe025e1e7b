# The node's MQTT session: announce, heartbeat, take assignments, report results.
#
# Adapters are passed in, so this file runs on MicroPython as well as CPython:
#   mqtt:      connect(client_id, user, password, will_topic, will_payload), subscribe(topic),
#              publish(topic, payload, qos, retain), poll() -> [(topic, payload)],
#              reconnected() -> True once after the connection came back, disconnect()
#   executor:  engines, submit(job), poll(handle), cancel(handle)
#   offered:   callable(busy) -> {"cpu", "memory_mb", "gpu", "load"} (what we offer now)

from edge import compat, protocol
from edge.jobs import JobRunner

VERSION = "0.1.0"


class Session:
    def __init__(self, config, mqtt, executor, offered, log=None):
        """config: {"node_id", "node_secret", "mqtt": {...}, "heartbeat_interval_s"}"""
        self.config = config
        self.node_id = config["node_id"]
        self.mqtt = mqtt
        self.offered = offered
        self.log = log or (lambda *a: None)
        self.interval_ms = int(float(config.get("heartbeat_interval_s") or 5) * 1000)
        self.seq = 0
        self.last_beat = None
        self.runner = JobRunner(
            self.node_id, config["node_secret"], executor, self._publish_kind, log=self.log
        )
        self.dropped = 0

    def topic(self, kind):
        return protocol.node_topic(self.node_id, kind)

    def _publish_kind(self, kind, msg):
        qos = 0 if kind == protocol.HEARTBEAT else 1
        self.mqtt.publish(self.topic(kind), protocol.encode(msg), qos, False)

    def start(self):
        creds = self.config["mqtt"]
        self.mqtt.connect(
            creds.get("client_id") or self.node_id,
            creds.get("username"),
            creds.get("password"),
            self.topic(protocol.STATUS),
            protocol.encode(protocol.status(self.node_id, protocol.OFFLINE)),
        )
        for kind in protocol.NODE_IN:
            self.mqtt.subscribe(self.topic(kind))
        self.announce()

    def announce(self):
        """Sent at every (re)connect: online status, then capabilities and running jobs."""
        self.mqtt.publish(
            self.topic(protocol.STATUS),
            protocol.encode(protocol.status(self.node_id, protocol.ONLINE)),
            1,
            True,
        )
        res = self.offered(False)
        self._publish_kind(
            protocol.HELLO,
            protocol.hello(
                self.node_id, self.runner.executor.engines, res, VERSION, self.runner.running_ids()
            ),
        )
        self.heartbeat()

    def state(self):
        return protocol.BUSY if self.runner.busy() else protocol.IDLE

    def heartbeat(self):
        self.seq += 1
        self.last_beat = compat.ticks_ms()
        msg = protocol.heartbeat(
            self.node_id,
            self.seq,
            self.state(),
            self.offered(self.runner.busy()),
            self.runner.running_ids(),
        )
        self._publish_kind(protocol.HEARTBEAT, msg)

    def handle(self, topic, payload):
        if topic == self.topic(protocol.ASSIGN) or topic == self.topic(protocol.CANCEL):
            try:
                msg = protocol.decode(payload)
            except ValueError as e:
                self.dropped += 1
                self.log("dropped message on " + topic + ": " + str(e))
                return "dropped"
            if topic.endswith(protocol.ASSIGN):
                outcome = self.runner.on_assign(msg)
                if outcome == "accepted":
                    self.heartbeat()  # tell the hub we are busy now, not in 5 s
                return outcome
            return self.runner.on_cancel(msg)
        self.dropped += 1
        return "dropped"

    def step(self):
        """One turn of the loop: messages in, finished jobs out, heartbeat when due."""
        if self.mqtt.reconnected():
            self.log("reconnected to the broker")
            self.announce()
        for topic, payload in self.mqtt.poll():
            try:
                self.handle(topic, payload)
            except Exception as e:  # one bad message must never stop the node
                self.dropped += 1
                self.log("error handling a message on " + topic + ": " + repr(e))
        if self.runner.poll():
            self.heartbeat()  # idle again: the hub can send the next job now
        now = compat.ticks_ms()
        if self.last_beat is None or compat.ticks_diff(now, self.last_beat) >= self.interval_ms:
            self.heartbeat()

    def stop(self):
        try:
            self.mqtt.publish(
                self.topic(protocol.STATUS),
                protocol.encode(protocol.status(self.node_id, protocol.OFFLINE)),
                1,
                True,
            )
        finally:
            self.mqtt.disconnect()

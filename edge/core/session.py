# The node's MQTT session: announce, heartbeat, take assignments, report results.
#
# Adapters are passed in, so this file runs on MicroPython as well as CPython:
#   mqtt:      connect(client_id, user, password, will_topic, will_payload), subscribe(topic),
#              publish(topic, payload, qos, retain) -> False (or raises OSError) when the
#              message did not go out, else a receipt (anything, None included),
#              poll() -> [(topic, payload)], reconnected() -> True once after the connection
#              came back, disconnect(); optional: connected() -> bool, delivered(receipt) ->
#              True once the broker acknowledged a QoS 1 message (without it, a publish that
#              returned counts as delivered, as with umqtt.simple's blocking publish)
#   executor:  engines, submit(job), poll(handle), cancel(handle); optional suspend(handle),
#              resume(handle), allow_network (True: its jobs may use the network; a router
#              of several executors, edge/executors/router.py, is asked per engine)
#              takes_files (True: it honours a job's "dirs", so file jobs may run on it)
#   offered:   callable(busy) -> {"cpu", "memory_mb", "gpu", "load"} (what we offer now)
#   outbox:    edge.core.outbox.Outbox, durable (a file) where the node has storage; default
#              in memory
#   gate:      callable() -> (allowed, why): may jobs run now? (the owner's idle preferences)
#
# Offline operation: events and results that the broker cannot take go to the outbox, and
# results always pass through it (written and synced before they are sent, removed once the
# broker acknowledged them), so a crash or a power cut loses no finished work. After every
# (re)connect the outbox is sent, oldest first, before `hello`: hello's `running` list makes
# the hub requeue every job of ours it does not name, so a result must reach it first.

from edge.core import compat, protocol
from edge.core.jobs import JobRunner
from edge.core.outbox import Outbox

VERSION = "0.1.0"


def _engines_where(executor, attr):
    """The engines whose executor says `attr` is True (a router: per engine)."""
    by_engine = getattr(executor, "by_engine", None)  # a router: one executor per engine
    if by_engine is None:
        by_engine = {engine: executor for engine in executor.engines}
    return sorted([e for e, ex in by_engine.items() if getattr(ex, attr, False) is True])


def network_engines(executor):
    """The engines whose jobs may use the network on this node: those whose executor the
    owner let (docker.allow_network, native.allow_network). Told to the hub in hello and
    heartbeats, so that it sends a job that asks for network access only where it may run."""
    return _engines_where(executor, "allow_network")


def file_engines(executor):
    """The engines whose executor gives a job files (its "dirs": wasmtime, wasm3-run, docker,
    native; pywasm3's worker does not)."""
    if hasattr(executor, "file_engines"):  # a router: it also knows its executors for files
        return executor.file_engines()
    return _engines_where(executor, "takes_files")


def file_caps(config, executor):
    """What the runner needs for file jobs (edge/core/jobfiles.py), from config["files"]
    ({"dir", "max_input_bytes", "max_output_bytes", "max_output_files"}): None when the node
    has no directory for them or no engine that takes them. Output is capped by the protocol."""
    files = config.get("files")
    engines = file_engines(executor)
    if not files or not files.get("dir") or not engines:
        return None
    caps = {"dir": files["dir"], "engines": engines}
    for key in ("max_input_bytes", "max_output_bytes", "max_output_files"):
        caps[key] = files[key]
    if caps["max_output_bytes"] > protocol.MAX_OUTPUT_BYTES:
        caps["max_output_bytes"] = protocol.MAX_OUTPUT_BYTES
    return caps


# Taking an assignment holds it about four times over at its peak on a board: the payload as
# umqtt reads it, the decoded message (the module as base64 text), the module's bytes and the
# heap's fragmentation around them (a 16.7 KB sieve assignment took 69 KiB on the firmware).
MESSAGE_SHARE = 4


def max_message():
    """The largest message this node can take: a quarter of the heap free when it starts, on
    MicroPython (None on CPython: no limit of its own). Told to the hub in hello, which sends
    no larger assignment, instead of one the board runs out of memory reading."""
    free = compat.heap_free()
    return None if free is None else free // MESSAGE_SHARE


class Session:
    def __init__(self, config, mqtt, executor, offered, log=None, outbox=None, gate=None):
        """config: {"node_id", "node_secret", "mqtt": {...}, "heartbeat_interval_s"}, and
        "files" ({"dir", "max_input_bytes", "max_output_bytes", "max_output_files"}) where
        the node takes file jobs, "slots" (jobs at once; 1 without it) and "gpus" (the
        machine's GPUs, [{"index", "name", "uuid", "memory_mb"}]) where it has them."""
        self.config = config
        self.node_id = config["node_id"]
        self.mqtt = mqtt
        self.offered = offered
        self.log = log or (lambda *a: None)
        self.interval_ms = int(float(config.get("heartbeat_interval_s") or 5) * 1000)
        self.seq = 0
        self.last_beat = None
        self.files = file_caps(config, executor)
        self.runner = JobRunner(
            self.node_id,
            config["node_secret"],
            executor,
            self._publish_kind,
            slots=config.get("slots") or 1,
            log=self.log,
            files=self.files,
            gpus=config.get("gpus"),
        )
        self.allow_network = network_engines(executor)
        self.max_message = config.get("max_message") or max_message()
        self.outbox = outbox if outbox is not None else Outbox(None, log=self.log)
        self.gate = gate
        self.allowed = True  # what the gate said last
        self.why = ""
        self.dropped = 0
        self._inflight = {}  # outbox seq -> receipt, handed to the broker, not acknowledged yet
        self._hello_due = False  # announced, but hello waits for the outbox to drain

    def topic(self, kind):
        return protocol.node_topic(self.node_id, kind)

    # -- sending -------------------------------------------------------------------------
    def connected(self):
        check = getattr(self.mqtt, "connected", None)
        return True if check is None else bool(check())

    def _send(self, topic, payload, qos, retain):
        """Hand one message to the MQTT adapter: a receipt, or False when it did not go out."""
        if not self.connected():
            return False
        try:
            receipt = self.mqtt.publish(topic, payload, qos, retain)
        except OSError as e:
            self.log("publish on " + topic + " failed: " + repr(e))
            return False
        if receipt is False:
            return False
        return True if receipt is None else receipt

    def _publish_kind(self, kind, msg):
        topic = self.topic(kind)
        payload = protocol.encode(msg)
        if kind not in (protocol.EVENT, protocol.RESULT):
            # Heartbeats (QoS 0) and hellos are stale once the broker is back: never queued.
            self._send(topic, payload, 0 if kind == protocol.HEARTBEAT else 1, False)
            return
        result = kind == protocol.RESULT
        if not result and not len(self.outbox):
            # An event while the outbox is empty goes straight out; queued only if it cannot.
            if self._send(topic, payload, 1, False) is not False:
                return
            self.log("broker unreachable: " + kind + " queued in the outbox")
        try:
            self.outbox.append(topic, payload, 1, result)
        except (OSError, ValueError) as e:  # storage failed: the runner's cache still has it
            self.log("outbox write failed (" + repr(e) + "): sending " + kind + " unqueued")
            self._send(topic, payload, 1, False)
            return
        self.flush()

    def flush(self):
        """Send queued messages in order; forget those the broker acknowledged. Returns True
        when every queued message has been handed to the broker."""
        if not len(self.outbox):
            return True
        if not self.connected():
            return False
        delivered = getattr(self.mqtt, "delivered", None)
        for seq in self.outbox.pending():
            receipt = self._inflight.get(seq)
            if receipt is not None:
                if delivered(receipt):
                    del self._inflight[seq]
                    self.outbox.done(seq)
                continue
            try:
                topic, payload, qos = self.outbox.get(seq)
            except OSError as e:
                self.log("outbox read failed: " + repr(e))
                return False
            receipt = self._send(topic, payload, qos, False)
            if receipt is False:
                return False  # the connection went again: the rest waits for the next one
            if delivered is None or receipt is True:
                self.outbox.done(seq)
            else:
                self._inflight[seq] = receipt
        return True

    # -- lifecycle -------------------------------------------------------------------------
    def start(self):
        self.check_gate()  # so the first hello and heartbeat already tell the truth
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
        """Sent at every (re)connect: online status, what we queued while away, then
        capabilities and running jobs."""
        self._inflight = {}  # unacknowledged before the break: send them again (the hub
        # drops duplicates)
        self._send(
            self.topic(protocol.STATUS),
            protocol.encode(protocol.status(self.node_id, protocol.ONLINE)),
            1,
            True,
        )
        if len(self.outbox):
            self.log("sending " + str(len(self.outbox)) + " queued messages")
        self._hello_due = True
        self._hello()

    def _hello(self):
        if not self.flush():
            return  # hello would requeue the jobs whose results are still queued
        self._hello_due = False
        res = self.offered(False)
        self._publish_kind(
            protocol.HELLO,
            protocol.hello(
                self.node_id,
                self.runner.executor.engines,
                res,
                VERSION,
                self.runner.running_ids(),
                self.allow_network,
                self._announced_files(),
                self.runner.slots,
                self.config.get("gpus"),
                self.max_message,
            ),
        )
        self.heartbeat()

    def _announced_files(self):
        if self.files is None:
            return None
        out = {}
        for key in ("engines", "max_input_bytes", "max_output_bytes", "max_output_files"):
            out[key] = self.files[key]
        return out

    def state(self):
        if not self.allowed:
            return protocol.SUSPENDED
        return protocol.BUSY if self.runner.busy() else protocol.IDLE

    def heartbeat(self):
        self.seq += 1
        self.last_beat = compat.ticks_ms()
        offer = self.offered(self.runner.busy() or not self.allowed)
        state = self.state()
        held = None
        if state == protocol.SUSPENDED:  # why, and when jobs may run again (the gate's guess)
            soon = getattr(self.gate, "resume_in_s", None)
            soon = soon() if soon is not None else None
            held = {"why": str(self.why or "")[:200],
                    "resume_in_s": None if soon is None else int(soon)}  # fmt: skip
        msg = protocol.heartbeat(
            self.node_id,
            self.seq,
            state,
            offer,
            self.runner.running_ids(),
            self.allow_network,
            self.runner.free(offer),
            held,
        )
        self._publish_kind(protocol.HEARTBEAT, msg)

    def check_gate(self):
        """Ask the gate whether jobs may run; on a change, stop or continue them and tell the
        hub at once."""
        if self.gate is None:
            return
        if self.runner.gpus:
            self._check_gpus()
        try:
            allowed, why = self.gate()
        except Exception as e:  # a broken reading must not stop the node: keep the last answer
            self.log("idle gate failed: " + repr(e))
            return
        allowed = bool(allowed)
        self.why = why
        if allowed == self.allowed:
            return
        self.allowed = allowed
        if allowed:
            self.log("jobs may run again: " + str(why))
            self.runner.release()
        else:
            self.log("owner active (" + str(why) + "): jobs suspended, new ones turned down")
            self.runner.hold(why)
        self.heartbeat()

    def _check_gpus(self):
        """GPU jobs run only while the offer has GPUs (the owner's gpu_only_when_idle): stop
        them when it drops to none, continue them when it comes back."""
        try:
            gpus = int(self.offered(False).get("gpu") or 0)
        except Exception as e:  # a broken reading: keep the last answer
            self.log("GPU offer failed: " + repr(e))
            return
        held = self.runner.gpu_held is not None
        if gpus <= 0 and not held:
            self.log("GPUs held for the owner: GPU jobs suspended, new ones turned down")
            self.runner.hold_gpus(None)
            self.heartbeat()
        elif gpus > 0 and held:
            self.log("GPUs offered again: GPU jobs continue")
            self.runner.release_gpus()
            self.heartbeat()

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
        self.check_gate()
        for topic, payload in self.mqtt.poll():
            try:
                self.handle(topic, payload)
            except Exception as e:  # one bad message must never stop the node
                self.dropped += 1
                self.log("error handling a message on " + topic + ": " + repr(e))
        finished = self.runner.poll()
        if self._hello_due:
            self._hello()
        else:
            self.flush()
        if finished:
            self.heartbeat()  # idle again: the hub can send the next job now
        now = compat.ticks_ms()
        if self.last_beat is None or compat.ticks_diff(now, self.last_beat) >= self.interval_ms:
            self.heartbeat()

    def stop(self, drain_ms=2000):
        """Say goodbye. Waits up to drain_ms for the broker to acknowledge what is queued; the
        rest stays in the outbox for the next start."""
        began = compat.ticks_ms()
        while len(self.outbox) and self.connected():
            self.flush()
            if not len(self.outbox) or compat.ticks_diff(compat.ticks_ms(), began) >= drain_ms:
                break
            compat.sleep_ms(20)
        if len(self.outbox):
            self.log("stopping with " + str(len(self.outbox)) + " messages queued")
        try:
            self._send(
                self.topic(protocol.STATUS),
                protocol.encode(protocol.status(self.node_id, protocol.OFFLINE)),
                1,
                True,
            )
        finally:
            self.mqtt.disconnect()
            self.outbox.close()

    def serve(self, say, exit_after=0, busy_wait_s=0.005):
        """The node's main loop, as edge/mp_main.py and the boards run it: connect, step until
        Ctrl-C (or until exit_after jobs have ended), then say goodbye and close the executor.
        A fault in one step is reported and the loop goes on; a MemoryError is not caught.
        say(text) reports progress. Returns the exit code."""
        url = self.config["mqtt"]["url"]
        executor = self.runner.executor
        try:
            self.start()
        except OSError as e:  # MqttUnavailable; paho's ConnectionError is an OSError too
            say(str(e))  # it names the broker and what went wrong
            executor.close()
            return 1
        say("node " + self.node_id + " online at " + url)
        runner = self.runner
        try:
            while not exit_after or runner.completed + runner.failed < exit_after:
                try:
                    self.step()
                except MemoryError:
                    raise
                except Exception as e:  # one fault must not take the node down
                    say("node loop error: " + repr(e))
                    compat.sleep_ms(1000)
                    continue
                # a running job ends elsewhere (its own process, or its thread): look soon
                self.mqtt.wait(busy_wait_s if runner.running else 0.05)
        except KeyboardInterrupt:
            say("stopping (Ctrl-C)")
        finally:
            executor.close()
            try:
                self.stop()
            except Exception as e:
                say("could not say goodbye to the broker: " + repr(e))
            say(
                "node " + self.node_id + " stopped: " + str(runner.completed)
                + " jobs completed, " + str(runner.failed) + " failed"
            )  # fmt: skip
        return 0

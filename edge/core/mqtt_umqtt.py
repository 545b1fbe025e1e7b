"""MQTT adapter for MicroPython nodes: micropython-lib's umqtt.simple behind the interface
edge/core/session.py uses (the one edge/mqtt_paho.py gives CPython nodes): connect, subscribe,
publish, poll, wait, reconnected, disconnect.

umqtt.simple is the protocol level: it raises on a broken connection and blocks only while
it reads one packet or waits for an ack. This is the robust level, as umqtt.robust and
mqtt_as are: it reads only when the socket is readable (poll() never waits), pings within
the keepalive, notices a dead connection, reconnects with backoff (1 s doubling to 30 s),
re-subscribes, and re-sends the QoS 1 messages published while the broker was away (the
latest `queue_cap`; heartbeats, QoS 0, are dropped: the next one replaces them).
tools/fetch-umqtt.py installs umqtt.simple where edge/mp_main.py looks for it.

mqtts:// (a hub with --tls, docs/tls.md) is MQTT over TLS: umqtt.simple's `ssl=True` with
`ssl_params`, the arguments of the port's ssl.wrap_socket, which the node passes in
(edge/mp_main.py: the pinned CA as `cadata`, `cert_reqs` CERT_REQUIRED); this module adds
`server_hostname`, so the broker's certificate must name the host of the URL. A certificate
the node does not trust fails the connection at once (retrying cannot help), and every
reconnect verifies it again.
"""

try:
    import select
except ImportError:  # pragma: no cover
    import uselect as select  # type: ignore[no-redef]

from umqtt.simple import MQTTClient

from edge.core import compat

BACKOFF_MIN_MS = 1000
BACKOFF_MAX_MS = 30000
READS_PER_POLL = 32  # packets read per poll(), so one busy topic cannot starve the node


class MqttUnavailable(OSError):
    """The broker cannot be reached, or refused the connection."""


TLS_SCHEMES = ("mqtts", "ssl")
SCHEMES = ("mqtt", "tcp", "mqtts", "ssl")


class MqttUntrusted(MqttUnavailable):
    """The broker's certificate is not one the node trusts (not from its CA, or not naming the
    broker's host)."""


def is_tls(url):
    """Whether an MQTT URL is MQTT over TLS (mqtts://)."""
    return url.partition("://")[0] in TLS_SCHEMES


def first_server(url):
    """A broker cluster's servers, comma-separated (docs/broker-cluster.md): a board connects
    to the first; it does not move to another (edge-run does, edge/node_failover.py)."""
    return url.split(",")[0].strip()


def parse_url(url):
    """'mqtt://host:port' or 'mqtts://host:port' -> (host, port)."""
    scheme, sep, rest = url.partition("://")
    host, _, port = rest.partition("/")[0].rpartition(":")
    if not sep or scheme not in SCHEMES or not host:
        raise ValueError(
            "MQTT URL must look like mqtt://host:port or mqtts://host:port, got " + repr(url)
        )
    try:
        port = int(port)
    except ValueError:
        raise ValueError("MQTT URL has no valid port: " + repr(url)) from None
    return host.strip("[]"), port


class UmqttMqtt:
    def __init__(
        self, url, connect_timeout_s=30, keepalive_s=30, queue_cap=32, log=None, ssl_params=None
    ):
        url = first_server(url)
        self.host, self.port = parse_url(url)
        self.ssl_params = None
        if is_tls(url):
            if ssl_params is None:
                raise ValueError(
                    url + " is MQTT over TLS: the node needs the hub's CA to verify it (--ca "
                    "FILE, or ca.pem in its data directory)"
                )
            self.ssl_params = dict(ssl_params)
            self.ssl_params["server_hostname"] = self.host
        self.connect_timeout_s = connect_timeout_s
        self.keepalive_s = keepalive_s
        self.queue_cap = queue_cap
        self.log = log or (lambda *a: None)
        self.client = None
        self.poller = None
        self.params = None
        self.subs = []
        self.inbox = []
        self.pending = []  # QoS 1 (topic, payload, retain) waiting for the broker
        self.up = False
        self.came_back = False
        self.backoff_ms = BACKOFF_MIN_MS
        self.lost_at = compat.ticks_ms()
        self.retry_after_ms = 0
        self.last_out = self.last_in = compat.ticks_ms()

    # -- the interface -------------------------------------------------------------------
    def connect(self, client_id, username, password, will_topic, will_payload):
        self.params = (client_id, username, password, will_topic, will_payload)
        start = compat.ticks_ms()
        while True:
            try:
                self._open()
                return
            except Exception as e:  # umqtt raises OSError, MQTTException, even IndexError
                self._close()
                self._check_trusted(e)
                if compat.ticks_diff(compat.ticks_ms(), start) > self.connect_timeout_s * 1000:
                    raise MqttUnavailable(
                        "cannot reach the MQTT broker at "
                        + self.host + ":" + str(self.port) + ": " + repr(e)
                    ) from None  # fmt: skip
                compat.sleep_ms(500)

    def subscribe(self, topic):
        self.subs.append(topic)
        if self.up:
            try:
                self.client.subscribe(topic, 1)
            except Exception as e:
                self._lost(e)

    def publish(self, topic, payload, qos, retain):
        if self.up:
            try:
                self.client.publish(topic, payload, retain, qos)
                self.last_out = compat.ticks_ms()
                return
            except Exception as e:
                self._lost(e)
        if qos:
            self.pending.append((topic, payload, retain))
            if len(self.pending) > self.queue_cap:
                self.pending.pop(0)

    def poll(self):
        """Messages that arrived, without waiting; reconnects when it is time to."""
        now = compat.ticks_ms()
        if not self.up:
            if compat.ticks_diff(now, self.lost_at) >= self.retry_after_ms:
                self._reconnect()
        else:
            self._read()
            self._keepalive(compat.ticks_ms())
        out = self.inbox
        self.inbox = []
        return out

    def wait(self, timeout_s):
        """Sleep until the broker sends something or timeout_s passes."""
        ms = int(timeout_s * 1000)
        if self.inbox:
            return
        if self.up and self.poller is not None:
            try:
                self.poller.poll(ms)
                return
            except OSError:
                pass
        compat.sleep_ms(ms)

    def connected(self):
        return self.up

    def reconnected(self):
        if self.came_back:
            self.came_back = False
            return True
        return False

    def disconnect(self):
        if self.up:
            try:  # noqa: SIM105 - MicroPython has no contextlib
                self.client.disconnect()  # a clean disconnect: the broker drops the last will
            except Exception:
                pass
        self._close()

    # -- the machinery -------------------------------------------------------------------
    def _check_trusted(self, e):
        """MicroPython's TLS raises ValueError, with mbedTLS's words, for a certificate it
        does not trust (CPython's SSLCertVerificationError is a ValueError too)."""
        if self.ssl_params is not None and isinstance(e, ValueError):
            raise MqttUntrusted(
                "the MQTT broker at " + self.host + ":" + str(self.port) + " presents a "
                "certificate this node does not trust (" + str(e).strip() + "): is the CA the "
                "node has (--ca, node.json's \"ca\", ca.pem) this hub's, and does its "
                "certificate name " + self.host + "?"
            )  # fmt: skip

    def _open(self):
        client_id, username, password, will_topic, will_payload = self.params
        tls = {}
        if self.ssl_params is not None:
            tls = {"ssl": True, "ssl_params": self.ssl_params}
        c = MQTTClient(
            client_id, self.host, self.port, username or None, password or None,
            self.keepalive_s, **tls,
        )  # fmt: skip
        c.set_callback(self._on_message)
        c.set_last_will(will_topic, will_payload, True, 1)
        c.connect()
        self.client = c
        for topic in self.subs:
            c.subscribe(topic, 1)
        self.poller = select.poll()
        self.poller.register(c.sock, select.POLLIN)
        self.up = True
        self.last_out = self.last_in = compat.ticks_ms()
        pending, self.pending = self.pending, []
        for topic, payload, retain in pending:
            self.publish(topic, payload, 1, retain)

    def _on_message(self, topic, payload):
        if not isinstance(topic, str):
            topic = bytes(topic).decode()
        self.inbox.append((topic, bytes(payload)))

    def _read(self):
        for _ in range(READS_PER_POLL):
            try:
                events = self.poller.poll(0)
                if not events:
                    return
                self.client.wait_msg()  # a whole packet is there or on its way
                self.last_in = compat.ticks_ms()
            except Exception as e:
                self._lost(e)
                return

    def _keepalive(self, now):
        if not self.up:
            return
        ka = self.keepalive_s * 1000
        if compat.ticks_diff(now, self.last_in) > ka + ka // 2:
            self._lost(OSError("no answer from the broker for " + str(self.keepalive_s) + " s"))
        elif compat.ticks_diff(now, self.last_out) > ka // 2:
            try:
                self.client.ping()
                self.last_out = now
            except Exception as e:
                self._lost(e)

    def _reconnect(self):
        try:
            self._open()
        except Exception as e:
            self._close()
            self.lost_at, self.retry_after_ms = compat.ticks_ms(), self.backoff_ms
            self.log(
                "MQTT reconnect failed ("
                + repr(e)
                + "); next try in "
                + str(self.backoff_ms)
                + " ms"
            )
            self.backoff_ms = min(self.backoff_ms * 2, BACKOFF_MAX_MS)
            return
        self.backoff_ms = BACKOFF_MIN_MS
        self.came_back = True
        self.log("MQTT connection back")

    def _lost(self, why):
        if self.up:
            self.log("MQTT connection lost: " + repr(why))
        self._close()
        self.lost_at, self.retry_after_ms = compat.ticks_ms(), self.backoff_ms

    def _close(self):
        self.up = False
        if self.client is not None and self.client.sock is not None:
            try:  # noqa: SIM105
                self.client.sock.close()
            except Exception:
                pass
        self.poller = None

"""MQTT adapter for CPython nodes: paho-mqtt behind the small interface edge/core/session.py uses.

paho runs its network loop in a thread and reconnects on its own, waiting 1 s, then twice as
long after each failed attempt up to `max_backoff_s`; this adapter re-subscribes after a
reconnect and tells the session (reconnected()) so it announces itself again.

mqtts:// (the hub's broker with --tls) connects over TLS, verifying the broker against
ca_certs (the CA the node pinned at enrollment, edge/enroll.py) or else the system's CAs.

While the broker is away, publish() returns False instead of handing the message to paho: paho's
queue lives in this process and dies with it, the session's outbox is a file. publish() returns
paho's MQTTMessageInfo otherwise, and delivered() says when the broker acknowledged it.
"""

from __future__ import annotations

import collections
import socket
import ssl
import threading
import time
from typing import Literal
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def _no_delay(_client, _userdata, sock):  # type: ignore[no-untyped-def]
    """Small QoS 1 messages and their acks must not wait out Nagle + delayed ACK (~40 ms)."""
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class PahoMqtt:
    def __init__(
        self,
        url: str,
        connect_timeout_s: float = 30.0,
        min_backoff_s: int = 1,
        max_backoff_s: int = 30,
        ca_certs: str | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "tcp", "mqtts", "ssl") or not parts.hostname:
            raise ValueError(
                f"MQTT URL must look like mqtt://host:port or mqtts://host:port, got {url!r}"
            )
        self.host = parts.hostname
        self.tls = parts.scheme in ("mqtts", "ssl")
        self.port = parts.port or (8883 if self.tls else 1883)
        self.ca_certs = ca_certs
        self.connect_timeout_s = connect_timeout_s
        if not 1 <= min_backoff_s <= max_backoff_s:
            raise ValueError("reconnect backoff must satisfy 1 <= min_backoff_s <= max_backoff_s")
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self._inbox: collections.deque[tuple[str, bytes]] = collections.deque()
        self._subs: list[str] = []
        self._connected = threading.Event()
        self._connects = 0
        self._seen_connects = 0
        self._lock = threading.Lock()
        self.client: mqtt.Client | None = None

    def connect(self, client_id, username, password, will_topic, will_payload):  # type: ignore[no-untyped-def]
        c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=True,
        )
        if username:
            c.username_pw_set(username, password)
        c.will_set(will_topic, will_payload, qos=1, retain=True)
        c.reconnect_delay_set(min_delay=self.min_backoff_s, max_delay=self.max_backoff_s)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_socket_open = _no_delay
        if self.tls:
            from edge.enroll import tls_context  # mqtts:// only

            c.tls_set_context(tls_context(self.ca_certs))
        self.client = c
        deadline = time.monotonic() + self.connect_timeout_s
        while True:
            try:
                c.connect(self.host, self.port, keepalive=30)
                break
            except ssl.SSLCertVerificationError as e:
                # Retrying cannot help: this broker is not the one the node pinned.
                from edge.enroll import untrusted

                why = untrusted(e, f"mqtts://{self.host}:{self.port}", self.ca_certs is not None)
                raise ConnectionError(
                    f"cannot connect to the MQTT broker at {self.host}:{self.port}: {why}"
                ) from e
            except OSError as e:
                if time.monotonic() > deadline:
                    raise ConnectionError(
                        f"cannot reach the MQTT broker at {self.host}:{self.port}: {e}"
                    ) from e
                time.sleep(0.5)
        c.loop_start()
        if not self._connected.wait(max(1.0, deadline - time.monotonic())):
            raise ConnectionError(f"the MQTT broker at {self.host}:{self.port} refused us")
        with self._lock:
            self._seen_connects = self._connects

    def _on_connect(self, client, _userdata, _flags, rc, _props):  # type: ignore[no-untyped-def]
        if rc.is_failure:
            return
        for topic in self._subs:
            client.subscribe(topic, qos=1)
        with self._lock:
            self._connects += 1
        self._connected.set()

    def _on_disconnect(self, *_args):  # type: ignore[no-untyped-def]
        self._connected.clear()

    def _on_message(self, _client, _userdata, msg):  # type: ignore[no-untyped-def]
        self._inbox.append((msg.topic, bytes(msg.payload)))

    def subscribe(self, topic: str) -> None:
        self._subs.append(topic)
        assert self.client is not None
        self.client.subscribe(topic, qos=1)

    def publish(
        self, topic: str, payload: bytes, qos: int, retain: bool
    ) -> mqtt.MQTTMessageInfo | Literal[False]:
        """A receipt for delivered(), or False when the message did not go out (no broker)."""
        if self.client is None or not self._connected.is_set():
            return False
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            # The connection went between the check and the send. paho keeps a QoS 1 copy to
            # send on reconnect, and the caller queues its own: the hub drops the duplicate.
            return False
        return info

    def delivered(self, receipt: mqtt.MQTTMessageInfo) -> bool:
        """True once the broker acknowledged the message (PUBACK for QoS 1)."""
        try:
            return bool(receipt.is_published())
        except (ValueError, RuntimeError):  # paho refused it: never delivered
            return False

    def poll(self) -> list[tuple[str, bytes]]:
        out = []
        while self._inbox:
            out.append(self._inbox.popleft())
        return out

    def wait(self, timeout_s: float) -> None:
        """Sleep until a message arrives or timeout_s passes (keeps the node loop cheap)."""
        deadline = time.monotonic() + timeout_s
        while not self._inbox and time.monotonic() < deadline:
            time.sleep(0.005)

    def connected(self) -> bool:
        return self._connected.is_set()

    def reconnected(self) -> bool:
        with self._lock:
            if self._connects > self._seen_connects:
                self._seen_connects = self._connects
                return True
        return False

    def disconnect(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()

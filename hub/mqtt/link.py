"""The hub's MQTT connection: paho-mqtt driven by the asyncio event loop.

paho runs without a network thread of its own: the loop reads its socket when it is readable,
paho writes inline (the loop waits for writability only when the socket is full), a keepalive
task pings the broker, and a lost connection is reconnected (after 1 s, then up to 5 s apart).
So all MQTT and database work happens on one thread (the ledger's single writer), and no second
Python thread competes for the GIL (with one, every message crossed threads, and a thread that
wants the GIL back can wait up to the interpreter's 5 ms switch interval).

The bridge (bridge.py) owns one Link per broker server: it hands paho's messages to the
bridge's inbox, and the bridge supervises their keepalive tasks with its own. With several hub
replicas (a share group), each Link subscribes to the nodes' and agents' topics as MQTT shared
subscriptions (`$share/GROUP/...`): the server gives each message to one replica of the group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import select
import socket
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge.core import protocol

log = logging.getLogger("hub.mqtt.bridge")  # one logger for the bridge, as before the split


def subscriptions(share_group: str | None = None) -> list[tuple[str, int]]:
    """What the hub listens to (QoS 1): every node's outgoing topics and the agents' requests.
    With a share group, as shared subscriptions, so replicas of the hub split them; MQTT 3.1.1
    clients may use them on Mosquitto (2.0 and later) just as MQTT 5 ones do."""
    filters = [protocol.node_topic("+", kind) for kind in protocol.NODE_OUT]
    filters.append(protocol.agent_topic("+", protocol.SUBMIT))
    filters += [protocol.agent_topic("+", k) for k in (protocol.INVOKE, protocol.RESPONSE)]
    if share_group is not None:
        filters = [f"$share/{share_group}/{f}" for f in filters]
    return [(f, 1) for f in filters]


def valid_share_group(name: str) -> bool:
    """A group name is one topic level: no `/`, no wildcards (MQTT 5, 4.8.2)."""
    return bool(name) and not any(c in name for c in "/+#\x00")


def _no_delay(_client: Any, _userdata: Any, sock: Any) -> None:
    """Small QoS 1 messages and their acks must not wait out Nagle + delayed ACK (~40 ms)."""
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Link:
    """One paho client on the running event loop: connect, read, flush, keepalive, reconnect.

    `on_message` is paho's message callback (client, userdata, message), called on the loop;
    `max_read` is how many packets one read takes at most (the bridge's batch size);
    `share_group`: subscribe as that group's shared subscriptions (None: plain ones)."""

    def __init__(
        self,
        host: str,
        port: int,
        on_message: Callable[[Any, Any, mqtt.MQTTMessage], None],
        max_read: int,
        share_group: str | None = None,
    ) -> None:
        if share_group is not None and not valid_share_group(share_group):
            raise ValueError(f"a share group is one topic level (no / + #), not {share_group!r}")
        self.host, self.port = host, port
        self.max_read = max_read
        self.share_group = share_group
        self.stopping = False  # set by the bridge when it stops: no more reconnecting
        self.away_since: float | None = None  # monotonic time the broker was lost (or missed)
        self.reconnecting: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connected = asyncio.Event()
        self._was_connected = False
        self._writing = False
        # The hub's own broker uses the login's name (deparrow-hub) as client id whatever is
        # sent. An outside broker may take it as sent: several hubs there need ids of their
        # own, and one nobody can guess, or anyone able to connect could take the hub's over.
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"deparrow-hub-{secrets.token_hex(8)}",
            clean_session=True,
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = on_message
        self.client.on_disconnect = self._on_disconnect
        self.client.on_socket_open = self._on_socket_open
        self.client.on_socket_close = self._on_socket_close

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # --- connecting and disconnecting ------------------------------------------------------
    async def open(self, deadline: float) -> None:
        """Open the connection (CONNECT sent), trying again until `deadline` (monotonic)."""
        self._loop = asyncio.get_running_loop()
        while True:
            try:
                self.client.connect(self.host, self.port, keepalive=30)
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    raise ConnectionError(
                        f"cannot reach the MQTT broker at {self.host}:{self.port}: {e}"
                    ) from e
                await asyncio.sleep(0.2)
        self.flush()

    async def accepted(self, timeout_s: float) -> None:
        """Wait until the broker has accepted the hub; TimeoutError if it does not in time."""
        await asyncio.wait_for(self._connected.wait(), timeout_s)

    def close(self) -> None:
        """Say goodbye to the broker and let go of the socket."""
        self.client.disconnect()
        self.flush()
        self.forget_socket()

    def forget_socket(self) -> None:
        sock = self.client.socket()
        if sock is not None:
            self._on_socket_close(None, None, sock)

    # --- paho on the event loop ------------------------------------------------------------
    def _on_socket_open(self, _c: Any, _u: Any, sock: Any) -> None:
        _no_delay(_c, _u, sock)
        if self._loop is not None:
            self._loop.add_reader(sock, self._read)

    def _on_socket_close(self, _c: Any, _u: Any, sock: Any) -> None:
        if self._loop is not None:
            self._loop.remove_reader(sock)
            if self._writing:
                self._writing = False
                self._loop.remove_writer(sock)

    def _read(self) -> None:
        # paho reads one packet per loop_read(); take all that have arrived (up to a batch),
        # so they reach the consumer together and share one commit.
        client = self.client
        for _ in range(self.max_read):
            if client.loop_read() != mqtt.MQTT_ERR_SUCCESS:
                break
            sock = client.socket()
            if sock is None or not select.select([sock], [], [], 0)[0]:
                break
        self.flush()  # acks, and anything paho queued inside its callbacks

    def flush(self) -> None:
        """Write what paho queued; wait for writability only when the socket is full."""
        client = self.client
        if client.want_write():
            client.loop_write()
        sock = client.socket()
        if sock is None or self._loop is None:
            return
        if client.want_write():
            if not self._writing:
                self._writing = True
                self._loop.add_writer(sock, self.flush)
        elif self._writing:
            self._writing = False
            self._loop.remove_writer(sock)

    async def keepalive(self) -> None:
        """Runs as long as the bridge does (supervised by it)."""
        while True:
            await asyncio.sleep(1.0)
            if self.client.socket() is not None:
                self.client.loop_misc()  # pings; notices a connection that died quietly
                self.flush()

    async def _reconnect(self) -> None:
        """After 1 s, then twice as long after each failure, up to 5 s. The TCP connection is
        tried without blocking the loop first; paho's own connect then finds the broker up."""
        delay = 1.0
        while not self.stopping and not self.client.is_connected():
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            try:
                _r, w = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), 5)
                w.close()
                self.client.reconnect()
            except (OSError, TimeoutError) as e:
                log.info("the MQTT broker at %s:%d is still away: %s", self.host, self.port, e)
                continue
            self.flush()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._connected.wait(), 5)
        self.reconnecting = None

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            log.error("the MQTT broker at %s:%d refused the hub: %s", self.host, self.port, rc)
            return
        client.subscribe(subscriptions(self.share_group))
        self.away_since = None
        if self._was_connected:
            log.info("hub reconnected to the MQTT broker")
        self._was_connected = True
        self._connected.set()

    def away_s(self) -> float:
        """How long the broker has been away (0 while connected or never tried)."""
        return 0.0 if self.away_since is None else time.monotonic() - self.away_since

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        self._connected.clear()
        if self.away_since is None:
            self.away_since = time.monotonic()
        if self.stopping or self._loop is None:
            return
        log.warning(
            "hub lost the MQTT broker at %s:%d (%s); reconnecting", self.host, self.port, rc
        )
        self.keep_trying()

    def keep_trying(self) -> None:
        """Reconnect in the background (after a loss, or a server of a cluster that was away
        when the hub started): the others carry the traffic meanwhile."""
        if self.away_since is None:
            self.away_since = time.monotonic()
        if self.reconnecting is None and not self.stopping:
            self._loop = self._loop or asyncio.get_running_loop()
            self.reconnecting = self._loop.create_task(self._reconnect())

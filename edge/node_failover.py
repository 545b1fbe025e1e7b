"""edge-run --bootstrap: a node that moves to another broker when its own is gone.

`FailoverMqtt` is the MQTT adapter edge/core/session.py takes, over several brokers: the ones
the hub's bootstrap list gives nodes (GET /api/v1/bootstrap, edge/bootstrap.py), best first,
then the one in node.json. It connects to the first that takes the node. When that connection
is lost, paho tries to get it back (edge/mqtt_paho.py); when it is still lost after
`window_s`, the adapter fetches the list again and connects to the next broker that takes the
node, and says so once through reconnected(), so the session announces itself there and sends
its outbox first (edge/core/outbox.py): results finished while cut off are delivered, once
(the hub drops a duplicate). The broker left behind is forgotten; one that stays unreachable
is retried only after the others.

A board's firmware has no room for this: it stays on its one broker (edge/mp_main.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from edge.mqtt_paho import PahoMqtt

log = logging.getLogger("edge")

WINDOW_S = 10.0  # how long a lost broker may take to come back before the node moves on
CONNECT_S = 5.0  # how long each broker is tried when moving


class FailoverMqtt:
    """PahoMqtt over several broker URLs. refresh() -> the bootstrap list's broker URLs, best
    first (may raise OSError: the list is kept); say(line) reports each move."""

    def __init__(
        self,
        urls: list[str],
        *,
        refresh: Callable[[], list[str]] | None = None,
        window_s: float = WINDOW_S,
        connect_timeout_s: float = CONNECT_S,
        ca_certs: str | None = None,
        say: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        make: Callable[..., Any] = PahoMqtt,
    ) -> None:
        if not urls:
            raise ValueError("a node needs at least one broker URL")
        self.urls = list(dict.fromkeys(urls))
        self.refresh = refresh
        self.window_s = window_s
        self.connect_timeout_s = connect_timeout_s
        self.ca_certs = ca_certs
        self.say = say or (lambda _line: None)
        self.clock = clock
        self.make = make
        self.url = self.urls[0]
        self.current: Any = None
        self.moves = 0
        self._args: tuple[Any, ...] = ()
        self._subs: list[str] = []
        self._lost_at: float | None = None
        self._moved = False

    # --- connecting ----------------------------------------------------------------------
    def connect(self, client_id, username, password, will_topic, will_payload):  # type: ignore[no-untyped-def]
        self._args = (client_id, username, password, will_topic, will_payload)
        self._connect_first(self.urls)

    def _connect_first(self, urls: list[str]) -> None:
        """Connect to the first of urls that takes the node; ConnectionError naming each."""
        problems = []
        for url in urls:
            try:
                mqtt = self.make(url, connect_timeout_s=self.connect_timeout_s,
                                 ca_certs=self.ca_certs)  # fmt: skip
            except ValueError as e:  # a URL the list should not have given
                problems.append(str(e))
                continue
            try:
                mqtt.connect(*self._args)
                for topic in self._subs:
                    mqtt.subscribe(topic)
            except OSError as e:  # ConnectionError is one
                problems.append(str(e))
                _close(mqtt)
                continue
            old, self.current, self.url = self.current, mqtt, url
            if old is not None:
                _close(old)
            return
        raise ConnectionError("no broker took this node: " + "; ".join(problems))

    def _check(self) -> None:
        """Move to another broker when this one has been lost for window_s."""
        if self.current is None or self.current.connected():
            self._lost_at = None
            return
        now = self.clock()
        if self._lost_at is None:
            self._lost_at = now
            return
        if now - self._lost_at < self.window_s:
            return
        if self.refresh is not None:
            try:
                fresh = self.refresh()
            except OSError as e:  # no replica answers: move along the list known
                log.info("cannot refresh the broker list: %s", e)
            else:
                self.urls = list(dict.fromkeys([*fresh, *self.urls]))
        left = self.url
        others = [u for u in self.urls if u != left]
        try:
            self._connect_first(others)
        except ConnectionError as e:
            log.info("%s; staying with %s", e, left)
            self._lost_at = now  # paho keeps trying the old one; the others again later
            return
        self._lost_at = None
        self._moved = True
        self.moves += 1
        self.say(
            f"edge-run: the broker at {left} was gone for {self.window_s:g} s: moved to "
            f"{self.url} (queued results go out there)"
        )

    # --- what the session uses -------------------------------------------------------------
    def subscribe(self, topic: str) -> None:
        self._subs.append(topic)
        self.current.subscribe(topic)

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> Any:
        return self.current.publish(topic, payload, qos, retain)

    def delivered(self, receipt: Any) -> bool:
        return bool(self.current.delivered(receipt))

    def poll(self) -> list[tuple[str, bytes]]:
        return list(self.current.poll())

    def wait(self, timeout_s: float) -> None:
        self.current.wait(timeout_s)

    def connected(self) -> bool:
        self._check()
        return bool(self.current.connected())

    def reconnected(self) -> bool:
        self._check()
        back = bool(self.current.reconnected())  # consumed either way
        if self._moved:
            self._moved = False
            return True  # a new broker: announce there, outbox first
        return back

    def disconnect(self) -> None:
        if self.current is not None:
            self.current.disconnect()


def _close(mqtt: Any) -> None:
    try:
        mqtt.disconnect()
    except Exception as e:  # a half-made connection: nothing more to close
        log.info("closing a broker connection: %r", e)

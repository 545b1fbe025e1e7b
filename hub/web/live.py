"""Live updates for the dashboard: the latest events, each node's recent heartbeats, and a
Server-Sent Events stream per open page (job states, node states, heartbeats, balances).

The hub keeps no heartbeat history in its database (a node row holds only the last beat), so
the bridge hands each heartbeat here once it is committed (a "beat" change) and the last
HEARTBEATS_KEPT beats of each node stay in memory, in a ring: enough for the node page's
chart, gone when the hub restarts. Memory stays bounded: compact tuples, and
rings for at most NODES_TRACKED nodes (the ones heard from least recently are dropped).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from hub.api.auth import Identity
from hub.ledger.money import UnknownAccount, format_micro
from hub.market.jobs import wallet_of
from hub.web import session

log = logging.getLogger(__name__)

EVENTS_KEPT = 200
HEARTBEATS_KEPT = 240
NODES_TRACKED = 2000
BEAT_FIELDS = ("t", "state", "load", "cpu", "memory_mb", "running")
WALLET_CHECK_S = 1.0
KEEPALIVE_S = 15.0
_CLOSE: dict[str, Any] = {"kind": "close"}


@dataclass
class Live:
    events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=EVENTS_KEPT))
    beats: OrderedDict[str, deque[tuple[Any, ...]]] = field(default_factory=OrderedDict)
    subscribers: set[asyncio.Queue[dict[str, Any]]] = field(default_factory=set)
    loop: asyncio.AbstractEventLoop | None = None
    loop_thread: int | None = None

    def publish(self, event: dict[str, Any]) -> None:
        loop = self.loop
        if loop is not None and threading.get_ident() != self.loop_thread:
            loop.call_soon_threadsafe(self._fan_out, event)
        else:
            self._fan_out(event)

    def _fan_out(self, event: dict[str, Any]) -> None:
        for q in list(self.subscribers):
            with contextlib.suppress(asyncio.QueueFull):  # a stalled page misses events
                q.put_nowait(event)


LIVE = web.AppKey("live", Live)


def record(app: web.Application, kind: str, data: dict[str, Any]) -> None:
    """A job or node changed: keep it for the latest-events list and tell open pages."""
    live = app.get(LIVE)
    if live is None:
        return
    if kind == "beat":  # a heartbeat: the node's ring and open pages, not the events list
        _beat(live, data)
        return
    event = {"t": time.time(), "kind": kind, **data}
    live.events.appendleft(event)
    live.publish(event)


def heartbeats(app: web.Application, node_id: str) -> list[dict[str, Any]]:
    ring = app[LIVE].beats.get(node_id)
    return [dict(zip(BEAT_FIELDS, beat, strict=True)) for beat in ring] if ring else []


def _beat(live: Live, data: dict[str, Any]) -> None:
    beat = tuple(data[f] for f in BEAT_FIELDS)
    ring = live.beats.get(data["id"])
    if ring is None:
        ring = live.beats[data["id"]] = deque(maxlen=HEARTBEATS_KEPT)
        if len(live.beats) > NODES_TRACKED:
            live.beats.popitem(last=False)
    else:
        live.beats.move_to_end(data["id"])
    ring.append(beat)
    live.publish({"kind": "beat", "id": data["id"], **dict(zip(BEAT_FIELDS, beat, strict=True))})


async def on_startup(app: web.Application) -> None:
    live = app[LIVE]
    live.loop = asyncio.get_running_loop()
    live.loop_thread = threading.get_ident()


async def on_shutdown(app: web.Application) -> None:
    """Before the services close: end every open stream."""
    app[LIVE]._fan_out(_CLOSE)


def setup(app: web.Application) -> None:
    app[LIVE] = Live()
    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)


class _Visibility:
    """Which events one signed-in identity may see: admins all, others their own."""

    def __init__(self, services: Any, who: Identity) -> None:
        self.services = services
        self.who = who
        self.owners: dict[tuple[str, str], str | None] = {}

    def allows(self, event: dict[str, Any]) -> bool:
        if self.who.is_admin:
            return True
        kind = "job" if event["kind"] == "job" else "node"
        key = (kind, str(event.get("id")))
        if key not in self.owners:
            row = (
                self.services.store.job(key[1])
                if kind == "job"
                else self.services.store.node(key[1])
            )
            self.owners[key] = row["owner"] if row is not None else None
        return self.owners[key] == self.who.user_id


def _wallet_state(services: Any, user_id: str) -> dict[str, Any] | None:
    wallet = wallet_of(user_id)
    try:
        balance = services.ledger.balance(wallet)
        held = services.ledger.held_for(wallet)
    except UnknownAccount:
        return None
    return {"balance": format_micro(balance), "held": format_micro(held),
            "balance_micro": balance, "held_micro": held}  # fmt: skip


async def stream(request: web.Request) -> web.StreamResponse:
    """GET /live: Server-Sent Events for the signed-in identity until the page goes away."""
    who = session.current(request)
    if who is None:
        return web.Response(status=401, text="sign in first")
    services = session.services(request)
    live = request.app[LIVE]
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1000)
    live.subscribers.add(queue)
    seen = _Visibility(services, who)
    wallet: dict[str, Any] | None = None
    last_wallet_check = 0.0
    last_write = time.monotonic()

    async def send(kind: str, data: dict[str, Any]) -> None:
        nonlocal last_write
        await response.write(f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode())
        last_write = time.monotonic()

    try:
        await send("hello", {"user": who.user_id, "role": who.role})
        while True:
            try:
                event: dict[str, Any] | None = await asyncio.wait_for(queue.get(), WALLET_CHECK_S)
            except TimeoutError:
                event = None
            if event is _CLOSE:
                break
            if event is not None and seen.allows(event):
                await send(str(event["kind"]), event)
            now = time.monotonic()
            if event is None or event["kind"] == "job" or now - last_wallet_check > 1:
                last_wallet_check = now
                state = _wallet_state(services, who.user_id)
                if state is not None and state != wallet:
                    wallet = state
                    await send("wallet", state)
            if now - last_write > KEEPALIVE_S:
                await response.write(b": keepalive\n\n")
                last_write = now
    except ConnectionError:  # the page went away
        pass
    finally:
        live.subscribers.discard(queue)
    return response

"""The registry of live hub replicas, kept in the store they share.

Each replica upserts its own row every `interval_s` (`Presence.tick`): its id (new at every
process start), the URL clients reach it by, the MQTT broker URLs it gives nodes, its region,
and its load: the HTTP requests it answered per second over the last interval and how late its
event loop woke (a busy loop is a loaded replica, whatever the request count). A row not
refreshed within `STALE_INTERVALS` of its own interval is not listed: that replica is gone, or
too stuck to serve. A replica that stops cleanly deletes its row; rows of crashed replicas are
deleted by the others after `FORGET_INTERVALS`.

GET /api/v1/bootstrap (hub/api/bootstrap.py) serves the list to nodes, the CLI and the SDK.
Times come from an injected clock (the hub's, `time.time`), so tests move it instead of
sleeping.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from hub.store.db import Database

log = logging.getLogger(__name__)

COMPONENT = "cluster"
# A row is listed while it is younger than this many of its replica's intervals.
STALE_INTERVALS = 3
# Rows of replicas that vanished without a goodbye are deleted after this many intervals.
FORGET_INTERVALS = 100
DEFAULT_INTERVAL_S = 5.0

MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "replicas",
        """
        CREATE TABLE replicas (
            id TEXT PRIMARY KEY,
            url TEXT NOT NULL,
            -- JSON array of the broker URLs this replica gives nodes
            brokers TEXT NOT NULL DEFAULT '[]',
            region TEXT NOT NULL DEFAULT '',
            requests_per_s REAL NOT NULL DEFAULT 0,
            lag_ms REAL NOT NULL DEFAULT 0,
            interval_s REAL NOT NULL,
            started_at REAL NOT NULL,
            seen_at REAL NOT NULL
        );
        CREATE INDEX replicas_seen ON replicas(seen_at);
        """,
    ),
]

UPSERT = (
    "INSERT INTO replicas (id, url, brokers, region, requests_per_s, lag_ms, interval_s,"
    " started_at, seen_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (id) DO UPDATE SET url = excluded.url, brokers = excluded.brokers,"
    " region = excluded.region, requests_per_s = excluded.requests_per_s,"
    " lag_ms = excluded.lag_ms, interval_s = excluded.interval_s, seen_at = excluded.seen_at"
)


@dataclass(frozen=True)
class Replica:
    id: str
    url: str
    brokers: tuple[str, ...]
    region: str
    requests_per_s: float
    lag_ms: float
    interval_s: float
    seen_at: float


def new_replica_id() -> str:
    return "r_" + uuid.uuid4().hex[:16]


def split_urls(text: str | None) -> list[str]:
    """A comma-separated list of URLs (a broker cluster's servers), blanks dropped."""
    return [u.strip() for u in (text or "").split(",") if u.strip()]


class Registry:
    """The replicas' rows in the shared store."""

    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock  # looked up at each call: a test may swap it
        db.migrate(COMPONENT, MIGRATIONS)

    def beat(
        self,
        replica_id: str,
        *,
        url: str,
        brokers: Sequence[str] = (),
        region: str = "",
        requests_per_s: float = 0.0,
        lag_ms: float = 0.0,
        interval_s: float = DEFAULT_INTERVAL_S,
    ) -> Replica:
        """Insert or refresh this replica's row, seen now; forget long-dead replicas."""
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, not {interval_s!r}")
        now = self.clock()
        with self.db.transaction() as c:
            c.execute(
                UPSERT,
                (replica_id, url, json.dumps(list(brokers)), region, float(requests_per_s),
                 float(lag_ms), float(interval_s), now, now),
            )  # fmt: skip
            c.execute(
                "DELETE FROM replicas WHERE seen_at + interval_s * ? < ?",
                (FORGET_INTERVALS, now),
            )
        return Replica(replica_id, url, tuple(brokers), region, float(requests_per_s),
                       float(lag_ms), float(interval_s), now)  # fmt: skip

    def live(self) -> list[Replica]:
        """The replicas refreshed within STALE_INTERVALS of their interval, by id."""
        rows = self.db.query(
            "SELECT id, url, brokers, region, requests_per_s, lag_ms, interval_s, seen_at"
            " FROM replicas WHERE seen_at + interval_s * ? >= ? ORDER BY id",
            (STALE_INTERVALS, self.clock()),
        )
        return [_replica(r) for r in rows]

    def remove(self, replica_id: str) -> None:
        with self.db.transaction() as c:
            c.execute("DELETE FROM replicas WHERE id = ?", (replica_id,))


def _replica(r: Any) -> Replica:
    return Replica(str(r["id"]), str(r["url"]), tuple(_urls(r["brokers"])), str(r["region"]),
                   float(r["requests_per_s"]), float(r["lag_ms"]), float(r["interval_s"]),
                   float(r["seen_at"]))  # fmt: skip


def _urls(text: object) -> list[str]:
    try:
        value = json.loads(str(text))
    except ValueError:
        return []
    return [str(u) for u in value] if isinstance(value, list) else []


class Presence:
    """This replica's row, refreshed every interval_s while `run()` runs, deleted by
    `leave()`. requests() is a running count of the HTTP requests answered (its rate over the
    last interval is the load); monotonic() times that interval."""

    def __init__(
        self,
        registry: Registry,
        *,
        url: str,
        brokers: Sequence[str],
        region: str = "",
        requests: Callable[[], float] = lambda: 0.0,
        interval_s: float = DEFAULT_INTERVAL_S,
        replica_id: str | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, not {interval_s!r}")
        self.registry = registry
        self.id = replica_id or new_replica_id()
        self.url = url
        self.brokers = list(brokers)
        self.region = region
        self.requests = requests
        self.interval_s = interval_s
        self.monotonic = monotonic
        self._last: tuple[float, float] | None = None  # (monotonic time, request count)
        self.failures = 0

    def tick(self, lag_s: float = 0.0) -> Replica:
        """Measure the load since the last tick and refresh the row."""
        now, count = self.monotonic(), float(self.requests())
        rate = 0.0
        if self._last is not None and now > self._last[0]:
            rate = max(0.0, count - self._last[1]) / (now - self._last[0])
        self._last = (now, count)
        return self.registry.beat(
            self.id,
            url=self.url,
            brokers=self.brokers,
            region=self.region,
            requests_per_s=round(rate, 3),
            lag_ms=round(max(0.0, lag_s) * 1000, 3),
            interval_s=self.interval_s,
        )

    async def run(self) -> None:
        """Refresh the row every interval_s until cancelled (tick() once first, to be listed
        from the start). The loop's lag is how much later than asked the sleep returned."""
        loop = asyncio.get_running_loop()
        while True:
            began = loop.time()
            await asyncio.sleep(self.interval_s)
            try:
                self.tick(loop.time() - began - self.interval_s)
            except Exception:  # the store is away: the row goes stale, clients move on
                self.failures += 1
                log.exception("could not refresh this replica's row in the registry")

    def leave(self) -> None:
        """A clean stop: clients stop being sent here at once, not after three intervals."""
        try:
            self.registry.remove(self.id)
        except Exception:
            log.exception("could not remove this replica's row from the registry")

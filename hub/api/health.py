"""`GET /healthz` and `GET /readyz`, for a supervisor and a load balancer (docs/operations.md).

/healthz: the process answers HTTP (always 200). /readyz: it can do its work: the database
takes a write transaction and commits it (through the ledger's group commit, the one writer,
so the probe waits its turn like any write and never races it), and the bridge is connected to
the MQTT broker. Otherwise 503, naming what is not ready. Both open, without a token: they say
nothing but ready or not, and why.
"""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

from aiohttp import web

from hub.api.http import json_response
from hub.api.services import SERVICES

# A group commit takes milliseconds; a database that has not committed in this long is not
# one a request should wait on.
DB_PROBE_S = 2.0


async def healthz(_request: web.Request) -> web.Response:
    return json_response({"ok": True})


def _probe(c: sqlite3.Connection) -> None:
    # The writer runs this inside its BEGIN IMMEDIATE batch: reaching it means the write lock
    # was taken; the caller hears back only once that batch's COMMIT succeeded.
    c.execute("SELECT 1").fetchone()


async def _database(services: Any) -> str | None:
    writer = services.writer
    if writer is None or not writer.running:
        return "the ledger writer is not running"
    try:
        await asyncio.wait_for(writer.run(_probe), DB_PROBE_S)
    except TimeoutError:
        return f"a write transaction did not commit within {DB_PROBE_S:g} s"
    except Exception as e:  # disk full, read-only file, I/O error
        return f"a write transaction failed: {e}"
    return None


def _broker(services: Any) -> str | None:
    bridge = services.bridge
    if bridge is None:
        return "the MQTT bridge has not started"
    if not bridge.connected:
        return "not connected to the MQTT broker at " + ",".join(services.broker_urls_shown())
    return None


async def readyz(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    problems = {
        name: problem
        for name, problem in (
            ("database", await _database(services)),
            ("broker", _broker(services)),
        )
        if problem is not None
    }
    lead = services.leadership  # which replica this is, and whether it runs the scheduler
    replica = {"replica": lead.replica, "leading": lead.leading}
    if problems:
        return json_response({"ready": False, "not_ready": problems, **replica}, 503)
    return json_response({"ready": True, **replica})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)

"""A slow disk against the hub's event loop: an unrelated read while group commits are slow,
with the COMMIT on the loop (the baseline, as before) and off it (Database.write_batch).

    python bench/slow_commit.py [--json] [--delays 0,20,200,1000] [--seconds 3]

A real hub in this process: the app factory, its own Mosquitto, a real SQLite file (WAL,
synchronous=FULL), served on a loopback port. The slow disk is a delay added to every COMMIT
(a time.sleep just before it, which, like an fsync, releases the GIL). For each delay, the
baseline (Database.commit_off_loop = False: the COMMIT runs on the loop) and the hub as it is
run the same load, one after the other on the same hub:

- write load: 64 tasks on the hub's loop awaiting `writer.transfer(...)` back to back (what the
  bridge's message batches and the API's submissions do), so a COMMIT is nearly always in
  flight;
- the unrelated read: GET /api/v1/wallet of a user no transfer touches, from a client thread
  (http.client, keep-alive), one every 25 ms; its latency (p50, p99, max). A GET waits for the
  COMMIT in flight when it arrives at most hub.app.READ_GRACE_S, then reads the durable state;
- the loop's stall: a task on the loop sleeping 10 ms, its worst oversleep (what MQTT
  keepalives, socket reads and the scheduler's ticks suffer);
- transfers acknowledged per second (each only after its COMMIT).

Then the books must balance and the entries stored must equal the transfers acknowledged.
Prints figures and ratios, and as its last line one JSON object. Exit status 1 when a check
fails. Each window lasts max(--seconds, 6 x delay), so even the slowest disk gets a few
COMMITs per window.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aiohttp import web  # noqa: E402

from hub.api.services import SERVICES  # noqa: E402
from hub.app import READ_GRACE_S, create_app  # noqa: E402
from hub.config import HubConfig  # noqa: E402
from hub.ledger.money import MICRO  # noqa: E402
from hub.market.jobs import wallet_of  # noqa: E402

WRITERS = 64
READ_EVERY_S = 0.025


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def filesystem_of(path: Path) -> str:
    """The type of the filesystem holding path (tmpfs would make fsync free: say so)."""
    best, fstype = "", "unknown"
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                mount, kind = line.split()[1:3]
                if str(path).startswith(mount) and len(mount) > len(best):
                    best, fstype = mount, kind
    except OSError:
        pass
    return fstype


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


class Reader(threading.Thread):
    """GET /api/v1/wallet every READ_EVERY_S until stopped; latencies in ms."""

    def __init__(self, port: int, jwt: str) -> None:
        super().__init__(daemon=True)
        self.port, self.jwt = port, jwt
        self.latencies: list[float] = []
        self.errors = 0
        self.stop = threading.Event()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        headers = {"Authorization": "Bearer " + self.jwt}
        while not self.stop.is_set():
            started = time.perf_counter()
            conn.request("GET", "/api/v1/wallet", headers=headers)
            r = conn.getresponse()
            r.read()
            if r.status == 200:
                self.latencies.append((time.perf_counter() - started) * 1000)
            else:
                self.errors += 1
            self.stop.wait(READ_EVERY_S)
        conn.close()


async def window(
    services: Any, port: int, jwt: str, off_loop: bool, load: bool, seconds: float
) -> dict[str, Any]:
    """One measurement: write load (or none), the reader, the loop's stall."""
    services.db.commit_off_loop = off_loop
    writer, ledger = services.writer, services.ledger
    stop = asyncio.Event()
    acknowledged = 0
    lags: list[float] = []

    async def write(i: int) -> None:
        nonlocal acknowledged
        src, dst = wallet_of(f"w{i % 8}"), wallet_of(f"w{(i + 1) % 8}")
        n = 0
        while not stop.is_set():
            await writer.transfer(f"bench:{time.time_ns()}:{i}:{n}", src, dst, 1, "bench")
            acknowledged += 1
            n += 1

    async def watch_loop() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append((time.perf_counter() - t0 - 0.01) * 1000)

    tasks = [asyncio.create_task(watch_loop())]
    if load:
        tasks += [asyncio.create_task(write(i)) for i in range(WRITERS)]
    await asyncio.sleep(0.2)  # the load is under way
    reader = Reader(port, jwt)
    t0, before = time.perf_counter(), acknowledged
    reader.start()
    await asyncio.sleep(seconds)
    reader.stop.set()
    await asyncio.to_thread(reader.join)
    rate = (acknowledged - before) / (time.perf_counter() - t0)
    stop.set()
    await asyncio.gather(*tasks)
    assert ledger.audit().balanced
    lat = reader.latencies
    return {
        "reads": len(lat),
        "read_errors": reader.errors,
        "p50_ms": statistics.median(lat) if lat else float("nan"),
        "p99_ms": pct(lat, 99),
        "max_ms": max(lat) if lat else float("nan"),
        "loop_stall_max_ms": max(lags) if lags else 0.0,
        "transfers_per_s": rate,
        "acknowledged": acknowledged,
    }


async def main(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="bench-slow-commit-"))
    config = HubConfig(
        data_dir=tmp / "hub",
        port=free_port(),
        broker="mosquitto",
        broker_port=0,
        welcome_grant_credits=10,
    )
    app = create_app(config)
    runner = web.AppRunner(app)
    await runner.setup()  # the services: database, writer, broker, bridge
    site = web.TCPSite(runner, "127.0.0.1", config.port)
    await site.start()
    services = app[SERVICES]
    db = services.db
    for i in range(8):  # the writers' wallets, funded for any number of transfers
        services.ledger.open_account(wallet_of(f"w{i}"), "wallet", f"w{i}")
        services.ledger.grant(f"bench-fund:{i}", wallet_of(f"w{i}"), 10**9 * MICRO, "bench")
    _, token, _ = services.create_user("reader", "user")  # nothing of the load touches it

    def jwt() -> str:
        conn = http.client.HTTPConnection("127.0.0.1", config.port, timeout=10)
        conn.request(
            "POST",
            "/api/v1/auth/token",
            json.dumps({"token": token}),
            {"Content-Type": "application/json"},
        )
        body = json.loads(conn.getresponse().read())
        conn.close()
        return str(body["jwt"])

    reader_jwt = await asyncio.to_thread(jwt)
    delay = 0.0
    real_finish = db._finish_outer

    def slow_finish(statement: str) -> None:
        if statement == "COMMIT" and delay:
            time.sleep(delay)  # the slow disk; like an fsync, it releases the GIL
        real_finish(statement)

    db._finish_outer = slow_finish
    entries0 = services.ledger.audit().entries
    fs = filesystem_of(tmp)
    results: dict[str, Any] = {"read_grace_ms": READ_GRACE_S * 1000, "fs": fs, "windows": []}
    ok = True
    print(f"database on {fs} ({tmp}); COMMIT delay 0 = the disk's own fsync")
    try:
        idle = await window(services, config.port, reader_jwt, True, False, args.seconds)
        results["idle"] = idle
        print(
            f"idle hub: GET p50 {idle['p50_ms']:.2f} ms, p99 {idle['p99_ms']:.2f} ms,"
            f" max {idle['max_ms']:.2f} ms ({idle['reads']} reads)"
        )
        print(
            f"GET /api/v1/wallet while {WRITERS} tasks transfer through the writer; a GET"
            f" waits for the COMMIT in flight at most {READ_GRACE_S * 1000:.0f} ms"
        )
        head = (
            f"{'COMMIT delay':>12}  {'COMMIT':>7}  {'reads':>5}  {'p50 ms':>8}"
            f"  {'p99 ms':>8}  {'max ms':>8}  {'loop stall':>10}  {'transfers/s':>11}"
        )
        print(head)
        acknowledged = 0
        for ms in args.delays:
            delay = ms / 1000
            seconds = max(args.seconds, 6 * delay)
            pair = {}
            for off_loop in (False, True):
                r = await window(services, config.port, reader_jwt, off_loop, True, seconds)
                acknowledged += r["acknowledged"]
                ok &= r["read_errors"] == 0
                pair["off_loop" if off_loop else "on_loop"] = r
                print(
                    f"{ms:>9} ms  {'thread' if off_loop else 'loop':>7}  {r['reads']:>5}"
                    f"  {r['p50_ms']:>8.1f}  {r['p99_ms']:>8.1f}  {r['max_ms']:>8.1f}"
                    f"  {r['loop_stall_max_ms']:>7.1f} ms  {r['transfers_per_s']:>11.0f}"
                )
            before, after = pair["on_loop"], pair["off_loop"]
            ratio = before["p50_ms"] / after["p50_ms"] if after["p50_ms"] else float("nan")
            print(
                f"{'':>12}  GET p50 {ratio:.1f}x faster, p99 {before['p99_ms']:.0f} ->"
                f" {after['p99_ms']:.0f} ms; loop stall {before['loop_stall_max_ms']:.0f} ->"
                f" {after['loop_stall_max_ms']:.0f} ms"
            )
            results["windows"].append({"delay_ms": ms, **pair, "p50_ratio": ratio})
        delay = 0.0
        audit = services.ledger.audit()
        stored = audit.entries - entries0
        ok &= audit.balanced and stored == acknowledged
        print(
            f"books balanced: {audit.balanced}; entries stored {stored},"
            f" transfers acknowledged {acknowledged}"
        )
    finally:
        delay = 0.0
        await runner.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    results["ok"] = ok
    print(json.dumps(results) if args.json else json.dumps({"ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--delays",
        default="0,20,200,1000",
        type=lambda s: [int(x) for x in s.split(",")],
        help="COMMIT delays to add, in ms (comma-separated)",
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each window")
    parser.add_argument("--json", action="store_true", help="all figures as JSON, last line")
    sys.exit(asyncio.run(main(parser.parse_args())))

"""Dashboard pages with a large history: server time of the Jobs and Wallet pages.

    python bench/dashboard.py [--json] [--jobs 100000] [--entries 100000] [--requests 40]

A hub database is filled with `--jobs` jobs (over 30 days, mixed states, all one user's) and
`--entries` ledger entries touching that user's wallet (uptime pay, transfers in and out),
then a real hub process serves it. The user signs in through the dashboard's own sign-in
form and asks for each page `--requests` times; the figure is the median of the hub's own
Server-Timing header (the page handler, from the request to the rendered HTML: queries,
template and all), beside the wall time the client saw.

- `jobs_page_ms`: GET /jobs (the newest page, with the per-state counts of the filter chips);
  `wallet_page_ms`: GET /wallet (balance, held credits, the newest page of history).
- For context: a page of each halfway back through the history, the Jobs page filtered by
  state and by the admin over everyone's jobs, the wallet chart's data (fetched by the page
  after it loads), and the baseline: the same pages for a user with an empty history, in the
  same hub. Target: 100 ms or less for both figures.

Prints figures and ratios, and as its last line one JSON object. Exit status 1 when a page
answers anything but 200.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deparrow import localnet  # noqa: E402
from hub.app import open_services  # noqa: E402
from hub.config import HubConfig  # noqa: E402
from hub.ledger.money import MICRO  # noqa: E402
from hub.market.jobs import wallet_of  # noqa: E402

TARGET_MS = 100.0
DAY = 86400
STATES = ["completed"] * 85 + ["failed"] * 8 + ["cancelled"] * 5 + ["queued"] * 2


def seed(data_dir: Path, jobs: int, entries: int, rng: random.Random) -> dict[str, str]:
    """Fill a fresh hub database; returns the tokens of the busy user and of an idle one."""
    services = open_services(HubConfig(data_dir=data_dir, broker_port=0))
    busy_id, busy_token, _ = services.create_user("busy", "user")
    _, idle_token, _ = services.create_user("idle", "user")
    other_id, _, _ = services.create_user("other", "user")
    db = services.db
    module = services.store.put_blob((ROOT / "wasm-jobs" / "fib.wasm").read_bytes())
    now = time.time()
    start = now - 30 * DAY
    spec = json.dumps(
        {
            "engine": {
                "type": "wasm",
                "module": "example:fib",
                "entrypoint": "fib",
                "args": ["25"],
                "env": {},
            },
            "name": "fib",
            "type": "batch",
            "resources": {"cpu": 1.0, "memory_mb": 64, "gpu": 0},
            "timeout": 60,
            "priority": "normal",
            "input": None,
            "gas": None,
            "constraints": {},
        }
    )
    result = json.dumps(
        {
            "exit_code": 0,
            "stdout": "",
            "stderr": "",
            "returns": [75025],
            "error": None,
            "digest": "0" * 64,
            "wall_ms": 70,
            "cpu_ms": 70,
        }
    )
    rows = []
    for i in range(jobs):
        t = start + (now - start) * i / jobs
        state = rng.choice(STATES)
        done = state in ("completed", "failed", "cancelled")
        rows.append((f"j_{i:016x}", busy_id, f"fib-{i % 50}", spec, state, "normal", 1000, 64,
                     60, module, 166666, 2777 if done else None,
                     result if state == "completed" else None, t,
                     t + 0.3 if done else None))  # fmt: skip
    with db.transaction() as c:
        c.executemany(
            "INSERT INTO jobs (id, owner, name, spec, state, priority, cpu_milli, memory_mb,"
            " timeout_s, module_sha256, hold, cost, result, submitted_at, finished_at)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            rows,
        )
    # Ledger entries through the ledger itself: uptime pay from the mint, transfers out and
    # in, in batches (so the books balance and every cached balance is right).
    ledger = services.ledger
    wallet, other = wallet_of(busy_id), wallet_of(other_id)
    ledger.grant("bench:funds:other", other, 10**6 * MICRO, "bench funds")
    batch = 5000
    for first in range(0, entries, batch):
        with db.transaction():
            for i in range(first, min(entries, first + batch)):
                kind = i % 3
                if kind == 0:
                    ledger.grant(f"bench:{i}", wallet, 2 * MICRO, "uptime of node n_bench")
                elif kind == 1:
                    ledger.transfer(f"bench:{i}", wallet, other, MICRO, f"transfer to {other_id}")
                else:
                    ledger.transfer(f"bench:{i}", other, wallet, MICRO, f"transfer to {busy_id}")
    # Spread the entries over the same 30 days as the jobs (the ledger stamps them now).
    with db.transaction() as c:
        c.execute(
            "UPDATE entries SET created_at = ? + (? - ?) * id / (SELECT MAX(id) FROM entries)",
            (start, now, start),
        )
    audit = ledger.audit()
    if not audit.balanced:
        raise SystemExit("the seeded ledger does not balance")
    db.close()
    return {"busy": busy_token, "idle": idle_token}


class Browser:
    """A signed-in visitor: the dashboard's session cookie over one keep-alive connection."""

    def __init__(self, url: str, token: str) -> None:
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port)
        body = urlencode({"token": token, "next": "/"})
        self.conn.request("POST", "/signin", body,
                          {"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
        r = self.conn.getresponse()
        r.read()
        cookie = r.getheader("Set-Cookie") or ""
        if r.status != 303 or "dp_session=" not in cookie:
            raise SystemExit(f"sign-in failed: {r.status} {cookie!r}")
        self.cookie = cookie.split(";", 1)[0]

    def get(self, path: str) -> tuple[float, float, str]:
        """(server ms from Server-Timing, client wall ms, body)."""
        t0 = time.perf_counter()
        self.conn.request("GET", path, headers={"Cookie": self.cookie})
        r = self.conn.getresponse()
        body = r.read().decode()
        wall = (time.perf_counter() - t0) * 1000
        if r.status != 200:
            raise SystemExit(f"GET {path}: {r.status}\n{body[:500]}")
        timing = r.getheader("Server-Timing") or ""
        server = float(timing.split("dur=")[1]) if "dur=" in timing else wall
        return server, wall, body


def measure(b: Browser, path: str, n: int) -> dict[str, float]:
    b.get(path)  # warm: the first request also fills SQLite's page cache
    server, wall = [], []
    for _ in range(n):
        s, w, _ = b.get(path)
        server.append(s)
        wall.append(w)
    return {"server_ms": statistics.median(server), "wall_ms": statistics.median(wall),
            "server_p90_ms": sorted(server)[int(0.9 * (n - 1))]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", action="store_true", help="only the JSON line on stdout")
    p.add_argument("--jobs", type=int, default=100_000)
    p.add_argument("--entries", type=int, default=100_000)
    p.add_argument("--requests", type=int, default=40, help="requests per page (median)")
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)

    def say(text: str) -> None:
        if not args.json:
            print(text, flush=True)

    result: dict[str, Any] = {"jobs": args.jobs, "entries": args.entries}
    with tempfile.TemporaryDirectory(prefix="deparrow-dashboard-") as tmp:
        d = Path(tmp)
        t0 = time.perf_counter()
        tokens = seed(d / "hub", args.jobs, args.entries, random.Random(args.seed))
        say(f"seeded {args.jobs:,} jobs and {args.entries:,} ledger entries in "
            f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
        hub = localnet.LocalHub(d / "hub", log_path=d / "hub.log")
        try:
            busy = Browser(hub.url, tokens["busy"])
            idle = Browser(hub.url, tokens["idle"])
            admin = Browser(hub.url, hub.admin.token or "")
            # Deep pages: halfway back through the history (a cursor, as the "older" links).
            middle_t = time.time() - 15 * DAY
            middle_entry = args.entries // 2
            n = args.requests
            figures = {
                "jobs_page": measure(busy, "/jobs", n),
                "wallet_page": measure(busy, "/wallet", n),
                "jobs_page_deep": measure(busy, f"/jobs?before={middle_t:.6f}", n),
                "jobs_page_failed": measure(busy, "/jobs?state=failed", n),
                "jobs_page_admin_all": measure(admin, "/jobs", n),
                "wallet_page_deep": measure(busy, f"/wallet?before={middle_entry}", n),
                "wallet_chart_json": measure(busy, "/wallet/chart.json?days=14", n),
                "jobs_page_empty_baseline": measure(idle, "/jobs", n),
                "wallet_page_empty_baseline": measure(idle, "/wallet", n),
            }
        finally:
            hub.stop()
    say(f"\nmedian over {args.requests} requests each (server = the hub's Server-Timing; "
        "wall = what the client saw)")  # fmt: skip
    for name, f in figures.items():
        say(f"  {name:28} server {f['server_ms']:7.1f} ms (p90 {f['server_p90_ms']:6.1f})"
            f"   wall {f['wall_ms']:7.1f} ms")  # fmt: skip
    jobs_ms = figures["jobs_page"]["server_ms"]
    wallet_ms = figures["wallet_page"]["server_ms"]
    jobs_base = figures["jobs_page_empty_baseline"]["server_ms"]
    wallet_base = figures["wallet_page_empty_baseline"]["server_ms"]
    say(f"\njobs page:   {jobs_ms:.1f} ms with {args.jobs:,} jobs, {jobs_ms / jobs_base:.1f}x "
        f"an empty history ({jobs_base:.1f} ms); target <= {TARGET_MS:.0f} ms: "
        f"{'met' if jobs_ms <= TARGET_MS else 'MISSED'}")  # fmt: skip
    say(f"wallet page: {wallet_ms:.1f} ms with {args.entries:,} entries, "
        f"{wallet_ms / wallet_base:.1f}x an empty history ({wallet_base:.1f} ms); target <= "
        f"{TARGET_MS:.0f} ms: {'met' if wallet_ms <= TARGET_MS else 'MISSED'}")  # fmt: skip
    result.update(
        jobs_page_ms=round(jobs_ms, 2),
        wallet_page_ms=round(wallet_ms, 2),
        target_ms=TARGET_MS,
        **{f"{k}_ms": round(v["server_ms"], 2) for k, v in figures.items()
           if k not in ("jobs_page", "wallet_page")},
        jobs_page_ratio_to_empty=round(jobs_ms / jobs_base, 2),
        wallet_page_ratio_to_empty=round(wallet_ms / wallet_base, 2),
    )  # fmt: skip
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Durable ledger throughput: acknowledged transfers per second against raw SQLite commits.

    python bench/ledger.py [--json] [--seconds 3] [--concurrency 512] [--accounts 1000]

One run measures, each in a fresh database file in one temporary directory (same filesystem,
same durability: WAL, synchronous=FULL):

- the baseline: raw sqlite3, one transfer per commit (BEGIN IMMEDIATE; two balance UPDATEs;
  one INSERT; COMMIT), timed in two halves, before and after the ledger runs, so drift in the
  machine's speed hits both sides;
- the ceiling: the same raw transfers, N per BEGIN IMMEDIATE/COMMIT, N the ledger's mean batch
  size, timed in two halves around the runs below: how close the ledger comes to what SQLite
  commits in batches of that size with no idempotency key, no postings and no checks;
- the ledger through its public API with group commit: N asyncio tasks each awaiting
  `writer.transfer(...)` in a loop (consecutive transfers applied set-based by
  Ledger.transfer_many). A transfer counts once its future resolved, which happens only
  after the COMMIT that stored it;
- for context, the same through the generic path, `writer.run(lambda c: ledger.transfer(...))`
  (one savepoint per transfer);
- for context, the ledger with one commit per transfer (`ledger.transfer` on its own).

Then it audits each ledger (the books must balance) and checks that the entries stored equal
the transfers acknowledged. Prints figures and ratios, and as its last line one JSON object.
Exit status 1 when an audit or a count fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hub.ledger.ledger import Ledger  # noqa: E402
from hub.ledger.money import MICRO, Entry  # noqa: E402
from hub.ledger.writer import Writer  # noqa: E402
from hub.store.db import Database  # noqa: E402

FUNDS = 10**9 * MICRO  # per wallet: no bench transfer can run short


def filesystem_of(path: Path) -> str:
    """The type of the filesystem holding path (tmpfs would make fsync free: say so)."""
    best, fstype = "", "unknown"
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                mount = parts[1]
                if str(path).startswith(mount) and len(mount) > len(best):
                    best, fstype = mount, parts[2]
    except OSError:
        pass
    return fstype


# --- (a) baseline -------------------------------------------------------------------------
def open_raw(path: Path, accounts: int) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE accounts (id TEXT PRIMARY KEY, balance INTEGER NOT NULL)")
    conn.execute(
        "CREATE TABLE transfers (id INTEGER PRIMARY KEY, src TEXT NOT NULL, dst TEXT NOT NULL,"
        " amount INTEGER NOT NULL)"
    )
    conn.executemany(
        "INSERT INTO accounts VALUES (?, ?)", [(f"wallet:{i}", FUNDS) for i in range(accounts)]
    )
    return conn


def baseline(
    conn: sqlite3.Connection, accounts: int, seconds: float, per_commit: int = 1, seed: int = 1
) -> tuple[int, float]:
    """Raw transfers, `per_commit` in each commit, for `seconds`: (transfers, elapsed)."""
    rng = random.Random(seed)
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        conn.execute("BEGIN IMMEDIATE")
        for _ in range(per_commit):
            src, dst = rng.sample(range(accounts), 2)
            amount = rng.randint(1, 1000)
            conn.execute(
                "UPDATE accounts SET balance = balance - ? WHERE id = ?", (amount, f"wallet:{src}")
            )
            conn.execute(
                "UPDATE accounts SET balance = balance + ? WHERE id = ?", (amount, f"wallet:{dst}")
            )
            conn.execute(
                "INSERT INTO transfers (src, dst, amount) VALUES (?, ?, ?)",
                (f"wallet:{src}", f"wallet:{dst}", amount),
            )
        conn.execute("COMMIT")
        n += per_commit
    return n, time.perf_counter() - start


# --- the ledger ---------------------------------------------------------------------------
def open_ledger(path: Path, accounts: int) -> tuple[Database, Ledger]:
    db = Database(path)
    ledger = Ledger(db)
    with db.transaction():
        for i in range(accounts):
            ledger.open_account(f"wallet:{i}", "wallet", str(i))
            ledger.grant(f"fund:{i}", f"wallet:{i}", FUNDS, "bench funds")
    return db, ledger


async def batched(
    ledger: Ledger,
    accounts: int,
    seconds: float,
    concurrency: int,
    max_batch: int,
    via_run: bool = False,
) -> dict[str, Any]:
    """Clients awaiting `writer.transfer(...)` (or, with via_run, `writer.run(lambda ...)`)."""
    writer = Writer(ledger.db, max_batch=max_batch, ledger=ledger)
    await writer.start()
    latencies: list[float] = []
    failures: list[str] = []
    acked = 0

    names = [f"wallet:{i}" for i in range(accounts)]

    def pay(key: str, src: str, dst: str, amount: int) -> Callable[[sqlite3.Connection], Entry]:
        return lambda c: ledger.transfer(key, src, dst, amount, "bench")

    async def client(worker: int) -> None:
        nonlocal acked
        rnd = random.Random(worker).random
        i = 0
        while time.perf_counter() < deadline:
            s = int(rnd() * accounts)
            src, dst = names[s], names[(s + 1 + int(rnd() * (accounts - 1))) % accounts]
            key = f"bench:{worker}:{i}"
            amount = 1 + int(rnd() * 1000)
            i += 1
            t = time.perf_counter()
            try:
                if via_run:
                    await writer.run(pay(key, src, dst, amount))
                else:
                    await writer.transfer(key, src, dst, amount, "bench")
            except Exception as e:
                failures.append(f"{type(e).__name__}: {e}")
                continue
            latencies.append(time.perf_counter() - t)
            acked += 1

    start = time.perf_counter()
    deadline = start + seconds
    await asyncio.gather(*(client(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - start
    await writer.stop()
    latencies.sort()
    stats = writer.stats
    return {
        "acknowledged": acked,
        "failures": len(failures),
        "first_failure": failures[0] if failures else None,
        "elapsed": elapsed,
        "rate": acked / elapsed,
        "batches": stats.batches,
        "batch_mean": stats.batch_mean,
        "batch_max": stats.largest,
        "p50_ms": statistics.median(latencies) * 1000 if latencies else None,
        "p99_ms": latencies[int(0.99 * (len(latencies) - 1))] * 1000 if latencies else None,
    }


def single(ledger: Ledger, accounts: int, seconds: float) -> dict[str, Any]:
    """One commit per transfer: ledger.transfer opens and commits its own transaction."""
    rng = random.Random(2)
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        src, dst = rng.sample(range(accounts), 2)
        ledger.transfer(
            f"single:{n}", f"wallet:{src}", f"wallet:{dst}", rng.randint(1, 1000), "bench"
        )
        n += 1
    elapsed = time.perf_counter() - start
    return {"acknowledged": n, "elapsed": elapsed, "rate": n / elapsed}


def check(ledger: Ledger, acknowledged: int) -> tuple[bool, bool, int]:
    """(books balanced, stored bench entries == acknowledged, stored bench entries)."""
    audit = ledger.audit()
    row = ledger.db.query_one("SELECT COUNT(*) AS n FROM entries WHERE reason = 'bench'")
    stored = int(row["n"]) if row is not None else -1
    return audit.balanced, stored == acknowledged, stored


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", action="store_true", help="only the JSON line on stdout")
    p.add_argument("--seconds", type=float, default=3.0, help="per measured phase (default 3)")
    p.add_argument(
        "--concurrency",
        type=int,
        default=512,
        help="concurrent clients (512, as in the 500-client HTTP test)",
    )
    p.add_argument("--accounts", type=int, default=1000, help="wallets to move between (1000)")
    p.add_argument("--max-batch", type=int, default=512, help="Writer max_batch (512)")
    p.add_argument("--no-single", action="store_true", help="skip the one-commit-per-transfer run")
    p.add_argument("--dir", type=Path, default=None, help="where the temporary files go")
    args = p.parse_args(argv)
    if args.seconds <= 0 or args.concurrency < 1 or args.accounts < 2:
        p.error("--seconds must be > 0, --concurrency >= 1, --accounts >= 2")

    def say(text: str) -> None:
        if not args.json:
            print(text, flush=True)

    with tempfile.TemporaryDirectory(prefix="deparrow-bench-", dir=args.dir) as tmp:
        d = Path(tmp)
        fs = filesystem_of(d.resolve())
        say(f"files in {d} ({fs}); WAL, synchronous=FULL; {os.cpu_count()} CPUs")
        if fs in ("tmpfs", "ramfs"):
            say("warning: a RAM filesystem makes fsync free; use --dir on a real disk")

        raw = open_raw(d / "raw.sqlite", args.accounts)
        half = args.seconds / 2
        n1, t1 = baseline(raw, args.accounts, half)

        db, ledger = open_ledger(d / "batched.sqlite", args.accounts)
        say(f"ledger: {args.concurrency} concurrent clients, max_batch {args.max_batch}...")
        b = asyncio.run(
            batched(ledger, args.accounts, args.seconds, args.concurrency, args.max_batch)
        )
        b_balanced, b_counted, b_stored = check(ledger, b["acknowledged"])
        db.close()

        # The ceiling, in batches of the ledger's mean size, on a file of its own.
        per_commit = max(1, round(b["batch_mean"]))
        ceiling = open_raw(d / "raw_batched.sqlite", args.accounts)
        c1, u1 = baseline(ceiling, args.accounts, half, per_commit, seed=3)

        db, ledger = open_ledger(d / "batched_run.sqlite", args.accounts)
        r = asyncio.run(
            batched(ledger, args.accounts, args.seconds, args.concurrency, args.max_batch, True)
        )
        r_balanced, r_counted, _ = check(ledger, r["acknowledged"])
        db.close()
        b_balanced = b_balanced and r_balanced
        b_counted = b_counted and r_counted

        n2, t2 = baseline(raw, args.accounts, half)
        raw.close()
        base = (n1 + n2) / (t1 + t2)
        c2, u2 = baseline(ceiling, args.accounts, half, per_commit, seed=4)
        ceiling.close()
        top = (c1 + c2) / (u1 + u2)

        s: dict[str, Any] | None = None
        s_balanced = s_counted = True
        if not args.no_single:
            db, ledger = open_ledger(d / "single.sqlite", args.accounts)
            s = single(ledger, args.accounts, args.seconds)
            s_balanced, s_counted, _ = check(ledger, s["acknowledged"])
            db.close()

    ratio = b["rate"] / base
    say(
        f"baseline   raw sqlite, 1 transfer/commit: {base:9.0f} commits/s"
        f"  (halves {n1 / t1:.0f}, {n2 / t2:.0f})"
    )
    say(
        f"ledger     group commit, acknowledged:    {b['rate']:9.0f} transfers/s"
        f"  = {ratio:.1f}x baseline; mean batch {b['batch_mean']:.0f} (max {b['batch_max']}),"
        f" latency p50 {b['p50_ms']:.1f} ms p99 {b['p99_ms']:.1f} ms"
    )
    say(
        f"ceiling    raw sqlite, {per_commit} transfers/commit:  {top:9.0f} transfers/s"
        f"  (halves {c1 / u1:.0f}, {c2 / u2:.0f}); the ledger reaches {b['rate'] / top:.0%} of it"
    )
    say(
        f"ledger     via writer.run (savepoints):    {r['rate']:9.0f} transfers/s"
        f"  = {r['rate'] / base:.1f}x baseline; mean batch {r['batch_mean']:.0f}"
    )
    if s is not None:
        say(
            f"ledger     1 commit per transfer:          {s['rate']:9.0f} transfers/s"
            f"  = {s['rate'] / base:.2f}x baseline"
        )
    say(
        f"checks     audit balanced: {b_balanced and s_balanced};"
        f" stored entries = acknowledged ({b_stored} = {b['acknowledged']}):"
        f" {b_counted and s_counted}; failed calls: {b['failures']}"
        + (f" (first: {b['first_failure']})" if b["failures"] else "")
    )
    ok = (
        b_balanced
        and b_counted
        and s_balanced
        and s_counted
        and not b["failures"]
        and not r["failures"]
    )
    result = {
        "durable_transfers_per_s": round(b["rate"], 1),
        "baseline_single_commit_per_s": round(base, 1),
        "ratio": round(ratio, 2),
        "raw_batched_per_s": round(top, 1),
        "raw_batched_per_commit": per_commit,
        "ratio_to_raw_batched": round(b["rate"] / top, 3),
        "batch_mean": round(b["batch_mean"], 1),
        "batch_max": b["batch_max"],
        "sync": "FULL",
        "journal_mode": "wal",
        "filesystem": fs,
        "concurrency": args.concurrency,
        "max_batch": args.max_batch,
        "seconds": args.seconds,
        "acknowledged": b["acknowledged"],
        "stored": b_stored,
        "failures": b["failures"],
        "p50_ms": round(b["p50_ms"], 2) if b["p50_ms"] is not None else None,
        "p99_ms": round(b["p99_ms"], 2) if b["p99_ms"] is not None else None,
        "writer_run_transfers_per_s": round(r["rate"], 1),
        "writer_run_ratio": round(r["rate"] / base, 2),
        "single_commit_ledger_per_s": round(s["rate"], 1) if s is not None else None,
        "audit_balanced": b_balanced and s_balanced,
        "entries_match": b_counted and s_counted,
        "ok": ok,
    }
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

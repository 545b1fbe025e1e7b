"""Read-only queries the dashboard needs beyond the store's and the ledger's own calls:
pages of jobs with cursors, counts per state, per-hour and per-day series for the charts.

Nothing here writes or decides anything about jobs or credits; the indexes that keep these
pages fast with a large history are the dashboard's own migrations (component "web").
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from hub.ledger import reports
from hub.store.db import Database

COMPONENT = "web"
MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "indexes for the dashboard's job pages and charts",
        # A store migration that rebuilds the jobs table drops these; such a migration must
        # recreate them (IF NOT EXISTS keeps that harmless).
        """
        CREATE INDEX IF NOT EXISTS web_jobs_submitted ON jobs(submitted_at);
        CREATE INDEX IF NOT EXISTS web_jobs_state_submitted ON jobs(state, submitted_at);
        CREATE INDEX IF NOT EXISTS web_jobs_owner_state ON jobs(owner, state, submitted_at);
        CREATE INDEX IF NOT EXISTS web_jobs_node_submitted ON jobs(node, submitted_at);
        CREATE INDEX IF NOT EXISTS web_entries_created ON entries(created_at);
        """,
    ),
    (
        2,
        "job pages list verified jobs, not their replicas: partial indexes",
        # Every list and count says `parent IS NULL` (store migration 6 made replicas rows of
        # their own); a partial index with that condition keeps them index-only.
        """
        DROP INDEX IF EXISTS web_jobs_submitted;
        DROP INDEX IF EXISTS web_jobs_state_submitted;
        DROP INDEX IF EXISTS web_jobs_owner_state;
        CREATE INDEX IF NOT EXISTS web_jobs_top_submitted ON jobs(submitted_at)
            WHERE parent IS NULL;
        CREATE INDEX IF NOT EXISTS web_jobs_top_state_submitted ON jobs(state, submitted_at)
            WHERE parent IS NULL;
        CREATE INDEX IF NOT EXISTS web_jobs_top_owner_state ON jobs(owner, state, submitted_at)
            WHERE parent IS NULL;
        """,
    ),
]

PAGE_SIZE = 25
HOUR = 3600
DAY = 86400


def migrate(db: Database) -> None:
    db.migrate(COMPONENT, MIGRATIONS)


@dataclass(frozen=True)
class JobPage:
    rows: list[sqlite3.Row]
    newer: float | None  # cursor for the page before (newer jobs), None on the first page
    older: float | None  # cursor for the next page (older jobs), None on the last page


def _job_filter(owner: str | None, state: str | None, q: str | None) -> tuple[list[str], list[Any]]:
    where: list[str] = ["parent IS NULL"]  # a verified job's replicas show inside it
    params: list[Any] = []
    if owner is not None:
        where.append("owner = ?")
        params.append(owner)
    if state is not None:
        where.append("state = ?")
        params.append(state)
    if q:
        # A job id, or any part of a job name ("fib" finds "bob-fib-30"). A substring match
        # can use no index, but it only scans jobs in submission order until the page is full.
        # The search is literal: % and _ typed by the user match themselves.
        where.append("(id = ? OR name LIKE ? ESCAPE '\\')")
        escaped = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        params += [q, "%" + escaped + "%"]
    return where, params


def job_page(
    db: Database,
    *,
    owner: str | None,
    state: str | None = None,
    q: str | None = None,
    before: float | None = None,
    after: float | None = None,
    limit: int = PAGE_SIZE,
) -> JobPage:
    """Jobs newest first, `limit` at a time; page by submission time (a cursor, so a page
    costs the same however deep in the history it is)."""
    where, params = _job_filter(owner, state, q)
    if after is not None:
        where.append("submitted_at > ?")
        params.append(after)
        order = "ASC"
    else:
        if before is not None:
            where.append("submitted_at < ?")
            params.append(before)
        order = "DESC"
    sql = "SELECT * FROM jobs"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY submitted_at {order} LIMIT ?"
    rows = db.query(sql, (*params, limit + 1))
    more = len(rows) > limit
    rows = rows[:limit]
    if after is not None:
        rows.reverse()
        newer = float(rows[0]["submitted_at"]) if rows and more else None
        older = float(rows[-1]["submitted_at"]) if rows else None
    else:
        newer = float(rows[0]["submitted_at"]) if rows and before is not None else None
        older = float(rows[-1]["submitted_at"]) if rows and more else None
    return JobPage(rows, newer, older)


def job_counts(db: Database, owner: str | None) -> dict[str, int]:
    """How many jobs are in each state (the filter chips)."""
    if owner is None:
        rows = db.query("SELECT state, count(*) AS n FROM jobs WHERE parent IS NULL GROUP BY state")
    else:
        rows = db.query(
            "SELECT state, count(*) AS n FROM jobs WHERE owner = ? AND parent IS NULL"
            " GROUP BY state",
            (owner,),
        )
    return {str(r["state"]): int(r["n"]) for r in rows}


def jobs_per_hour(
    db: Database, owner: str | None, hours: int = 24, now: float | None = None
) -> dict[str, Any]:
    """Jobs submitted in each of the last `hours` hours, by the state they are in now."""
    now = time.time() if now is None else now
    first = int(now // HOUR) - hours + 1
    sql = (
        "SELECT CAST(submitted_at / 3600 AS INTEGER) AS h, state, count(*) AS n FROM jobs"
        " WHERE submitted_at >= ? AND parent IS NULL"
    )
    params: list[Any] = [first * HOUR]
    if owner is not None:
        sql += " AND owner = ?"
        params.append(owner)
    sql += " GROUP BY h, state"
    series: dict[str, list[int]] = {}
    for r in db.query(sql, params):
        i = int(r["h"]) - first
        if 0 <= i < hours:
            series.setdefault(str(r["state"]), [0] * hours)[i] += int(r["n"])
    return {"t": [(first + i) * HOUR for i in range(hours)], "series": series}


def wallet_by_day(
    db: Database, wallet: str, days: int = 14, now: float | None = None
) -> dict[str, Any]:
    """Credits (µc) a wallet earned and spent on each of the last `days` days, in total and
    by kind (hub/ledger/reports.py sorts each line of the history).

    earned_by: node work, uptime, bonus (referral), grant (welcome), received (transfers in).
    spent_by: compute (what finished jobs cost), calls (service calls), sent (transfers out)
    and held (holds of jobs still running, placed that day): a hold is not spending, but
    until its job ends nobody knows how much of it will be, so it shows apart. A job that
    ends counts its cost on the day it ended; its hold and what came back count nowhere.
    """
    now = time.time() if now is None else now
    first = int(now // DAY) - days + 1
    t = [(first + i) * DAY for i in range(days)]
    # Entry ids grow with time: each day is a range of ids (found with the created_at
    # index), so the postings need no join with entries.
    bounds: list[int | None] = []
    for i in range(days + 1):
        row = db.query_one(
            "SELECT id FROM entries WHERE created_at >= ? ORDER BY created_at LIMIT 1",
            ((first + i) * DAY,),
        )
        bounds.append(int(row["id"]) if row is not None and row["id"] is not None else None)
    earned_by = {k: [0] * days for k in reports.EARNED}
    spent_by = {k: [0] * days for k in (*reports.SPENT, "held")}
    for i in range(days):
        lo, hi = bounds[i], bounds[i + 1]
        if lo is None:
            continue
        key = (db.path, wallet, first + i)
        closed = hi is not None and now - (first + i + 1) * DAY > _SETTLED_S
        if closed and key in _DAY_CACHE:
            flows = _DAY_CACHE[key]
        else:
            flows = _day_flows(db, wallet, lo, hi)
            if closed:
                if len(_DAY_CACHE) >= _DAY_CACHE_MAX:
                    _DAY_CACHE.pop(next(iter(_DAY_CACHE)))
                _DAY_CACHE[key] = flows
        for kind, amount in flows.items():
            if kind in earned_by:
                earned_by[kind][i] += amount
            elif kind in spent_by:
                spent_by[kind][i] -= amount
    return {
        "t": t,
        "earned": [sum(s[i] for s in earned_by.values()) for i in range(days)],
        "spent": [sum(s[i] for s in spent_by.values()) for i in range(days)],
        "earned_by": earned_by,
        "spent_by": spent_by,
    }


# Days that ended a while ago do not change: their sums are kept (bounded, oldest dropped).
_SETTLED_S = 3600
_DAY_CACHE_MAX = 20_000
_DAY_CACHE: dict[tuple[str, str, int], dict[str, int]] = {}


def _day_flows(db: Database, wallet: str, lo: int, hi: int | None) -> dict[str, int]:
    """The wallet's lines in entries lo <= id < hi, summed by kind (signed)."""
    hi = hi if hi is not None else 2**63 - 1
    sums = db.query(
        "SELECT entry_id, SUM(amount) AS amount FROM postings"
        " WHERE account_id = ? AND entry_id >= ? AND entry_id < ? GROUP BY entry_id",
        (wallet, lo, hi),
    )
    rows = _history_rows(db, wallet, sums, 0)
    flows: dict[str, int] = {}
    for line in reports.describe(db, wallet, rows):
        flows[line.category] = flows.get(line.category, 0) + line.amount
    return flows


def node_earnings(db: Database, node: Any, now: float | None = None) -> dict[str, Any]:
    """What a node earned its owner (µc): in total and over the last day and week, split
    into work (its jobs, replicas and service hours: each attempt's pay) and uptime (its
    uptime payouts, keyed uptime:<node>:…), with the week's average per day, as BOINC
    Manager shows a host's credit and its recent average."""
    now = time.time() if now is None else now
    node_id = str(node["id"])
    uptime = int(node["uptime_paid"])
    out: dict[str, Any] = {"total": int(node["earned"]), "work": int(node["earned"]) - uptime,
                           "uptime": uptime}  # fmt: skip
    for name, span in (("day", DAY), ("week", 7 * DAY)):
        work = db.query_one(
            "SELECT COALESCE(SUM(pay), 0) AS s FROM attempts WHERE node = ? AND ended_at >= ?",
            (node_id, now - span),
        )
        up = db.query_one(
            "SELECT COALESCE(SUM(p.amount), 0) AS s FROM entries e"
            " JOIN postings p ON p.entry_id = e.id AND p.account_id != 'mint'"
            " WHERE e.idem_key >= ? AND e.idem_key < ? AND e.created_at >= ?",
            (f"uptime:{node_id}:", f"uptime:{node_id};", now - span),
        )
        w, u = int(work["s"]) if work else 0, int(up["s"]) if up else 0
        out[name] = {"work": w, "uptime": u, "total": w + u}
    out["week_per_day"] = out["week"]["total"] // 7
    return out


@dataclass(frozen=True)
class HistoryRow:
    entry_id: int
    created_at: float
    reason: str
    amount: int
    balance_after: int
    counterparties: tuple[str, ...]
    memo: dict[str, Any] | None


def history_page(
    db: Database, account: str, balance: int, limit: int, before: int | None = None
) -> list[HistoryRow]:
    """One page of an account's entries, newest first, as Ledger.history gives them, but
    walking the postings index alone (Ledger.history groups over a join with entries, which
    makes SQLite read every posting of the account: 140 ms at 100,000 entries)."""
    if before is not None:
        newer = db.query_one(
            "SELECT COALESCE(SUM(amount), 0) AS s FROM postings"
            " WHERE account_id = ? AND entry_id >= ?",
            (account, before),
        )
        balance -= int(newer["s"]) if newer is not None else 0
    sums = db.query(
        "SELECT entry_id, SUM(amount) AS amount FROM postings"
        " WHERE account_id = ? AND entry_id < ? GROUP BY entry_id ORDER BY entry_id DESC LIMIT ?",
        (account, before if before is not None else 2**63 - 1, limit),
    )
    return _history_rows(db, account, sums, balance)


def _history_rows(
    db: Database, account: str, sums: list[sqlite3.Row], balance: int
) -> list[HistoryRow]:
    """The history rows of `sums` ((entry_id, amount) of the account, newest first), with
    each entry's time, reason, memo and the other accounts it moved; `balance` is the
    account's balance after the first of them."""
    if not sums:
        return []
    ids = json.dumps([int(r["entry_id"]) for r in sums])
    entries = {
        int(e["id"]): e
        for e in db.query(
            "SELECT id, created_at, reason, memo FROM entries"
            " WHERE id IN (SELECT CAST(value AS INTEGER) FROM json_each(?))",
            (ids,),
        )
    }
    others: dict[int, list[str]] = {}
    for p in db.query(
        "SELECT DISTINCT entry_id, account_id FROM postings"
        " WHERE entry_id IN (SELECT CAST(value AS INTEGER) FROM json_each(?)) AND account_id != ?"
        " ORDER BY entry_id, account_id",
        (ids, account),
    ):
        others.setdefault(int(p["entry_id"]), []).append(str(p["account_id"]))
    rows = []
    for r in sums:
        entry_id, amount = int(r["entry_id"]), int(r["amount"])
        e = entries[entry_id]
        try:
            memo = json.loads(e["memo"]) if e["memo"] else None
        except ValueError:
            memo = None
        rows.append(
            HistoryRow(entry_id, float(e["created_at"]), str(e["reason"]), amount, balance,
                       tuple(others.get(entry_id, [])), memo if isinstance(memo, dict) else None)
        )  # fmt: skip
        balance -= amount
    return rows


def node_columns(db: Database) -> set[str]:
    """The nodes table's columns: optional ones (reputation) are shown when they exist."""
    return db.columns("nodes")


def jobs_on_node(db: Database, node_id: str, limit: int = 20) -> list[sqlite3.Row]:
    return db.query(
        "SELECT * FROM jobs WHERE node = ? ORDER BY submitted_at DESC LIMIT ?", (node_id, limit)
    )


def offered(node: sqlite3.Row) -> dict[str, Any]:
    """What a node offers now, from its last heartbeat (zeros when it never sent one)."""
    try:
        res = json.loads(node["resources"] or "{}")
    except ValueError:
        res = {}
    return {
        "cpu": float(res.get("cpu", 0) or 0),
        "memory_mb": int(res.get("memory_mb", 0) or 0),
        "gpu": int(res.get("gpu", 0) or 0),
        "load": float(res.get("load", 0) or 0),
    }


def _names(db: Database, table: str, ids: set[str]) -> dict[str, str]:
    """Id -> name of the rows of `table` (users, nodes, jobs: a constant, never input) with
    those ids, in one query."""
    ids = {i for i in ids if i}
    if not ids:
        return {}
    rows = db.query(
        f"SELECT id, name FROM {table} WHERE id IN (SELECT value FROM json_each(?))",
        (json.dumps(sorted(ids)),),
    )
    return {str(r["id"]): str(r["name"]) for r in rows}


def user_names(db: Database, ids: set[str]) -> dict[str, str]:
    return _names(db, "users", ids)


def node_names(db: Database, ids: set[str]) -> dict[str, str]:
    """Node id -> its name, for the jobs list and the events feed."""
    return _names(db, "nodes", ids)


def job_names(db: Database, ids: set[str]) -> dict[str, str]:
    """Job id -> its name, for the events feed."""
    return _names(db, "jobs", ids)


def find_user(db: Database, who: str) -> sqlite3.Row | None:
    """A user or agent by id, or by name when exactly one has it."""
    row = db.query_one("SELECT * FROM users WHERE id = ?", (who,))
    if row is not None:
        return row
    rows = db.query("SELECT * FROM users WHERE name = ? LIMIT 2", (who,))
    return rows[0] if len(rows) == 1 else None

"""Reading the books: an entry by its key, an account's history, and the audit that checks
every invariant.

All only read; the Ledger's reading methods (`entry`, `history`, `audit`) call in.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from hub.ledger.checks import memo_load
from hub.ledger.money import INT64_MAX, Entry, format_micro
from hub.store.db import Database


@dataclass(frozen=True)
class HistoryRow:
    entry_id: int
    created_at: float
    reason: str
    amount: int  # signed, for the account asked about
    balance_after: int
    counterparties: tuple[str, ...]
    memo: dict[str, Any] | None


@dataclass(frozen=True)
class BalanceMismatch:
    account: str
    cached: int
    recomputed: int


@dataclass(frozen=True)
class Audit:
    total: int  # sum of all balances: must be 0
    by_kind: dict[str, int]
    mismatches: tuple[BalanceMismatch, ...]  # cached balance != sum of its postings
    negatives: tuple[tuple[str, int], ...]  # non-mint accounts below zero
    unbalanced_entries: tuple[int, ...]  # entries whose postings do not sum to zero
    stranded_holds: tuple[str, ...]  # closed holds that still hold credits
    accounts: int
    entries: int
    balanced: bool


def entry(db: Database, idem_key: str) -> Entry | None:
    """The entry posted under this key, with its legs, as a replay would return it."""
    row = db.query_one(
        "SELECT id, idem_key, reason, memo, created_at FROM entries WHERE idem_key = ?",
        (idem_key,),
    )
    if row is None:
        return None
    legs = tuple(
        (str(p["account_id"]), int(p["amount"]))
        for p in db.query(
            "SELECT account_id, amount FROM postings WHERE entry_id = ? ORDER BY id",
            (row["id"],),
        )
    )
    return Entry(
        id=int(row["id"]),
        idem_key=str(row["idem_key"]),
        reason=str(row["reason"]),
        legs=legs,
        created_at=float(row["created_at"]),
        memo=memo_load(row["memo"]),
        replayed=True,
    )


def history(
    db: Database, account_id: str, balance: int, limit: int, before_entry_id: int | None
) -> list[HistoryRow]:
    """The account's entries, newest first, each with its signed amount and the balance
    right after it; `balance` is the account's balance now (see Ledger.history)."""
    if before_entry_id is None:
        before_entry_id = INT64_MAX
    else:
        newer = db.query_one(
            "SELECT COALESCE(SUM(amount), 0) AS s FROM postings"
            " WHERE account_id = ? AND entry_id >= ?",
            (account_id, before_entry_id),
        )
        balance -= int(newer["s"]) if newer is not None else 0
    rows = db.query(
        "SELECT e.id, e.created_at, e.reason, e.memo, SUM(p.amount) AS amount"
        " FROM postings p JOIN entries e ON e.id = p.entry_id"
        " WHERE p.account_id = ? AND p.entry_id < ?"
        " GROUP BY e.id ORDER BY e.id DESC LIMIT ?",
        (account_id, before_entry_id, limit),
    )
    others: dict[int, list[str]] = {}
    if rows:
        ids = [int(r["id"]) for r in rows]
        for p in db.query(
            f"SELECT DISTINCT entry_id, account_id FROM postings"
            f" WHERE entry_id IN ({','.join('?' * len(ids))}) AND account_id != ?"
            f" ORDER BY entry_id, account_id",
            (*ids, account_id),
        ):
            others.setdefault(int(p["entry_id"]), []).append(str(p["account_id"]))
    result = []
    for r in rows:
        amount = int(r["amount"])
        result.append(
            HistoryRow(
                entry_id=int(r["id"]),
                created_at=float(r["created_at"]),
                reason=str(r["reason"]),
                amount=amount,
                balance_after=balance,
                counterparties=tuple(others.get(int(r["id"]), [])),
                memo=memo_load(r["memo"]),
            )
        )
        balance -= amount
    return result


def audit(db: Database) -> Audit:
    """Check the books: zero sum, cached balances = postings, no negative wallets."""
    accounts = db.query("SELECT id, kind, balance FROM accounts")
    by_kind: dict[str, int] = {}
    total = 0
    negatives = []
    for a in accounts:
        balance = int(a["balance"])
        total += balance
        by_kind[str(a["kind"])] = by_kind.get(str(a["kind"]), 0) + balance
        if a["kind"] != "mint" and balance < 0:
            negatives.append((str(a["id"]), balance))
    mismatches = tuple(
        BalanceMismatch(str(r["id"]), int(r["balance"]), int(r["recomputed"]))
        for r in db.query(
            "SELECT a.id, a.balance, COALESCE(p.total, 0) AS recomputed FROM accounts a"
            " LEFT JOIN (SELECT account_id, SUM(amount) AS total FROM postings"
            "            GROUP BY account_id) p ON p.account_id = a.id"
            " WHERE a.balance != COALESCE(p.total, 0) ORDER BY a.id"
        )
    )
    unbalanced = tuple(
        int(r["entry_id"])
        for r in db.query(
            "SELECT entry_id FROM postings GROUP BY entry_id HAVING SUM(amount) != 0"
            " ORDER BY entry_id"
        )
    )
    stranded = tuple(
        str(r["account_id"])
        for r in db.query(
            "SELECT h.account_id FROM holds h JOIN accounts a ON a.id = h.account_id"
            " WHERE h.closed_entry_id IS NOT NULL AND a.balance != 0 ORDER BY h.account_id"
        )
    )
    entries = db.query_one("SELECT COUNT(*) AS n FROM entries")
    return Audit(
        total=total,
        by_kind=by_kind,
        mismatches=mismatches,
        negatives=tuple(negatives),
        unbalanced_entries=unbalanced,
        stranded_holds=stranded,
        accounts=len(accounts),
        entries=int(entries["n"]) if entries is not None else 0,
        balanced=total == 0
        and not mismatches
        and not negatives
        and not unbalanced
        and not stranded,
    )


# --- a wallet's history as a person reads it ----------------------------------------------
# What each line of a wallet's history is, for the page, the CSV and the CLI alike. Earned:
# WORK (pay for jobs its nodes ran and service calls its agents answered), UPTIME, BONUS
# (referral), GRANT (welcome), RECEIVED (transfers in). Spent: COMPUTE (what its own jobs
# cost), CALLS (what its service calls cost), SENT (transfers out). HELD: credits reserved for
# a job still running; a hold and what comes back of it are not spending, so once the job
# ends its hold lines fold into one line with the cost.
EARNED = ("work", "uptime", "bonus", "grant", "received")
SPENT = ("compute", "calls", "sent")


class EntryLike(Protocol):
    """A history row: this module's HistoryRow or the dashboard's page of them."""

    @property
    def entry_id(self) -> int: ...
    @property
    def created_at(self) -> float: ...
    @property
    def reason(self) -> str: ...
    @property
    def amount(self) -> int: ...
    @property
    def balance_after(self) -> int: ...
    @property
    def counterparties(self) -> tuple[str, ...]: ...
    @property
    def memo(self) -> dict[str, Any] | None: ...


@dataclass(frozen=True)
class Line:
    entry_id: int
    created_at: float
    amount: int  # signed; a finished job's line is minus its cost
    balance_after: int
    category: str  # one of EARNED, SPENT, "held" or "other"
    text: str  # "transfer from alice", "job completed j_…", "service call c_… answered"
    link: tuple[str, str] | None  # ("job"|"agent"|"service"|"node", id) or nothing
    held: int  # a finished job's or call's hold: everything that went into it
    back: int  # and what of it came back
    reason: str  # the ledger's own reason
    counterparties: tuple[str, ...]
    memo: dict[str, Any] | None


def describe(db: Database, wallet: str, rows: Sequence[EntryLike]) -> list[Line]:
    """The wallet's history rows (newest first, from Ledger.history or a page of them) as
    lines a person reads. The entries that moved credits into one of the wallet's own holds
    that is closed now are left out: the entry that closed it stands for the whole job."""
    holds: dict[str, tuple[int, int | None]] = {}
    users: set[str] = set()
    for r in rows:
        for c in r.counterparties:
            kind, _, ident = c.partition(":")
            if kind == "hold":
                holds[ident] = (0, None)
            elif kind == "wallet":
                users.add(ident)
    own: dict[str, tuple[int, int | None]] = {}
    if holds:
        for h in db.query(
            "SELECT job_id, placed, closed_entry_id FROM holds"
            " WHERE wallet = ? AND job_id IN (SELECT value FROM json_each(?))",
            (wallet, json.dumps(sorted(holds))),
        ):
            closed = h["closed_entry_id"]
            own[str(h["job_id"])] = (int(h["placed"]), int(closed) if closed is not None else None)
        # A hold spent to the last micro-credit gives nothing back: the entry that closed it
        # never touched the wallet, so the entries that filled it stand for the job instead.
        closing = [c for _, c in own.values() if c is not None]
        touched = {
            int(p["entry_id"])
            for p in db.query(
                "SELECT entry_id FROM postings WHERE account_id = ?"
                " AND entry_id IN (SELECT CAST(value AS INTEGER) FROM json_each(?))",
                (wallet, json.dumps(closing)),
            )
        } if closing else set()  # fmt: skip
        own = {k: (p, c if c is None or c in touched else -1) for k, (p, c) in own.items()}
    names = {
        str(u["id"]): str(u["name"])
        for u in db.query(
            "SELECT id, name FROM users WHERE id IN (SELECT value FROM json_each(?))",
            (json.dumps(sorted(users)),),
        )
    } if users else {}  # fmt: skip
    lines = []
    for r in rows:
        line = _line(r, own, names)
        if line is not None:
            lines.append(line)
    return lines


def _line(
    r: EntryLike, own: dict[str, tuple[int, int | None]], names: dict[str, str]
) -> Line | None:
    held = back = 0
    amount = r.amount
    link: tuple[str, str] | None = None
    hold = next((c[5:] for c in r.counterparties if c.startswith("hold:")), None)
    people = [c[7:] for c in r.counterparties if c.startswith("wallet:")]
    call = hold is not None and hold.startswith("c_")
    if hold is not None and hold in own:
        placed, closed = own[hold]
        if closed is None:
            category = "held"
            text = r.reason
        elif closed == -1:  # spent in full (see describe): each filling is a cost
            category = "calls" if call else "compute"
            held, back = -r.amount, 0
            text = r.reason.removeprefix("hold for ")
            text = ("service " + text) if text.startswith("call ") else text
        elif r.entry_id != closed:
            return None  # folded into the line of the entry that closed the hold
        else:
            category = "calls" if call else "compute"
            held, back = placed, r.amount
            amount = r.amount - placed
            text = ("service " + r.reason) if r.reason.startswith("call ") else r.reason
        if not call:
            link = ("job", hold)
        elif people:
            link = ("agent", people[0])  # the agent that answered: its page
        elif r.memo and isinstance(r.memo.get("service"), str):
            link = ("service", r.memo["service"])  # the service called: its console
    elif hold is not None and amount > 0:
        category = "work"
        text = ("answered service " if call else "node work: ") + r.reason
    elif "mint" in r.counterparties:
        if r.reason.startswith("uptime"):
            category = "uptime"
            node = r.reason.rsplit(" ", 1)[-1]
            link = ("node", node) if node.startswith("n_") else None
        elif r.reason.startswith("referral"):
            category = "bonus"
        else:
            category = "grant"
        text = r.reason
    elif people:
        who = names.get(people[0], people[0])
        if amount > 0:
            category, text = "received", f"transfer from {who}"
        else:
            category, text = "sent", f"transfer to {who}"
    else:
        category, text = "other", r.reason
    return Line(
        entry_id=r.entry_id, created_at=r.created_at, amount=amount,
        balance_after=r.balance_after, category=category, text=text, link=link, held=held,
        back=back, reason=r.reason, counterparties=r.counterparties, memo=r.memo,
    )  # fmt: skip


CSV_HEADER = ("entry", "time_utc", "reason", "amount", "balance_after", "counterparties",
              "category", "held", "came_back", "ledger_reason")  # fmt: skip


def csv_row(line: Line) -> list[str | int]:
    """A history line in a CSV statement: exact amounts, the line's own words as its reason
    and the ledger's reason in the last column."""
    when = datetime.fromtimestamp(line.created_at, UTC).isoformat(timespec="seconds")
    folded = line.category in ("compute", "calls")
    return [
        line.entry_id, when, line.text, format_micro(line.amount),
        format_micro(line.balance_after), " ".join(line.counterparties), line.category,
        format_micro(line.held) if folded else "", format_micro(line.back) if folded else "",
        line.reason,
    ]  # fmt: skip

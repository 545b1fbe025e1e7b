"""Reading the books: an entry by its key, an account's history, and the audit that checks
every invariant.

All only read; the Ledger's reading methods (`entry`, `history`, `audit`) call in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hub.ledger.checks import memo_load
from hub.ledger.money import INT64_MAX, Entry
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

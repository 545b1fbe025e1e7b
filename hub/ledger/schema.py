"""The ledger's tables, and the statements its hot paths run prepared."""

from __future__ import annotations

import sqlite3

from hub.ledger.money import INT64_MAX, Leg

COMPONENT = "ledger"

MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "accounts, entries, postings, holds",
        """
        CREATE TABLE accounts (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL CHECK (kind IN ('wallet', 'hold', 'mint', 'revenue')),
            -- wallets: the user id; holds: the wallet the held credits came from
            owner TEXT,
            -- a cache of SUM(postings.amount), written in the same transaction as the postings
            balance INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL,
            CHECK (kind = 'mint' OR balance >= 0)
        );
        CREATE INDEX accounts_kind_owner ON accounts(kind, owner);
        CREATE TABLE entries (
            id INTEGER PRIMARY KEY,
            idem_key TEXT NOT NULL UNIQUE,
            reason TEXT NOT NULL,
            memo TEXT,
            created_at REAL NOT NULL
        );
        CREATE TABLE postings (
            id INTEGER PRIMARY KEY,
            entry_id INTEGER NOT NULL REFERENCES entries(id),
            account_id TEXT NOT NULL REFERENCES accounts(id),
            amount INTEGER NOT NULL CHECK (amount != 0)
        );
        CREATE INDEX postings_account ON postings(account_id, entry_id);
        CREATE INDEX postings_entry ON postings(entry_id);
        CREATE TABLE holds (
            job_id TEXT PRIMARY KEY,
            account_id TEXT NOT NULL UNIQUE REFERENCES accounts(id),
            wallet TEXT NOT NULL REFERENCES accounts(id),
            placed INTEGER NOT NULL DEFAULT 0,
            opened_at REAL NOT NULL,
            closed_entry_id INTEGER REFERENCES entries(id)
        );
        CREATE INDEX holds_wallet ON holds(wallet, closed_entry_id);
        INSERT INTO accounts (id, kind, owner, balance, created_at)
            VALUES ('mint', 'mint', NULL, 0, (julianday('now') - 2440587.5) * 86400.0);
        """,
    ),
]


SELECT_ACCOUNT = "SELECT kind, balance FROM accounts WHERE id = ?"
HOLD_CLOSED = "SELECT 1 FROM holds WHERE account_id = ? AND closed_entry_id IS NOT NULL"
# The id is the next after the largest, as SQLite's rowid picks it, written out so that both
# stores number entries alike (the batch path writes ids itself: INSERT_ENTRY_WITH_ID).
INSERT_ENTRY = (
    "INSERT INTO entries (id, idem_key, reason, memo, created_at)"
    " VALUES ((SELECT COALESCE(MAX(id), 0) + 1 FROM entries), ?, ?, ?, ?) RETURNING id"
)
# Adds a net change ?1 to account ?2's balance only if every balance it passes through keeps
# the rules of post(): at least ?3 before for the mint (so never below -INT64_MAX), ?4 for the
# others (never below zero), at most ?5 (never above INT64_MAX), and, when it receives credits
# (?6 = 1), not a closed hold. `net_change` works the bounds out in Python, so that nothing
# here can overflow (PostgreSQL would raise; SQLite would turn the sum into a REAL). No row
# changed = some rule failed, or no such account. The CASE makes SQLite look at `holds` only
# for holds receiving credits.
APPLY_NET_CHANGE = """
    UPDATE accounts SET balance = balance + ?1
    WHERE id = ?2
      AND balance >= CASE WHEN kind = 'mint' THEN ?3 ELSE ?4 END
      AND balance <= ?5
      AND CASE WHEN ?6 = 1 AND kind = 'hold'
          THEN NOT EXISTS (SELECT 1 FROM holds
                           WHERE account_id = ?2 AND closed_entry_id IS NOT NULL)
          ELSE TRUE END
"""
NetChange = tuple[int, str, int, int, int, int]


def net_change(account: str, net: int, low: int, high: int, receives: bool) -> NetChange | None:
    """APPLY_NET_CHANGE's parameters for an account whose running change goes from 0 down to
    `low` and up to `high` on its way to `net`; None when a bound leaves int64 (the caller
    then takes the careful way, which names the problem)."""
    if low < -INT64_MAX or high > INT64_MAX:
        return None
    return (net, account, -INT64_MAX - low, -low, INT64_MAX - high, 1 if receives else 0)


SET_BALANCE = "UPDATE accounts SET balance = ? WHERE id = ?"
INSERT_ENTRY_WITH_ID = (
    "INSERT INTO entries (id, idem_key, reason, memo, created_at) VALUES (?, ?, ?, ?, ?)"
)
# The same for entries without a memo: the sqlite3 module binds None through its adapter
# lookup, which cost about a microsecond a row, as much as the rest of the row's binding.
INSERT_ENTRY_WITH_ID_NO_MEMO = (
    "INSERT INTO entries (id, idem_key, reason, memo, created_at) VALUES (?, ?, ?, NULL, ?)"
)
# One statement whatever the number of ids (a JSON array in one parameter), so the statement
# cache keeps it prepared; holds receiving credits need to know whether they are closed.
SELECT_ACCOUNTS_JSON = """
    SELECT a.id, a.kind, a.balance,
           CASE WHEN a.kind = 'hold' THEN EXISTS (
               SELECT 1 FROM holds h WHERE h.account_id = a.id AND h.closed_entry_id IS NOT NULL)
           ELSE FALSE END
    FROM accounts a WHERE a.id IN (SELECT value FROM json_each(?1))
"""
SELECT_ENTRIES_JSON = """
    SELECT e.id, e.idem_key, e.reason, e.memo, e.created_at, p.account_id, p.amount
    FROM entries e LEFT JOIN postings p ON p.entry_id = e.id
    WHERE e.idem_key IN (SELECT value FROM json_each(?1))
    ORDER BY e.id, p.id
"""
MULTI_ROW_LEGS = 64  # up to this many legs go in one INSERT (3 parameters per leg)
INSERT_POSTINGS = {
    n: "INSERT INTO postings (entry_id, account_id, amount) VALUES " + ", ".join(["(?, ?, ?)"] * n)
    for n in range(1, MULTI_ROW_LEGS + 1)
}


def insert_postings(c: sqlite3.Connection, entry_id: int, legs: list[Leg]) -> None:
    n = len(legs)
    if n <= MULTI_ROW_LEGS:
        params: list[object] = []
        for account, amount in legs:
            params += (entry_id, account, amount)
        c.execute(INSERT_POSTINGS[n], params)
    else:
        c.executemany(INSERT_POSTINGS[1], [(entry_id, account, amount) for account, amount in legs])

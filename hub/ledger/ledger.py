"""The credit ledger: double-entry bookkeeping in integer micro-credits over SQLite.

Every movement of credits is one balanced journal entry (its postings sum to zero) between
accounts: user wallets, one escrow hold per job, and the network's mint, which issues welcome
grants and bonuses and is the only account allowed to go negative. So the sum over all
accounts is always zero and no wallet ever goes below zero; `audit()` checks both.

Exactly once: every entry carries an idempotency key. Posting a key again returns the first
entry and moves nothing; posting it with a different movement raises IdempotencyConflict.
A job's hold is closed (settled or refunded) under the key `close:<job_id>`, so a job is paid
out or refunded once, never both.

This module knows nothing of HTTP or MQTT: it raises the LedgerError family and the API layer
maps them to statuses.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal, InvalidOperation
from typing import Any, NamedTuple

from hub.store.db import Database

MICRO = 1_000_000  # micro-credits (µc) per credit
MAX_CREDITS = 10**12  # largest single amount, in credits; keeps every balance inside int64
MAX_AMOUNT = MAX_CREDITS * MICRO
_INT64_MAX = 2**63 - 1

MINT = "mint"
ACCOUNT_KINDS = ("wallet", "hold", "mint", "revenue")
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


_SELECT_ACCOUNT = "SELECT kind, balance FROM accounts WHERE id = ?"
_HOLD_CLOSED = "SELECT 1 FROM holds WHERE account_id = ? AND closed_entry_id IS NOT NULL"
_INSERT_ENTRY = "INSERT INTO entries (idem_key, reason, memo, created_at) VALUES (?, ?, ?, ?)"
# Adds ?1 to account ?2's balance only if every rule of post() holds for it; otherwise it
# changes no row. (The CASE makes SQLite look at `holds` only for holds receiving credits.)
_APPLY_CHANGE = """
    UPDATE accounts SET balance = balance + ?1
    WHERE id = ?2
      AND (kind = 'mint' OR balance + ?1 >= 0)
      AND typeof(balance + ?1) = 'integer' AND balance + ?1 >= -9223372036854775807
      AND CASE WHEN ?1 > 0 AND kind = 'hold'
          THEN NOT EXISTS (SELECT 1 FROM holds
                           WHERE account_id = ?2 AND closed_entry_id IS NOT NULL)
          ELSE 1 END
"""
_INSERT_ENTRY_WITH_ID = (
    "INSERT INTO entries (id, idem_key, reason, memo, created_at) VALUES (?, ?, ?, ?, ?)"
)
# One statement whatever the number of ids (a JSON array in one parameter), so the statement
# cache keeps it prepared; holds receiving credits need to know whether they are closed.
_SELECT_ACCOUNTS_JSON = """
    SELECT a.id, a.kind, a.balance,
           CASE WHEN a.kind = 'hold' THEN EXISTS (
               SELECT 1 FROM holds h WHERE h.account_id = a.id AND h.closed_entry_id IS NOT NULL)
           ELSE 0 END
    FROM accounts a WHERE a.id IN (SELECT value FROM json_each(?1))
"""
_SELECT_ENTRIES_JSON = """
    SELECT e.id, e.idem_key, e.reason, e.memo, e.created_at, p.account_id, p.amount
    FROM entries e LEFT JOIN postings p ON p.entry_id = e.id
    WHERE e.idem_key IN (SELECT value FROM json_each(?1))
    ORDER BY e.id, p.id
"""
_MULTI_ROW_LEGS = 64  # up to this many legs go in one INSERT (3 parameters per leg)
_INSERT_POSTINGS = {
    n: "INSERT INTO postings (entry_id, account_id, amount) VALUES " + ", ".join(["(?, ?, ?)"] * n)
    for n in range(1, _MULTI_ROW_LEGS + 1)
}


class _TakeCarefulPath(Exception):
    """Internal: the optimistic write met something unusual; redo it with every check first."""


# --- errors -------------------------------------------------------------------------------
class LedgerError(Exception):
    """A credit movement was refused; nothing was changed."""


class InvalidAmount(LedgerError):
    pass


class UnknownAccount(LedgerError):
    def __init__(self, account: str, message: str | None = None) -> None:
        self.account = account
        super().__init__(
            message or f"no account {account!r}; wallets are opened when their user is created"
        )


class InsufficientFunds(LedgerError):
    def __init__(self, account: str, needed: int, available: int) -> None:
        self.account = account
        self.needed = needed
        self.available = available
        self.shortfall = needed - available
        super().__init__(
            f"insufficient credits in {account}: need {format_micro(needed)},"
            f" have {format_micro(available)}, short by {format_micro(self.shortfall)}"
        )


class IdempotencyConflict(LedgerError):
    def __init__(self, idem_key: str, entry_id: int, detail: str) -> None:
        self.idem_key = idem_key
        self.entry_id = entry_id
        super().__init__(
            f"idempotency key {idem_key!r} was already used by entry #{entry_id} for a"
            f" different movement ({detail}); use a new key for a new movement"
        )


class SameAccount(LedgerError):
    pass


class HoldError(LedgerError):
    """A hold cannot be placed or closed as asked (closed already, wrong wallet, overpaid)."""


class TransferRequest(NamedTuple):
    """The arguments of one `Ledger.transfer`, for `Ledger.transfer_many`."""

    idem_key: str
    src: str
    dst: str
    amount: int
    reason: str
    memo: dict[str, Any] | None = None


# --- amounts ------------------------------------------------------------------------------
def check_amount(amount: object, what: str = "amount") -> int:
    """An amount of µc must be a plain int (bool and float are refused: floats are inexact)."""
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise InvalidAmount(
            f"{what} must be an integer number of micro-credits, not {type(amount).__name__}"
        )
    if abs(amount) > MAX_AMOUNT:
        raise InvalidAmount(f"{what} {amount} µc is over the limit of {MAX_CREDITS} credits")
    return amount


def credits_to_micro(value: str | int | Decimal) -> int:
    """Parse credits exactly ("1.5" -> 1_500_000). Signed; callers decide whether < 0 is ok."""
    if isinstance(value, bool | float):
        raise InvalidAmount(
            f"credits must be given as a string or integer, not {type(value).__name__}"
            f" (write '1.5', not 1.5)"
        )
    if isinstance(value, int):
        d = Decimal(value)
    elif isinstance(value, Decimal):
        d = value
    elif isinstance(value, str):
        try:
            d = Decimal(value.strip())
        except InvalidOperation:
            raise InvalidAmount(f"{value!r} is not a number of credits") from None
    else:
        raise InvalidAmount(f"credits must be a string or integer, not {type(value).__name__}")
    if not d.is_finite():
        raise InvalidAmount(f"{value!r} is not a finite number of credits")
    if d.copy_abs() > MAX_CREDITS:  # copy_abs is exact; abs() would round or overflow
        raise InvalidAmount(f"{value!r} credits is over the limit of {MAX_CREDITS} credits")
    # Exact integer arithmetic on the decimal's digits: no context rounding can hide a 7th
    # decimal, and the magnitude check above bounds the work.
    sign, digits, exponent = d.as_tuple()
    assert isinstance(exponent, int)
    coefficient = int("".join(map(str, digits)) or "0")
    shift = exponent + 6
    while shift < 0 and coefficient and coefficient % 10 == 0:
        coefficient //= 10
        shift += 1
    if shift < 0:
        if coefficient:
            raise InvalidAmount(
                f"{value!r} has more than 6 decimals; 0.000001 credit is the smallest unit"
            )
        return 0
    micro: int = coefficient * 10**shift
    return -micro if sign else micro


def format_micro(amount: int) -> str:
    """2_500_000 -> "2.5", 2777 -> "0.002777", 10_000_000 -> "10"."""
    sign = "-" if amount < 0 else ""
    whole, frac = divmod(abs(amount), MICRO)
    if not frac:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{frac:06d}".rstrip("0")


def wallet_id(owner: str) -> str:
    return "wallet:" + owner


def hold_id(job_id: str) -> str:
    return "hold:" + job_id


# --- records ------------------------------------------------------------------------------
Leg = tuple[str, int]


@dataclass(frozen=True)
class Entry:
    id: int
    idem_key: str
    reason: str
    legs: tuple[Leg, ...]
    created_at: float
    memo: dict[str, Any] | None = None
    replayed: bool = False  # True when the key had been posted before and nothing moved now


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
class Hold:
    job_id: str
    account: str
    wallet: str
    placed: int  # everything ever moved into the hold
    balance: int  # what is still held
    closed_entry_id: int | None

    @property
    def closed(self) -> bool:
        return self.closed_entry_id is not None


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


# --- the ledger ---------------------------------------------------------------------------
class Ledger:
    """Credit movements over the hub's Database. Creating one applies the ledger migrations."""

    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock
        db.migrate(COMPONENT, MIGRATIONS)

    # --- accounts -------------------------------------------------------------------------
    def open_account(self, account_id: str, kind: str, owner: str | None = None) -> None:
        """Create an account if it does not exist yet (idempotent)."""
        _check_account_id(account_id, kind)
        with self.db.transaction() as c:
            row = c.execute(
                "SELECT kind, owner FROM accounts WHERE id = ?", (account_id,)
            ).fetchone()
            if row is None:
                c.execute(
                    "INSERT INTO accounts (id, kind, owner, balance, created_at)"
                    " VALUES (?, ?, ?, 0, ?)",
                    (account_id, kind, owner, self.clock()),
                )
                return
            if row["kind"] != kind:
                raise LedgerError(f"account {account_id} exists as a {row['kind']}, not a {kind}")
            if owner is not None and row["owner"] not in (None, owner):
                raise LedgerError(f"account {account_id} belongs to {row['owner']}, not {owner}")

    def ensure_mint(self) -> None:
        self.open_account(MINT, "mint")

    def account(self, account_id: str) -> sqlite3.Row | None:
        return self.db.query_one("SELECT * FROM accounts WHERE id = ?", (account_id,))

    def accounts(self, kind: str | None = None) -> list[sqlite3.Row]:
        """All accounts (id, kind, owner, balance, created_at), optionally of one kind."""
        if kind is None:
            return self.db.query("SELECT * FROM accounts ORDER BY kind, id")
        return self.db.query("SELECT * FROM accounts WHERE kind = ? ORDER BY id", (kind,))

    def balance(self, account_id: str) -> int:
        row = self.db.query_one("SELECT balance FROM accounts WHERE id = ?", (account_id,))
        if row is None:
            raise UnknownAccount(account_id)
        return int(row["balance"])

    def held_for(self, wallet: str) -> int:
        """Credits of this wallet sitting in open holds (reserved for its running jobs)."""
        self.balance(wallet)  # UnknownAccount for a wallet that does not exist
        row = self.db.query_one(
            "SELECT COALESCE(SUM(a.balance), 0) AS held FROM holds h"
            " JOIN accounts a ON a.id = h.account_id"
            " WHERE h.wallet = ? AND h.closed_entry_id IS NULL",
            (wallet,),
        )
        return int(row["held"]) if row is not None else 0

    # --- posting ----------------------------------------------------------------------------
    def post(
        self,
        idem_key: str,
        reason: str,
        legs: Sequence[Leg],
        memo: dict[str, Any] | None = None,
    ) -> Entry:
        """Post one balanced entry exactly once.

        A key seen before returns the first entry (`replayed=True`) without moving anything
        again, provided reason and legs match; otherwise IdempotencyConflict. The memo is
        descriptive and not compared.
        """
        _check_text(idem_key, "idempotency key", 256)
        _check_text(reason, "reason", 500)
        clean = _check_legs(legs)
        return self._post(idem_key, reason, clean, memo, _memo_json(memo))

    def _post(
        self,
        idem_key: str,
        reason: str,
        legs: list[Leg],
        memo: dict[str, Any] | None,
        memo_json: str | None,
    ) -> Entry:
        """`post` after its arguments were checked: legs well-formed, non-zero, balanced.

        The common case (a new key, known accounts, enough funds) takes the optimistic path:
        four statements that write and let SQLite report what the checks need. Anything
        else undoes that attempt and goes the careful way, which checks everything in a fixed
        order before writing and raises the precise error.
        """
        try:
            with self.db.transaction() as c:
                now = self.clock()
                entry_id = self._write_optimistic(c, idem_key, reason, legs, memo_json, now)
        except _TakeCarefulPath:
            return self._post_checked(idem_key, reason, legs, memo, memo_json)
        return Entry(entry_id, idem_key, reason, tuple(legs), now, memo, replayed=False)

    def _write_optimistic(
        self,
        c: sqlite3.Connection,
        idem_key: str,
        reason: str,
        legs: list[Leg],
        memo_json: str | None,
        now: float,
    ) -> int:
        """Write a new entry, letting SQLite verify each rule as it writes; raise
        _TakeCarefulPath (the caller's savepoint then undoes the writes) on anything unusual.

        It verifies the same rules as `_post_checked`, and no fewer: the key is new (else the
        UNIQUE index refuses the insert), and each balance UPDATE applies only when the
        account exists, stays at or above zero unless it is the mint, stays an int64 (SQLite
        turns an overflowing sum into a REAL), and is not a closed hold receiving credits
        (see _APPLY_CHANGE); so an update that changed no row means some rule failed.
        """
        try:
            cur = c.execute(_INSERT_ENTRY, (idem_key, reason, memo_json, now))
        except sqlite3.IntegrityError:  # the key was used before: a replay or a conflict
            raise _TakeCarefulPath from None
        entry_id = cur.lastrowid
        assert entry_id is not None
        if len(legs) == 2 and legs[0][0] != legs[1][0]:  # a transfer: one change per account
            changes = sorted(legs)
        else:
            net: dict[str, int] = {}
            for account, amount in legs:
                net[account] = net.get(account, 0) + amount
            changes = sorted(net.items())
        for account, change in changes:
            if c.execute(_APPLY_CHANGE, (change, account)).rowcount != 1:
                raise _TakeCarefulPath
        _insert_postings(c, entry_id, legs)
        return entry_id

    def _post_checked(
        self,
        idem_key: str,
        reason: str,
        legs: list[Leg],
        memo: dict[str, Any] | None,
        memo_json: str | None,
    ) -> Entry:
        """Check everything before writing; raise the first problem found."""
        with self.db.transaction() as c:
            existing = self._entry_by_key(idem_key)
            if existing is not None:
                _require_same(existing, reason, legs)
                return existing
            net: dict[str, int] = {}
            for account, amount in legs:
                net[account] = net.get(account, 0) + amount
            accounts = sorted(net)
            # One primary-key lookup per account: SQLite runs `id IN (?, ?)` through an
            # ephemeral index, which cost more than the two lookups it replaces.
            rows = [c.execute(_SELECT_ACCOUNT, (account,)).fetchone() for account in accounts]
            for account, row in zip(accounts, rows, strict=True):
                if row is None:
                    raise UnknownAccount(account)
            new_balances: list[tuple[int, str]] = []
            for account, row in zip(accounts, rows, strict=True):
                kind, balance = row[0], int(row[1])
                change = net[account]
                after = balance + change
                if kind != "mint" and after < 0:
                    raise InsufficientFunds(account, -change, balance)
                if abs(after) > _INT64_MAX:
                    raise InvalidAmount(f"{account} would exceed the largest storable balance")
                # Only hold accounts have rows in `holds` (place_hold opens them as kind
                # 'hold', and an id's prefix fixes its kind), so wallets skip this lookup.
                if kind == "hold" and change > 0 and c.execute(_HOLD_CLOSED, (account,)).fetchone():
                    raise HoldError(f"{account} is closed; credits cannot be moved into it")
                new_balances.append((after, account))
            now = self.clock()
            entry_id = c.execute(_INSERT_ENTRY, (idem_key, reason, memo_json, now)).lastrowid
            assert entry_id is not None
            _insert_postings(c, entry_id, legs)
            for update in new_balances:
                c.execute("UPDATE accounts SET balance = ? WHERE id = ?", update)
        return Entry(entry_id, idem_key, reason, tuple(legs), now, memo, replayed=False)

    def transfer(
        self,
        idem_key: str,
        src: str,
        dst: str,
        amount: int,
        reason: str,
        memo: dict[str, Any] | None = None,
    ) -> Entry:
        legs, memo_json = _check_transfer(idem_key, src, dst, amount, reason, memo)
        return self._post(idem_key, reason, legs, memo, memo_json)

    def transfer_many(self, requests: Sequence[TransferRequest]) -> list[Entry | Exception]:
        """Apply transfers in order, as `transfer` called once per request would.

        Each request gets its own result: the Entry (replayed=True for a key posted before,
        in an earlier transaction or earlier in `requests`) or the exception `transfer` would
        have raised, with the same type and message; refused requests change nothing. The
        accepted ones are written together, with no savepoint per request: the rules of
        `_post_checked` are applied in Python to balances read once, in request order, then
        entries and postings are inserted with executemany and each touched account's
        balance is updated once. If writing fails, nothing of this call is stored and the
        error propagates.
        """
        results: list[Any] = []  # an Entry or an exception per request, once decided
        checked: list[tuple[int, str, str, int, list[Leg], dict[str, Any] | None, str | None]] = []
        accounts: set[str] = set()
        keys: set[str] = set()
        for i, r in enumerate(requests):
            try:
                legs, memo_json = _check_transfer(
                    r.idem_key, r.src, r.dst, r.amount, r.reason, r.memo
                )
            except Exception as e:
                results.append(e)
                continue
            results.append(None)
            checked.append((i, r.idem_key, r.reason, r.amount, legs, r.memo, memo_json))
            accounts.add(r.src)
            accounts.add(r.dst)
            keys.add(r.idem_key)
        if not checked:
            return results
        with self.db.transaction() as c:
            # account -> [kind, balance, closed hold]
            state: dict[str, list[Any]] = {
                row[0]: [row[1], int(row[2]), bool(row[3])]
                for row in c.execute(_SELECT_ACCOUNTS_JSON, (json.dumps(sorted(accounts)),))
            }
            known: dict[str, Entry] = {}
            for row in c.execute(_SELECT_ENTRIES_JSON, (json.dumps(sorted(keys)),)):
                key = row[1]
                prior = known.get(key)
                leg = () if row[5] is None else ((str(row[5]), int(row[6])),)
                if prior is None:
                    known[key] = Entry(
                        id=int(row[0]),
                        idem_key=str(key),
                        reason=str(row[2]),
                        legs=leg,
                        created_at=float(row[4]),
                        memo=_memo_load(row[3]),
                        replayed=True,
                    )
                else:
                    known[key] = replace(prior, legs=prior.legs + leg)
            top = c.execute("SELECT MAX(id) FROM entries").fetchone()[0]
            next_id = 1 if top is None else int(top) + 1
            if next_id + len(checked) > _INT64_MAX:  # SQLite would pick random ids: go slow
                for i, key, reason, _, legs, memo, memo_json in checked:
                    try:
                        results[i] = self._post_checked(key, reason, legs, memo, memo_json)
                    except Exception as e:
                        results[i] = e
                return results
            now = self.clock()
            entry_rows: list[tuple[int, str, str, str | None, float]] = []
            posting_rows: list[tuple[int, str, int]] = []
            # Keys written earlier in this call: a later request with one replays what the
            # database would return. Kept as rows; an Entry is built only for such a replay.
            fresh: dict[str, tuple[int, str, tuple[Leg, ...], str | None]] = {}
            for i, key, reason, amount, legs, memo, memo_json in checked:
                existing = known.get(key)
                if existing is None and key in fresh:
                    entry_id, f_reason, f_legs, f_memo = fresh[key]
                    existing = Entry(
                        entry_id, key, f_reason, f_legs, now, _memo_load(f_memo), replayed=True
                    )
                    known[key] = existing
                if existing is not None:
                    try:
                        _require_same(existing, reason, legs)
                    except Exception as e:
                        results[i] = e
                    else:
                        results[i] = existing
                    continue
                (src, _), (dst, _) = legs
                # The order of _post_checked: unknown accounts first, then each account's
                # rules, accounts sorted by id. The src side is the only one that can run
                # short; the dst side can overflow or be a closed hold.
                s_state = state.get(src)
                d_state = state.get(dst)
                if s_state is None or d_state is None:
                    unknown = [a for a, st in ((src, s_state), (dst, d_state)) if st is None]
                    results[i] = UnknownAccount(min(unknown))
                    continue
                problem = _transfer_problem(src, s_state, dst, d_state, amount)
                if problem is not None:
                    results[i] = problem
                    continue
                s_state[1] -= amount
                d_state[1] += amount
                entry_id = next_id
                next_id += 1
                legs_t = tuple(legs)
                entry_rows.append((entry_id, key, reason, memo_json, now))
                posting_rows.append((entry_id, src, -amount))
                posting_rows.append((entry_id, dst, amount))
                results[i] = Entry(entry_id, key, reason, legs_t, now, memo, replayed=False)
                fresh[key] = (entry_id, reason, legs_t, memo_json)
            touched = {account for _, account, _ in posting_rows}
            if entry_rows:
                c.executemany(_INSERT_ENTRY_WITH_ID, entry_rows)
                c.executemany(_INSERT_POSTINGS[1], posting_rows)
                c.executemany(
                    "UPDATE accounts SET balance = ? WHERE id = ?",
                    [(state[account][1], account) for account in sorted(touched)],
                )
        return results

    def grant(
        self,
        idem_key: str,
        dst: str,
        amount: int,
        reason: str,
        memo: dict[str, Any] | None = None,
    ) -> Entry:
        """Issue new credits from the mint (welcome grants, bonuses)."""
        return self.transfer(idem_key, MINT, dst, amount, reason, memo)

    # --- holds ------------------------------------------------------------------------------
    def place_hold(
        self,
        job_id: str,
        wallet: str,
        amount: int,
        idem_key: str | None = None,
        reason: str = "hold",
        memo: dict[str, Any] | None = None,
    ) -> Entry:
        """Move `amount` from the wallet into the job's hold (opened on first use).

        InsufficientFunds when the wallet is short: then nothing, not even the hold, exists.
        A different idem_key adds to an open hold (a top-up); the default key is
        `hold:<job_id>`.
        """
        _check_text(job_id, "job id", 200)
        _check_positive(amount)
        key = idem_key if idem_key is not None else "hold:" + job_id
        account = hold_id(job_id)
        legs = [(wallet, -amount), (account, amount)]
        memo = {"job_id": job_id, **(memo or {})}
        with self.db.transaction() as c:
            if self._entry_by_key(key) is not None:
                return self.post(key, reason, legs, memo)  # a replay, or a conflict
            hold = self.hold(job_id)
            if hold is None:
                row = self.account(wallet)
                if row is None:
                    raise UnknownAccount(wallet)
                if row["kind"] != "wallet":
                    raise HoldError(f"holds are placed on wallets; {wallet} is a {row['kind']}")
                self.open_account(account, "hold", owner=wallet)
                c.execute(
                    "INSERT INTO holds (job_id, account_id, wallet, placed, opened_at)"
                    " VALUES (?, ?, ?, 0, ?)",
                    (job_id, account, wallet, self.clock()),
                )
            elif hold.wallet != wallet:
                raise HoldError(f"job {job_id}'s hold is on {hold.wallet}, not {wallet}")
            elif hold.closed:
                raise HoldError(
                    f"the hold for job {job_id} was closed by entry #{hold.closed_entry_id};"
                    f" submit a new job"
                )
            entry = self.post(key, reason, legs, memo)
            c.execute("UPDATE holds SET placed = placed + ? WHERE job_id = ?", (amount, job_id))
        return entry

    def close_hold(
        self,
        job_id: str,
        payouts: Sequence[Leg],
        reason: str,
        idem_key: str | None = None,
        memo: dict[str, Any] | None = None,
    ) -> Entry:
        """Pay each (account, amount) from the job's hold; the rest goes back to its wallet.

        The default key `close:<job_id>` makes settlement and refund of one job mutually
        exclusive: closing again is a replay when identical, otherwise IdempotencyConflict.
        Zero payouts are skipped; payouts above what is held raise HoldError.
        """
        _check_text(job_id, "job id", 200)
        account = hold_id(job_id)
        clean: list[Leg] = []
        for payee, amount in payouts:
            _check_positive(amount, "payout", allow_zero=True)
            if payee == account:
                raise HoldError(f"a payout from the hold of job {job_id} cannot go to the hold")
            if amount:
                clean.append((payee, amount))
        paid = sum(amount for _, amount in clean)
        key = idem_key if idem_key is not None else "close:" + job_id
        memo = {"job_id": job_id, **(memo or {})}
        with self.db.transaction() as c:
            hold = self.hold(job_id)
            if hold is None:
                raise UnknownAccount(account, f"job {job_id} has no hold to close")
            existing = self._entry_by_key(key)
            if existing is not None:
                # The amount held at closing time is in the first entry; rebuild this request
                # against it so an identical repeat compares equal.
                held = -sum(a for acct, a in existing.legs if acct == account)
                if held <= 0 or paid > held:
                    raise IdempotencyConflict(key, existing.id, _describe(existing))
                return self.post(key, reason, _close_legs(account, hold.wallet, held, clean), memo)
            if hold.closed:
                raise HoldError(
                    f"the hold for job {job_id} was already closed by entry"
                    f" #{hold.closed_entry_id}; nothing was moved"
                )
            held = hold.balance
            if paid > held:
                raise HoldError(
                    f"payouts of {format_micro(paid)} exceed the {format_micro(held)} credits"
                    f" held for job {job_id}"
                )
            entry = self.post(key, reason, _close_legs(account, hold.wallet, held, clean), memo)
            c.execute("UPDATE holds SET closed_entry_id = ? WHERE job_id = ?", (entry.id, job_id))
        return entry

    def refund_hold(
        self, job_id: str, reason: str = "refund", idem_key: str | None = None
    ) -> Entry:
        """Return everything held for the job to its wallet (close_hold with no payouts)."""
        return self.close_hold(job_id, [], reason, idem_key)

    def hold(self, job_id: str) -> Hold | None:
        row = self.db.query_one(
            "SELECT h.job_id, h.account_id, h.wallet, h.placed, h.closed_entry_id, a.balance"
            " FROM holds h JOIN accounts a ON a.id = h.account_id WHERE h.job_id = ?",
            (job_id,),
        )
        if row is None:
            return None
        closed = row["closed_entry_id"]
        return Hold(
            job_id=str(row["job_id"]),
            account=str(row["account_id"]),
            wallet=str(row["wallet"]),
            placed=int(row["placed"]),
            balance=int(row["balance"]),
            closed_entry_id=int(closed) if closed is not None else None,
        )

    # --- reading ------------------------------------------------------------------------------
    def entry(self, idem_key: str) -> Entry | None:
        return self._entry_by_key(idem_key)

    def history(
        self, account_id: str, limit: int = 50, before_entry_id: int | None = None
    ) -> list[HistoryRow]:
        """The account's entries, newest first, each with its signed amount and the balance
        right after it. Page with before_entry_id = the last row's entry_id."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise LedgerError("history limit must be an integer from 1 to 1000")
        balance = self.balance(account_id)
        if before_entry_id is None:
            before_entry_id = _INT64_MAX
        else:
            newer = self.db.query_one(
                "SELECT COALESCE(SUM(amount), 0) AS s FROM postings"
                " WHERE account_id = ? AND entry_id >= ?",
                (account_id, before_entry_id),
            )
            balance -= int(newer["s"]) if newer is not None else 0
        rows = self.db.query(
            "SELECT e.id, e.created_at, e.reason, e.memo, SUM(p.amount) AS amount"
            " FROM postings p JOIN entries e ON e.id = p.entry_id"
            " WHERE p.account_id = ? AND p.entry_id < ?"
            " GROUP BY e.id ORDER BY e.id DESC LIMIT ?",
            (account_id, before_entry_id, limit),
        )
        others: dict[int, list[str]] = {}
        if rows:
            ids = [int(r["id"]) for r in rows]
            for p in self.db.query(
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
                    memo=_memo_load(r["memo"]),
                )
            )
            balance -= amount
        return result

    def audit(self) -> Audit:
        """Check the books: zero sum, cached balances = postings, no negative wallets."""
        accounts = self.db.query("SELECT id, kind, balance FROM accounts")
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
            for r in self.db.query(
                "SELECT a.id, a.balance, COALESCE(p.total, 0) AS recomputed FROM accounts a"
                " LEFT JOIN (SELECT account_id, SUM(amount) AS total FROM postings"
                "            GROUP BY account_id) p ON p.account_id = a.id"
                " WHERE a.balance != COALESCE(p.total, 0) ORDER BY a.id"
            )
        )
        unbalanced = tuple(
            int(r["entry_id"])
            for r in self.db.query(
                "SELECT entry_id FROM postings GROUP BY entry_id HAVING SUM(amount) != 0"
                " ORDER BY entry_id"
            )
        )
        stranded = tuple(
            str(r["account_id"])
            for r in self.db.query(
                "SELECT h.account_id FROM holds h JOIN accounts a ON a.id = h.account_id"
                " WHERE h.closed_entry_id IS NOT NULL AND a.balance != 0 ORDER BY h.account_id"
            )
        )
        entries = self.db.query_one("SELECT COUNT(*) AS n FROM entries")
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

    # --- internals ------------------------------------------------------------------------------
    def _entry_by_key(self, idem_key: str) -> Entry | None:
        row = self.db.query_one(
            "SELECT id, idem_key, reason, memo, created_at FROM entries WHERE idem_key = ?",
            (idem_key,),
        )
        if row is None:
            return None
        legs = tuple(
            (str(p["account_id"]), int(p["amount"]))
            for p in self.db.query(
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
            memo=_memo_load(row["memo"]),
            replayed=True,
        )


def _insert_postings(c: sqlite3.Connection, entry_id: int, legs: list[Leg]) -> None:
    n = len(legs)
    if n <= _MULTI_ROW_LEGS:
        params: list[object] = []
        for account, amount in legs:
            params += (entry_id, account, amount)
        c.execute(_INSERT_POSTINGS[n], params)
    else:
        c.executemany(
            _INSERT_POSTINGS[1], [(entry_id, account, amount) for account, amount in legs]
        )


def _close_legs(account: str, wallet: str, held: int, payouts: list[Leg]) -> list[Leg]:
    remainder = held - sum(amount for _, amount in payouts)
    legs: list[Leg] = [(account, -held), *payouts]
    if remainder:
        legs.append((wallet, remainder))
    return legs


def _require_same(existing: Entry, reason: str, legs: Sequence[Leg]) -> None:
    if existing.reason != reason:
        raise IdempotencyConflict(
            existing.idem_key, existing.id, f"reason {existing.reason!r}, not {reason!r}"
        )
    if sorted(existing.legs) != sorted(legs):
        raise IdempotencyConflict(existing.idem_key, existing.id, _describe(existing))


def _transfer_problem(
    src: str, s_state: list[Any], dst: str, d_state: list[Any], amount: int
) -> Exception | None:
    """What `_post_checked` would raise for moving amount from src to dst, or None.

    The states are [kind, balance, closed hold]; the checks run per account sorted by id.
    """
    sides = [(src, s_state, -amount), (dst, d_state, amount)]
    if dst < src:
        sides.reverse()
    for account, (kind, balance, closed), change in sides:
        after = balance + change
        if kind != "mint" and after < 0:
            return InsufficientFunds(account, -change, balance)
        if abs(after) > _INT64_MAX:
            return InvalidAmount(f"{account} would exceed the largest storable balance")
        if kind == "hold" and change > 0 and closed:
            return HoldError(f"{account} is closed; credits cannot be moved into it")
    return None


def _describe(entry: Entry) -> str:
    moved = ", ".join(f"{account} {format_micro(amount)}" for account, amount in entry.legs)
    return f"{entry.reason!r}: {moved}"


def _check_text(value: object, what: str, max_len: int) -> None:
    if not isinstance(value, str) or not value.strip():
        raise LedgerError(f"{what} must be a non-empty string")
    if len(value) > max_len:
        raise LedgerError(f"{what} is longer than {max_len} characters")


def _check_transfer(
    idem_key: str, src: str, dst: str, amount: int, reason: str, memo: dict[str, Any] | None
) -> tuple[list[Leg], str | None]:
    """The checks of `transfer`, in its order: (legs, memo as JSON) or the first problem."""
    _check_positive(amount)
    if src == dst:
        raise SameAccount(f"cannot transfer from {src} to itself; choose another recipient")
    # The checks post() would make, spelled out for two legs (this is the hot path): a
    # positive amount within limits gives two non-zero legs that balance by construction.
    _check_text(idem_key, "idempotency key", 256)
    _check_text(reason, "reason", 500)
    _check_text(src, "account id", 200)
    _check_text(dst, "account id", 200)
    return [(src, -amount), (dst, amount)], _memo_json(memo)


def _check_positive(amount: object, what: str = "amount", allow_zero: bool = False) -> int:
    n = check_amount(amount, what)
    if n < 0 or (n == 0 and not allow_zero):
        raise InvalidAmount(f"{what} must be positive, got {format_micro(n)} credits")
    return n


def _check_legs(legs: Sequence[Leg]) -> list[Leg]:
    clean: list[Leg] = []
    for leg in legs:
        if not isinstance(leg, tuple | list) or len(leg) != 2:
            raise LedgerError(f"a leg is an (account, amount) pair, not {leg!r}")
        account, amount = leg
        _check_text(account, "account id", 200)
        if check_amount(amount, f"amount for {account}") == 0:
            raise InvalidAmount(f"a leg of 0 credits for {account} moves nothing; leave it out")
        clean.append((account, amount))
    if len(clean) < 2:
        raise LedgerError("an entry needs at least two legs (a debit and a credit)")
    total = sum(amount for _, amount in clean)
    if total != 0:
        raise LedgerError(f"entry is unbalanced: its legs sum to {format_micro(total)}, not 0")
    return clean


def _check_account_id(account_id: object, kind: str) -> None:
    if kind not in ACCOUNT_KINDS:
        raise LedgerError(f"unknown account kind {kind!r}; use one of {', '.join(ACCOUNT_KINDS)}")
    _check_text(account_id, "account id", 200)
    assert isinstance(account_id, str)
    if kind == "mint":
        if account_id != MINT:
            raise LedgerError(f"the mint account is {MINT!r}, not {account_id!r}")
    elif account_id != kind and not (
        account_id.startswith(kind + ":") and len(account_id) > len(kind) + 1
    ):
        raise LedgerError(f"a {kind} account id looks like '{kind}:<name>', not {account_id!r}")
    if kind in ("wallet", "hold") and account_id == kind:
        raise LedgerError(f"a {kind} account id needs a name: '{kind}:<name>'")


def _memo_json(memo: dict[str, Any] | None) -> str | None:
    if memo is None:
        return None
    if not isinstance(memo, dict):
        raise LedgerError("memo must be a dict")
    try:
        return json.dumps(memo, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise LedgerError(f"memo must be JSON-serialisable: {e}") from None


def _memo_load(text: object) -> dict[str, Any] | None:
    if text is None:
        return None
    value = json.loads(str(text))
    return value if isinstance(value, dict) else {"value": value}

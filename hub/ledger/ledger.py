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
maps them to statuses. The amounts, account names, errors and records are in money.py, the
checks in checks.py, the tables and prepared statements in schema.py, history and the audit
in reports.py.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any

from hub.ledger import reports, transfers
from hub.ledger.checks import (
    check_account_id,
    check_legs,
    check_positive,
    check_text,
    check_transfer,
    describe,
    memo_json,
    require_same,
)
from hub.ledger.money import (
    INT64_MAX,
    MINT,
    Entry,
    Hold,
    HoldError,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidAmount,
    LedgerError,
    Leg,
    TransferRequest,
    UnknownAccount,
    format_micro,
    hold_id,
)
from hub.ledger.reports import Audit, HistoryRow
from hub.ledger.schema import (
    APPLY_NET_CHANGE,
    COMPONENT,
    HOLD_CLOSED,
    INSERT_ENTRY,
    MIGRATIONS,
    SELECT_ACCOUNT,
    insert_postings,
    net_change,
)
from hub.store.db import Database


class _TakeCarefulPath(Exception):
    """Internal: the optimistic write met something unusual; redo it with every check first."""


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
        check_account_id(account_id, kind)
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
        check_text(idem_key, "idempotency key", 256)
        check_text(reason, "reason", 500)
        clean = check_legs(legs)
        return self._post(idem_key, reason, clean, memo, memo_json(memo))

    def _post(
        self,
        idem_key: str,
        reason: str,
        legs: list[Leg],
        memo: dict[str, Any] | None,
        memo_json: str | None,
        same_memo: bool = False,
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
            return self._post_checked(idem_key, reason, legs, memo, memo_json, same_memo)
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
        account exists, stays at or above zero unless it is the mint, stays an int64, and is
        not a closed hold receiving credits (see APPLY_NET_CHANGE); so an update that changed
        no row means some rule failed.
        """
        try:
            cur = c.execute(INSERT_ENTRY, (idem_key, reason, memo_json, now))
        except sqlite3.IntegrityError:  # the key was used before: a replay or a conflict
            raise _TakeCarefulPath from None
        entry_id = int(cur.fetchone()[0])
        if len(legs) == 2 and legs[0][0] != legs[1][0]:  # a transfer: one change per account
            changes = sorted(legs)
        else:
            net: dict[str, int] = {}
            for account, amount in legs:
                net[account] = net.get(account, 0) + amount
            changes = sorted(net.items())
        for account, change in changes:
            params = net_change(account, change, min(change, 0), max(change, 0), change > 0)
            if params is None or c.execute(APPLY_NET_CHANGE, params).rowcount != 1:
                raise _TakeCarefulPath
        insert_postings(c, entry_id, legs)
        return entry_id

    def _post_checked(
        self,
        idem_key: str,
        reason: str,
        legs: list[Leg],
        memo: dict[str, Any] | None,
        memo_json: str | None,
        same_memo: bool = False,
    ) -> Entry:
        """Check everything before writing; raise the first problem found."""
        with self.db.transaction() as c:
            existing = self.entry(idem_key)
            if existing is not None:
                require_same(existing, reason, legs, same_memo, memo_json)
                return existing
            net: dict[str, int] = {}
            for account, amount in legs:
                net[account] = net.get(account, 0) + amount
            accounts = sorted(net)
            # One primary-key lookup per account: SQLite runs `id IN (?, ?)` through an
            # ephemeral index, which cost more than the two lookups it replaces.
            rows = [c.execute(SELECT_ACCOUNT, (account,)).fetchone() for account in accounts]
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
                if abs(after) > INT64_MAX:
                    raise InvalidAmount(f"{account} would exceed the largest storable balance")
                # Only hold accounts have rows in `holds` (place_hold opens them as kind
                # 'hold', and an id's prefix fixes its kind), so wallets skip this lookup.
                if kind == "hold" and change > 0 and c.execute(HOLD_CLOSED, (account,)).fetchone():
                    raise HoldError(f"{account} is closed; credits cannot be moved into it")
                new_balances.append((after, account))
            now = self.clock()
            entry_id = int(
                c.execute(INSERT_ENTRY, (idem_key, reason, memo_json, now)).fetchone()[0]
            )
            insert_postings(c, entry_id, legs)
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
        same_memo: bool = False,
    ) -> Entry:
        """Move amount from src to dst exactly once. With same_memo, a replay of the key must
        carry the same memo too (else IdempotencyConflict): for a user's transfer, whose
        memo is part of what they asked for."""
        legs, memo_json = check_transfer(idem_key, src, dst, amount, reason, memo)
        return self._post(idem_key, reason, legs, memo, memo_json, same_memo)

    def transfer_many(self, requests: Sequence[TransferRequest]) -> list[Entry | Exception]:
        """Apply transfers in order, as `transfer` called once per request would.

        Each request gets its own result: the Entry (replayed=True for a key posted before,
        in an earlier transaction or earlier in `requests`) or the exception `transfer` would
        have raised, with the same type and message; refused requests change nothing. The
        accepted ones are written together, with no savepoint per request, a few statements
        for the whole list (hub/ledger/transfers.py). If writing fails, nothing of this call
        is stored and the error propagates.
        """
        return transfers.transfer_many(self, requests)

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
        check_text(job_id, "job id", 200)
        check_positive(amount)
        key = idem_key if idem_key is not None else "hold:" + job_id
        account = hold_id(job_id)
        legs = [(wallet, -amount), (account, amount)]
        memo = {"job_id": job_id, **(memo or {})}
        with self.db.transaction() as c:
            if self.entry(key) is not None:
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
        check_text(job_id, "job id", 200)
        account = hold_id(job_id)
        clean: list[Leg] = []
        for payee, amount in payouts:
            check_positive(amount, "payout", allow_zero=True)
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
            existing = self.entry(key)
            if existing is not None:
                # The amount held at closing time is in the first entry; rebuild this request
                # against it so an identical repeat compares equal.
                held = -sum(a for acct, a in existing.legs if acct == account)
                if held <= 0 or paid > held:
                    raise IdempotencyConflict(key, existing.id, describe(existing))
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
        """The entry posted under this key (replayed=True), or None."""
        return reports.entry(self.db, idem_key)

    def history(
        self, account_id: str, limit: int = 50, before_entry_id: int | None = None
    ) -> list[HistoryRow]:
        """The account's entries, newest first, each with its signed amount and the balance
        right after it. Page with before_entry_id = the last row's entry_id."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise LedgerError("history limit must be an integer from 1 to 1000")
        balance = self.balance(account_id)
        return reports.history(self.db, account_id, balance, limit, before_entry_id)

    def audit(self) -> Audit:
        """Check the books: zero sum, cached balances = postings, no negative wallets."""
        return reports.audit(self.db)


def _close_legs(account: str, wallet: str, held: int, payouts: list[Leg]) -> list[Leg]:
    remainder = held - sum(amount for _, amount in payouts)
    legs: list[Leg] = [(account, -held), *payouts]
    if remainder:
        legs.append((wallet, remainder))
    return legs

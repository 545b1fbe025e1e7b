"""The credit ledger and its database, against a real SQLite file.

What a user would check: credits move exactly once, an error changes nothing and says why,
the books always balance (sum zero, no negative wallet, cached balances = postings), and all
of it survives a restart.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from hub.ledger.ledger import Ledger
from hub.ledger.money import (
    MAX_AMOUNT,
    MICRO,
    MINT,
    Entry,
    HoldError,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidAmount,
    LedgerError,
    SameAccount,
    TransferRequest,
    UnknownAccount,
    credits_to_micro,
    format_micro,
)
from hub.store.db import Database, MigrationError, TransactionConflict, open_database, split_sql

U1, U2, U3 = "wallet:u1", "wallet:u2", "wallet:u3"


pytestmark = pytest.mark.both_stores


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "hub.sqlite"


@pytest.fixture
def db(store: str | Path) -> Any:
    database = open_database(store)
    yield database
    database.close()


@pytest.fixture
def ledger(db: Database) -> Ledger:
    led = Ledger(db)
    for owner in ("u1", "u2", "u3"):
        led.open_account("wallet:" + owner, "wallet", owner)
    return led


def funded(ledger: Ledger, account: str = U1, credits: int = 10) -> Ledger:
    ledger.grant("fund:" + account, account, credits * MICRO, "test funds")
    return ledger


def snapshot(ledger: Ledger) -> tuple[Any, ...]:
    """Everything stored that a failed call must leave alone."""
    db = ledger.db
    return (
        ledger.audit(),
        [tuple(r) for r in db.query("SELECT * FROM accounts ORDER BY id")],
        [tuple(r) for r in db.query("SELECT * FROM entries ORDER BY id")],
        [tuple(r) for r in db.query("SELECT * FROM postings ORDER BY id")],
        [tuple(r) for r in db.query("SELECT * FROM holds ORDER BY job_id")],
    )


def assert_unchanged(ledger: Ledger, before: tuple[Any, ...]) -> None:
    assert snapshot(ledger) == before
    assert ledger.audit().balanced


# --- amounts ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "micro"),
    [
        ("1.5", 1_500_000),
        ("0.002777", 2777),
        ("10", 10 * MICRO),
        ("1.0000000", MICRO),  # trailing zeros beyond 6 decimals are exact, so fine
        ("-2.25", -2_250_000),
        ("0", 0),
        (".5", 500_000),
        ("5.", 5 * MICRO),
        (7, 7 * MICRO),
        (Decimal("0.000001"), 1),
        ("1000000000000", 10**12 * MICRO),
    ],
)
def test_credits_to_micro_is_exact(text: Any, micro: int) -> None:
    assert credits_to_micro(text) == micro


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0.0000001", "more than 6 decimals"),
        ("1.00000000000000000000000000001", "more than 6 decimals"),  # beyond Decimal precision
        ("abc", "not a number"),
        ("", "not a number"),
        # Only plain ASCII decimals: what else Decimal() reads is refused (issue 15).
        (" 2 ", "plain decimal"),
        ("1e3", "plain decimal"),
        ("1e-1000000000", "plain decimal"),
        ("1e1000000000", "plain decimal"),
        ("nan", "plain decimal"),
        ("-inf", "plain decimal"),
        ("1_0", "plain decimal"),
        ("+1", "plain decimal"),
        ("\u0661", "plain decimal"),  # ARABIC-INDIC DIGIT ONE
        ("\uff11", "plain decimal"),  # FULLWIDTH DIGIT ONE
        ("1" * 65, "at most 64 characters"),
        ("1000000000000.000001", "over the limit"),
        (1.5, "not float"),
        (True, "not bool"),
    ],
)
def test_credits_to_micro_rejects_with_a_reason(value: Any, message: str) -> None:
    with pytest.raises(InvalidAmount, match=message):
        credits_to_micro(value)


@pytest.mark.parametrize(
    ("micro", "text"),
    [(1_500_000, "1.5"), (2777, "0.002777"), (10 * MICRO, "10"), (0, "0"), (-1_500_000, "-1.5")],
)
def test_format_micro_trims(micro: int, text: str) -> None:
    assert format_micro(micro) == text
    assert credits_to_micro(text) == micro


# --- database -----------------------------------------------------------------------------
@pytest.mark.sqlite_only
def test_database_is_durable_and_checks_foreign_keys(db: Database) -> None:
    assert db.query_one("PRAGMA journal_mode")[0] == "wal"  # type: ignore[index]
    assert db.query_one("PRAGMA synchronous")[0] == 2  # type: ignore[index]  # FULL
    assert db.query_one("PRAGMA foreign_keys")[0] == 1  # type: ignore[index]
    assert isinstance(db.query_one("SELECT 1 AS one"), sqlite3.Row)


def test_migrations_are_recorded_per_component(db: Database) -> None:
    a = [(1, "t", "CREATE TABLE a (x INTEGER);"), (2, "u", "ALTER TABLE a ADD COLUMN y TEXT")]
    b = [(1, "t", "CREATE TABLE b (x INTEGER); CREATE INDEX b_x ON b(x);")]
    assert db.migrate("alpha", a) == [1, 2]
    assert db.migrate("beta", b) == [1]  # same version numbers, no collision
    assert db.migrate("alpha", a) == []
    assert db.schema_version("alpha") == 2
    assert db.schema_version("nobody") == 0
    rows = db.query("SELECT component, version, name FROM schema_migrations ORDER BY 1, 2")
    assert [tuple(r) for r in rows] == [("alpha", 1, "t"), ("alpha", 2, "u"), ("beta", 1, "t")]
    # A later release adds migration 3: only it runs.
    assert db.migrate("alpha", [*a, (3, "v", "CREATE TABLE c (z INTEGER)")]) == [3]


def test_failed_migration_leaves_no_trace(db: Database) -> None:
    bad = [
        (1, "ok", "CREATE TABLE a (x INTEGER)"),
        (2, "broken", "CREATE TABLE b (x INTEGER); NOT SQL;"),
    ]
    with pytest.raises(sqlite3.OperationalError):
        db.migrate("alpha", bad)
    assert db.schema_version("alpha") == 1
    assert not db.columns("b")
    fixed = [bad[0], (2, "broken", "CREATE TABLE b (x INTEGER)")]
    assert db.migrate("alpha", fixed) == [2]


def test_migration_mismatches_are_refused(db: Database) -> None:
    db.migrate("alpha", [(1, "first", "CREATE TABLE a (x INTEGER)"), (2, "second", "SELECT 1")])
    with pytest.raises(MigrationError, match="does not know"):
        db.migrate("alpha", [(1, "first", "CREATE TABLE a (x INTEGER)")])
    with pytest.raises(MigrationError, match="renumbered"):
        db.migrate(
            "alpha", [(1, "renamed", "CREATE TABLE a (x INTEGER)"), (2, "second", "SELECT 1")]
        )
    with pytest.raises(MigrationError, match="increasing"):
        db.migrate("gamma", [(2, "x", "SELECT 1"), (1, "y", "SELECT 1")])


def test_split_sql_keeps_triggers_and_literals_whole() -> None:
    script = """
        -- a comment; with a semicolon
        CREATE TABLE a (x TEXT DEFAULT ';');
        CREATE TRIGGER t AFTER INSERT ON a BEGIN INSERT INTO a VALUES ('y'); SELECT 1; END;
        CREATE TABLE b (y INTEGER)
    """
    parts = split_sql(script)
    assert len(parts) == 3
    assert parts[1].startswith("CREATE TRIGGER") and parts[1].endswith("END;")


def test_transaction_commits_and_rolls_back(db: Database) -> None:
    db.migrate("t", [(1, "t", "CREATE TABLE t (x INTEGER)")])
    with db.transaction() as c:
        c.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(ZeroDivisionError), db.transaction() as c:
        c.execute("INSERT INTO t VALUES (2)")
        1 / 0  # noqa: B018
    assert [r["x"] for r in db.query("SELECT x FROM t")] == [1]
    assert not db.in_transaction and not db.conn.in_transaction


def test_nested_transaction_failure_undoes_only_the_inner_block(db: Database) -> None:
    db.migrate("t", [(1, "t", "CREATE TABLE t (x INTEGER)")])
    with db.transaction() as c:
        c.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(ValueError), db.transaction() as inner:
            inner.execute("INSERT INTO t VALUES (2)")
            raise ValueError
        c.execute("INSERT INTO t VALUES (3)")
    assert [r["x"] for r in db.query("SELECT x FROM t ORDER BY x")] == [1, 3]


def test_transaction_from_another_thread_is_refused(db: Database) -> None:
    errors: list[BaseException] = []

    def other() -> None:
        try:
            with db.transaction():
                pass
        except BaseException as e:
            errors.append(e)

    with db.transaction():
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert len(errors) == 1 and isinstance(errors[0], TransactionConflict)


async def test_awaiting_inside_a_transaction_is_caught(db: Database) -> None:
    import asyncio

    async def writer() -> None:
        with db.transaction():
            pass

    with db.transaction(), pytest.raises(TransactionConflict, match="do not await"):
        await asyncio.create_task(writer())


# --- accounts -----------------------------------------------------------------------------
def test_new_ledger_has_a_mint_and_migrations(ledger: Ledger) -> None:
    assert ledger.balance(MINT) == 0
    assert ledger.db.schema_version("ledger") == 1
    ledger.ensure_mint()
    assert [r["id"] for r in ledger.accounts("mint")] == [MINT]


def test_open_account_is_idempotent_and_checked(ledger: Ledger) -> None:
    ledger.open_account(U1, "wallet", "u1")
    ledger.open_account(U1, "wallet")
    ledger.open_account("revenue", "revenue")
    assert ledger.account(U1)["owner"] == "u1"  # type: ignore[index]
    with pytest.raises(LedgerError, match="looks like 'revenue:<name>'"):
        ledger.open_account(U1, "revenue")  # the id says which kind an account is
    with pytest.raises(LedgerError, match="belongs to u1"):
        ledger.open_account(U1, "wallet", "u9")
    with pytest.raises(LedgerError, match="unknown account kind"):
        ledger.open_account("escrow:x", "escrow")
    with pytest.raises(LedgerError, match="looks like 'wallet:<name>'"):
        ledger.open_account("u1", "wallet")
    with pytest.raises(LedgerError, match="needs a name"):
        ledger.open_account("wallet", "wallet")
    with pytest.raises(LedgerError, match="the mint account is 'mint'"):
        ledger.open_account("mint2", "mint")


def test_unknown_accounts(ledger: Ledger) -> None:
    with pytest.raises(UnknownAccount, match="wallet:nobody"):
        ledger.balance("wallet:nobody")
    with pytest.raises(UnknownAccount):
        ledger.held_for("wallet:nobody")
    with pytest.raises(UnknownAccount):
        ledger.history("wallet:nobody")
    funded(ledger)
    before = snapshot(ledger)
    with pytest.raises(UnknownAccount) as e:
        ledger.transfer("t", U1, "wallet:nobody", 1, "gift")
    assert e.value.account == "wallet:nobody"
    assert_unchanged(ledger, before)


# --- posting ------------------------------------------------------------------------------
def test_grant_issues_from_the_mint(ledger: Ledger) -> None:
    entry = ledger.grant("welcome:u1", U1, 100 * MICRO, "welcome grant", {"user": "u1"})
    assert not entry.replayed
    assert entry.legs == ((MINT, -100 * MICRO), (U1, 100 * MICRO))
    assert ledger.balance(U1) == 100 * MICRO
    assert ledger.balance(MINT) == -100 * MICRO  # the only account that may go negative
    audit = ledger.audit()
    assert audit.balanced and audit.total == 0
    assert audit.by_kind == {"mint": -100 * MICRO, "wallet": 100 * MICRO}


def test_transfer_moves_credits(ledger: Ledger) -> None:
    funded(ledger)
    ledger.transfer("t1", U1, U2, 2_500_000, "service call", {"service": "echo"})
    assert ledger.balance(U1) == 7_500_000
    assert ledger.balance(U2) == 2_500_000
    assert ledger.audit().balanced


def test_insufficient_funds_names_the_shortfall_and_changes_nothing(ledger: Ledger) -> None:
    ledger.grant("g", U1, MICRO, "grant")
    before = snapshot(ledger)
    with pytest.raises(InsufficientFunds) as e:
        ledger.transfer("t1", U1, U2, 2_500_000, "too much")
    err = e.value
    assert (err.account, err.needed, err.available, err.shortfall) == (
        U1,
        2_500_000,
        MICRO,
        1_500_000,
    )
    assert str(err) == "insufficient credits in wallet:u1: need 2.5, have 1, short by 1.5"
    assert_unchanged(ledger, before)
    # The key was not used up by the failure: once funded, the same request goes through.
    ledger.grant("g2", U1, 2 * MICRO, "grant")
    assert not ledger.transfer("t1", U1, U2, 2_500_000, "too much").replayed


def test_exactly_once_post(ledger: Ledger) -> None:
    funded(ledger)
    first = ledger.transfer("pay:42", U1, U2, MICRO, "payment")
    again = ledger.transfer("pay:42", U1, U2, MICRO, "payment", {"memo": "is not compared"})
    assert again.replayed and again.id == first.id and again.legs == first.legs
    assert ledger.balance(U2) == MICRO
    assert ledger.audit().entries == 2  # funding + one payment


@pytest.mark.parametrize(
    "call",
    [
        lambda led: led.transfer("pay:42", U1, U2, 2 * MICRO, "payment"),  # other amount
        lambda led: led.transfer("pay:42", U1, U3, MICRO, "payment"),  # other recipient
        lambda led: led.transfer("pay:42", U1, U2, MICRO, "tip"),  # other reason
        lambda led: led.grant("pay:42", U2, MICRO, "payment"),  # other source
    ],
)
def test_reused_key_for_another_movement_conflicts(ledger: Ledger, call: Any) -> None:
    funded(ledger)
    first = ledger.transfer("pay:42", U1, U2, MICRO, "payment")
    before = snapshot(ledger)
    with pytest.raises(IdempotencyConflict, match="pay:42") as e:
        call(ledger)
    assert e.value.entry_id == first.id
    assert_unchanged(ledger, before)


@pytest.mark.parametrize(
    ("legs", "error", "message"),
    [
        ([(U1, -5), (U2, 4)], LedgerError, "unbalanced"),
        ([(U1, -5), (U2, 5), (U3, 0)], InvalidAmount, "moves nothing"),
        ([(U1, 0)], InvalidAmount, "moves nothing"),
        ([], LedgerError, "at least two legs"),
        ([(U1, -1.5), (U2, 1.5)], InvalidAmount, "not float"),
        ([(U1, -True), (U2, True)], InvalidAmount, "not bool"),
        ([(U1, False), (U2, 0)], InvalidAmount, "not bool"),
        ([(U1, -(10**40)), (U2, 10**40)], InvalidAmount, "over the limit"),
        ([(U1, "-5"), (U2, 5)], InvalidAmount, "not str"),
        ([("", -5), (U2, 5)], LedgerError, "account id"),
        ([(U1, -5, 1), (U2, 5)], LedgerError, "pair"),
    ],
)
def test_bad_entries_are_refused(ledger: Ledger, legs: Any, error: Any, message: str) -> None:
    funded(ledger)
    before = snapshot(ledger)
    with pytest.raises(error, match=message):
        ledger.post("bad", "bad entry", legs)
    assert_unchanged(ledger, before)


def test_bad_keys_reasons_and_memos_are_refused(ledger: Ledger) -> None:
    funded(ledger)
    before = snapshot(ledger)
    legs = [(U1, -1), (U2, 1)]
    with pytest.raises(LedgerError, match="idempotency key"):
        ledger.post("", "x", legs)
    with pytest.raises(LedgerError, match="idempotency key"):
        ledger.post("   ", "x", legs)
    with pytest.raises(LedgerError, match="reason"):
        ledger.post("k", "", legs)
    with pytest.raises(LedgerError, match="JSON"):
        ledger.post("k", "x", legs, {"when": object()})
    with pytest.raises(LedgerError, match="JSON"):
        ledger.post("k", "x", legs, {"x": float("nan")})
    assert_unchanged(ledger, before)


@pytest.mark.parametrize("amount", [0, -1, 1.0, True, None])
def test_transfer_amount_must_be_a_positive_int(ledger: Ledger, amount: Any) -> None:
    funded(ledger)
    before = snapshot(ledger)
    with pytest.raises(InvalidAmount):
        ledger.transfer("t", U1, U2, amount, "x")
    with pytest.raises(InvalidAmount):
        ledger.grant("g", U2, amount, "x")
    assert_unchanged(ledger, before)


def test_transfer_to_itself_is_refused(ledger: Ledger) -> None:
    funded(ledger)
    before = snapshot(ledger)
    with pytest.raises(SameAccount, match="itself"):
        ledger.transfer("t", U1, U1, 1, "loop")
    assert_unchanged(ledger, before)


def test_wallet_cannot_go_negative_even_through_raw_post(ledger: Ledger) -> None:
    funded(ledger, U1, 1)
    before = snapshot(ledger)
    with pytest.raises(InsufficientFunds):
        ledger.post("k", "x", [(U1, -MICRO), (U1, -1), (U2, MICRO + 1)])
    assert_unchanged(ledger, before)
    # Several legs on one account are netted: -1 then +1 leaves room for the rest.
    ledger.post("k2", "x", [(U1, -MICRO), (U2, MICRO - 1), (U1, 1), (U2, -1), (U3, 1)])
    assert ledger.balance(U1) == 1
    assert ledger.audit().balanced


# --- holds --------------------------------------------------------------------------------
def test_place_hold_reserves_credits(ledger: Ledger) -> None:
    funded(ledger)
    entry = ledger.place_hold("j1", U1, 4 * MICRO)
    assert entry.idem_key == "hold:j1" and entry.memo == {"job_id": "j1"}
    assert ledger.balance(U1) == 6 * MICRO
    assert ledger.balance("hold:j1") == 4 * MICRO
    assert ledger.held_for(U1) == 4 * MICRO
    assert ledger.held_for(U2) == 0
    hold = ledger.hold("j1")
    assert hold is not None and hold.wallet == U1 and hold.placed == 4 * MICRO
    assert not hold.closed
    assert ledger.account("hold:j1")["owner"] == U1  # type: ignore[index]


def test_hold_replay_moves_once(ledger: Ledger) -> None:
    funded(ledger)
    first = ledger.place_hold("j1", U1, 4 * MICRO)
    again = ledger.place_hold("j1", U1, 4 * MICRO)
    assert again.replayed and again.id == first.id
    assert ledger.balance(U1) == 6 * MICRO and ledger.held_for(U1) == 4 * MICRO
    assert ledger.hold("j1").placed == 4 * MICRO  # type: ignore[union-attr]
    before = snapshot(ledger)
    with pytest.raises(IdempotencyConflict):
        ledger.place_hold("j1", U1, 5 * MICRO)
    with pytest.raises(IdempotencyConflict):
        ledger.place_hold("j1", U2, 4 * MICRO)
    assert_unchanged(ledger, before)


def test_hold_with_insufficient_funds_leaves_nothing(ledger: Ledger) -> None:
    funded(ledger, U1, 1)
    before = snapshot(ledger)
    with pytest.raises(InsufficientFunds) as e:
        ledger.place_hold("j1", U1, 3 * MICRO)
    assert e.value.shortfall == 2 * MICRO
    assert_unchanged(ledger, before)
    assert ledger.hold("j1") is None and ledger.account("hold:j1") is None


def test_hold_errors(ledger: Ledger) -> None:
    funded(ledger)
    funded(ledger, U2)
    before = snapshot(ledger)
    with pytest.raises(UnknownAccount):
        ledger.place_hold("j1", "wallet:nobody", MICRO)
    with pytest.raises(HoldError, match="placed on wallets"):
        ledger.place_hold("j1", MINT, MICRO)
    with pytest.raises(InvalidAmount):
        ledger.place_hold("j1", U1, 0)
    with pytest.raises(LedgerError, match="job id"):
        ledger.place_hold("", U1, 1)
    assert_unchanged(ledger, before)
    ledger.place_hold("j1", U1, MICRO)
    before = snapshot(ledger)
    with pytest.raises(HoldError, match="is on wallet:u1"):
        ledger.place_hold("j1", U2, MICRO, idem_key="top-up")
    assert_unchanged(ledger, before)


def test_hold_top_up_with_another_key(ledger: Ledger) -> None:
    funded(ledger)
    ledger.place_hold("j1", U1, MICRO)
    ledger.place_hold("j1", U1, 2 * MICRO, idem_key="hold:j1:retry1")
    assert ledger.held_for(U1) == 3 * MICRO
    assert ledger.hold("j1").placed == 3 * MICRO  # type: ignore[union-attr]
    ledger.refund_hold("j1")
    assert ledger.balance(U1) == 10 * MICRO


def test_settle_pays_out_and_returns_the_rest(ledger: Ledger) -> None:
    funded(ledger)
    ledger.open_account("revenue", "revenue")
    ledger.place_hold("j1", U1, 4 * MICRO)
    entry = ledger.close_hold(
        "j1", [(U2, 1_500_000), ("revenue", 500_000), (U3, 0)], "job completed j1"
    )
    assert entry.idem_key == "close:j1"
    assert sorted(entry.legs) == sorted(
        [("hold:j1", -4 * MICRO), (U2, 1_500_000), ("revenue", 500_000), (U1, 2 * MICRO)]
    )
    assert ledger.balance(U1) == 8 * MICRO
    assert ledger.balance(U2) == 1_500_000
    assert ledger.balance("revenue") == 500_000
    assert ledger.balance("hold:j1") == 0 and ledger.held_for(U1) == 0
    hold = ledger.hold("j1")
    assert hold is not None and hold.closed_entry_id == entry.id
    assert ledger.audit().balanced


def test_settle_everything_leaves_no_remainder_leg(ledger: Ledger) -> None:
    funded(ledger)
    ledger.place_hold("j1", U1, 4 * MICRO)
    entry = ledger.close_hold("j1", [(U2, 4 * MICRO)], "done")
    assert sorted(entry.legs) == [("hold:j1", -4 * MICRO), (U2, 4 * MICRO)]


def test_job_run_on_its_owners_own_node(ledger: Ledger) -> None:
    funded(ledger)
    ledger.place_hold("j1", U1, 4 * MICRO)
    ledger.close_hold("j1", [(U1, MICRO)], "done")
    assert ledger.balance(U1) == 10 * MICRO
    assert ledger.close_hold("j1", [(U1, MICRO)], "done").replayed


def test_settle_then_refund_never_moves_twice(ledger: Ledger) -> None:
    funded(ledger)
    ledger.place_hold("j1", U1, 4 * MICRO)
    ledger.close_hold("j1", [(U2, MICRO)], "job completed j1")
    before = snapshot(ledger)
    with pytest.raises(IdempotencyConflict, match="close:j1"):
        ledger.refund_hold("j1", "job cancelled j1")
    with pytest.raises(IdempotencyConflict):
        ledger.close_hold("j1", [(U2, 2 * MICRO)], "job completed j1")
    with pytest.raises(IdempotencyConflict):
        ledger.close_hold("j1", [(U2, 5 * MICRO)], "job completed j1")  # above what was held
    replay = ledger.close_hold("j1", [(U2, MICRO)], "job completed j1")
    assert replay.replayed
    assert_unchanged(ledger, before)
    with pytest.raises(HoldError, match="already closed"):
        ledger.refund_hold("j1", "cancel", idem_key="another key")
    with pytest.raises(HoldError, match="closed"):
        ledger.place_hold("j1", U1, MICRO, idem_key="late top-up")
    assert_unchanged(ledger, before)


def test_refund_twice_is_a_replay(ledger: Ledger) -> None:
    funded(ledger)
    ledger.place_hold("j1", U1, 4 * MICRO)
    first = ledger.refund_hold("j1", "job failed")
    assert ledger.balance(U1) == 10 * MICRO
    before = snapshot(ledger)
    again = ledger.refund_hold("j1", "job failed")
    assert again.replayed and again.id == first.id
    with pytest.raises(IdempotencyConflict):
        ledger.close_hold("j1", [(U2, MICRO)], "job failed")
    assert_unchanged(ledger, before)


def test_close_hold_errors_change_nothing(ledger: Ledger) -> None:
    funded(ledger)
    ledger.place_hold("j1", U1, 4 * MICRO)
    before = snapshot(ledger)
    with pytest.raises(HoldError, match="exceed the 4 credits held"):
        ledger.close_hold("j1", [(U2, 3 * MICRO), (U3, 2 * MICRO)], "done")
    with pytest.raises(UnknownAccount, match="no hold"):
        ledger.close_hold("j9", [], "done")
    with pytest.raises(UnknownAccount):
        ledger.close_hold("j1", [("wallet:nobody", MICRO)], "done")
    with pytest.raises(InvalidAmount):
        ledger.close_hold("j1", [(U2, -MICRO)], "done")
    with pytest.raises(InvalidAmount):
        ledger.close_hold("j1", [(U2, 0.5)], "done")  # type: ignore[list-item]
    with pytest.raises(HoldError, match="cannot go to the hold"):
        ledger.close_hold("j1", [("hold:j1", MICRO)], "done")
    assert_unchanged(ledger, before)
    assert ledger.held_for(U1) == 4 * MICRO


def test_raw_post_into_a_closed_hold_is_refused(ledger: Ledger) -> None:
    funded(ledger)
    ledger.place_hold("j1", U1, MICRO)
    ledger.refund_hold("j1")
    before = snapshot(ledger)
    with pytest.raises(HoldError, match="closed"):
        ledger.transfer("x", U1, "hold:j1", 1, "stray")
    assert_unchanged(ledger, before)


# --- history and audit --------------------------------------------------------------------
def test_history_newest_first_with_running_balance(ledger: Ledger) -> None:
    ledger.grant("g", U1, 10 * MICRO, "welcome grant")
    ledger.transfer("t1", U1, U2, MICRO, "tip", {"note": "thanks"})
    ledger.place_hold("j1", U1, 3 * MICRO)
    ledger.close_hold("j1", [(U2, 2 * MICRO)], "job completed j1")
    rows = ledger.history(U1)
    assert [(r.reason, r.amount, r.balance_after) for r in rows] == [
        ("job completed j1", MICRO, 7 * MICRO),
        ("hold", -3 * MICRO, 6 * MICRO),
        ("tip", -MICRO, 9 * MICRO),
        ("welcome grant", 10 * MICRO, 10 * MICRO),
    ]
    assert rows[0].counterparties == ("hold:j1", U2)
    assert rows[2].memo == {"note": "thanks"}
    assert rows[3].counterparties == (MINT,)
    page2 = ledger.history(U1, limit=2, before_entry_id=rows[1].entry_id)
    assert [(r.reason, r.balance_after) for r in page2] == [
        ("tip", 9 * MICRO),
        ("welcome grant", 10 * MICRO),
    ]
    assert ledger.history(U3) == []
    with pytest.raises(LedgerError, match="limit"):
        ledger.history(U1, limit=0)


def test_audit_finds_tampering(ledger: Ledger) -> None:
    funded(ledger)
    assert ledger.audit().balanced
    # Someone edits a cached balance behind the ledger's back.
    ledger.db.conn.execute("UPDATE accounts SET balance = balance + 5 WHERE id = ?", (U2,))
    audit = ledger.audit()
    assert not audit.balanced
    assert audit.total == 5
    assert [(m.account, m.cached, m.recomputed) for m in audit.mismatches] == [(U2, 5, 0)]


def test_audit_finds_unbalanced_entries(ledger: Ledger) -> None:
    funded(ledger)
    ledger.db.conn.execute("UPDATE postings SET amount = amount + 1 WHERE account_id = ?", (U1,))
    audit = ledger.audit()
    assert not audit.balanced
    assert audit.unbalanced_entries == (1,)
    assert [m.account for m in audit.mismatches] == [U1]


def test_schema_refuses_negative_wallets_even_in_raw_sql(ledger: Ledger) -> None:
    with pytest.raises(sqlite3.IntegrityError):
        ledger.db.conn.execute("UPDATE accounts SET balance = -1 WHERE id = ?", (U1,))
    with pytest.raises(sqlite3.IntegrityError):
        ledger.db.conn.execute(
            "INSERT INTO postings (entry_id, account_id, amount) VALUES (1, ?, 0)", (U1,)
        )


# --- restart and composition --------------------------------------------------------------
def test_restart_keeps_balances_and_dedupes(store: str | Path) -> None:
    db = open_database(store)
    led = Ledger(db)
    led.open_account(U1, "wallet", "u1")
    led.open_account(U2, "wallet", "u2")
    led.grant("welcome:u1", U1, 10 * MICRO, "welcome grant")
    led.place_hold("j1", U1, 4 * MICRO)
    led.place_hold("j2", U1, 2 * MICRO)
    led.close_hold("j1", [(U2, MICRO)], "job completed j1")
    audit = led.audit()
    db.close()

    db = open_database(store)  # the hub restarts
    led = Ledger(db)
    assert led.audit() == audit and audit.balanced
    assert led.balance(U1) == 7 * MICRO and led.balance(U2) == MICRO
    assert led.held_for(U1) == 2 * MICRO
    # Retried messages from before the restart still move nothing.
    assert led.grant("welcome:u1", U1, 10 * MICRO, "welcome grant").replayed
    assert led.place_hold("j1", U1, 4 * MICRO).replayed
    assert led.close_hold("j1", [(U2, MICRO)], "job completed j1").replayed
    with pytest.raises(IdempotencyConflict):
        led.refund_hold("j1", "job cancelled j1")
    assert led.audit() == audit
    led.refund_hold("j2", "job cancelled j2")
    assert led.balance(U1) == 9 * MICRO and led.audit().balanced
    db.close()


def test_outer_transaction_failure_undoes_ledger_work(ledger: Ledger) -> None:
    funded(ledger)
    db = ledger.db
    db.migrate("jobs", [(1, "jobs", "CREATE TABLE jobs (id TEXT PRIMARY KEY, state TEXT)")])
    before = snapshot(ledger)
    with pytest.raises(RuntimeError, match="crash"), db.transaction() as c:
        ledger.place_hold("j1", U1, 4 * MICRO)
        c.execute("INSERT INTO jobs VALUES ('j1', 'queued')")
        ledger.transfer("t", U1, U2, MICRO, "x")
        raise RuntimeError("crash after the ledger calls")
    assert_unchanged(ledger, before)
    assert db.query("SELECT * FROM jobs") == []
    # Composed and committed: job row and credits change together.
    with db.transaction() as c:
        ledger.place_hold("j1", U1, 4 * MICRO)
        c.execute("INSERT INTO jobs VALUES ('j1', 'queued')")
    assert ledger.held_for(U1) == 4 * MICRO
    assert len(db.query("SELECT * FROM jobs")) == 1


def test_caught_ledger_error_inside_outer_transaction_keeps_the_rest(ledger: Ledger) -> None:
    funded(ledger)
    db = ledger.db
    with db.transaction():
        ledger.transfer("t1", U1, U2, MICRO, "first")
        with pytest.raises(InsufficientFunds):
            ledger.place_hold("j1", U1, 100 * MICRO)
        ledger.transfer("t2", U1, U3, MICRO, "second")
    assert ledger.balance(U1) == 8 * MICRO
    assert ledger.hold("j1") is None
    assert ledger.audit().balanced


# --- many transfers at once (the writer's group commit) ------------------------------------
class _Undo(Exception):
    pass


def _outcome(result: object) -> object:
    if isinstance(result, Exception):
        return (type(result), str(result), getattr(result, "__dict__", None))
    return result


def _books(ledger: Ledger) -> tuple[Any, ...]:
    """What a batch changes. Postings without their id: PostgreSQL's identity sequence does
    not go back when a transaction is rolled back."""
    db = ledger.db
    return (
        [tuple(r) for r in db.query("SELECT id, kind, owner, balance FROM accounts ORDER BY id")],
        [tuple(r) for r in db.query("SELECT * FROM entries ORDER BY id")],
        [
            tuple(r)
            for r in db.query("SELECT entry_id, account_id, amount FROM postings ORDER BY id")
        ],
    )


def _many_and_one_by_one(ledger: Ledger, requests: list[TransferRequest]) -> Any:
    """(results, books) of transfer_many and of transfer called once per request, each run
    from the same state and rolled back after."""
    db = ledger.db
    runs = []
    for at_once in (True, False):
        try:
            with db.transaction():
                got: list[object] = []
                if at_once:
                    got = list(ledger.transfer_many(requests))
                else:
                    for r in requests:
                        try:
                            got.append(ledger.transfer(*r))
                        except Exception as e:
                            got.append(e)
                runs.append(([_outcome(g) for g in got], _books(ledger), ledger.audit().balanced))
                raise _Undo
        except _Undo:
            pass
    return runs


def _batch_ledger(db: Database) -> Ledger:
    led = Ledger(db, clock=lambda: 1234.5)
    for owner in ("u1", "u2", "u3", "rich"):
        led.open_account("wallet:" + owner, "wallet", owner)
    led.grant("fund:u1", U1, 10 * MICRO, "test funds")
    for i in range(9):  # near the int64 limit: an overflow is reachable
        led.grant(f"fund:rich:{i}", "wallet:rich", MAX_AMOUNT, "test funds")
    led.place_hold("open", U1, MICRO)
    led.place_hold("shut", U1, MICRO)
    led.refund_hold("shut")
    return led


def _t(key: str, src: str, dst: str, credits: float, reason: str = "pay") -> TransferRequest:
    return TransferRequest(key, src, dst, int(credits * MICRO), reason)


# Each batch as transfer_many receives it; the first ones all succeed (the optimistic way,
# one guarded UPDATE per account), the others each meet one rule (the careful way).
BATCHES = {
    "all accepted": [
        _t("a1", U1, U2, 3),
        _t("a2", U2, U3, 2.5),  # spends what it received just before
        _t("a3", MINT, U3, 1),
        _t("a4", U1, "hold:open", 1),  # into an open hold
        _t("a1", U1, U2, 3),  # a replay of a1 in the same batch
        _t("a1", U1, U2, 4),  # a conflict with it
        _t("fund:u1", MINT, U1, 10, "test funds"),  # a replay of a stored entry
        TransferRequest("a5", U3, U1, MICRO, "pay", {"why": "memo"}, same_memo=True),
    ],
    "a wallet runs short in the middle": [
        _t("b1", U1, U2, 6),
        _t("b2", U1, U3, 6),  # short: 4 left
        _t("b3", U2, U3, 5),
        _t("b4", U1, U3, 4),  # exactly what is left
    ],
    "spending before receiving": [_t("c1", U2, U3, 1), _t("c2", U1, U2, 1), _t("c3", U2, U3, 1)],
    "an unknown account": [_t("d1", U1, U2, 1), _t("d2", U1, "wallet:ghost", 1)],
    "a closed hold": [_t("e1", U1, "hold:shut", 1), _t("e2", U1, U3, 1)],
    "past the largest balance": [
        _t("f1", MINT, "wallet:rich", MAX_AMOUNT // MICRO),
        _t("f2", U1, U2, 1),
    ],
    "bad requests beside good ones": [
        _t("g1", U1, U2, 0),
        _t("", U1, U2, 1),
        _t("g2", U1, U1, 1),
        _t("g3", U1, U2, 1),
    ],
    "the mint's side": [_t("h1", MINT, U2, 5), _t("h2", U2, MINT, 5), _t("h3", U2, MINT, 1)],
}


def test_a_balance_past_int64_is_refused_by_name_on_each_store(db: Database) -> None:
    led = _batch_ledger(db)  # the mint is at -9 * MAX_AMOUNT, wallet:rich at +9 * MAX_AMOUNT
    before = snapshot(led)
    with pytest.raises(InvalidAmount, match="mint would exceed the largest storable balance"):
        led.grant("over", "wallet:rich", MAX_AMOUNT, "too much")
    assert_unchanged(led, before)


@pytest.mark.parametrize("name", list(BATCHES))
def test_transfer_many_equals_transfer_one_by_one(db: Database, name: str) -> None:
    led = _batch_ledger(db)
    before = _books(led)
    (many, many_books, many_ok), (one, one_books, one_ok) = _many_and_one_by_one(led, BATCHES[name])
    assert many == one
    assert many_books == one_books
    assert many_ok and one_ok
    assert _books(led) == before  # both rolled back


def test_transfer_many_refuses_only_the_short_transfer_and_keeps_the_rest(db: Database) -> None:
    led = _batch_ledger(db)
    # Sorted by account the optimistic UPDATEs change wallet:u1 and wallet:u2 before they reach
    # wallet:u3, which is short: that attempt is undone whole, and the careful way refuses
    # only the transfer that runs short, with its own error.
    results = led.transfer_many([_t("s1", U1, U2, 2), _t("s2", U3, U2, 1), _t("s3", U1, U3, 3)])
    assert isinstance(results[0], Entry) and isinstance(results[2], Entry)
    assert isinstance(results[1], InsufficientFunds) and results[1].account == U3
    assert results[1].available == 0 and results[1].needed == MICRO
    assert led.balance(U1) == 4 * MICRO  # 10, less 1 in the open hold, less 2 and 3
    assert led.balance(U2) == 2 * MICRO and led.balance(U3) == 3 * MICRO
    assert led.entry("s2") is None
    assert led.audit().balanced
    # Posted again, the accepted ones are replays and move nothing.
    again = led.transfer_many([_t("s1", U1, U2, 2), _t("s3", U1, U3, 3)])
    assert all(isinstance(e, Entry) and e.replayed for e in again)
    assert led.balance(U1) == 4 * MICRO and led.audit().balanced


# --- property: random sequences keep the books balanced -----------------------------------
OWNERS = ["u0", "u1", "u2", "u3"]
WALLETS = ["wallet:" + o for o in OWNERS]
JOBS = ["j0", "j1", "j2"]
KEYS = ["k0", "k1", "k2", "k3"]
AMOUNTS = [1, 7, MICRO, 2 * MICRO + 5, 5 * MICRO]
Legs = list[tuple[str, int]]


class LedgerMachine(RuleBasedStateMachine):
    """Drives the real ledger and a plain-Python model of it side by side."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="ledger-prop-")
        self.path = Path(self.dir) / "hub.sqlite"
        self.db = Database(self.path)
        self.ledger = Ledger(self.db)
        self.bal: dict[str, int] = {MINT: 0}
        self.entries: dict[str, tuple[str, Legs]] = {}
        self.holds: dict[str, dict[str, Any]] = {}
        self.done: list[Any] = []  # successful calls, to replay

    def teardown(self) -> None:
        self.db.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # model helpers
    def outcome(self, key: str, reason: str, legs: Legs) -> Any:
        if key in self.entries:
            old_reason, old_legs = self.entries[key]
            same = old_reason == reason and sorted(old_legs) == sorted(legs)
            return "replay" if same else IdempotencyConflict
        net: dict[str, int] = {}
        for account, amount in legs:
            net[account] = net.get(account, 0) + amount
        if any(a not in self.bal for a in net):
            return UnknownAccount
        if any(a != MINT and self.bal[a] + n < 0 for a, n in net.items()):
            return InsufficientFunds
        return "ok"

    def apply(self, key: str, reason: str, legs: Legs) -> None:
        self.entries[key] = (reason, legs)
        for account, amount in legs:
            self.bal[account] += amount

    def run(self, expected: Any, call: Any) -> Any:
        event(getattr(expected, "__name__", expected))  # shown by --hypothesis-show-statistics
        before = snapshot(self.ledger)
        if isinstance(expected, type):
            with pytest.raises(expected):
                call()
            assert snapshot(self.ledger) == before
            return None
        entry = call()
        assert entry.replayed == (expected == "replay")
        if entry.replayed:
            assert snapshot(self.ledger) == before
        self.done.append(call)
        return entry

    # rules
    @initialize()
    def open_and_fund(self) -> None:
        # u0..u2 start with credits; u3 has no wallet until open_wallet runs (UnknownAccount).
        for owner in OWNERS[:3]:
            wallet = "wallet:" + owner
            self.ledger.open_account(wallet, "wallet", owner)
            self.ledger.grant("fund:" + owner, wallet, 5 * MICRO, "funds")
            self.bal[wallet] = 0
            self.apply("fund:" + owner, "funds", [(MINT, -5 * MICRO), (wallet, 5 * MICRO)])

    @rule(owner=st.sampled_from(OWNERS))
    def open_wallet(self, owner: str) -> None:
        self.ledger.open_account("wallet:" + owner, "wallet", owner)
        self.bal.setdefault("wallet:" + owner, 0)

    @rule(key=st.sampled_from(KEYS), dst=st.sampled_from(WALLETS), amount=st.sampled_from(AMOUNTS))
    def grant(self, key: str, dst: str, amount: int) -> None:
        legs = [(MINT, -amount), (dst, amount)]
        expected = self.outcome(key, "grant", legs)
        self.run(expected, lambda: self.ledger.grant(key, dst, amount, "grant"))
        if expected == "ok":
            self.apply(key, "grant", legs)

    @rule(
        key=st.sampled_from(KEYS),
        src=st.sampled_from(WALLETS),
        dst=st.sampled_from(WALLETS),
        amount=st.sampled_from(AMOUNTS),
    )
    def transfer(self, key: str, src: str, dst: str, amount: int) -> None:
        legs = [(src, -amount), (dst, amount)]
        expected = SameAccount if src == dst else self.outcome(key, "transfer", legs)
        self.run(expected, lambda: self.ledger.transfer(key, src, dst, amount, "transfer"))
        if expected == "ok":
            self.apply(key, "transfer", legs)

    @rule(
        job=st.sampled_from(JOBS),
        wallet=st.sampled_from(WALLETS),
        amount=st.sampled_from(AMOUNTS),
        key=st.sampled_from([None, None, "top-up"]),
    )
    def place_hold(self, job: str, wallet: str, amount: int, key: str | None) -> None:
        k = key or "hold:" + job
        account = "hold:" + job
        legs = [(wallet, -amount), (account, amount)]
        hold = self.holds.get(job)
        expected: Any
        if k in self.entries:
            expected = self.outcome(k, "hold", legs)
        elif hold is None:
            if wallet not in self.bal:
                expected = UnknownAccount
            elif self.bal[wallet] < amount:
                expected = InsufficientFunds
            else:
                expected = "ok"
        elif hold["wallet"] != wallet or hold["closed"]:
            expected = HoldError
        else:
            expected = self.outcome(k, "hold", legs)
        self.run(expected, lambda: self.ledger.place_hold(job, wallet, amount, idem_key=key))
        if expected == "ok":
            if hold is None:
                self.holds[job] = {"wallet": wallet, "closed": False}
                self.bal[account] = 0
            self.apply(k, "hold", legs)

    @rule(
        job=st.sampled_from(JOBS),
        payouts=st.lists(
            st.tuples(st.sampled_from(WALLETS), st.sampled_from([0, *AMOUNTS])), max_size=2
        ),
        reason=st.sampled_from(["job completed", "job failed"]),
        key=st.sampled_from([None, None, "close-x"]),
    )
    def close_hold(self, job: str, payouts: Legs, reason: str, key: str | None) -> None:
        k = key or "close:" + job
        account = "hold:" + job
        clean = [(a, n) for a, n in payouts if n]
        paid = sum(n for _, n in clean)
        hold = self.holds.get(job)
        expected: Any
        legs: Legs = []
        if hold is None:
            expected = UnknownAccount
        elif k in self.entries:
            held = -sum(n for a, n in self.entries[k][1] if a == account)
            if held <= 0 or paid > held:
                expected = IdempotencyConflict
            else:
                legs = self._close_legs(account, hold["wallet"], held, clean)
                expected = self.outcome(k, reason, legs)
        elif hold["closed"] or paid > self.bal[account]:
            expected = HoldError
        else:
            legs = self._close_legs(account, hold["wallet"], self.bal[account], clean)
            expected = self.outcome(k, reason, legs)
        self.run(expected, lambda: self.ledger.close_hold(job, payouts, reason, idem_key=key))
        if expected == "ok":
            assert hold is not None
            hold["closed"] = True
            self.apply(k, reason, legs)

    @staticmethod
    def _close_legs(account: str, wallet: str, held: int, payouts: Legs) -> Legs:
        rest = held - sum(n for _, n in payouts)
        return [(account, -held), *payouts, *([(wallet, rest)] if rest else [])]

    @rule(data=st.data())
    def replay_a_success(self, data: st.DataObject) -> None:
        if not self.done:
            return
        call = data.draw(st.sampled_from(self.done))
        before = snapshot(self.ledger)
        assert call().replayed
        assert snapshot(self.ledger) == before

    @rule()
    def restart(self) -> None:
        self.db.close()
        self.db = Database(self.path)
        self.ledger = Ledger(self.db)  # recorded calls look up self.ledger when replayed

    # invariants, checked after every step
    @invariant()
    def books_balance(self) -> None:
        audit = self.ledger.audit()
        assert audit.balanced, audit
        assert audit.total == 0
        assert not audit.negatives and not audit.mismatches

    @invariant()
    def balances_match_the_model(self) -> None:
        stored = {r["id"]: r["balance"] for r in self.ledger.accounts()}
        assert stored == self.bal
        for wallet in WALLETS:
            if wallet in self.bal:
                expected = sum(
                    self.bal["hold:" + j]
                    for j, h in self.holds.items()
                    if h["wallet"] == wallet and not h["closed"]
                )
                assert self.ledger.held_for(wallet) == expected


LedgerMachine.TestCase.settings = settings(max_examples=120, stateful_step_count=40, deadline=None)
test_ledger_state_machine = LedgerMachine.TestCase

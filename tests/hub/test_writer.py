"""The ledger writer (group commit), against a real SQLite file.

What a user would check: an acknowledged transfer is stored, and stays stored when the
process is killed right after; a refused transfer changes nothing and says why, without
disturbing the others committed with it; nothing is acknowledged that was not committed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub.ledger.ledger import Ledger
from hub.ledger.money import (
    MAX_AMOUNT,
    MICRO,
    Entry,
    IdempotencyConflict,
    InsufficientFunds,
    TransferRequest,
)
from hub.ledger.writer import BatchAborted, Writer, WriterClosed
from hub.store.db import Database, TransactionConflict

ROOT = Path(__file__).resolve().parents[2]
U1, U2, U3 = "wallet:u1", "wallet:u2", "wallet:u3"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "hub.sqlite"


@pytest.fixture
def ledger(db_path: Path) -> Any:
    db = Database(db_path)
    led = Ledger(db)
    for owner in ("u1", "u2", "u3"):
        led.open_account("wallet:" + owner, "wallet", owner)
    led.grant("fund:u1", U1, 100 * MICRO, "test funds")
    yield led
    db.close()


@pytest.fixture
async def writer(ledger: Ledger) -> AsyncIterator[Writer]:
    w = Writer(ledger.db)
    await w.start()
    yield w
    await w.stop()


def stored(db_path: Path, idem_key: str) -> int:
    """How many entries another connection (another process, say) sees under this key."""
    other = sqlite3.connect(db_path)
    try:
        row = other.execute("SELECT COUNT(*) FROM entries WHERE idem_key = ?", (idem_key,))
        return int(row.fetchone()[0])
    finally:
        other.close()


def pay(ledger: Ledger, key: str, src: str, dst: str, amount: int) -> Callable[[Any], Entry]:
    return lambda c: ledger.transfer(key, src, dst, amount, "pay")


def entry_keys(ledger: Ledger) -> set[str]:
    return {str(r["idem_key"]) for r in ledger.db.query("SELECT idem_key FROM entries")}


# --- group commit ---------------------------------------------------------------------------
async def test_concurrent_transfers_share_one_commit_and_are_stored_when_acknowledged(
    ledger: Ledger, writer: Writer, db_path: Path
) -> None:
    async def send(i: int) -> Entry:
        key = f"t{i}"
        entry = await writer.run(lambda c: ledger.transfer(key, U1, U2, MICRO, "pay"))
        # Acknowledged means committed: another connection already sees it.
        assert stored(db_path, key) == 1
        return entry

    entries = await asyncio.gather(*(send(i) for i in range(50)))
    assert [e.idem_key for e in entries] == [f"t{i}" for i in range(50)]
    assert all(isinstance(e, Entry) and not e.replayed for e in entries)
    assert writer.stats.batches == 1 and writer.stats.calls == 50  # one COMMIT for all
    assert ledger.balance(U1) == 50 * MICRO and ledger.balance(U2) == 50 * MICRO
    assert ledger.audit().balanced


async def test_futures_resolve_only_after_commit(
    ledger: Ledger, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    futures: list[asyncio.Future[Any]] = []
    done_at_commit: list[dict[int, bool]] = []
    loop = asyncio.get_running_loop()
    create_future = loop.create_future

    def recording_create_future() -> asyncio.Future[Any]:
        fut = create_future()
        futures.append(fut)
        return fut

    class Recording(Database):
        def _finish_outer(self, statement: str) -> None:
            done_at_commit.append({id(f): f.done() for f in futures})  # just before COMMIT
            super()._finish_outer(statement)

    db = Recording(db_path)
    led = Ledger(db)
    w = Writer(db)
    await w.start()
    monkeypatch.setattr(loop, "create_future", recording_create_future)
    done_at_commit.clear()  # the migrations' commits
    try:
        await asyncio.gather(*(w.run(pay(led, f"k{i}", U1, U3, 1)) for i in range(5)))
    finally:
        monkeypatch.undo()
        await w.stop()
        db.close()
    answers = [f for f in futures if f.done() and isinstance(f.result(), Entry)]
    assert len(answers) == 5 and len(done_at_commit) == 1  # one COMMIT for the five
    assert not any(done_at_commit[0][id(f)] for f in answers)  # no answer before it


async def test_a_refused_call_rolls_back_only_itself(
    ledger: Ledger, writer: Writer, db_path: Path
) -> None:
    ledger.transfer("earlier", U1, U2, MICRO, "pay")

    def writes_then_fails(c: sqlite3.Connection) -> None:
        ledger.transfer("half-done", U1, U3, MICRO, "pay")  # undone with its savepoint
        raise ValueError("the caller's own check failed")

    results = await asyncio.gather(
        writer.run(lambda c: ledger.transfer("ok-1", U1, U2, MICRO, "pay")),
        writer.run(lambda c: ledger.transfer("broke", U3, U2, MICRO, "pay")),
        writer.run(lambda c: ledger.transfer("earlier", U1, U2, 2 * MICRO, "pay")),
        writer.run(writes_then_fails),
        writer.run(lambda c: ledger.transfer("ok-2", U2, U3, MICRO, "pay")),
        return_exceptions=True,
    )
    assert writer.stats.batches == 1
    ok1, broke, conflict, failed, ok2 = results
    assert isinstance(ok1, Entry) and isinstance(ok2, Entry)
    # Each caller gets its own exception, with its type and message.
    assert isinstance(broke, InsufficientFunds) and broke.account == U3
    assert isinstance(conflict, IdempotencyConflict) and "earlier" in str(conflict)
    assert isinstance(failed, ValueError) and str(failed) == "the caller's own check failed"
    assert entry_keys(ledger) >= {"ok-1", "ok-2", "earlier"}
    assert not entry_keys(ledger) & {"broke", "half-done"}
    assert stored(db_path, "ok-1") == stored(db_path, "ok-2") == 1
    assert ledger.balance(U3) == MICRO  # only ok-2 reached u3
    assert ledger.audit().balanced


async def test_a_failed_commit_fails_every_call_in_the_batch(
    ledger: Ledger, writer: Writer, db_path: Path
) -> None:
    before = ledger.audit()

    def breaks_the_commit(c: sqlite3.Connection) -> str:
        # A deferred foreign-key violation passes the statement and fails the COMMIT.
        c.execute("PRAGMA defer_foreign_keys = ON")
        c.execute("INSERT INTO postings (entry_id, account_id, amount) VALUES (999, 'x', 1)")
        return "looked fine"

    results = await asyncio.gather(
        writer.run(lambda c: ledger.transfer("a", U1, U2, MICRO, "pay")),
        writer.run(breaks_the_commit),
        writer.run(lambda c: ledger.transfer("b", U1, U3, MICRO, "pay")),
        return_exceptions=True,
    )
    assert all(isinstance(r, sqlite3.IntegrityError) for r in results), results
    assert stored(db_path, "a") == stored(db_path, "b") == 0
    assert ledger.audit() == before
    # The writer goes on: the next batch commits normally.
    entry = await writer.run(lambda c: ledger.transfer("a", U1, U2, MICRO, "pay"))
    assert not entry.replayed and stored(db_path, "a") == 1


async def test_a_call_that_ends_the_transaction_aborts_the_batch(
    ledger: Ledger, writer: Writer, db_path: Path
) -> None:
    results = await asyncio.gather(
        writer.run(lambda c: ledger.transfer("a", U1, U2, MICRO, "pay")),
        writer.run(lambda c: c.execute("ROLLBACK")),
        writer.run(lambda c: ledger.transfer("b", U1, U2, MICRO, "pay")),
        return_exceptions=True,
    )
    assert all(isinstance(r, BatchAborted) for r in results), results
    assert "retry with the same key" in str(results[0])
    # "b" must not have been committed on its own outside the batch either.
    assert stored(db_path, "a") == stored(db_path, "b") == 0
    assert not ledger.db.in_transaction and not ledger.db.conn.in_transaction
    await writer.run(lambda c: ledger.transfer("a", U1, U2, MICRO, "pay"))
    assert stored(db_path, "a") == 1 and ledger.audit().balanced


async def test_stop_drains_the_queue_then_refuses_work(ledger: Ledger) -> None:
    w = Writer(ledger.db, max_batch=7)
    await w.start()
    tasks = [asyncio.create_task(w.run(pay(ledger, f"d{i}", U1, U2, 1))) for i in range(40)]
    await asyncio.sleep(0)  # every call is queued; none committed yet
    await w.stop()
    assert all(t.done() and isinstance(t.result(), Entry) for t in tasks)
    assert w.stats.calls == 40 and w.stats.largest <= 7 and w.stats.batches >= 6
    assert ledger.balance(U2) == 40
    with pytest.raises(WriterClosed, match="not running"):
        await w.run(lambda c: None)
    await w.stop()  # stopping twice is harmless


async def test_run_before_start_is_refused(ledger: Ledger) -> None:
    w = Writer(ledger.db)
    with pytest.raises(WriterClosed):
        await w.run(lambda c: None)
    with pytest.raises(ValueError, match="max_batch"):
        Writer(ledger.db, max_batch=0)


async def test_a_cancelled_call_that_has_not_run_does_nothing(
    ledger: Ledger, writer: Writer
) -> None:
    task = asyncio.create_task(writer.run(lambda c: ledger.transfer("x", U1, U2, 1, "pay")))
    await asyncio.sleep(0)  # queued
    task.cancel()
    await asyncio.gather(writer.run(lambda c: None))  # the next batch runs
    assert task.cancelled()
    assert "x" not in entry_keys(ledger)


async def test_async_functions_are_refused(ledger: Ledger, writer: Writer) -> None:
    async def not_allowed(c: sqlite3.Connection) -> None:
        ledger.transfer("async", U1, U2, 1, "pay")

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "coroutine was never awaited"
        with pytest.raises(TypeError, match="synchronous function"):
            await writer.run(not_allowed)  # type: ignore[unused-coroutine]
    assert "async" not in entry_keys(ledger)


async def test_synchronous_writers_interleave_with_batches(ledger: Ledger, writer: Writer) -> None:
    """Hub code that calls db.transaction() directly never lands inside an open batch."""

    async def direct(i: int) -> None:
        await asyncio.sleep(0)
        with ledger.db.transaction():
            ledger.transfer(f"direct{i}", U1, U3, 1, "pay")

    async def batched(i: int) -> None:
        await writer.run(lambda c: ledger.transfer(f"batched{i}", U1, U2, 1, "pay"))

    await asyncio.gather(*(f(i) for i in range(30) for f in (direct, batched)))
    assert ledger.balance(U2) == 30 and ledger.balance(U3) == 30
    assert ledger.audit().balanced


async def test_a_batch_meets_a_transaction_left_open_across_an_await(
    ledger: Ledger, writer: Writer
) -> None:
    """Awaiting inside db.transaction() is a bug; the writer reports it instead of joining."""
    with ledger.db.transaction(), pytest.raises(TransactionConflict):
        await writer.run(lambda c: ledger.transfer("late", U1, U2, 1, "pay"))
    assert "late" not in entry_keys(ledger)


# --- crash safety -------------------------------------------------------------------------------
CHILD = textwrap.dedent(
    """
    import asyncio, random, sys
    sys.path.insert(0, sys.argv[2])
    from hub.store.db import Database, TransactionConflict
    from hub.ledger.ledger import Ledger
    from hub.ledger.money import MICRO, LedgerError
    from hub.ledger.writer import Writer

    WALLETS = [f"wallet:w{i}" for i in range(20)]

    async def main() -> None:
        db = Database(sys.argv[1])
        ledger = Ledger(db)
        with db.transaction():
            for i, w in enumerate(WALLETS):
                ledger.open_account(w, "wallet", w)
                # Small funds: some transfers are refused mid-batch (InsufficientFunds).
                ledger.grant("fund:" + w, w, (i % 3 + 1) * MICRO, "funds")
        writer = Writer(db, max_batch=64)
        await writer.start()
        print("ready", flush=True)

        async def client(n: int) -> None:
            rnd = random.Random(n)
            i = 0
            while True:
                src, dst = rnd.sample(WALLETS, 2)
                key, amount = f"c{n}-{i}", rnd.randint(1, MICRO // 4)
                i += 1
                try:
                    if sys.argv[3] == "transfer":
                        await writer.transfer(key, src, dst, amount, "crash test")
                    else:
                        await writer.run(
                            lambda c, k=key, s=src, d=dst, a=amount: ledger.transfer(
                                k, s, d, a, "crash test"
                            )
                        )
                except LedgerError:
                    print("refused", key, src, dst, amount, flush=True)
                else:
                    print("ok", key, src, dst, amount, flush=True)

        await asyncio.gather(*(client(n) for n in range(32)))

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("path", ["run", "transfer"])
def test_acknowledged_transfers_survive_sigkill(tmp_path: Path, path: str) -> None:
    script = tmp_path / "stream.py"
    script.write_text(CHILD)
    db_file = tmp_path / "crash.sqlite"
    child = subprocess.Popen(
        [sys.executable, str(script), str(db_file), str(ROOT), path],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert child.stdout is not None
    lines: list[bytes] = []

    def read() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while sum(line.startswith(b"ok ") for line in lines) < 3000:
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            _, err = child.communicate()
            pytest.fail(f"the streaming process stopped early: {err.decode()[-2000:]}")
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)  # mid-stream: batches are in flight
    child.wait()
    reader.join(timeout=10)
    assert child.returncode == -signal.SIGKILL

    complete = [line.decode().split() for line in lines if line.endswith(b"\n")]
    acked = {f[1]: (f[2], f[3], int(f[4])) for f in complete if f[0] == "ok"}
    refused = {f[1] for f in complete if f[0] == "refused"}
    assert len(acked) >= 3000 and refused  # the run mixed refusals into the batches

    db = Database(db_file)  # the hub restarts on the same file
    try:
        ledger = Ledger(db)
        audit = ledger.audit()
        assert audit.balanced, audit
        counts = {
            str(r["idem_key"]): int(r["n"])
            for r in db.query(
                "SELECT idem_key, COUNT(*) AS n FROM entries WHERE reason = 'crash test'"
                " GROUP BY idem_key"
            )
        }
        missing = [key for key in acked if counts.get(key) != 1]
        assert not missing, f"{len(missing)} acknowledged transfers lost, e.g. {missing[:5]}"
        assert not refused & counts.keys()
        # No partial entries: every entry has exactly its two legs, summing to zero.
        partial = db.query(
            "SELECT e.id FROM entries e LEFT JOIN postings p ON p.entry_id = e.id"
            " WHERE e.reason = 'crash test' GROUP BY e.id"
            " HAVING COUNT(p.id) != 2 OR SUM(p.amount) != 0"
        )
        assert partial == []
        # A client retrying acknowledged transfers after the restart moves nothing again.
        before = ledger.audit()
        for key, (src, dst, amount) in list(acked.items())[:200]:
            assert ledger.transfer(key, src, dst, amount, "crash test").replayed
        assert ledger.audit() == before
    finally:
        db.close()


# --- the set-based path for transfers ---------------------------------------------------------
ACCOUNTS = [
    U1,
    U2,
    U3,
    "wallet:rich",
    "wallet:ghost",
    "mint",
    "hold:open",
    "hold:shut",
    "revenue:r",
]
KEYS = [f"k{i}" for i in range(6)] + ["fund:u1", "fund:rich:0"]


def _template(path: Path) -> None:
    """A ledger with funded, empty, huge and unknown wallets, an open and a closed hold."""
    db = Database(path)
    led = Ledger(db, clock=lambda: 1000.0)
    for owner in ("u1", "u2", "u3", "rich"):
        led.open_account("wallet:" + owner, "wallet", owner)
    led.open_account("revenue:r", "revenue")
    led.grant("fund:u1", U1, 100 * MICRO, "test funds")
    for i in range(9):  # close to the int64 limit: overflows are reachable
        led.grant(f"fund:rich:{i}", "wallet:rich", MAX_AMOUNT, "test funds")
    led.place_hold("open", U1, 5 * MICRO)
    led.place_hold("shut", U1, 5 * MICRO)
    led.refund_hold("shut")
    db.close()


def _copy(template: Path, path: Path) -> tuple[Database, Ledger]:
    src, dst = sqlite3.connect(template), sqlite3.connect(path)
    src.backup(dst)
    src.close()
    dst.close()
    db = Database(path)
    return db, Ledger(db, clock=lambda: 2000.0)


def _outcome(result: object) -> object:
    if isinstance(result, Exception):
        return (type(result), str(result), getattr(result, "__dict__", None))
    return result


def _dump(db: Database) -> tuple[list[tuple[Any, ...]], ...]:
    return tuple(
        [tuple(r) for r in db.query(sql)]
        for sql in (
            "SELECT id, kind, owner, balance FROM accounts ORDER BY id",
            "SELECT * FROM entries ORDER BY id",
            "SELECT * FROM postings ORDER BY id",
        )
    )


_requests = st.builds(
    TransferRequest,
    idem_key=st.sampled_from(KEYS) | st.sampled_from(["", " ", "x" * 257]),
    src=st.sampled_from(ACCOUNTS),
    dst=st.sampled_from(ACCOUNTS),
    amount=st.sampled_from([1, 2 * MICRO, 50 * MICRO, 101 * MICRO, MAX_AMOUNT])
    | st.integers(-3, 3)
    | st.integers(1, 200 * MICRO)
    | st.sampled_from([MAX_AMOUNT + 1, True, 1.5]),
    reason=st.sampled_from(["pay", "other", "test funds"]) | st.just(""),
    memo=st.none() | st.sampled_from([{"a": 1}, {"b": [1, 2]}]),
    same_memo=st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_requests, max_size=25))
def test_transfer_many_equals_transfer_one_by_one(requests: list[TransferRequest]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        _template(d / "t.sqlite")
        db1, one_by_one = _copy(d / "t.sqlite", d / "a.sqlite")
        db2, at_once = _copy(d / "t.sqlite", d / "b.sqlite")
        try:
            expected: list[object] = []
            for r in requests:
                try:
                    expected.append(one_by_one.transfer(*r))
                except Exception as e:
                    expected.append(e)
            with db2.transaction():
                got = at_once.transfer_many(requests)
            assert [_outcome(g) for g in got] == [_outcome(e) for e in expected]
            assert _dump(db2) == _dump(db1)
            assert at_once.audit().balanced
        finally:
            db1.close()
            db2.close()


async def test_writer_transfer_mixes_with_run_in_queue_order(
    ledger: Ledger, writer: Writer, db_path: Path
) -> None:
    seen: list[int] = []

    def balance_of_u2(c: Any) -> int:
        b = ledger.balance(U2)
        seen.append(b)
        return b

    calls = [
        writer.transfer("t1", U1, U2, 10 * MICRO, "pay"),
        writer.transfer("t2", U1, U2, 10 * MICRO, "pay"),
        writer.run(balance_of_u2),
        writer.transfer("t3", U2, U3, 25 * MICRO, "pay"),  # short: 20 then
        writer.transfer("t1", U1, U2, 10 * MICRO, "pay"),  # a replay
        writer.transfer("t1", U1, U2, 11 * MICRO, "pay"),  # a conflict
        writer.run(pay(ledger, "t4", U2, U3, 5 * MICRO)),
        writer.transfer("t5", U2, U3, 15 * MICRO, "pay"),
    ]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert writer.stats.batches == 1
    assert seen == [20 * MICRO]
    assert isinstance(results[0], Entry) and not results[0].replayed
    assert isinstance(results[3], InsufficientFunds) and results[3].available == 20 * MICRO
    assert isinstance(results[4], Entry) and results[4].replayed
    assert results[4].id == results[0].id
    assert isinstance(results[5], IdempotencyConflict)
    assert isinstance(results[7], Entry)
    assert ledger.balance(U2) == 0 and ledger.balance(U3) == 20 * MICRO
    for key in ("t1", "t2", "t4", "t5"):
        assert stored(db_path, key) == 1
    assert stored(db_path, "t3") == 0


async def test_writer_transfer_is_acknowledged_after_commit(
    ledger: Ledger, writer: Writer, db_path: Path
) -> None:
    entry = await writer.transfer("ack", U1, U2, MICRO, "pay")
    assert stored(db_path, "ack") == 1 and not entry.replayed
    with pytest.raises(InsufficientFunds):
        await writer.transfer("nope", U2, U3, 2 * MICRO, "pay")
    assert stored(db_path, "nope") == 0


async def test_a_transfer_running_short_in_a_full_batch_fails_alone(
    ledger: Ledger, writer: Writer, db_path: Path
) -> None:
    # u1 holds 100 credits: 40 transfers of 2 to u2 and u3 fit, the 41st (90 credits) does not
    # once the others ran before it, and the rest of the batch commits around it.
    calls = [
        writer.transfer(f"full:{i}", U1, U2 if i % 2 else U3, 2 * MICRO, "pay") for i in range(40)
    ]
    calls.insert(20, writer.transfer("full:big", U1, U3, 90 * MICRO, "pay"))
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert writer.stats.batches == 1
    short = results.pop(20)
    assert isinstance(short, InsufficientFunds) and short.account == U1
    assert short.available == 60 * MICRO and short.needed == 90 * MICRO  # 20 of 2 ran before
    assert all(isinstance(r, Entry) and not r.replayed for r in results)
    assert all(stored(db_path, f"full:{i}") == 1 for i in range(40))
    assert stored(db_path, "full:big") == 0
    assert ledger.balance(U1) == 20 * MICRO
    assert ledger.balance(U2) + ledger.balance(U3) == 80 * MICRO
    assert ledger.audit().balanced


# --- checkpoints off the commit path -------------------------------------------------------
async def test_checkpoints_run_beside_the_writer_and_keep_the_wal_bounded(
    ledger: Ledger, db_path: Path
) -> None:
    wal = Path(str(db_path) + "-wal")
    conn = ledger.db.conn
    w = Writer(ledger.db)
    await w.start()
    # The writer's connection no longer checkpoints inside its COMMITs...
    assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    for round_ in range(20):
        await asyncio.gather(*(w.transfer(f"cp{round_}:{i}", U1, U2, 1, "pay") for i in range(200)))
        await asyncio.sleep(0.03)
    checkpointer = ledger.db._checkpointer
    assert checkpointer is not None and checkpointer.checkpoints > 0
    await w.stop()
    # ...the thread did, so the WAL was reset and reused rather than growing with every batch:
    # 4000 entries with their postings and index pages are far more than this.
    assert wal.stat().st_size < 4 * 1024 * 1024
    assert ledger.db._checkpointer is None
    assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000
    assert ledger.balance(U2) == 4000 and ledger.audit().balanced
    # Every acknowledged transfer is in the database file's view from a fresh connection.
    other = sqlite3.connect(db_path)
    try:
        n = other.execute("SELECT COUNT(*) FROM entries WHERE idem_key LIKE 'cp%'").fetchone()[0]
    finally:
        other.close()
    assert n == 4000

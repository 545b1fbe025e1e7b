"""The hub's one SQLite connection: durable settings, explicit transactions, recorded migrations.

One writer: every module of the hub shares this connection and writes only inside
`transaction()`, which starts with BEGIN IMMEDIATE so the write lock is taken up front (a
second process, such as the CLI, waits on busy_timeout instead of failing half-way).
Transactions nest: an inner `transaction()` joins the outer one through a SAVEPOINT, so a
service can wrap its own row updates and several ledger calls in one atomic unit, and an
inner failure that the caller catches undoes only the inner part. An inner one entered where
nothing was written since the enclosing savepoint shares it (rolling back to either is the
same state), so layers that each guard their work (a writer call, a message in it, the
handler's own block) cost one SAVEPOINT and RELEASE, not one each.

Durable commits off the event loop: a group commit (the Writer's batches, the bridge's)
enters `write_batch()` instead, which runs the body on the loop like `transaction()` but hands
the COMMIT, and the fsync that synchronous=FULL makes it wait for, to a thread of its own. While
that COMMIT is in flight the loop goes on, and the connection is the commit's alone:

- a read outside a transaction inside `snapshot_reads()` (the HTTP GET and HEAD handlers) is
  served from a second, read-only connection, from one snapshot for the whole COMMIT: the state
  before it, or after it once it is on disk, never a write that is not yet durable (in WAL mode
  another connection sees a commit only after its fsync);
- anything else that touches the database (`transaction()`, a read elsewhere, `conn`) first
  waits for the COMMIT to end, blocking the loop as every commit did before. Code that reads and
  then writes in one synchronous stretch therefore still decides on the latest state, and
  never lands inside the batch's transaction.

Schema changes are migrations recorded per component (`ledger`, `store`, ...) in
`schema_migrations`, so components number their migrations independently.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, suppress
from contextvars import ContextVar
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)

Params = Sequence[Any] | Mapping[str, Any]
Migration = tuple[int, str, str]


class MigrationError(Exception):
    """The database's recorded schema does not match the migrations this code carries."""


class TransactionConflict(RuntimeError):
    """A transaction was entered from another task or thread while one was open.

    The connection is shared, so the second caller would silently join (and could roll back)
    the first one's transaction. It happens when code awaits inside `with db.transaction()`;
    finish the database work before awaiting.
    """


# Set by snapshot_reads(): reads here may be served from the last durable snapshot while a
# COMMIT is in flight, instead of waiting for it.
_SNAPSHOT_READS: ContextVar[bool] = ContextVar("deparrow_snapshot_reads", default=False)


@contextmanager
def snapshot_reads() -> Iterator[None]:
    """Reads in this block (in this task) that meet a COMMIT in flight do not wait for it: they
    see the last durable state, from one snapshot. For code that only reads, such as an HTTP
    GET handler: a decision to write must not rest on such a read (a write waits for the
    COMMIT, and the state it then meets may be newer than what was read)."""
    token = _SNAPSHOT_READS.set(True)
    try:
        yield
    finally:
        _SNAPSHOT_READS.reset(token)


def split_sql(script: str) -> list[str]:
    """Split a SQL script into complete statements (trigger bodies stay whole).

    `executescript` would commit any open transaction first, so migrations run their
    statements one by one inside our own BEGIN IMMEDIATE instead.
    """
    statements: list[str] = []
    buf = ""
    for piece in script.split(";"):
        buf += piece + ";"
        if sqlite3.complete_statement(buf):
            if _has_sql(buf):
                statements.append(buf.strip())
            buf = ""
    if _has_sql(buf):
        statements.append(buf.strip())
    return statements


def _has_sql(text: str) -> bool:
    lines = [line.split("--", 1)[0] for line in text.splitlines()]
    return bool("".join(lines).replace(";", "").strip())


def _current_owner() -> tuple[int, object]:
    # _get_running_loop() instead of catching current_task()'s RuntimeError: this runs on
    # every transaction() and raising costs more than the rest of it outside a loop.
    loop = asyncio._get_running_loop()
    task = asyncio.current_task(loop) if loop is not None else None
    return threading.get_ident(), task


class _Transaction:
    """What `Database.transaction()` returns; the work is done by the Database."""

    __slots__ = ("db", "savepoint", "shared")

    def __init__(self, db: Database) -> None:
        self.db = db
        self.savepoint: str | None = None
        self.shared = False  # the savepoint is the enclosing one's (see Database._enter)

    def __enter__(self) -> sqlite3.Connection:
        return self.db._enter(self)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.db._exit(self, exc_type is not None)


class _Batch:
    """What `Database.write_batch()` returns: `transaction()` with its COMMIT off the loop."""

    __slots__ = ("committed", "db", "tx")

    def __init__(self, db: Database) -> None:
        self.db = db
        self.tx = _Transaction(db)
        self.committed = False  # True once the COMMIT (or, nested, the RELEASE) succeeded

    async def __aenter__(self) -> sqlite3.Connection:
        if self.db.queue_writers and self.db._depth == 0:
            await self.db._wait_turn()  # without blocking the loop (hub/store/pg.py)
        try:
            return self.db._enter(self.tx)
        except BaseException:
            await self.db._end_turn()
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is not None or self.tx.savepoint is not None:
                # A rollback costs no fsync; a nested batch is a savepoint of its caller's.
                self.db._exit(self.tx, exc_type is not None)
                self.committed = exc_type is None
                return
            await self.db._commit_off_loop(self)
        finally:
            if self.tx.savepoint is None:
                await self.db._end_turn()


class _Commit:
    """A COMMIT handed to the commit thread; `done` is set when it has ended either way."""

    __slots__ = ("done", "error", "woken")

    def __init__(self, woken: asyncio.Future[None]) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.woken = woken


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def is_postgres_url(target: object) -> bool:
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


def open_database(target: str | Path, *, commit_off_loop: bool = True) -> Database:
    """The store a --db value names: a postgresql:// URL (hub/store/pg.py), else the path of
    a SQLite file."""
    if is_postgres_url(target):
        from hub.store.pg import PgDatabase  # psycopg only where PostgreSQL is used

        return PgDatabase(str(target), commit_off_loop=commit_off_loop)
    return Database(target, commit_off_loop=commit_off_loop)


class Database:
    """The one SQLite connection of the hub. Rows come back as `sqlite3.Row`."""

    dialect = "sqlite"

    # Statements kept prepared by the sqlite3 module (its default is 128). The ledger's
    # statements are a few dozen, but IN (...) lists and multi-row VALUES vary with their
    # length, and a miss costs a full re-prepare on the write path.
    STATEMENT_CACHE = 512

    def __init__(
        self, path: str | Path, *, busy_timeout_ms: int = 5000, commit_off_loop: bool = True
    ) -> None:
        self.path = str(path)
        self.busy_timeout_ms = busy_timeout_ms
        # False: write_batch() commits on the loop as transaction() does (the baseline that
        # bench/slow_commit.py measures against).
        self.commit_off_loop = commit_off_loop
        # isolation_level=None: the sqlite3 module never opens transactions on its own; we
        # issue BEGIN IMMEDIATE / SAVEPOINT ourselves. check_same_thread=False is safe because
        # all writes happen on the hub's event-loop thread (enforced in transaction()), except
        # a write_batch()'s COMMIT, run by the commit thread while the loop keeps off the
        # connection.
        self._conn = self._connect()
        self._configure()
        self._depth = 0
        self._owner: tuple[int, object] | None = None
        # The open savepoints, innermost last: (name, total_changes when it was taken).
        self._marks: list[tuple[str, int | None]] = []
        self._closed = False
        self._checkpointer: _Checkpointer | None = None
        self._inflight: _Commit | None = None  # a write_batch() COMMIT in the commit thread
        self._committer: ThreadPoolExecutor | None = None
        self._reader: sqlite3.Connection | None = None  # snapshot reads during a COMMIT
        self._reader_pinned = False  # the reader holds its snapshot until that COMMIT ends

    # Whether write_batch() waits its turn among several processes before it begins (see
    # _wait_turn): not here, where one process writes the file.
    queue_writers = False

    async def _wait_turn(self) -> None:
        """Wait, without blocking the loop, until this process may write (PgDatabase)."""

    async def _end_turn(self) -> None:
        """Let the next process write (PgDatabase)."""

    def _configure(self) -> None:
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = FULL")  # a commit survives power loss
        self._conn.execute("PRAGMA foreign_keys = ON")

    def columns(self, table: str) -> set[str]:
        """The names of a table's columns."""
        return {str(r["name"]) for r in self.query(f"PRAGMA table_info({table})")}

    def describe(self) -> str:
        """Where the data lives, for logs and /readyz (never a password)."""
        return self.path

    @property
    def conn(self) -> sqlite3.Connection:
        if self._inflight is not None:
            self._settle()
        return self._conn

    @property
    def in_transaction(self) -> bool:
        return self._inflight is not None or self._depth > 0

    @property
    def committing(self) -> bool:
        """A write_batch() COMMIT is in flight in the commit thread."""
        return self._inflight is not None

    async def settled(self, timeout_s: float) -> bool:
        """Wait, without blocking the loop, for the COMMIT in flight now (not for any that
        starts later) to end; at most timeout_s. True when it has (or none was in flight)."""
        job = self._inflight
        if job is None or job.done.is_set():
            return True
        # asyncio.wait, not wait_for: a timeout must not cancel the batch's own future.
        await asyncio.wait([job.woken], timeout=timeout_s)
        return job.done.is_set()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._closed:
            self._settle()
            self.stop_checkpointer()
            self._closed = True
            if self._committer is not None:
                self._committer.shutdown(wait=True)
            if self._reader is not None:
                self._reader.close()
            self._conn.close()

    # --- checkpoints --------------------------------------------------------------------
    def start_checkpointer(self, interval_s: float = 0.2) -> None:
        """Move WAL checkpoints off the commit path, into a thread of their own.

        By default the connection that commits past 1000 WAL pages runs the checkpoint
        itself: it copies the WAL into the database file and fsyncs it before its COMMIT
        returns. A writer whose batches dirty a thousand pages paid that on nearly every
        commit. With the checkpointer, this connection never checkpoints; a second
        connection runs PASSIVE checkpoints every interval_s in a thread (sqlite3 releases
        the GIL while it works), which never block the writer and never change what a
        COMMIT guarantees: the WAL is fsynced at each commit either way.
        """
        if self._checkpointer is not None or self._closed:
            return
        self._checkpointer = _Checkpointer(self.path, interval_s)
        self.conn.execute("PRAGMA wal_autocheckpoint = 0")

    def stop_checkpointer(self) -> None:
        """Stop the thread after a last checkpoint; this connection checkpoints again."""
        cp, self._checkpointer = self._checkpointer, None
        if cp is None:
            return
        cp.stop()
        if not self._closed:
            self.conn.execute("PRAGMA wal_autocheckpoint = 1000")

    # --- transactions -------------------------------------------------------------------
    def transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK when the block raises.

        Re-entrant: a nested call joins the outer transaction as a SAVEPOINT. Only the
        outermost block commits; an exception leaving a nested block rolls back that block's
        writes and propagates.
        """
        # A small class rather than @contextmanager: a transfer through the writer enters two
        # of these, and the generator machinery cost about 2% of it.
        return _Transaction(self)

    def write_batch(self) -> _Batch:
        """`async with db.write_batch():` is `with db.transaction():` for a group commit: the
        body runs on the loop, BEGIN IMMEDIATE and savepoints as usual, and must not await;
        the COMMIT (its fsync) runs in the commit thread, and the block ends once it is
        durable, raising its error when it failed (then nothing of the body is stored).

        Meanwhile the loop serves other work; see the module's docstring for what meets the
        connection then. When the block's task is cancelled during the COMMIT, the COMMIT
        still completes (it cannot be called back): the block waits for it, sets
        `committed`, and re-raises the cancellation.
        """
        return _Batch(self)

    async def _commit_off_loop(self, batch: _Batch) -> None:
        if not self.commit_off_loop:
            self._finish_outer("COMMIT")
            batch.committed = True
            return
        loop = asyncio.get_running_loop()
        job = _Commit(loop.create_future())
        self._inflight = job
        if self._committer is None:
            self._committer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-commit")
        self._committer.submit(self._commit_in_thread, job, loop)
        try:
            await job.woken
        finally:  # cancelled too: the COMMIT goes on, and its outcome is the batch's
            self._settle(job)
            batch.committed = job.error is None
        if job.error is not None:
            raise job.error

    def _commit_in_thread(self, job: _Commit, loop: asyncio.AbstractEventLoop) -> None:
        # The loop does not touch the connection until job.done is set (see _settle), so the
        # connection and _depth/_owner are this thread's until then.
        try:
            self._finish_outer("COMMIT")
        except BaseException as e:  # handed to the batch's task; _finish_outer rolled back
            job.error = e
        finally:
            job.done.set()
            # A closed loop raises RuntimeError: nobody awaits the batch any more.
            with suppress(RuntimeError):
                loop.call_soon_threadsafe(_wake, job.woken)

    def _settle(self, job: _Commit | None = None) -> None:
        """On the loop: wait for the COMMIT in flight (job, or any) to end, and forget it."""
        inflight = self._inflight
        if inflight is None or (job is not None and inflight is not job):
            return
        inflight.done.wait()
        self._inflight = None
        if self._reader_pinned:
            self._reader_pinned = False
            reader = self._reader
            assert reader is not None
            try:
                reader.execute("COMMIT")  # let go of the snapshot
            except sqlite3.Error:  # the next COMMIT in flight gets a fresh reader
                log.exception("the read-only connection could not end its snapshot; reopening")
                self._reader = None
                reader.close()

    def _reading(self) -> sqlite3.Connection:
        """The connection a read outside the COMMIT in flight goes to."""
        job = self._inflight
        if job is None:
            return self._conn
        if job.done.is_set() or not _SNAPSHOT_READS.get():
            self._settle()
            return self._conn
        reader = self._reader
        if reader is None:
            reader = self._reader = self._open_reader()
        if not self._reader_pinned:
            # Deferred BEGIN: the first read takes the snapshot; every read until this COMMIT
            # is settled sees the same one (an audit's several queries agree with each other).
            reader.execute("BEGIN")
            self._reader_pinned = True
        return reader

    def _open_reader(self) -> sqlite3.Connection:
        reader = self._connect()
        reader.execute("PRAGMA query_only = ON")
        return reader

    def _connect(self) -> sqlite3.Connection:
        """A connection to the file as the hub's are set up: the writer's and the reader's."""
        conn = sqlite3.connect(
            self.path,
            isolation_level=None,
            check_same_thread=False,
            timeout=self.busy_timeout_ms / 1000,
            cached_statements=self.STATEMENT_CACHE,
        )
        conn.row_factory = sqlite3.Row
        # Savepoint and statement journals in memory: they only serve rollbacks inside an
        # open transaction (crash recovery never reads them), and once one outgrew 64 KiB
        # SQLite moved it to a file in /var/tmp for the rest of the transaction, costing a
        # write() per journaled page on every savepoint of a writer batch.
        conn.execute("PRAGMA temp_store = MEMORY")
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
        return conn

    def _enter(self, tx: _Transaction) -> sqlite3.Connection:
        if self._inflight is not None:
            self._settle()  # never inside (or beside) the batch whose COMMIT is in flight
        owner = _current_owner()
        if self._depth == 0:
            self._conn.execute("BEGIN IMMEDIATE")
            self._depth, self._owner = 1, owner
            tx.savepoint = None
            return self._conn
        if owner != self._owner:
            raise TransactionConflict(
                "a database transaction is already open in another task or thread; "
                "do not await (or hand work to threads) inside `with db.transaction()`"
            )
        self._depth += 1
        # A savepoint entered where nothing was written since the enclosing one shares it:
        # rolling back to either is the same state, so the SAVEPOINT and RELEASE a handler
        # nested in a batch item nested in a writer call would each send are not needed.
        # total_changes counts every row written (triggers too); the store runs no DDL in
        # a savepoint. A connection without it (PostgreSQL's defers its savepoints instead)
        # always takes its own.
        changes = getattr(self._conn, "total_changes", None)
        marks = self._marks
        if marks and changes is not None and marks[-1][1] == changes:
            tx.savepoint, tx.shared = marks[-1][0], True
            marks.append(marks[-1])
            return self._conn
        name = f"sp{self._depth}"
        self._conn.execute(f"SAVEPOINT {name}")
        tx.savepoint, tx.shared = name, False
        marks.append((name, changes))
        return self._conn

    def _exit(self, tx: _Transaction, failed: bool) -> None:
        name = tx.savepoint
        if name is None:
            self._finish_outer("ROLLBACK" if failed else "COMMIT")
            return
        try:
            if not failed:
                if not tx.shared:
                    self._conn.execute(f"RELEASE {name}")
            elif self._conn.in_transaction:
                self._conn.execute(f"ROLLBACK TO {name}")  # the savepoint stays open
                if not tx.shared:
                    self._conn.execute(f"RELEASE {name}")
            # else: SQLite already rolled the whole transaction back (SQLITE_FULL, IOERR...);
            # there is no savepoint left, and the original error is the one to report.
        finally:
            self._depth -= 1
            self._marks.pop()

    def _finish_outer(self, statement: str) -> None:
        try:
            if statement == "COMMIT" or self._conn.in_transaction:
                self._conn.execute(statement)
        except BaseException:
            # A failed COMMIT (disk full, I/O error) may leave the transaction open.
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise
        finally:
            self._depth, self._owner = 0, None
            self._marks.clear()

    # --- reads --------------------------------------------------------------------------
    def query(self, sql: str, params: Params = ()) -> list[sqlite3.Row]:
        conn = self._conn if self._inflight is None else self._reading()
        rows: list[sqlite3.Row] = conn.execute(sql, params).fetchall()
        return rows

    def query_one(self, sql: str, params: Params = ()) -> sqlite3.Row | None:
        conn = self._conn if self._inflight is None else self._reading()
        cur = conn.execute(sql, params)
        row: sqlite3.Row | None = cur.fetchone()
        if conn is not self._conn:
            cur.close()  # done with the statement now, not when the cursor is collected
        return row

    # --- migrations ---------------------------------------------------------------------
    def migrate(self, component: str, migrations: Sequence[Migration]) -> list[int]:
        """Apply the component's migrations above its recorded version; return those applied.

        Each migration runs in its own transaction together with its record in
        `schema_migrations`, so a failed migration leaves no trace and can be retried.
        """
        if not component or not isinstance(component, str):
            raise MigrationError("a migration component needs a non-empty name")
        last = 0
        for version, _name, _sql in migrations:
            if isinstance(version, bool) or not isinstance(version, int) or version <= last:
                raise MigrationError(
                    f"{component} migrations must have increasing positive integer versions;"
                    f" got {version!r} after {last}"
                )
            last = version
        known = {version: name for version, name, _sql in migrations}
        with self.transaction() as c:
            c.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " component TEXT NOT NULL,"
                " version INTEGER NOT NULL,"
                " name TEXT NOT NULL,"
                " applied_at REAL NOT NULL,"
                " PRIMARY KEY (component, version))"
            )
            recorded = self._recorded(component)
        for version, name in recorded.items():
            if version not in known:
                raise MigrationError(
                    f"the database has {component} migration {version} ({name!r}) that this"
                    f" version of deparrow does not know; upgrade deparrow or use another"
                    f" data directory"
                )
            if known[version] != name:
                raise MigrationError(
                    f"{component} migration {version} is recorded as {name!r} but this code"
                    f" calls it {known[version]!r}; migrations must never be renumbered"
                )
        applied: list[int] = []
        for version, name, sql in migrations:
            if version in recorded:
                continue
            with self.transaction() as c:
                # Re-check under the write lock: another process may have just applied it.
                if version in self._recorded(component):
                    continue
                for statement in split_sql(sql):
                    c.execute(statement)
                c.execute(
                    "INSERT INTO schema_migrations (component, version, name, applied_at)"
                    " VALUES (?, ?, ?, ?)",
                    (component, version, name, time.time()),
                )
            applied.append(version)
        return applied

    def _recorded(self, component: str) -> dict[int, str]:
        rows = self.query(
            "SELECT version, name FROM schema_migrations WHERE component = ? ORDER BY version",
            (component,),
        )
        return {int(r["version"]): str(r["name"]) for r in rows}

    def schema_version(self, component: str) -> int:
        """The highest recorded migration of a component (0 when none)."""
        try:
            row = self.query_one(
                "SELECT MAX(version) AS v FROM schema_migrations WHERE component = ?",
                (component,),
            )
        except sqlite3.OperationalError:  # no migration ever ran here
            return 0
        return int(row["v"]) if row is not None and row["v"] is not None else 0


class _Checkpointer:
    """A thread with its own connection running PASSIVE WAL checkpoints on a timer."""

    def __init__(self, path: str, interval_s: float) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, not {interval_s!r}")
        self.interval_s = interval_s
        self.checkpoints = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA synchronous = FULL")
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval_s):
                self._checkpoint()
            self._checkpoint()
        except sqlite3.Error as e:  # reported by stop(); commits go on: the WAL just grows
            self.error = e
        finally:
            self._conn.close()

    def _checkpoint(self) -> None:
        self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        self.checkpoints += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        if self.error is not None:
            log.warning("WAL checkpoints failed (the WAL file grew instead): %s", self.error)

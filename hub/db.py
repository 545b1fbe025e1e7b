"""The hub's one SQLite connection: durable settings, explicit transactions, recorded migrations.

One writer: every module of the hub shares this connection and writes only inside
`transaction()`, which starts with BEGIN IMMEDIATE so the write lock is taken up front (a
second process, such as the CLI, waits on busy_timeout instead of failing half-way).
Transactions nest: an inner `transaction()` joins the outer one through a SAVEPOINT, so a
service can wrap its own row updates and several ledger calls in one atomic unit, and an
inner failure that the caller catches undoes only the inner part.

Schema changes are migrations recorded per component (`ledger`, `store`, ...) in
`schema_migrations`, so components number their migrations independently.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
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

    __slots__ = ("db", "savepoint")

    def __init__(self, db: Database) -> None:
        self.db = db
        self.savepoint: str | None = None

    def __enter__(self) -> sqlite3.Connection:
        return self.db._enter(self)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.db._exit(self, exc_type is not None)


class Database:
    """The one SQLite connection of the hub. Rows come back as `sqlite3.Row`."""

    # Statements kept prepared by the sqlite3 module (its default is 128). The ledger's
    # statements are a few dozen, but IN (...) lists and multi-row VALUES vary with their
    # length, and a miss costs a full re-prepare on the write path.
    STATEMENT_CACHE = 512

    def __init__(self, path: str | Path, *, busy_timeout_ms: int = 5000) -> None:
        self.path = str(path)
        # isolation_level=None: the sqlite3 module never opens transactions on its own; we
        # issue BEGIN IMMEDIATE / SAVEPOINT ourselves. check_same_thread=False is safe because
        # all writes happen on the hub's event-loop thread (enforced in transaction()).
        self._conn = sqlite3.connect(
            self.path,
            isolation_level=None,
            check_same_thread=False,
            timeout=busy_timeout_ms / 1000,
            cached_statements=self.STATEMENT_CACHE,
        )
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = FULL")  # a commit survives power loss
        self._conn.execute("PRAGMA foreign_keys = ON")
        # Savepoint and statement journals in memory: they only serve rollbacks inside an
        # open transaction (crash recovery never reads them), and once one outgrew 64 KiB
        # SQLite moved it to a file in /var/tmp for the rest of the transaction, costing a
        # write() per journaled page on every savepoint of a writer batch.
        self._conn.execute("PRAGMA temp_store = MEMORY")
        self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        self._depth = 0
        self._owner: tuple[int, object] | None = None
        self._closed = False
        self._checkpointer: _Checkpointer | None = None

    @property
    def conn(self) -> sqlite3.Connection:
        return self._conn

    @property
    def in_transaction(self) -> bool:
        return self._depth > 0

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._closed:
            self.stop_checkpointer()
            self._closed = True
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
        self._conn.execute("PRAGMA wal_autocheckpoint = 0")

    def stop_checkpointer(self) -> None:
        """Stop the thread after a last checkpoint; this connection checkpoints again."""
        cp, self._checkpointer = self._checkpointer, None
        if cp is None:
            return
        cp.stop()
        if not self._closed:
            self._conn.execute("PRAGMA wal_autocheckpoint = 1000")

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

    def _enter(self, tx: _Transaction) -> sqlite3.Connection:
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
        name = f"sp{self._depth + 1}"
        self._conn.execute(f"SAVEPOINT {name}")
        self._depth += 1
        tx.savepoint = name
        return self._conn

    def _exit(self, tx: _Transaction, failed: bool) -> None:
        name = tx.savepoint
        if name is None:
            self._finish_outer("ROLLBACK" if failed else "COMMIT")
            return
        try:
            if not failed:
                self._conn.execute(f"RELEASE {name}")
            elif self._conn.in_transaction:
                self._conn.execute(f"ROLLBACK TO {name}")
                self._conn.execute(f"RELEASE {name}")
            # else: SQLite already rolled the whole transaction back (SQLITE_FULL, IOERR...);
            # there is no savepoint left, and the original error is the one to report.
        finally:
            self._depth -= 1

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

    # --- reads --------------------------------------------------------------------------
    def query(self, sql: str, params: Params = ()) -> list[sqlite3.Row]:
        rows: list[sqlite3.Row] = self._conn.execute(sql, params).fetchall()
        return rows

    def query_one(self, sql: str, params: Params = ()) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self._conn.execute(sql, params).fetchone()
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

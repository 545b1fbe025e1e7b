"""PostgreSQL as the hub's store: `deparrow hub --db postgresql://user@host/dbname`.

`PgDatabase` is `Database` (hub/store/db.py) on a PostgreSQL server through psycopg 3: the
same transactions, savepoints, group commits off the loop, snapshot reads and migrations, and
the same SQL, said in PostgreSQL's dialect by hub/store/dialect.py.

Several hub processes may share one database. What SQLite's BEGIN IMMEDIATE gave one process,
a transaction-scoped advisory lock gives them all: every write transaction takes
`pg_advisory_xact_lock(WRITE_LOCK)` after BEGIN, so write transactions run one at a time
across every replica, each seeing the last one's commit. The ledger's rules (balances never
below zero, each idempotency key once, a hold settled once) therefore hold exactly as they do
on SQLite, with no read-modify-write race between replicas, while reads (the REST API, the
dashboard) run in parallel on every replica without the lock. The unique indexes remain the
last word: a key inserted twice fails, whatever the lock.

Errors: psycopg's errors come out as the sqlite3 module's classes (IntegrityError,
OperationalError, DatabaseError), the vocabulary the hub's code already catches, with the
server's message and the original error as their cause.

Values come back as they do from SQLite: integers as int (also SUM's NUMERIC), booleans as
0/1, floats as float, bytea as bytes; rows index by position and by column name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import psycopg
from psycopg import pq
from psycopg.adapt import Dumper, Loader

from hub.store.db import Database, Params
from hub.store.dialect import to_postgres

log = logging.getLogger(__name__)

# Any fixed 64-bit key: "deparrow" in ASCII. Every write transaction holds it until it ends.
WRITE_LOCK = int.from_bytes(b"deparrow", "big") & 0x7FFF_FFFF_FFFF_FFFF
BEGIN_WRITE = f"BEGIN; SELECT pg_advisory_xact_lock({WRITE_LOCK})"
# The group commits' turnstile (PgDatabase._wait_turn): another fixed key.
TURN = WRITE_LOCK ^ 1
BEGIN_SNAPSHOT = "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY"


class Row(tuple):  # type: ignore[type-arg]
    """A result row like sqlite3.Row: row[0], row["name"], row.keys(), dict(row)."""

    __slots__ = ()
    _index: dict[str, int] = {}
    _names: list[str] = []

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            try:
                return tuple.__getitem__(self, self._index[key])
            except KeyError:
                raise IndexError(f"no such column: {key}") from None
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._names)


def _row_class(names: list[str]) -> type[Row]:
    return type("Row", (Row,), {"__slots__": (), "_index": {n: i for i, n in enumerate(names)},
                                "_names": names})  # fmt: skip


def _row_factory(cursor: Any) -> Any:
    desc = cursor.description
    if desc is None:
        return tuple
    cls = _row_class([c.name for c in desc])
    return cls


class _NumericLoader(Loader):
    """NUMERIC (what SUM of a BIGINT gives) as int when whole, else float."""

    def load(self, data: Any) -> int | float:
        text = bytes(data).decode()
        return float(text) if any(ch in text for ch in ".eEN") else int(text)


class _BoolLoader(Loader):
    def load(self, data: Any) -> int:
        return 1 if bytes(data) == b"t" else 0


class _BoolDumper(Dumper):
    """Python bools go in as 0/1 integers, as SQLite stores them."""

    oid = psycopg.postgres.types["int8"].oid

    def dump(self, obj: Any) -> bytes:
        return b"1" if obj else b"0"


class _Nothing:
    """What a statement that needed no round trip returns: no rows."""

    rowcount = -1

    def fetchone(self) -> None:
        return None

    def fetchall(self) -> list[Any]:
        return []

    def __iter__(self) -> Iterator[Any]:
        return iter(())

    def close(self) -> None:
        pass


_NOTHING = _Nothing()


class Cursor:
    """What `execute()` returns: fetchone, fetchall, iteration, rowcount."""

    __slots__ = ("_cur",)

    def __init__(self, cur: psycopg.Cursor[Any]) -> None:
        self._cur = cur

    def fetchone(self) -> Any:
        return self._cur.fetchone() if self._cur.description is not None else None

    def fetchall(self) -> list[Any]:
        return self._cur.fetchall() if self._cur.description is not None else []

    def __iter__(self) -> Iterator[Any]:
        return iter(self.fetchall())

    @property
    def rowcount(self) -> int:
        return self._cur.rowcount

    @property
    def lastrowid(self) -> None:
        raise sqlite3.NotSupportedError("PostgreSQL has no lastrowid: use RETURNING")

    def close(self) -> None:
        self._cur.close()


def _mapped(e: psycopg.Error, sql: str | None = None) -> sqlite3.Error:
    if isinstance(e, psycopg.IntegrityError):
        cls: type[sqlite3.Error] = sqlite3.IntegrityError
    elif isinstance(e, psycopg.OperationalError | psycopg.ProgrammingError):
        # SQLite's word for a syntax error, an unknown table or column, a lost connection
        cls = sqlite3.OperationalError
    elif isinstance(e, psycopg.InterfaceError):
        cls = sqlite3.InterfaceError
    else:
        cls = sqlite3.DatabaseError
    detail = e.diag.message_primary if e.diag and e.diag.message_primary else str(e)
    if sql is not None and not isinstance(e, psycopg.IntegrityError | psycopg.OperationalError):
        detail += f" (in: {' '.join(sql.split())[:300]})"  # a statement this dialect got wrong
    err = cls(detail)
    err.sqlite_errorname = type(e).__name__
    return err


class PgConnection:
    """A psycopg connection that takes the hub's SQLite SQL and answers like sqlite3's."""

    def __init__(self, url: str, *, read_only: bool = False) -> None:
        self.url = url
        self.read_only = read_only
        self.reconnects = 0
        # SAVEPOINT and RELEASE not sent yet (see _savepoints): they go out with the next
        # statement, in one round trip, or never when nothing ran inside.
        self._deferred: list[str] = []
        self._pg = self._open()

    def _open(self) -> psycopg.Connection[Any]:
        try:
            pg = psycopg.connect(self.url, autocommit=True, row_factory=_row_factory)
        except psycopg.Error as e:
            raise _mapped(e) from e
        pg.adapters.register_loader("numeric", _NumericLoader)
        pg.adapters.register_loader("bool", _BoolLoader)
        pg.adapters.register_dumper(bool, _BoolDumper)
        return pg

    @property
    def in_transaction(self) -> bool:
        """A transaction is open here (a lost connection has none: the server ended it)."""
        if self._pg.closed or self._pg.broken:
            return False
        return self._pg.info.transaction_status != pq.TransactionStatus.IDLE

    def _run(self, cur_sql: bytes | str, args: Any, sql_for_errors: str | None) -> Cursor:
        """Execute; outside a transaction, a connection the server lost (a restart, a
        failover, an idle timeout) is opened again and the statement sent once more: such a
        statement is a read or a BEGIN, safe to repeat. Inside one, the error goes up and the
        transaction fails whole; the next one starts on a new connection."""
        idle = not self.in_transaction
        for attempt in (1, 2):
            if self._pg.closed or self._pg.broken:
                if not idle:
                    raise sqlite3.OperationalError("the connection to PostgreSQL was lost")
                self._pg = self._open()
                self.reconnects += 1
            cur = self._pg.cursor()
            try:
                if self._deferred:
                    self._with_deferred(cur, cur_sql, args)
                elif args is None:
                    cur.execute(cur_sql)
                else:
                    cur.execute(cur_sql, args)
                return Cursor(cur)
            except psycopg.OperationalError as e:
                if attempt == 2 or not idle or not (self._pg.closed or self._pg.broken):
                    raise _mapped(e, sql_for_errors) from e
                log.warning("the connection to PostgreSQL was lost (%s); connecting again", e)
            except psycopg.Error as e:
                raise _mapped(e, sql_for_errors) from e
        raise AssertionError("unreachable")

    def _with_deferred(self, cur: Any, cur_sql: bytes | str, args: Any) -> None:
        """The savepoints not sent yet, then this statement, in one pipeline: one round trip.
        An error in the statement comes up here, with the savepoints before it in place."""
        ops, self._deferred = self._deferred, []
        with self._pg.pipeline():
            for op in ops:
                self._pg.cursor().execute(op.encode())
            cur.execute(cur_sql, args if args is not None else None)

    def _savepoints(self, sql: str) -> Cursor | _Nothing | None:
        """SAVEPOINT, RELEASE and ROLLBACK TO, as the store's nested transactions send them
        (hub/store/db.py), each a round trip on its own on a network: deferred instead.
        A savepoint nothing ran in is never sent, nor is its RELEASE or ROLLBACK TO; the
        others go out with the next statement. None: not one of these."""
        if sql.startswith("SAVEPOINT "):
            self._deferred.append(sql)
            return _NOTHING
        if sql.startswith("RELEASE "):
            mark = "SAVEPOINT " + sql[len("RELEASE ") :]
            if self._deferred and self._deferred[-1] == mark:
                self._deferred.pop()  # nothing ran inside it
            else:
                self._deferred.append(sql)
            return _NOTHING
        if sql.startswith("ROLLBACK TO "):
            mark = "SAVEPOINT " + sql[len("ROLLBACK TO ") :]
            if mark in self._deferred:  # nothing sent since it: nothing to undo on the server
                del self._deferred[self._deferred.index(mark) + 1 :]
                return _NOTHING
            self._deferred.clear()  # undone by this rollback anyway
            return self._run(sql.encode(), None, None)
        if sql in ("COMMIT", "ROLLBACK"):
            self._deferred.clear()  # a transaction's end releases every savepoint
        return None

    @property
    def closed(self) -> bool:
        return self._pg.closed

    def execute(self, sql: str, params: Params = ()) -> Cursor:
        if sql == "BEGIN IMMEDIATE":
            return self._raw(BEGIN_WRITE)
        if sql == "BEGIN":
            return self._raw(BEGIN_SNAPSHOT if self.read_only else "BEGIN")
        if sql.startswith(("PRAGMA", "pragma")):
            raise sqlite3.OperationalError(f"a PRAGMA has no meaning on PostgreSQL: {sql}")
        control = self._savepoints(sql)
        if control is not None:
            return control  # type: ignore[return-value]
        t = to_postgres(sql)
        args: Any = params
        if t.numbered and not isinstance(params, Mapping):
            args = {f"p{i}": v for i, v in enumerate(params, 1)}
        elif not isinstance(params, Mapping):
            args = list(params)
        return self._run(t.sql, args, t.sql)

    def executemany(self, sql: str, seq: Sequence[Params]) -> Cursor:
        if self._deferred:  # the savepoints it runs inside go out first
            self._run(b"SELECT 1", None, None)
        t = to_postgres(sql)
        rows: list[Any] = []
        for params in seq:
            if t.numbered and not isinstance(params, Mapping):
                rows.append({f"p{i}": v for i, v in enumerate(params, 1)})
            else:
                rows.append(params)
        cur = self._pg.cursor()
        try:
            cur.executemany(t.sql, rows)
        except psycopg.Error as e:
            raise _mapped(e) from e
        return Cursor(cur)

    def _raw(self, sql: str) -> Cursor:
        return self._run(sql.encode(), None, None)  # as is: several statements allowed

    def close(self) -> None:
        self._pg.close()


class PgDatabase(Database):
    """The hub's store on PostgreSQL; see the module's docstring."""

    dialect = "postgresql"
    queue_writers = True

    def __init__(self, url: str, *, commit_off_loop: bool = True) -> None:
        self.url = url
        super().__init__(url, commit_off_loop=commit_off_loop)
        self._turn_conn: Any = None  # an async connection holding TURN between batches
        self._turn_local: asyncio.Lock | None = None
        self._turn_held = False

    async def _wait_turn(self) -> None:
        """A group commit (write_batch) waits here for the other replicas' batches to end,
        on a connection of its own, with the loop free to serve HTTP and MQTT meanwhile;
        only then does it BEGIN and take WRITE_LOCK, which it then mostly finds free. Were
        it to wait in BEGIN instead, its replica's whole loop would stand still while another
        replica writes. The turnstile is for the loop's sake only: WRITE_LOCK alone keeps the
        writes apart, so a turnstile connection that fails is dropped and writes go on."""
        if self._turn_local is None:
            self._turn_local = asyncio.Lock()
        await self._turn_local.acquire()
        try:
            if self._turn_conn is None or self._turn_conn.closed:
                self._turn_conn = await psycopg.AsyncConnection.connect(
                    self.url, autocommit=True, keepalives=1, keepalives_idle=5,
                    keepalives_interval=2, keepalives_count=2,
                )  # fmt: skip
            await self._turn_conn.execute("SELECT pg_advisory_lock(%s)", (TURN,))
            self._turn_held = True
        except (psycopg.Error, OSError) as e:
            log.warning("the write turnstile failed (%s); writing without it", e)
            await self._drop_turn()
        except BaseException:  # cancelled while waiting: the session lock may be held
            await self._drop_turn()
            self._turn_local.release()
            raise

    async def _end_turn(self) -> None:
        if self._turn_local is None or not self._turn_local.locked():
            return
        try:
            if self._turn_held:
                self._turn_held = False
                await self._turn_conn.execute("SELECT pg_advisory_unlock(%s)", (TURN,))
        except (psycopg.Error, OSError) as e:
            log.warning("the write turnstile failed (%s); writing without it", e)
            await self._drop_turn()
        finally:
            self._turn_local.release()

    def close(self) -> None:
        conn, self._turn_conn = self._turn_conn, None
        if conn is not None and not conn.closed:
            conn.pgconn.finish()  # no loop needed: the server lets go of its lock
        super().close()

    async def _drop_turn(self) -> None:
        conn, self._turn_conn, self._turn_held = self._turn_conn, None, False
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()  # its session lock goes with it

    def _configure(self) -> None:
        pass  # durability and isolation are the server's settings

    def _connect(self) -> Any:
        return PgConnection(self.url)

    def _open_reader(self) -> Any:
        return PgConnection(self.url, read_only=True)

    def start_checkpointer(self, interval_s: float = 0.2) -> None:
        pass  # the server checkpoints its own WAL

    def stop_checkpointer(self) -> None:
        pass

    def columns(self, table: str) -> set[str]:
        rows = self.query(
            "SELECT column_name AS name FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = ?",
            (table,),
        )
        return {str(r["name"]) for r in rows}

    def describe(self) -> str:
        """The server and database, without the password."""
        conn: Any = self._conn
        info = conn._pg.info
        return f"postgresql://{info.user}@{info.host}:{info.port}/{info.dbname}"

"""Nested transactions keep their meaning when savepoints are shared or deferred.

A nested `db.transaction()` entered where nothing was written since the enclosing savepoint
shares that savepoint on SQLite (hub/store/db.py) instead of sending SAVEPOINT and RELEASE of
its own; PostgreSQL's connection defers its savepoints instead (hub/store/pg.py). Either way a
failed inner block must undo exactly its own writes, at every depth and in every order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hub.store.db import Database, open_database

pytestmark = pytest.mark.both_stores


@pytest.fixture
def db(store: str | Path) -> Any:
    database = open_database(store)
    database.migrate("t", [(1, "t", "CREATE TABLE t (x INTEGER)")])
    yield database
    database.close()


def _rows(db: Database) -> list[int]:
    return [r["x"] for r in db.query("SELECT x FROM t ORDER BY x")]


def test_inner_failure_right_after_the_outer_savepoint_undoes_only_the_inner(db: Database) -> None:
    with db.transaction() as c:
        c.execute("INSERT INTO t VALUES (1)")
        with db.transaction():  # a savepoint of its own: something was written before it
            with pytest.raises(ValueError), db.transaction() as inner:  # shares the one above
                inner.execute("INSERT INTO t VALUES (2)")
                raise ValueError
            c.execute("INSERT INTO t VALUES (3)")
            with pytest.raises(ValueError), db.transaction() as inner:  # its own again
                inner.execute("INSERT INTO t VALUES (4)")
                raise ValueError
        c.execute("INSERT INTO t VALUES (5)")
    assert _rows(db) == [1, 3, 5]


def test_three_levels_sharing_one_savepoint_fail_one_at_a_time(db: Database) -> None:
    with db.transaction() as c:
        c.execute("INSERT INTO t VALUES (1)")
        with db.transaction():
            with db.transaction():
                with pytest.raises(ValueError), db.transaction() as inner:
                    inner.execute("INSERT INTO t VALUES (2)")
                    raise ValueError
                c.execute("INSERT INTO t VALUES (3)")  # the level above goes on after it
            with pytest.raises(ValueError), db.transaction():
                c.execute("INSERT INTO t VALUES (4)")
                raise ValueError
        with pytest.raises(ValueError), db.transaction():
            with db.transaction() as inner:  # succeeds, then its enclosing block fails
                inner.execute("INSERT INTO t VALUES (6)")
            raise ValueError
        c.execute("INSERT INTO t VALUES (7)")
    assert _rows(db) == [1, 3, 7]


def test_an_outer_block_that_fails_after_a_shared_inner_one_succeeded_undoes_both(
    db: Database,
) -> None:
    with db.transaction() as c:
        c.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(ValueError), db.transaction():
            with db.transaction() as inner:
                inner.execute("INSERT INTO t VALUES (2)")
            c.execute("INSERT INTO t VALUES (3)")
            raise ValueError
        with db.transaction():  # the depth is whole again: a new block commits normally
            c.execute("INSERT INTO t VALUES (4)")
    assert _rows(db) == [1, 4]
    assert not db.in_transaction


def test_a_read_only_inner_block_that_fails_leaves_the_writes_around_it(db: Database) -> None:
    with db.transaction() as c:
        c.execute("INSERT INTO t VALUES (1)")
        with db.transaction():
            with pytest.raises(ValueError), db.transaction() as inner:
                inner.execute("SELECT x FROM t").fetchall()
                raise ValueError
            c.execute("INSERT INTO t VALUES (2)")
    assert _rows(db) == [1, 2]


def test_sqlite_sends_one_savepoint_for_blocks_nested_with_no_write_between(
    tmp_path: Path,
) -> None:
    db = open_database(tmp_path / "hub.sqlite")
    db.migrate("t", [(1, "t", "CREATE TABLE t (x INTEGER)")])
    sent: list[str] = []
    db.conn.set_trace_callback(sent.append)
    try:
        with db.transaction() as c:
            c.execute("INSERT INTO t VALUES (1)")
            with db.transaction(), db.transaction(), db.transaction() as inner:
                inner.execute("INSERT INTO t VALUES (2)")
                with db.transaction() as deepest:  # after a write: a savepoint of its own
                    deepest.execute("INSERT INTO t VALUES (3)")
    finally:
        db.conn.set_trace_callback(None)
    savepoints = [s for s in sent if s.startswith(("SAVEPOINT", "RELEASE", "ROLLBACK"))]
    assert savepoints == ["SAVEPOINT sp2", "SAVEPOINT sp5", "RELEASE sp5", "RELEASE sp2"]
    assert _rows(db) == [1, 2, 3]
    db.close()

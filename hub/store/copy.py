"""Copy every table of one store into another, empty one: how a hub moves off its SQLite file
onto PostgreSQL (`deparrow copy-store`, docs/scale.md).

Both stores must already have the same schema (the caller runs every component's migrations
on both). Tables go in the order their foreign keys need, rows of a table that refers to
itself (a job's parent) with the referred ones first, all in one transaction on the target:
a copy that fails leaves the target as it was. Identity columns continue after the largest
id copied. The caller checks the result (counts per table, the ledger's audit).
"""

from __future__ import annotations

from collections.abc import Callable

from hub.store.db import Database

BATCH = 500


def tables_in_order(src: Database) -> list[str]:
    """The source's tables, each after the tables its foreign keys name."""
    names = [
        str(r["name"])
        for r in src.query(
            "SELECT name FROM sqlite_master WHERE type = 'table'"
            " AND name NOT LIKE 'sqlite_%' AND name != 'schema_migrations' ORDER BY name"
        )
    ]
    needs = {t: {str(r["table"]) for r in src.query(f"PRAGMA foreign_key_list({t})")} - {t}
             for t in names}  # fmt: skip
    ordered: list[str] = []
    while len(ordered) < len(names):
        ready = [t for t in names if t not in ordered and needs[t] <= set(ordered)]
        if not ready:
            raise ValueError(f"foreign keys form a cycle among {sorted(set(names) - set(ordered))}")
        ordered += ready
    return ordered


def _self_references(src: Database, table: str) -> list[str]:
    return [str(r["from"]) for r in src.query(f"PRAGMA foreign_key_list({table})")
            if r["table"] == table]  # fmt: skip


def _key(src: Database, table: str) -> str:
    """What orders a table's rows as they were written: rowid, or the primary key of a
    table WITHOUT ROWID."""
    sql = src.query_one("SELECT sql FROM sqlite_master WHERE name = ?", (table,))
    if sql is None or "WITHOUT ROWID" not in str(sql["sql"]).upper():
        return "rowid"
    pk = sorted((int(r["pk"]), str(r["name"])) for r in src.query(f"PRAGMA table_info({table})"))
    return ", ".join(name for n, name in pk if n > 0)


def copy_tables(
    src: Database, dst: Database, progress: Callable[[str, int], None] = lambda _t, _n: None
) -> dict[str, int]:
    """Copy every row; returns the rows copied per table. ValueError when the target holds
    data already (it must be a new database with the schema in place)."""
    order = tables_in_order(src)
    missing = [t for t in order if not dst.columns(t)]
    if missing:
        raise ValueError(f"the target has no table {missing[0]}: run the migrations first")
    for table in ("users", "entries", "jobs"):
        if dst.query_one(f"SELECT 1 FROM {table} LIMIT 1") is not None:
            raise ValueError(f"the target already holds data (its {table} table is not empty)")
    copied: dict[str, int] = {}
    with dst.transaction() as c:
        # Rows migrations put in place (the mint account) are the source's to give.
        for table in reversed(order):
            c.execute(f"DELETE FROM {table}")
        for table in order:
            cols = [str(r["name"]) for r in src.query(f"PRAGMA table_info({table})")]
            first = "".join(f"{col} IS NOT NULL, " for col in _self_references(src, table))
            insert = (
                f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})"
            )
            rows = src.query(
                f"SELECT {', '.join(cols)} FROM {table} ORDER BY {first}{_key(src, table)}"
            )
            for start in range(0, len(rows), BATCH):
                c.executemany(insert, [tuple(r) for r in rows[start : start + BATCH]])
            copied[table] = len(rows)
            progress(table, len(rows))
        if dst.dialect == "postgresql":
            for r in dst.query(
                "SELECT table_name, column_name FROM information_schema.columns"
                " WHERE table_schema = current_schema() AND is_identity = 'YES'"
            ):
                table, col = str(r["table_name"]), str(r["column_name"])
                c.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', '{col}'),"
                    f" (SELECT COALESCE(MAX({col}), 0) + 1 FROM {table}), false)"
                )
    return copied

"""Counts the SQL statements a process sends to SQLite, by statement (bench/market.py --count-sql).

Python imports `sitecustomize` at start-up from the path, so a hub started with this folder on
PYTHONPATH and DEPARROW_SQL_CENSUS=FILE counts every statement of every sqlite3 connection it
opens (through sqlite3's trace callback: literals and numbers folded, so one statement's calls
count together). SIGUSR1 writes the counts so far to FILE.<n> (n = 1, 2, ...), most frequent
first, as "count<TAB>statement" lines. Without DEPARROW_SQL_CENSUS it does nothing.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import sqlite3
from typing import Any

_FILE = os.environ.get("DEPARROW_SQL_CENSUS")

if _FILE:
    _counts: collections.Counter[str] = collections.Counter()
    _dumps = 0
    _connect = sqlite3.connect
    _literal = re.compile(r"'(?:[^']|'')*'")
    _number = re.compile(r"\b\d+(?:\.\d+)?(?:e[-+]?\d+)?\b")

    def _count(sql: str) -> None:
        _counts[_number.sub("N", _literal.sub("'?'", " ".join(sql.split())))] += 1

    def _traced(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = _connect(*args, **kwargs)
        conn.set_trace_callback(_count)
        return conn

    def _dump(_signum: int, _frame: Any) -> None:
        global _dumps
        _dumps += 1
        with open(f"{_FILE}.{_dumps}", "w", encoding="utf-8") as f:
            for sql, n in _counts.most_common():
                f.write(f"{n}\t{sql}\n")

    sqlite3.connect = _traced  # type: ignore[assignment]
    signal.signal(signal.SIGUSR1, _dump)

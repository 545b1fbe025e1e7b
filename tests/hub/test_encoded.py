"""The base64 of blobs that assignments carry, read and encoded once per blob (hub/market/jobs.py
Encoded), on a real store file."""

from __future__ import annotations

import base64
from pathlib import Path

from hub.market.jobs import Encoded
from hub.store.db import open_database
from hub.store.rows import Store


def test_a_blob_is_read_once_and_the_least_recently_used_go_first(tmp_path: Path) -> None:
    db = open_database(tmp_path / "hub.sqlite")
    store = Store(db)
    blobs = [b"\0asm" + bytes([65 + i]) * 96 for i in range(5)]  # 100 bytes: 136 characters
    digests = [store.put_blob(b) for b in blobs]
    encoded = Encoded(store, limit=4 * 136)  # room for four
    reads: list[str] = []
    db.conn.set_trace_callback(lambda sql: reads.append(sql) if "FROM blobs" in sql else None)

    def text(i: int) -> str:
        return base64.b64encode(blobs[i]).decode()

    assert encoded.get(digests[0]) == text(0)
    assert encoded.get(digests[0]) == text(0)
    assert len(reads) == 1  # the second from what is held
    for i in (1, 2, 3):
        assert encoded.get(digests[i]) == text(i)
    assert encoded.get(digests[0]) == text(0)  # now the most recently used
    assert encoded.get(digests[4]) == text(4)  # 1, the least recently used, goes
    assert encoded.held == 4 * 136
    reads.clear()
    assert [encoded.get(digests[i]) for i in (0, 2, 3, 4)] == [text(i) for i in (0, 2, 3, 4)]
    assert not reads
    assert encoded.get(digests[1]) == text(1) and len(reads) == 1

    assert encoded.get("0" * 64) is None  # no such blob: nothing held for it
    big = store.put_blob(b"x" * 200)  # over a quarter of the limit: encoded, not held
    assert encoded.get(big) == base64.b64encode(b"x" * 200).decode()
    assert big not in encoded._by_digest
    db.conn.set_trace_callback(None)
    db.close()

"""Several hub processes writing one PostgreSQL ledger at once (each its own connection, as
replicas are): the same idempotency keys from all of them move credits once, no wallet goes
below zero, and the books balance. Real server, real concurrency, no mocks."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

from deparrow.pgserver import LocalPostgres
from hub.ledger.ledger import Ledger
from hub.ledger.money import InsufficientFunds, LedgerError
from hub.store.db import open_database

WALLETS = [f"wallet:u{i}" for i in range(4)]
REPLICAS = 4
KEYS = 300


def test_replicas_posting_the_same_keys_move_credits_once(
    postgres_server: LocalPostgres,
) -> None:
    url = postgres_server.create_database("writers")
    setup = Ledger(open_database(url))
    setup.ensure_mint()
    for w in WALLETS:
        setup.open_account(w, "wallet", w.split(":")[1])
        setup.grant("g-" + w, w, 1_000, "grant")
    # The same plan on every replica, in its own order: each key names one transfer.
    plan = []
    rng = random.Random(3)
    for k in range(KEYS):
        src, dst = rng.sample(WALLETS, 2)
        plan.append((f"t{k}", src, dst, rng.randint(1, 60)))
    start = threading.Barrier(REPLICAS)

    def replica(seed: int) -> tuple[int, int]:
        ledger = Ledger(open_database(url))  # a connection of its own, as a process has
        order = plan[:]
        random.Random(seed).shuffle(order)
        moved = refused = 0
        start.wait()
        for key, src, dst, amount in order:
            try:
                entry = ledger.transfer(key, src, dst, amount, "test")
                moved += not entry.replayed
            except InsufficientFunds:
                refused += 1
            except LedgerError:
                refused += 1
        ledger.db.close()
        return moved, refused

    with ThreadPoolExecutor(REPLICAS) as pool:
        results = list(pool.map(replica, range(REPLICAS)))
    moved = sum(m for m, _ in results)
    rows = setup.db.query("SELECT idem_key, COUNT(*) AS n FROM entries GROUP BY idem_key")
    once = {r["idem_key"]: int(r["n"]) for r in rows}
    assert all(n == 1 for n in once.values())  # no key twice
    posted = sum(1 for key, *_ in plan if key in once)
    assert moved == posted  # what the replicas say they moved is what is in the books
    assert posted > KEYS // 2  # most moved; some may be refused for want of funds
    for w in WALLETS:
        assert setup.balance(w) >= 0
    assert sum(setup.balance(w) for w in WALLETS) == 4_000
    audit = setup.audit()
    assert audit.balanced, audit

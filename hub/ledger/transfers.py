"""Many transfers in one step: the set-based path the writer's group commit takes.

`transfer_many(ledger, requests)` gives each request the result `ledger.transfer` would have
given it, called once per request in order, and leaves the books as those calls would have
(the same entry ids, postings and balances), with a few statements for the whole list instead
of a savepoint and five statements per transfer.

Two ways, as `Ledger._post` has: the common case (new keys, known accounts, enough funds
everywhere) goes the optimistic way, which reads no account: every request is accepted in
Python, then each touched account gets ONE guarded UPDATE that applies its net change only if
every balance the account passes through on the way (in request order) keeps the ledger's
rules; those UPDATEs are run first, and when one changes no row (an unknown account, a wallet
running short, a closed hold receiving credits, a balance leaving int64) the attempt is undone
and the careful way runs instead: it reads every account once and applies the rules of
`_post_checked` in Python, request by request, so a refused transfer gets its own error and
the others still go through.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from hub.ledger.checks import check_transfer, memo_load, require_same, transfer_problem
from hub.ledger.money import INT64_MAX, Entry, Leg, TransferRequest, UnknownAccount
from hub.ledger.schema import (
    APPLY_NET_CHANGE,
    INSERT_ENTRY_WITH_ID,
    INSERT_ENTRY_WITH_ID_NO_MEMO,
    INSERT_POSTINGS,
    SELECT_ACCOUNTS_JSON,
    SELECT_ENTRIES_JSON,
    SET_BALANCE,
    NetChange,
    net_change,
)

if TYPE_CHECKING:
    from hub.ledger.ledger import Ledger

# (request index, key, reason, amount, legs, memo, memo as JSON, same_memo)
Checked = tuple[int, str, str, int, list[Leg], dict[str, Any] | None, str | None, bool]


class _TakeCarefulPath(Exception):
    """Internal: the optimistic attempt met something unusual; undo it, redo it carefully."""


def transfer_many(ledger: Ledger, requests: Sequence[TransferRequest]) -> list[Entry | Exception]:
    """See `Ledger.transfer_many`."""
    results: list[Any] = []  # an Entry or an exception per request, once decided
    checked: list[Checked] = []
    for i, r in enumerate(requests):
        try:
            legs, memo_json = check_transfer(r.idem_key, r.src, r.dst, r.amount, r.reason, r.memo)
        except Exception as e:
            results.append(e)
            continue
        results.append(None)
        checked.append((i, r.idem_key, r.reason, r.amount, legs, r.memo, memo_json, r.same_memo))
    if not checked:
        return results
    try:
        with ledger.db.transaction() as c:  # a savepoint when inside the writer's batch
            _optimistic(ledger, c, checked, results)
        return results
    except _TakeCarefulPath:
        pass
    with ledger.db.transaction() as c:
        _careful(ledger, c, checked, results)
    return results


def _known_entries(c: sqlite3.Connection, checked: list[Checked]) -> dict[str, Entry]:
    """The entries already stored under the requests' keys (replayed=True), by key."""
    known: dict[str, Entry] = {}
    keys = sorted({item[1] for item in checked})
    for row in c.execute(SELECT_ENTRIES_JSON, (json.dumps(keys),)):
        key = row[1]
        prior = known.get(key)
        leg = () if row[5] is None else ((str(row[5]), int(row[6])),)
        if prior is None:
            known[key] = Entry(
                id=int(row[0]),
                idem_key=str(key),
                reason=str(row[2]),
                legs=leg,
                created_at=float(row[4]),
                memo=memo_load(row[3]),
                replayed=True,
            )
        else:
            known[key] = replace(prior, legs=prior.legs + leg)
    return known


def _next_entry_id(c: sqlite3.Connection) -> int:
    top = c.execute("SELECT MAX(id) FROM entries").fetchone()[0]
    return 1 if top is None else int(top) + 1


def _replay(
    key: str,
    reason: str,
    legs: list[Leg],
    same: bool,
    memo_json: str | None,
    known: dict[str, Entry],
    fresh: dict[str, tuple[int, str, tuple[Leg, ...], str | None]],
    now: float,
) -> Entry | Exception | None:
    """The result for a key posted before (stored, or earlier in this call), else None."""
    existing = known.get(key)
    if existing is None and key in fresh:
        # Written earlier in this call: answer what the database would return for it. Kept
        # as a row until then; the Entry is built only for such a replay.
        entry_id, f_reason, f_legs, f_memo = fresh[key]
        existing = Entry(entry_id, key, f_reason, f_legs, now, memo_load(f_memo), replayed=True)
        known[key] = existing
    if existing is None:
        return None
    try:
        require_same(existing, reason, legs, same, memo_json)
    except Exception as e:
        return e
    return existing


def _insert_entries(
    c: sqlite3.Connection, rows: list[tuple[int, str, str, str | None, float]]
) -> None:
    """Insert entry rows (ids given); those without a memo bind no None (see schema.py)."""
    plain = [(i, key, reason, at) for i, key, reason, memo, at in rows if memo is None]
    if plain:
        c.executemany(INSERT_ENTRY_WITH_ID_NO_MEMO, plain)
    if len(plain) != len(rows):
        c.executemany(INSERT_ENTRY_WITH_ID, [row for row in rows if row[3] is not None])


def _optimistic(
    ledger: Ledger, c: sqlite3.Connection, checked: list[Checked], results: list[Any]
) -> None:
    """Accept every request that is not a replay, then let one guarded UPDATE per account
    confirm it; raise _TakeCarefulPath (the caller's savepoint undoes the writes) when one
    does not."""
    known = _known_entries(c, checked)
    next_id = _next_entry_id(c)
    if next_id + len(checked) > INT64_MAX:
        raise _TakeCarefulPath  # SQLite would pick random ids: the careful path goes slow
    now = ledger.clock()
    # account -> [net change, lowest and highest running change, receives credits]
    moves: dict[str, list[Any]] = {}
    entry_rows: list[tuple[int, str, str, str | None, float]] = []
    posting_rows: list[tuple[int, str, int]] = []
    fresh: dict[str, tuple[int, str, tuple[Leg, ...], str | None]] = {}
    for i, key, reason, amount, legs, memo, memo_json, same in checked:
        if key in known or key in fresh:
            results[i] = _replay(key, reason, legs, same, memo_json, known, fresh, now)
            continue
        (src, _), (dst, _) = legs
        m = moves.get(src)
        if m is None:
            moves[src] = [-amount, -amount, 0, False]
        else:
            m[0] -= amount
            if m[0] < m[1]:
                m[1] = m[0]
        m = moves.get(dst)
        if m is None:
            moves[dst] = [amount, 0, amount, True]
        else:
            m[0] += amount
            if m[0] > m[2]:
                m[2] = m[0]
            m[3] = True
        entry_id = next_id
        next_id += 1
        legs_t = tuple(legs)
        entry_rows.append((entry_id, key, reason, memo_json, now))
        posting_rows.append((entry_id, src, -amount))
        posting_rows.append((entry_id, dst, amount))
        results[i] = Entry(entry_id, key, reason, legs_t, now, memo, replayed=False)
        fresh[key] = (entry_id, reason, legs_t, memo_json)
    if not entry_rows:
        return
    changes: list[NetChange] = []
    for account in sorted(moves):
        params = net_change(account, *moves[account])
        if params is None:
            raise _TakeCarefulPath  # the careful way names the request that overflows
        changes.append(params)
    if c.executemany(APPLY_NET_CHANGE, changes).rowcount != len(changes):
        raise _TakeCarefulPath
    _insert_entries(c, entry_rows)
    c.executemany(INSERT_POSTINGS[1], posting_rows)


def _careful(
    ledger: Ledger, c: sqlite3.Connection, checked: list[Checked], results: list[Any]
) -> None:
    """Read every account once; apply the rules of `_post_checked` in Python, in request order
    (the same checks in the same order, so a refused request gets the same error); then write
    what was accepted."""
    accounts = sorted({a for item in checked for a, _ in item[4]})
    # account -> [kind, balance, closed hold]
    state: dict[str, list[Any]] = {
        row[0]: [row[1], int(row[2]), bool(row[3])]
        for row in c.execute(SELECT_ACCOUNTS_JSON, (json.dumps(accounts),))
    }
    known = _known_entries(c, checked)
    next_id = _next_entry_id(c)
    if next_id + len(checked) > INT64_MAX:  # SQLite would pick random ids: go slow
        for i, key, reason, _, legs, memo, memo_json, same in checked:
            try:
                results[i] = ledger._post_checked(key, reason, legs, memo, memo_json, same)
            except Exception as e:
                results[i] = e
        return
    now = ledger.clock()
    entry_rows: list[tuple[int, str, str, str | None, float]] = []
    posting_rows: list[tuple[int, str, int]] = []
    fresh: dict[str, tuple[int, str, tuple[Leg, ...], str | None]] = {}
    for i, key, reason, amount, legs, memo, memo_json, same in checked:
        if key in known or key in fresh:
            results[i] = _replay(key, reason, legs, same, memo_json, known, fresh, now)
            continue
        (src, _), (dst, _) = legs
        # The order of _post_checked: unknown accounts first, then each account's rules,
        # accounts sorted by id. The src side is the only one that can run short; the dst
        # side can overflow or be a closed hold.
        s_state = state.get(src)
        d_state = state.get(dst)
        if s_state is None or d_state is None:
            unknown = [a for a, st in ((src, s_state), (dst, d_state)) if st is None]
            results[i] = UnknownAccount(min(unknown))
            continue
        problem = transfer_problem(src, s_state, dst, d_state, amount)
        if problem is not None:
            results[i] = problem
            continue
        s_state[1] -= amount
        d_state[1] += amount
        entry_id = next_id
        next_id += 1
        legs_t = tuple(legs)
        entry_rows.append((entry_id, key, reason, memo_json, now))
        posting_rows.append((entry_id, src, -amount))
        posting_rows.append((entry_id, dst, amount))
        results[i] = Entry(entry_id, key, reason, legs_t, now, memo, replayed=False)
        fresh[key] = (entry_id, reason, legs_t, memo_json)
    if entry_rows:
        touched = {account for _, account, _ in posting_rows}
        _insert_entries(c, entry_rows)
        c.executemany(INSERT_POSTINGS[1], posting_rows)
        c.executemany(SET_BALANCE, [(state[a][1], a) for a in sorted(touched)])

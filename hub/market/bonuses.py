"""Bonuses from the mint: uptime for nodes that are there for the network, and referrals.

docs/economy.md ("Staying online", "Referral") states the rules with worked examples; the
amounts are in hub/ledger/economy.py. Both reward people, not accounts: an agent counts as
the person who owns it (Store.human_of), so one person's many agents or nodes earn one
person's bonus.
Called inside the market's transactions; no aiohttp, no MQTT.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

from hub.ledger import economy
from hub.ledger.ledger import Ledger
from hub.ledger.money import MICRO, wallet_id
from hub.store.db import Database
from hub.store.rows import Store


# A node's uptime, :gap ms more of availability ending on UTC day :day (accrue_uptime, and
# Bonuses.beat with the gap as an expression): the day's availability waits until the node
# has proved itself that day, then moves to uptime_ms; a gap of 0 moves nothing. The
# expressions read the row as it was (SQLite and PostgreSQL both evaluate SET against the
# old row).
def _uptime_sets(gap: str) -> str:
    return (
        f" uptime_pending_ms = CASE WHEN {gap} = 0 THEN uptime_pending_ms"
        "  WHEN proved_day = :day THEN 0"
        f"  WHEN uptime_day = :day THEN uptime_pending_ms + {gap} ELSE {gap} END,"
        f" uptime_ms = uptime_ms + CASE WHEN {gap} > 0 AND proved_day = :day THEN {gap}"
        "  + CASE uptime_day WHEN :day THEN uptime_pending_ms ELSE 0 END ELSE 0 END,"
        f" uptime_day = CASE WHEN {gap} = 0 THEN uptime_day ELSE :day END"
    )


# Bonuses.beat's statement, in three forms by what the node was doing before the beat (the
# caller read its row in this transaction): nothing of the uptime moves when it was not
# available or no time counts; idle, the gap counts; busy, it counts if the node holds work
# the hub gave it.


_HOLDS_WORK = "EXISTS (SELECT 1 FROM jobs WHERE node = :id AND state IN ('assigned', 'running'))"
_UPTIME = {
    "none": "",
    "idle": _uptime_sets(":gap") + ",",
    "busy": _uptime_sets(f"(CASE WHEN {_HOLDS_WORK} THEN :gap ELSE 0 END)") + ",",
}
_BEAT = (
    "UPDATE nodes SET{uptime}{sets} WHERE id = :id"
    " RETURNING uptime_ms, uptime_paid, (SELECT COUNT(*) FROM jobs WHERE node = :id"
    " AND state IN ('assigned', 'running') AND assigned_at <= :stale)"
)


class Bonuses:
    def __init__(
        self, db: Database, store: Store, ledger: Ledger, clock: Callable[[], float]
    ) -> None:
        self.db = db
        self.store = store
        self.ledger = ledger
        self.clock = clock

    def proved(self, node: sqlite3.Row, job_owner: str) -> None:
        """The node was paid for work for another person: that proves it real today. Its
        uptime of today becomes payable (docs/economy.md, "Staying online"); on its first such
        job, whoever referred its owner may be due a bonus."""
        if job_owner == node["owner"]:
            return  # a node proves nothing on its own owner's jobs (nor its person's, below)
        owner = self.store.human_of(str(node["owner"]))
        customer = self.store.human_of(job_owner)
        if customer == owner:
            return
        now = self.clock()
        day = economy.utc_day(now)
        c = self.db.conn
        first_today = c.execute(
            "UPDATE nodes SET proved_day = ?1, uptime_ms = uptime_ms + CASE uptime_day"
            " WHEN ?1 THEN uptime_pending_ms ELSE 0 END, uptime_pending_ms = 0, uptime_day = ?1"
            " WHERE id = ?2 AND proved_day != ?1",
            (day, node["id"]),
        )
        if first_today.rowcount == 1:  # the day's waiting availability is payable now
            self._pay_uptime(str(node["id"]), day)
        first = c.execute(
            "UPDATE nodes SET proved_at = ? WHERE id = ? AND proved_at IS NULL", (now, node["id"])
        )
        if first.rowcount == 1:
            self._referral_bonus(node, owner, customer)

    def _referral_bonus(self, node: sqlite3.Row, owner: str, customer: str) -> None:
        """+500 to whoever referred the node's person, when a node of theirs first proves real
        on a paid job of a third person: once per referred person, never to the node's own
        person, never on the referrer's own jobs (a referrer cannot buy the proof)."""
        user = self.store.user(owner)
        referrer = user["referred_by"] if user is not None else None
        if not referrer or self.store.user(referrer) is None:
            return
        if self.store.human_of(str(referrer)) in (owner, customer):
            return
        key = "referral:person:" + owner
        if self.ledger.entry(key) is not None:
            return  # this person's referral was paid, by an earlier node of theirs
        amount = economy.RATES.referral_credits * MICRO
        self.ledger.open_account(wallet_id(referrer), "wallet", referrer)
        self.ledger.grant(
            key,
            wallet_id(referrer),
            amount,
            f"referral bonus: {owner}'s node {node['id']} ran its first job",
        )

    def accrue_uptime(self, node_id: str, gap_ms: int, now: float | None = None) -> int:
        """Count gap_ms of a node's availability, ending at `now`. Availability of a UTC day
        is payable once the node has proved itself that day (a paid job for another person,
        `proved`); until then it waits, and a day that ends without proof pays nothing.
        Returns what was paid (µc)."""
        if gap_ms <= 0:
            return 0
        day = economy.utc_day(self.clock() if now is None else now)
        with self.db.transaction() as c:
            c.execute(
                f"UPDATE nodes SET{_uptime_sets(':gap')} WHERE id = :id",
                {"day": day, "gap": gap_ms, "id": node_id},
            )
            return self._pay_uptime(node_id, day)

    def beat(
        self,
        node_id: str,
        was: str,
        gap_ms: int,
        now: float,
        fields: dict[str, Any],
        stale_before: float,
    ) -> int:
        """A heartbeat's write, in one statement: the node's record (`fields`) and its uptime
        since the previous beat, which counts `gap_ms` if the node was available meanwhile
        (`was` idle, or busy with work the hub gave it: docs/economy.md, "Staying online"),
        as accrue_uptime counts it; the payout follows only when one is due. `was`: the
        node's state as its row said in this transaction. Returns how many jobs the hub gave
        the node before `stale_before` that it still holds (0 when the node is unknown)."""
        day = economy.utc_day(now)
        form = was if gap_ms > 0 and was in ("idle", "busy") else "none"
        sets = ", ".join(f"{k} = :{k}" for k in fields)
        params = {**fields, "id": node_id, "day": day, "gap": max(0, gap_ms), "stale": stale_before}
        with self.db.transaction() as c:  # the payout, when one is due, with the uptime
            row = c.execute(_BEAT.format(uptime=_UPTIME[form], sets=" " + sets), params).fetchone()
            if row is None:
                return 0
            if economy.uptime_due(int(row[0]), int(row[1])) >= economy.UPTIME_PAYOUT_MIN:
                self._pay_uptime(node_id, day)
            return int(row[2])

    def _pay_uptime(self, node_id: str, day: int) -> int:
        """Inside a transaction: pay the node's payable uptime once it is worth a payout, up to
        what its person may still earn today (the cap). The payout's key is what was settled
        before it, so a replay of the same step can never pay twice; what the cap cuts off is
        settled unpaid, not carried to another day."""
        node = self.store.node(node_id)
        assert node is not None
        due = economy.uptime_due(int(node["uptime_ms"]), int(node["uptime_paid"]))
        if due < economy.UPTIME_PAYOUT_MIN:
            return 0
        c = self.db.conn
        person = self.store.human_of(str(node["owner"]))
        row = c.execute(
            "SELECT paid FROM uptime_owner_day WHERE owner = ? AND day = ?", (person, day)
        ).fetchone()
        pay = max(0, min(due, economy.uptime_cap() - (int(row[0]) if row else 0)))
        if pay:
            self.ledger.open_account(wallet_id(node["owner"]), "wallet", node["owner"])
            self.ledger.grant(
                f"uptime:{node_id}:{node['uptime_paid']}",
                wallet_id(node["owner"]),
                pay,
                f"uptime of node {node_id}",
            )
            c.execute(
                "INSERT INTO uptime_owner_day (owner, day, paid) VALUES (?, ?, ?)"
                " ON CONFLICT (owner, day)"
                " DO UPDATE SET paid = uptime_owner_day.paid + excluded.paid",
                (person, day, pay),
            )
        c.execute(
            "UPDATE nodes SET uptime_paid = uptime_paid + ?, earned = earned + ? WHERE id = ?",
            (due, pay, node_id),
        )
        return pay

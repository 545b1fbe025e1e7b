"""Node reputation: a score in (0, 1) that the scheduler ranks idle nodes by.

A new node starts neutral (0.5). Good work moves the score a fraction of the way up towards 1,
bad work multiplies it down towards 0, so it stays bounded and recent conduct counts more than
old: a node cannot bank years of small jobs and then cheat cheaply. docs/economy.md has the
rule and a worked example; change both together.
"""

from __future__ import annotations

import sqlite3
from typing import Final

NEUTRAL: Final = 0.5
# At or above this a node is in good standing: the scheduler treats such nodes as equally
# suitable and lets them take turns (the one given a job longest ago first), so every honest
# node earns; below it (three lost jobs in a row, or one outvoted replica) a node gets work
# only when no node in good standing can take it, the most reputable first.
GOOD_STANDING: Final = 0.4

# event -> (weight, counter column). Gains: r + w * (1 - r). Losses: r * (1 - w).
GAINS: Final = {
    "completed": (0.02, "jobs_completed"),  # a job run to its end, paid
    "agreed": (0.05, "replicas_agreed"),  # a replica whose result the quorum confirmed
}
LOSSES: Final = {
    "dissented": (0.5, "replicas_dissented"),  # a replica the quorum outvoted: wrong output
    "lost": (0.1, "jobs_lost"),  # offline, restarted, silent or crashed with a job on it
}


def after(score: float, event: str) -> float:
    """The score after one event (the SQL below does the same in the database)."""
    if event in GAINS:
        return score + GAINS[event][0] * (1 - score)
    return score * (1 - LOSSES[event][0])


def assignment(event: str) -> tuple[str, float]:
    """The SET clause (with one `?`, the weight) that applies an event to a nodes row, so a
    caller can fold it into an UPDATE of its own."""
    if event in GAINS:
        w, column = GAINS[event]
        return f"reputation = reputation + ? * (1 - reputation), {column} = {column} + 1", w
    w, column = LOSSES[event]
    return f"reputation = reputation * (1 - ?), {column} = {column} + 1", w


def record(c: sqlite3.Connection, node_id: str, event: str) -> None:
    """Apply one event to a node, inside the caller's transaction (which moves the job's state
    too, so an event is counted once however often its message arrives)."""
    sql, w = assignment(event)
    c.execute(f"UPDATE nodes SET {sql} WHERE id = ?", (w, node_id))


def clear_loss(c: sqlite3.Connection, node_id: str) -> None:
    """Undo one "lost" event: the loss turned out to be the job's fault (it broke another
    node the same way, hub/market/jobs.py `_blame`). Division by the loss factor, kept below 1."""
    w, column = LOSSES["lost"]
    c.execute(
        f"UPDATE nodes SET reputation = MIN(reputation / (1 - ?), 0.999999),"
        f" {column} = MAX({column} - 1, 0) WHERE id = ?",
        (w, node_id),
    )

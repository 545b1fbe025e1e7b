"""Verification by replicas: what a result's hash is, and what k replicas decide.

A job with `verify: {replicas: k}` runs on k nodes of distinct owners. Each completed replica's
result is reduced to one hash; a strict majority of k with the same hash is the quorum, and its
result is the job's. Pure functions, no database: hub/market/jobs.py applies the decision.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass

MAX_REPLICAS = 5

# Failures that are the node's fault, not the job's: the job is retried on another node.
# (A trap, a timeout, a memory limit or an invalid module would happen anywhere.)
NODE_ERROR_KINDS = ("executor error", "docker engine error", "image not found")


def error_kind(error: str | None) -> str | None:
    """The kind of a result's `error`: what comes before its first colon, as every executor
    writes it (docs/protocol.md): "timeout: job exceeded its 10s limit" -> "timeout". The one
    parser the hub uses for them; None when there is no error."""
    if not error:
        return None
    return str(error).split(":", 1)[0].strip().lower()


def node_caused(error: str | None) -> bool:
    return error_kind(error) in NODE_ERROR_KINDS


def result_hash(exit_code: int, digest: str) -> str:
    """sha256 (hex) of `v1|<exit_code>|<digest>`, where digest is the signed output digest of
    the result message (stdout and returned values, docs/protocol.md). stderr and timings are
    left out: they may differ between honest nodes."""
    return hashlib.sha256(f"v1|{exit_code}|{digest}".encode()).hexdigest()


def quorum(k: int) -> int:
    """Results that must agree: a strict majority of k."""
    return k // 2 + 1


@dataclass(frozen=True)
class Decision:
    """What the replicas decide so far. `done` False: wait for the ones still running."""

    done: bool
    agreed_hash: str | None = None  # set when a quorum agrees
    reason: str | None = None  # set when no quorum is possible


def decide(k: int, hashes: list[str], failed: int, failure: str | None = None) -> Decision:
    """hashes: one per completed replica; failed: replicas that ended without a result.

    Decided once every replica has ended, or earlier when no quorum is possible any more
    (the rest could not make a majority even if they all agreed)."""
    need = quorum(k)
    pending = k - len(hashes) - failed
    groups = Counter(hashes).most_common()
    best, largest = groups[0] if groups else (None, 0)
    if pending > 0 and largest + pending >= need:
        return Decision(False)
    if largest >= need:
        return Decision(True, agreed_hash=best)
    return Decision(True, reason=no_quorum_reason(k, [n for _, n in groups], failed, failure))


def no_quorum_reason(k: int, groups: list[int], failed: int, failure: str | None) -> str:
    """Why k replicas decided nothing, e.g. 'no quorum: 3 replicas gave 3 different results'.
    groups: how many results agreed with each other, per distinct result."""
    results = sum(groups)
    if results == k and len(groups) == k:
        return f"no quorum: {k} replicas gave {k} different results"
    said = []
    if len(groups) == 1:
        said.append("1 gave a result" if results == 1 else f"{results} gave the same result")
    elif groups:
        said.append(f"{results} gave {len(groups)} different results")
    if failed:
        said.append(f"{failed} failed" + (f" ({failure})" if failure else ""))
    return f"no quorum: of {k} replicas, {' and '.join(said)}; {quorum(k)} had to agree"

"""The checks a movement passes before it is written, each raising the error it names.

`Ledger.post` and `Ledger.transfer` run them in a fixed order, and `transfer_many` repeats
that order in Python (`transfer_problem`), so a request refused in a batch gets the same
error it would have got alone.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from hub.ledger.money import (
    ACCOUNT_KINDS,
    INT64_MAX,
    MAX_AMOUNT,
    MINT,
    Entry,
    HoldError,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidAmount,
    LedgerError,
    Leg,
    SameAccount,
    check_amount,
    format_micro,
)


def require_same(
    existing: Entry,
    reason: str,
    legs: Sequence[Leg],
    same_memo: bool = False,
    memo: str | None = None,
) -> None:
    """Posting existing's key again is a replay of it, or IdempotencyConflict. With
    same_memo the memo (as memo_json writes it) must match too."""
    if existing.reason != reason:
        raise IdempotencyConflict(
            existing.idem_key, existing.id, f"reason {existing.reason!r}, not {reason!r}"
        )
    if sorted(existing.legs) != sorted(legs):
        raise IdempotencyConflict(existing.idem_key, existing.id, describe(existing))
    if same_memo and memo_json(existing.memo) != memo:
        raise IdempotencyConflict(
            existing.idem_key, existing.id, f"memo {existing.memo!r}, not {memo_load(memo)!r}"
        )


def transfer_problem(
    src: str, s_state: list[Any], dst: str, d_state: list[Any], amount: int
) -> Exception | None:
    """What `_post_checked` would raise for moving amount from src to dst, or None.

    The states are [kind, balance, closed hold]; the checks run per account sorted by id.
    """
    sides = [(src, s_state, -amount), (dst, d_state, amount)]
    if dst < src:
        sides.reverse()
    for account, (kind, balance, closed), change in sides:
        after = balance + change
        if kind != "mint" and after < 0:
            return InsufficientFunds(account, -change, balance)
        if abs(after) > INT64_MAX:
            return InvalidAmount(f"{account} would exceed the largest storable balance")
        if kind == "hold" and change > 0 and closed:
            return HoldError(f"{account} is closed; credits cannot be moved into it")
    return None


def describe(entry: Entry) -> str:
    moved = ", ".join(f"{account} {format_micro(amount)}" for account, amount in entry.legs)
    return f"{entry.reason!r}: {moved}"


def check_text(value: object, what: str, max_len: int) -> None:
    if not isinstance(value, str) or not value.strip():
        raise LedgerError(f"{what} must be a non-empty string")
    if len(value) > max_len:
        raise LedgerError(f"{what} is longer than {max_len} characters")


def check_transfer(
    idem_key: str, src: str, dst: str, amount: int, reason: str, memo: dict[str, Any] | None
) -> tuple[list[Leg], str | None]:
    """The checks of `transfer`, in its order: (legs, memo as JSON) or the first problem."""
    # The common case passes them all in one expression (the group commit checks thousands a
    # second); anything else goes through them one by one below, for the first problem.
    if (
        type(amount) is int
        and 0 < amount <= MAX_AMOUNT
        and src != dst
        and memo is None
        and type(idem_key) is str
        and type(reason) is str
        and type(src) is str
        and type(dst) is str
        and 0 < len(idem_key) <= 256
        and 0 < len(reason) <= 500
        and 0 < len(src) <= 200
        and 0 < len(dst) <= 200
        and not idem_key.isspace()
        and not reason.isspace()
        and not src.isspace()
        and not dst.isspace()
    ):
        return [(src, -amount), (dst, amount)], None
    check_positive(amount)
    if src == dst:
        raise SameAccount(f"cannot transfer from {src} to itself; choose another recipient")
    # The checks post() would make, spelled out for two legs (this is the hot path): a
    # positive amount within limits gives two non-zero legs that balance by construction.
    check_text(idem_key, "idempotency key", 256)
    check_text(reason, "reason", 500)
    check_text(src, "account id", 200)
    check_text(dst, "account id", 200)
    return [(src, -amount), (dst, amount)], memo_json(memo)


def check_positive(amount: object, what: str = "amount", allow_zero: bool = False) -> int:
    n = check_amount(amount, what)
    if n < 0 or (n == 0 and not allow_zero):
        raise InvalidAmount(f"{what} must be positive, got {format_micro(n)} credits")
    return n


def check_legs(legs: Sequence[Leg]) -> list[Leg]:
    clean: list[Leg] = []
    for leg in legs:
        if not isinstance(leg, tuple | list) or len(leg) != 2:
            raise LedgerError(f"a leg is an (account, amount) pair, not {leg!r}")
        account, amount = leg
        check_text(account, "account id", 200)
        if check_amount(amount, f"amount for {account}") == 0:
            raise InvalidAmount(f"a leg of 0 credits for {account} moves nothing; leave it out")
        clean.append((account, amount))
    if len(clean) < 2:
        raise LedgerError("an entry needs at least two legs (a debit and a credit)")
    total = sum(amount for _, amount in clean)
    if total != 0:
        raise LedgerError(f"entry is unbalanced: its legs sum to {format_micro(total)}, not 0")
    return clean


def check_account_id(account_id: object, kind: str) -> None:
    if kind not in ACCOUNT_KINDS:
        raise LedgerError(f"unknown account kind {kind!r}; use one of {', '.join(ACCOUNT_KINDS)}")
    check_text(account_id, "account id", 200)
    assert isinstance(account_id, str)
    if kind == "mint":
        if account_id != MINT:
            raise LedgerError(f"the mint account is {MINT!r}, not {account_id!r}")
    elif account_id != kind and not (
        account_id.startswith(kind + ":") and len(account_id) > len(kind) + 1
    ):
        raise LedgerError(f"a {kind} account id looks like '{kind}:<name>', not {account_id!r}")
    if kind in ("wallet", "hold") and account_id == kind:
        raise LedgerError(f"a {kind} account id needs a name: '{kind}:<name>'")


def memo_json(memo: dict[str, Any] | None) -> str | None:
    if memo is None:
        return None
    if not isinstance(memo, dict):
        raise LedgerError("memo must be a dict")
    try:
        return json.dumps(memo, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise LedgerError(f"memo must be JSON-serialisable: {e}") from None


def memo_load(text: object) -> dict[str, Any] | None:
    if text is None:
        return None
    value = json.loads(str(text))
    return value if isinstance(value, dict) else {"value": value}

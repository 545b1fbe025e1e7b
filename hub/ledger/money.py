"""Credits, accounts and what the ledger answers: the leaf of the ledger room.

Amounts are integer micro-credits (µc): `credits_to_micro` parses a decimal string exactly,
`format_micro` prints one back. Accounts are named by kind (`wallet:<user>`, `hold:<job>`,
the `mint`). A refused movement raises one of the LedgerError family, which the API layer
maps to statuses; a movement that happened is an Entry. Nothing here touches the database.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, NamedTuple

MICRO = 1_000_000  # micro-credits (µc) per credit
MAX_CREDITS = 10**12  # largest single amount, in credits; keeps every balance inside int64
MAX_AMOUNT = MAX_CREDITS * MICRO
INT64_MAX = 2**63 - 1  # the largest balance SQLite stores as an integer

MINT = "mint"
ACCOUNT_KINDS = ("wallet", "hold", "mint", "revenue")


# --- errors -------------------------------------------------------------------------------
class LedgerError(Exception):
    """A credit movement was refused; nothing was changed."""


class InvalidAmount(LedgerError):
    pass


class UnknownAccount(LedgerError):
    def __init__(self, account: str, message: str | None = None) -> None:
        self.account = account
        super().__init__(
            message or f"no account {account!r}; wallets are opened when their user is created"
        )


class InsufficientFunds(LedgerError):
    def __init__(self, account: str, needed: int, available: int) -> None:
        self.account = account
        self.needed = needed
        self.available = available
        self.shortfall = needed - available
        super().__init__(
            f"insufficient credits in {account}: need {format_micro(needed)},"
            f" have {format_micro(available)}, short by {format_micro(self.shortfall)}"
        )


class IdempotencyConflict(LedgerError):
    def __init__(self, idem_key: str, entry_id: int, detail: str) -> None:
        self.idem_key = idem_key
        self.entry_id = entry_id
        super().__init__(
            f"idempotency key {idem_key!r} was already used by entry #{entry_id} for a"
            f" different movement ({detail}); use a new key for a new movement"
        )


class SameAccount(LedgerError):
    pass


class HoldError(LedgerError):
    """A hold cannot be placed or closed as asked (closed already, wrong wallet, overpaid)."""


class TransferRequest(NamedTuple):
    """The arguments of one `Ledger.transfer`, for `Ledger.transfer_many`."""

    idem_key: str
    src: str
    dst: str
    amount: int
    reason: str
    memo: dict[str, Any] | None = None
    # A replay must carry the same memo too (a user's transfer, whose memo is part of what
    # they asked for); else the memo is descriptive and a replay may differ in it.
    same_memo: bool = False


# --- amounts ------------------------------------------------------------------------------
def check_amount(amount: object, what: str = "amount") -> int:
    """An amount of µc must be a plain int (bool and float are refused: floats are inexact)."""
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise InvalidAmount(
            f"{what} must be an integer number of micro-credits, not {type(amount).__name__}"
        )
    if abs(amount) > MAX_AMOUNT:
        raise InvalidAmount(f"{what} {amount} µc is over the limit of {MAX_CREDITS} credits")
    return amount


# A plain decimal in ASCII: what Decimal() would also take ("1_0", "+1", " 0.5 ", "1e3",
# "nan", digits of other scripts) is refused, so an amount means what it reads as.
_PLAIN_DECIMAL = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


def credits_to_micro(value: str | int | Decimal) -> int:
    """Parse credits exactly ("1.5" -> 1_500_000). Signed; callers decide whether < 0 is ok.
    A string must be a plain decimal: ASCII digits, an optional leading '-' and one '.'."""
    if isinstance(value, bool | float):
        raise InvalidAmount(
            f"credits must be given as a string or integer, not {type(value).__name__}"
            f" (write '1.5', not 1.5)"
        )
    if isinstance(value, int):
        d = Decimal(value)
    elif isinstance(value, Decimal):
        d = value
    elif isinstance(value, str):
        if len(value) > 64:
            raise InvalidAmount(f"an amount of credits has at most 64 characters, not {len(value)}")
        if not _PLAIN_DECIMAL.fullmatch(value):
            raise InvalidAmount(
                f"{value!r} is not a number of credits: write a plain decimal such as 2.5"
                " (digits 0-9, an optional '-' and '.', nothing else)"
            )
        try:
            d = Decimal(value)
        except InvalidOperation:  # not reached: the pattern is a subset of Decimal's syntax
            raise InvalidAmount(f"{value!r} is not a number of credits") from None
    else:
        raise InvalidAmount(f"credits must be a string or integer, not {type(value).__name__}")
    if not d.is_finite():
        raise InvalidAmount(f"{value!r} is not a finite number of credits")
    if d.copy_abs() > MAX_CREDITS:  # copy_abs is exact; abs() would round or overflow
        raise InvalidAmount(f"{value!r} credits is over the limit of {MAX_CREDITS} credits")
    # Exact integer arithmetic on the decimal's digits: no context rounding can hide a 7th
    # decimal, and the magnitude check above bounds the work.
    sign, digits, exponent = d.as_tuple()
    assert isinstance(exponent, int)
    coefficient = int("".join(map(str, digits)) or "0")
    shift = exponent + 6
    while shift < 0 and coefficient and coefficient % 10 == 0:
        coefficient //= 10
        shift += 1
    if shift < 0:
        if coefficient:
            raise InvalidAmount(
                f"{value!r} has more than 6 decimals; 0.000001 credit is the smallest unit"
            )
        return 0
    micro: int = coefficient * 10**shift
    return -micro if sign else micro


def format_micro(amount: int) -> str:
    """2_500_000 -> "2.5", 2777 -> "0.002777", 10_000_000 -> "10"."""
    sign = "-" if amount < 0 else ""
    whole, frac = divmod(abs(amount), MICRO)
    if not frac:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{frac:06d}".rstrip("0")


def wallet_id(owner: str) -> str:
    return "wallet:" + owner


def hold_id(job_id: str) -> str:
    return "hold:" + job_id


# --- records ------------------------------------------------------------------------------
Leg = tuple[str, int]


@dataclass(frozen=True)
class Entry:
    id: int
    idem_key: str
    reason: str
    legs: tuple[Leg, ...]
    created_at: float
    memo: dict[str, Any] | None = None
    replayed: bool = False  # True when the key had been posted before and nothing moved now


@dataclass(frozen=True)
class Hold:
    job_id: str
    account: str
    wallet: str
    placed: int  # everything ever moved into the hold
    balance: int  # what is still held
    closed_entry_id: int | None

    @property
    def closed(self) -> bool:
        return self.closed_entry_id is not None

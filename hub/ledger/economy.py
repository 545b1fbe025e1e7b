"""The credit rules in one place: what a job costs and what a node earns.

Amounts are integer micro-credits (1 credit = 1,000,000 µc). docs/economy.md explains each
rule with a worked example; change both together.
"""

from __future__ import annotations

from dataclasses import dataclass

from hub.ledger.money import MICRO

REVENUE = "revenue"  # the network's account: high-priority premiums, dissenting replicas' shares
SECONDS_PER_HOUR = 3600
MILLI = 1000  # CPU is specified in milli-CPUs (1000 = one CPU-equivalent)


@dataclass(frozen=True)
class Rates:
    cpu_credits_per_hour: int = 10  # paid to the node owner per CPU-equivalent hour
    gpu_credits_per_hour: int = 50
    uptime_credits_per_day: int = 100
    referral_credits: int = 500
    high_priority_multiplier: int = 2
    # Uptime paid to all the nodes of one person (their agents' nodes included) in one UTC day.
    uptime_cap_credits_per_person_day: int = 300


RATES = Rates()


def _cpu_cost(cpu_milli: int, seconds: int, rates: Rates) -> int:
    # Integer arithmetic, rounded down: 1 CPU for 1 s is 2777 µc at 10 credits/hour.
    return cpu_milli * seconds * rates.cpu_credits_per_hour * MICRO // (MILLI * SECONDS_PER_HOUR)


MS_PER_DAY = 86_400_000
# Uptime is paid out once a node has this much unpaid (a minute at the default rate), so the
# ledger sees a payout a minute per node rather than one per heartbeat.
UPTIME_PAYOUT_MIN_MS = 60_000


def uptime_due(uptime_ms: int, paid: int, rates: Rates = RATES) -> int:
    """Uptime pay owed: all availability so far at the daily rate, less what was paid.

    Computed from totals rather than per beat, so rounding never loses or adds a micro-credit
    however the availability is sliced."""
    earned = uptime_ms * rates.uptime_credits_per_day * MICRO // MS_PER_DAY
    return max(0, earned - paid)


def counted_gap_ms(gap_ms: int, offline_after_ms: int) -> int:
    """A heartbeat pays for the time since the previous one, unless the node was silent long
    enough to be offline: gaps don't pay."""
    return gap_ms if 0 <= gap_ms <= offline_after_ms else 0


SECONDS_PER_DAY = 86_400


def utc_day(now: float) -> int:
    """The UTC day a moment falls in (days since 1970-01-01): uptime's proof period."""
    return int(now // SECONDS_PER_DAY)


def uptime_cap(rates: Rates = RATES) -> int:
    """The most uptime pay one person's nodes earn in one UTC day (µc)."""
    return rates.uptime_cap_credits_per_person_day * MICRO


# The same threshold in micro-credits (69,444 µc at 100 credits/day).
UPTIME_PAYOUT_MIN = max(1, uptime_due(UPTIME_PAYOUT_MIN_MS, 0))


def _gpu_cost(gpus: int, seconds: int, rates: Rates) -> int:
    return gpus * seconds * rates.gpu_credits_per_hour * MICRO // SECONDS_PER_HOUR


def gpu_pay(gpus: int, wall_ms: int, timeout_s: int, rates: Rates = RATES) -> int:
    """+50 credits per GPU-hour while a GPU job runs (pro rata by the started second)."""
    return _gpu_cost(gpus, billable_seconds(wall_ms, timeout_s), rates)


def billable_seconds(wall_ms: int, timeout_s: int) -> int:
    """Pro rata by the second: started seconds count, never beyond the job's timeout."""
    seconds = max(1, -(-wall_ms // 1000))
    return min(seconds, timeout_s)


def node_pay(
    cpu_milli: int, wall_ms: int, timeout_s: int, rates: Rates = RATES, gpus: int = 0
) -> int:
    """What the node owner earns for running a job that used wall_ms of its time: the CPU it
    was given at the CPU rate, and each GPU it was given at the GPU rate. Each part is rounded
    down on its own, so a GPU job pays exactly its CPU part plus gpu_pay()."""
    seconds = billable_seconds(wall_ms, timeout_s)
    return _cpu_cost(cpu_milli, seconds, rates) + _gpu_cost(gpus, seconds, rates)


def job_charge(
    cpu_milli: int,
    wall_ms: int,
    timeout_s: int,
    priority: str,
    rates: Rates = RATES,
    gpus: int = 0,
) -> int:
    """What the submitter pays for actual use (high priority costs more)."""
    mult = rates.high_priority_multiplier if priority == "high" else 1
    return node_pay(cpu_milli, wall_ms, timeout_s, rates, gpus) * mult


def max_price(
    cpu_milli: int, timeout_s: int, priority: str, rates: Rates = RATES, gpus: int = 0
) -> int:
    """The hold placed at submission: the charge if the job ran for its whole timeout."""
    return job_charge(cpu_milli, timeout_s * 1000, timeout_s, priority, rates, gpus)


def period_price(
    cpu_milli: int, period_s: int, priority: str, rates: Rates = RATES, gpus: int = 0
) -> int:
    """A service job's charge for one whole billing period (and what is held for the next)."""
    return job_charge(cpu_milli, period_s * 1000, period_s, priority, rates, gpus)

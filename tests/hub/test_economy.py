"""The pricing rules, in micro-credits (see docs/economy.md)."""

from __future__ import annotations

from hub.ledger import economy
from hub.ledger.money import MICRO


def test_one_cpu_hour_pays_ten_credits() -> None:
    assert economy.node_pay(1000, 3600 * 1000, 3600) == 10 * MICRO


def test_pro_rata_by_started_second() -> None:
    one = economy.node_pay(1000, 1, 60)
    assert one == economy.node_pay(1000, 1000, 60) == 2777  # 10e6 / 3600, rounded down
    assert economy.node_pay(1000, 1001, 60) == 5555
    assert economy.node_pay(500, 1000, 60) == 1388  # half a CPU


def test_billing_never_exceeds_the_timeout_or_the_hold() -> None:
    hold = economy.max_price(2000, 30, "normal")
    assert economy.job_charge(2000, 10**9, 30, "normal") == hold
    for ms in (0, 1, 999, 29_999, 30_000, 31_000):
        assert economy.job_charge(2000, ms, 30, "high") <= economy.max_price(2000, 30, "high")


def test_high_priority_costs_double() -> None:
    assert economy.max_price(1000, 60, "high") == 2 * economy.max_price(1000, 60, "normal")

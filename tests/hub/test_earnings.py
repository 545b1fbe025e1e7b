"""Earning rules beyond running jobs: uptime from heartbeats, referral bonus (real SQLite)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from edge import protocol
from hub import economy
from hub.app import Services, open_services
from hub.config import HubConfig
from hub.jobs import wallet_of
from hub.ledger import MICRO
from hub.models import JobSpec


@pytest.fixture
def services(tmp_path: Path) -> Services:
    return open_services(HubConfig(data_dir=tmp_path, welcome_grant_credits=10))


def add_node(s: Services, owner: str) -> Any:
    token, _ = s.store.create_enrollment_token(owner, 60)
    node_id, _ = s.store.create_node(
        token=token, owner=owner, name="n", engines=["wasm"], arch="x", cpu=2, memory_mb=512,
        mqtt_password="pw",
    )  # fmt: skip
    s.store.update_node(node_id, state="idle", last_seen=1.0)
    return s.store.node(node_id)


def run_job(s: Services, submitter: str, node: Any) -> None:
    spec = msgspec.convert(
        {"engine": {"type": "wasm", "module": "example:fib", "entrypoint": "fib"}}, JobSpec
    )
    job = s.jobs.submit(submitter, spec)
    assignment = s.jobs.assign(job, node["id"])
    assert assignment is not None
    msg = protocol.result(node["id"], node["secret"], job["id"], 1, {
        "status": "completed", "exit_code": 0, "stdout": b"", "returns": [1], "error": None,
        "wall_ms": 10, "cpu_ms": 10})  # fmt: skip
    assert s.jobs.on_result(node["id"], msg) == "settled"


def balance(s: Services, user: str) -> int:
    return s.ledger.balance(wallet_of(user))


def test_uptime_pays_100_credits_per_day_pro_rata(services: Services) -> None:
    owner, _, _ = services.create_user("owner", "user")
    node = add_node(services, owner)
    start = balance(services, owner)
    assert services.jobs.accrue_uptime(node["id"], 30_000) == 0  # under a minute: accrues
    paid = services.jobs.accrue_uptime(node["id"], 30_000)
    assert paid == 69_444  # 60 s of 100 credits/day, rounded down
    for _ in range(1439):  # the rest of the day, a minute at a time
        services.jobs.accrue_uptime(node["id"], 60_000)
    assert balance(services, owner) - start == 100 * MICRO  # exact: no rounding drift
    assert services.ledger.audit().balanced


def test_gaps_do_not_pay() -> None:
    assert economy.counted_gap_ms(1_000, 15_000) == 1_000
    assert economy.counted_gap_ms(15_001, 15_000) == 0
    assert economy.counted_gap_ms(-5, 15_000) == 0


def test_referral_paid_once_when_the_referred_node_proves_real(services: Services) -> None:
    alice, _, _ = services.create_user("alice", "user")
    bob, _, _ = services.create_user("bob", "user", referred_by=alice)
    carol, _, _ = services.create_user("carol", "user")
    assert balance(services, alice) == 10 * MICRO  # nothing at sign-up
    node = add_node(services, bob)
    run_job(services, carol, node)
    assert balance(services, alice) == 510 * MICRO
    run_job(services, carol, node)  # a second job: no second bonus
    assert balance(services, alice) == 510 * MICRO
    history = services.ledger.history(wallet_of(alice))
    assert history[0].reason.startswith("referral bonus: node " + node["id"])
    assert services.ledger.audit().balanced


def test_no_referral_without_a_referrer(services: Services) -> None:
    bob, _, _ = services.create_user("bob", "user")
    carol, _, _ = services.create_user("carol", "user")
    run_job(services, carol, add_node(services, bob))
    assert services.ledger.audit().by_kind["mint"] == -20 * MICRO  # only the welcome grants


def test_gpu_rule() -> None:
    assert economy.gpu_pay(1, 3_600_000, 3600) == 50 * MICRO
    assert economy.gpu_pay(2, 1_000, 60) == 2 * 50 * MICRO // 3600

"""Earning rules beyond running jobs: uptime from heartbeats, referral bonus (real SQLite)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from edge.core import protocol
from hub.api.services import Services
from hub.app import open_services
from hub.config import HubConfig
from hub.ledger import economy
from hub.ledger.money import MICRO
from hub.market.jobs import wallet_of
from hub.market.spec import JobSpec
from tests.hub.conftest import db_url

pytestmark = pytest.mark.both_stores


@pytest.fixture
def services(tmp_path: Path, store: str | Path) -> Services:
    return open_services(
        HubConfig(data_dir=tmp_path, db_url=db_url(store), welcome_grant_credits=10)
    )


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


DAY = 86_400
T0 = 20_000 * DAY  # midnight UTC, some day in 2024: days are UTC days


def prove(s: Services, node: Any, at: float, customer: str) -> None:
    """The node completes a paid job for `customer` at time `at`."""
    s.jobs.clock = lambda: at
    run_job(s, customer, node)


def test_uptime_pays_100_credits_per_day_pro_rata(services: Services) -> None:
    owner, _, _ = services.create_user("owner", "user")
    carol, _, _ = services.create_user("carol", "user")
    node = add_node(services, owner)
    prove(services, node, T0 + 1, carol)  # the node has proved itself today
    start = balance(services, owner)
    assert services.jobs.accrue_uptime(node["id"], 30_000, T0 + 30) == 0  # under a minute
    paid = services.jobs.accrue_uptime(node["id"], 30_000, T0 + 60)
    assert paid == 69_444  # 60 s of 100 credits/day, rounded down
    for minute in range(2, 1441):  # the rest of the day, a minute at a time
        services.jobs.accrue_uptime(node["id"], 60_000, T0 + 60 * minute - 1)
    assert balance(services, owner) - start == 100 * MICRO  # exact: no rounding drift
    assert services.ledger.audit().balanced


def test_a_day_without_proof_pays_no_uptime(services: Services) -> None:
    owner, _, _ = services.create_user("owner", "user")
    carol, _, _ = services.create_user("carol", "user")
    node = add_node(services, owner)
    start = balance(services, owner)
    for minute in range(1, 1441):  # a whole idle day, and nobody gave it work
        assert services.jobs.accrue_uptime(node["id"], 60_000, T0 + 60 * minute - 1) == 0
    assert balance(services, owner) == start
    # Next day: two idle hours wait, then a job for carol proves the node and pays them.
    for minute in range(1, 121):
        services.jobs.accrue_uptime(node["id"], 60_000, T0 + DAY + 60 * minute)
    assert balance(services, owner) == start
    prove(services, node, T0 + DAY + 7300, carol)
    uptime = balance(services, owner) - start - economy.node_pay(1000, 10, 10)
    assert uptime == economy.uptime_due(2 * 3600 * 1000, 0)  # the two hours, not the day before
    row = services.store.node(node["id"])
    assert row["uptime_ms"] == 2 * 3600 * 1000 and row["uptime_pending_ms"] == 0


def test_jobs_for_your_own_person_prove_nothing(services: Services) -> None:
    owner, _, _ = services.create_user("owner", "user")
    agent, _ = services.agents.create_agent(owner, "helper", 5 * MICRO)
    node = add_node(services, owner)
    prove(services, node, T0 + 1, agent)  # owner's own agent bought the "proof"
    start = balance(services, owner)
    services.jobs.accrue_uptime(node["id"], 3_600_000, T0 + 3600)
    assert balance(services, owner) == start


def test_uptime_is_capped_per_person_per_day_agents_included(services: Services) -> None:
    owner, _, _ = services.create_user("owner", "user")
    carol, _, _ = services.create_user("carol", "user")
    services.ledger.grant("extra:carol", wallet_of(carol), 100 * MICRO, "test funds")
    agent, _ = services.agents.create_agent(owner, "fleet")
    nodes = [add_node(services, owner) for _ in range(3)]
    nodes += [add_node(services, agent) for _ in range(3)]  # the agent's nodes are owner's
    for node in nodes:
        prove(services, node, T0 + 1, carol)
    start = balance(services, owner) + balance(services, agent)
    for minute in range(1, 1441):
        for node in nodes:
            services.jobs.accrue_uptime(node["id"], 60_000, T0 + 60 * minute - 1)
    earned = balance(services, owner) + balance(services, agent) - start
    assert earned == economy.uptime_cap() == 300 * MICRO  # six nodes' day would be 600
    # The next day the cap starts afresh.
    for node in nodes:
        prove(services, node, T0 + DAY + 1, carol)
    services.jobs.accrue_uptime(nodes[0]["id"], 3_600_000, T0 + DAY + 3600)
    assert balance(services, owner) + balance(services, agent) - start > earned
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
    assert history[0].reason == f"referral bonus: {bob}'s node {node['id']} ran its first job"
    assert services.ledger.audit().balanced


def test_referral_cannot_be_farmed_with_many_nodes_or_the_referrers_own_jobs(
    services: Services,
) -> None:
    alice, _, _ = services.create_user("alice", "user")
    bob, _, _ = services.create_user("bob", "user", referred_by=alice)
    carol, _, _ = services.create_user("carol", "user")
    services.ledger.grant("extra:alice", wallet_of(alice), 100 * MICRO, "test funds")
    alice_agent, _ = services.agents.create_agent(alice, "buyer", 50 * MICRO)
    bob_agent, _ = services.agents.create_agent(bob, "farm")
    start = balance(services, alice)
    # The referrer buying the proof, herself or through her agent, pays nothing.
    run_job(services, alice, add_node(services, bob))
    run_job(services, alice_agent, add_node(services, bob))
    assert balance(services, alice) < start  # she paid for the jobs, earned no bonus
    # Many nodes of bob's, his agents' included: one bonus for one referred person.
    for _ in range(3):
        run_job(services, carol, add_node(services, bob))
        run_job(services, carol, add_node(services, bob_agent))
    bonuses = [e for e in services.ledger.history(wallet_of(alice)) if "referral" in e.reason]
    assert len(bonuses) == 1
    assert services.ledger.audit().balanced


def test_no_referral_without_a_referrer(services: Services) -> None:
    bob, _, _ = services.create_user("bob", "user")
    carol, _, _ = services.create_user("carol", "user")
    run_job(services, carol, add_node(services, bob))
    assert services.ledger.audit().by_kind["mint"] == -20 * MICRO  # only the welcome grants


def test_gpu_rule() -> None:
    assert economy.gpu_pay(1, 3_600_000, 3600) == 50 * MICRO
    assert economy.gpu_pay(2, 1_000, 60) == 2 * 50 * MICRO // 3600


def test_the_docs_uptime_numbers_are_the_rules() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "economy.md").read_text()
    section = doc.split("## Staying online", 1)[1].split("\n## ", 1)[0]
    assert economy.uptime_due(2 * 3600 * 1000, 0) == 8_333_333 and "8,333,333 µc" in section
    assert economy.UPTIME_PAYOUT_MIN == 69_444 and "69,444 µc" in section
    cap = economy.RATES.uptime_cap_credits_per_person_day
    assert economy.uptime_cap() == cap * MICRO and f"{cap} credits of uptime per UTC day" in section

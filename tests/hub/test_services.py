"""Service jobs: long-running, billed per period (an hour), stopped when the wallet runs dry.

Real SQLite and the real job lifecycle; time is driven by passing `now` to bill_services and
by moving a job's period start back, never by sleeping.
"""

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
from hub.market.errors import JobError
from hub.market.jobs import wallet_of
from hub.market.spec import JobSpec
from tests.hub.conftest import db_url
from tests.hub.test_earnings import add_node

pytestmark = pytest.mark.both_stores

HOUR = 3600
PRICE = 10 * MICRO  # one CPU for one hour


@pytest.fixture
def services(tmp_path: Path, store: str | Path) -> Services:
    return open_services(
        HubConfig(data_dir=tmp_path, db_url=db_url(store), welcome_grant_credits=25)
    )


def service_spec(**over: Any) -> JobSpec:
    raw = {
        "type": "service",
        "engine": {"type": "wasm", "module": "example:loop", "entrypoint": "_start"},
        "timeout": 5 * 86400,
        **over,
    }
    return msgspec.convert(raw, JobSpec)


def start_service(s: Services, owner: str, node: Any, **over: Any) -> Any:
    job = s.jobs.submit(owner, service_spec(**over))
    assert s.jobs.assign(job, node["id"]) is not None
    running = {"job_id": job["id"], "attempt": 1, "state": protocol.RUNNING}
    assert s.jobs.on_event(node["id"], running)
    row = s.store.job(job["id"])
    assert row is not None and row["period_start"] is not None
    return row


def balance(s: Services, user: str) -> int:
    return s.ledger.balance(wallet_of(user))


def rewind(s: Services, job_id: str, seconds: float) -> None:
    """Pretend the current period began `seconds` earlier."""
    with s.db.transaction() as c:
        c.execute(
            "UPDATE jobs SET period_start = period_start - ?1, assigned_at = assigned_at - ?1,"
            " started_at = started_at - ?1 WHERE id = ?2",
            (seconds, job_id),
        )


def test_a_service_holds_one_hour_ahead_not_its_lifetime(services: Services) -> None:
    agent, _, _ = services.create_user("agent", "agent")
    job = services.jobs.submit(agent, service_spec())
    assert int(job["hold"]) == PRICE  # a week-long lifetime, one hour held
    assert balance(services, agent) == 25 * MICRO - PRICE
    other, _, _ = services.create_user("other", "agent")
    high = services.jobs.submit(other, service_spec(priority="high"))
    assert int(high["hold"]) == 2 * PRICE  # high priority costs 2x
    short = services.jobs.submit(other, service_spec(timeout=600))
    assert int(short["hold"]) == economy.max_price(1000, 600, "normal")  # lifetime < an hour


def test_each_hour_is_paid_to_the_node_owner_once(services: Services) -> None:
    owner, _, _ = services.create_user("owner", "user")
    agent, _, _ = services.create_user("agent", "agent")
    services.ledger.grant("test:top-up", wallet_of(agent), 100 * MICRO, "test funds")
    node = add_node(services, owner)
    job = start_service(services, agent, node)
    start = float(job["period_start"])
    owner0, agent0 = balance(services, owner), balance(services, agent)

    assert services.jobs.bill_services(now=start + HOUR - 1) == []  # not an hour yet
    assert balance(services, owner) == owner0

    assert services.jobs.bill_services(now=start + 2.5 * HOUR) == []  # two whole hours
    assert balance(services, owner) == owner0 + 2 * PRICE
    assert balance(services, agent) == agent0 - 2 * PRICE  # and the third hour is held
    assert services.ledger.held_for(wallet_of(agent)) == PRICE
    row = services.store.job(job["id"])
    assert row is not None
    assert row["periods_billed"] == 2 and int(row["cost"]) == 2 * PRICE
    assert float(row["period_start"]) == start + 2 * HOUR
    assert int(services.store.node(node["id"])["earned"]) == 2 * PRICE

    # The same moment again, or a second sweep: nothing moves twice.
    assert services.jobs.bill_services(now=start + 2.5 * HOUR) == []
    assert balance(services, owner) == owner0 + 2 * PRICE
    view = services.jobs.view(row)
    assert view["billing"]["periods_billed"] == 2
    assert view["billing"]["period_price"] == "10"
    assert services.ledger.audit().balanced


def test_a_service_stops_when_the_wallet_cannot_hold_the_next_hour(services: Services) -> None:
    owner, _, _ = services.create_user("owner", "user")
    agent, _, _ = services.create_user("agent", "agent")  # 25 credits: two hours and a half
    node = add_node(services, owner)
    job = start_service(services, agent, node)
    start = float(job["period_start"])

    stopped = services.jobs.bill_services(now=start + 5 * HOUR)
    assert stopped == [(node["id"], job["id"], 1)]  # the bridge sends the node a cancel
    row = services.store.job(job["id"])
    assert row is not None and row["state"] == "cancelled"
    assert "stopped after 2 paid period(s)" in row["reason"]
    assert "wallet has 5" in row["reason"]
    assert int(row["cost"]) == 2 * PRICE
    assert balance(services, agent) == 5 * MICRO  # 25 - two hours; nothing left held
    assert services.ledger.held_for(wallet_of(agent)) == 0
    assert services.jobs.bill_services(now=start + 9 * HOUR) == []  # stopped stays stopped
    assert services.ledger.audit().balanced


def test_cancel_pays_the_started_seconds_of_the_current_hour(services: Services) -> None:
    owner, _, _ = services.create_user("owner", "user")
    agent, _, _ = services.create_user("agent", "agent")
    node = add_node(services, owner)
    job = start_service(services, agent, node)
    owner0 = balance(services, owner)
    rewind(services, job["id"], HOUR + 1800)  # an hour and a half ago
    services.jobs.bill_services()
    assert balance(services, owner) == owner0 + PRICE

    row, tell = services.jobs.cancel(agent, job["id"], is_admin=False)
    assert tell == node["id"] and row["state"] == "cancelled"
    half = balance(services, owner) - owner0 - PRICE
    # About half an hour (a second or two of test time on top), pro rata by the second.
    assert economy.node_pay(1000, 1800_000, HOUR) <= half <= economy.node_pay(1000, 1810_000, HOUR)
    assert int(row["cost"]) == PRICE + half
    assert services.ledger.held_for(wallet_of(agent)) == 0
    # A repeated cancel changes nothing.
    services.jobs.cancel(agent, job["id"], is_admin=False)
    assert balance(services, owner) == owner0 + PRICE + half
    assert services.ledger.audit().balanced


def test_a_service_that_ends_settles_its_last_partial_hour(services: Services) -> None:
    owner, _, _ = services.create_user("owner", "user")
    agent, _, _ = services.create_user("agent", "agent")
    node = add_node(services, owner)
    job = start_service(services, agent, node)
    rewind(services, job["id"], 600)  # ran ten minutes
    agent0 = balance(services, agent)
    outcome = {"status": "completed", "exit_code": 0, "stdout": b"bye\n", "returns": None,
               "error": None, "wall_ms": 600_000, "cpu_ms": 5}  # fmt: skip
    msg = protocol.result(node["id"], node["secret"], job["id"], 1, outcome)
    assert services.jobs.on_result(node["id"], msg) == "settled"
    assert services.jobs.on_result(node["id"], msg) == "ignored: job already completed"
    row = services.store.job(job["id"])
    assert row is not None and row["state"] == "completed"
    ten_minutes = economy.node_pay(1000, 600_000, HOUR)
    assert int(row["cost"]) == ten_minutes
    assert balance(services, agent) == agent0 + PRICE - ten_minutes  # the rest came back
    assert services.ledger.audit().balanced


def test_a_failed_service_keeps_what_it_paid_and_refunds_the_current_hour(
    services: Services,
) -> None:
    owner, _, _ = services.create_user("owner", "user")
    agent, _, _ = services.create_user("agent", "agent")
    node = add_node(services, owner)
    job = start_service(services, agent, node)
    rewind(services, job["id"], HOUR + 60)
    services.jobs.bill_services()
    outcome = {"status": "failed", "exit_code": None, "stdout": b"", "returns": None,
               "error": "trap: unreachable", "wall_ms": 3_660_000, "cpu_ms": 5}  # fmt: skip
    msg = protocol.result(node["id"], node["secret"], job["id"], 1, outcome)
    assert services.jobs.on_result(node["id"], msg) == "refunded"
    row = services.store.job(job["id"])
    assert row is not None and row["state"] == "failed" and int(row["cost"]) == PRICE
    assert services.ledger.held_for(wallet_of(agent)) == 0
    assert balance(services, agent) == 25 * MICRO - PRICE
    assert services.ledger.audit().balanced


def test_a_service_whose_node_goes_silent_is_requeued_by_the_sweep(services: Services) -> None:
    owner, _, _ = services.create_user("owner", "user")
    agent, _, _ = services.create_user("agent", "agent")
    node = add_node(services, owner)
    job = start_service(services, agent, node)
    started = float(job["period_start"])
    services.store.update_node(node["id"], last_seen=started + 1800)  # then silence
    now = started + 1800 + services.scheduler.offline_after_s() + 1
    services.jobs.clock = lambda: now
    assert services.scheduler.sweep(now=now) == [node["id"]]
    row = services.store.job(job["id"])
    assert row is not None and row["state"] == "queued" and row["period_start"] is None
    assert row["queued_at"] == now  # its wait in the queue starts again
    [lost] = services.jobs.attempts.of_job(job["id"])
    assert lost["outcome"] == "lost" and lost["pay"] == 0  # the half hour is not paid
    # Not running: nothing is billed, however long it waits.
    assert services.jobs.bill_services(now=started + 10 * HOUR) == []
    assert services.ledger.held_for(wallet_of(agent)) == PRICE
    assert services.ledger.audit().balanced


def test_service_lifetime_limit_is_checked(services: Services) -> None:
    agent, _, _ = services.create_user("agent", "agent")
    too_long = services.config.max_service_s + 1
    with pytest.raises(JobError, match="limit for a service's lifetime"):
        services.jobs.submit(agent, service_spec(timeout=too_long))
    with pytest.raises(JobError, match="over the hub's 86400s limit"):
        services.jobs.submit(agent, service_spec(type="batch", timeout=2 * 86400))
    assert balance(services, agent) == 25 * MICRO  # nothing held for refused jobs

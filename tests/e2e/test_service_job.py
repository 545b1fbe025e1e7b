"""A service job on a real node, billed per period as it runs (periods of 2 s here instead of
an hour), then cancelled: the node stops it and the books balance."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from tests.conftest import start_hub, start_node, wait_until


def test_a_service_is_billed_each_period_while_it_runs(tmp_path: Path) -> None:
    hub = start_hub(tmp_path, extra=("--service-period", "2"))
    try:
        _, owner = hub.user("owner")
        _, agent = hub.user("agent")
        node = start_node(hub, owner, tmp_path)
        owner0 = Decimal(owner.wallet()["balance"])
        spec = {
            "type": "service",
            "name": "a-service",
            "engine": {"type": "wasm", "module": "example:loop"},
            "timeout": 600,
        }
        job_id = agent.submit(spec)["id"]

        def billed_twice() -> bool:
            job = agent.job(job_id)
            assert job["state"] in ("queued", "assigned", "running"), job
            return bool(job["billing"] and job["billing"]["periods_billed"] >= 2)

        wait_until("two billed periods", billed_twice, 60, [node, hub.proc])
        job = agent.cancel(job_id)
        assert job["state"] == "cancelled"
        wait_until(
            "the node to stop the service and be idle again",
            lambda: owner.nodes()[0]["state"] == "idle" and not owner.nodes()[0]["running"],
            30,
            [node],
        )
        job = agent.job(job_id)
        periods = job["billing"]["periods_billed"]
        # Each whole period of one CPU: 2 s x 10 credits/hour = 0.005555 credits.
        per_period = Decimal(job["billing"]["period_price"])
        assert per_period == Decimal("0.005555")
        cost = Decimal(job["cost"])
        assert periods * per_period <= cost <= (periods + 1) * per_period
        # All of it to the node's owner (plus uptime pay, should the test take over a minute).
        earned = Decimal(owner.wallet()["balance"]) - owner0
        assert cost <= earned < cost + Decimal("0.2")
        assert Decimal(agent.wallet()["held"]) == 0
        assert hub.admin.audit()["balanced"]
        node.stop()
    finally:
        hub.stop()

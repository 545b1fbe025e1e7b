"""The agent SDK (deparrow.agent) against a real hub process, its own Mosquitto and a real node:
a seller serves a Wasm-backed service, a buyer finds and calls it, and an agent living as a
service job runs until it is broke and is stopped, with its owner told."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import pytest

from deparrow import Agent, AuthError, CallFailed, DeparrowError, InsufficientCredits, NotFound
from deparrow.examples.runner import live_until_broke
from deparrow.examples.seller import sell_fib
from deparrow.localnet import LocalHub
from tests.conftest import ROOT, require_mosquitto, start_hub, start_node


def test_sdk_round_trip_seller_serves_and_buyer_calls(tmp_path: Path) -> None:
    require_mosquitto()
    hub = start_hub(tmp_path, broker="mosquitto")
    try:
        owner_user, owner = hub.user("owner")
        node = start_node(hub, owner, tmp_path)
        seller = Agent.create(hub.url, owner_user["token"], "seller", fund="0.1")
        buyer = Agent.create(hub.url, owner_user["token"], "buyer", fund="1")
        assert seller.wallet().balance == Decimal("0.1")
        service = sell_fib(seller, price="0.01")
        flaky = seller.register_service(
            "flaky", lambda inp: 1 / 0, price="0.5", tags=["test"],
            input_schema={"type": "object"}, output_schema={"type": "number"},
        )  # fmt: skip
        seller.start()
        try:
            found = buyer.find_services(q="fibonacci", tag="math")
            assert [s.id for s in found] == [service.id] and found[0].price == Decimal("0.01")
            result = buyer.call("fib", {"n": 20})  # by name: the cheapest fib on offer
            assert result.output["fib"] == 6765 and result.price == Decimal("0.01")
            assert result.agent == seller.id
            assert Decimal(result.output["compute_cost"]) == Decimal("0.002777")
            assert seller.job(result.output["job"])["state"] == "completed"
            again = buyer.call(service, {"n": 20}, key="same", via="mqtt")
            assert again.output["fib"] == 6765
            # The same request id again: the same call, not charged again.
            assert buyer.call(service, {"n": 20}, key="same", via="mqtt").id == again.id
            assert buyer.wallet().balance == Decimal("0.98")
            # The seller's margin: 2 x 0.01 earned, 2 x 0.002777 spent on its wasm jobs.
            assert seller.wallet().balance == Decimal("0.1") + 2 * Decimal("0.007223")

            with pytest.raises(CallFailed, match="ZeroDivisionError") as failed:
                buyer.call(flaky, {"x": 1})
            assert failed.value.call["state"] == "failed"
            with pytest.raises(DeparrowError, match=r"input schema.*maximum") as bad:
                buyer.call(service, {"n": 1000})
            assert bad.value.status == 400
            with pytest.raises(InsufficientCredits) as poor:
                Agent.create(hub.url, owner_user["token"], "poor", fund="0").call(service, {"n": 1})
            assert poor.value.shortfall == Decimal("0.01")
            with pytest.raises(NotFound, match="no service named 'nope'"):
                buyer.call("nope", {})
            with pytest.raises(AuthError, match="unknown API token"):
                Agent(hub.url, "dpt_not-a-token").wallet()
            assert buyer.wallet().balance == Decimal("0.98") and buyer.wallet().held == 0

            job = buyer.run_job(
                {"engine": {"type": "wasm", "module": "example:fib", "entrypoint": "fib_iter",
                            "args": ["30"]}, "timeout": 10},
                via="mqtt",
            )  # fmt: skip
            assert job["result"]["returns"] == [832040]
            assert any("job completed" in h["reason"] for h in buyer.history())

            # The same through the CLI, as a person would.
            def cli(token: str, *args: str) -> subprocess.CompletedProcess[str]:
                return subprocess.run(
                    [sys.executable, "-m", "deparrow.cli", "--hub", hub.url, "--token", token,
                     *args],
                    capture_output=True, text=True, timeout=60,
                )  # fmt: skip

            out = cli(buyer.token, "agent", "services", "fib", "--tag", "math")
            assert out.returncode == 0 and service.id in out.stdout and "0.01 credits" in out.stdout
            out = cli(buyer.token, "agent", "call", service.id, '{"n": 10}')
            assert out.returncode == 0, out.stderr
            assert json.loads(out.stdout)["fib"] == 55 and "paid 0.01 credits" in out.stderr
            out = cli(buyer.token, "agent", "call", service.id, '{"n": -1}')
            assert out.returncode == 1 and "input schema" in out.stderr
            out = cli(buyer.token, "agent", "call", flaky.id, "{}")
            assert out.returncode == 1 and "failed" in out.stderr and "refunded" in out.stderr
            out = cli(owner_user["token"], "agent", "create", "helper", "--fund", "0.5", "--json")
            assert out.returncode == 0 and json.loads(out.stdout)["token"].startswith("dpt_")
            out = cli(owner_user["token"], "agent", "list")
            assert out.returncode == 0
            assert {"seller", "buyer", "helper"} <= set(re.findall(r"\b(seller|buyer|helper)\b",
                                                                   out.stdout))  # fmt: skip
            assert buyer.wallet().balance == Decimal("0.97") - Decimal(job["cost"])
        finally:
            seller.close()
            buyer.close()
        assert flaky.price == Decimal("0.5")
        assert hub.admin.audit()["balanced"]
        node.stop()
    finally:
        hub.stop()


def test_an_agent_pays_for_its_life_until_broke_and_its_owner_is_told(tmp_path: Path) -> None:
    require_mosquitto()
    hub = start_hub(tmp_path, broker="mosquitto", extra=("--service-period", "1"))
    try:
        owner_user, owner = hub.user("owner")
        node = start_node(hub, owner, tmp_path)
        # 1-second periods of one CPU cost 0.002777 each: 0.008 credits pay for two of them.
        runner = Agent.create(hub.url, owner_user["token"], "runner", fund="0.008")
        runner.start()  # connected: it hears the hub's notice
        try:
            job = live_until_broke(runner, 60, echo=lambda _s: None)
            assert job["state"] == "cancelled"
            assert job["reason"].startswith("stopped after 2 paid period(s)")
            assert Decimal(job["cost"]) == 2 * Decimal("0.002777")
            deadline = time.monotonic() + 10
            while not runner.notices and time.monotonic() < deadline:
                time.sleep(0.05)
            assert runner.notices and runner.notices[0]["kind"] == "stopped"
            assert job["id"] in runner.notices[0]["message"]
        finally:
            runner.close()
        mine = owner.request("GET", "/api/v1/agents")["agents"]
        assert [(a["id"], a["state"]) for a in mine] == [(runner.id, "stopped")]
        assert "stopped after 2 paid period(s)" in mine[0]["notices"][0]["message"]
        assert Decimal(mine[0]["balance"]) < Decimal("0.002777")  # cannot pay another period
        assert hub.admin.audit()["balanced"]
        node.stop()
    finally:
        hub.stop()


def test_the_sdk_example_in_docs_agents_md_runs(tmp_path: Path) -> None:
    text = (ROOT / "docs" / "agents.md").read_text()
    block = re.search(r"<!-- sdk-example -->\s*```python\n(.*?)```", text, re.S)
    assert block, "docs/agents.md lost its SDK example"
    script = tmp_path / "example.py"
    script.write_text(block.group(1))
    hub = start_hub(tmp_path)
    try:
        owner_user, _ = hub.user("owner")
        out = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=60,
            env={**os.environ, "HUB": hub.url, "TOKEN": owner_user["token"]},
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.splitlines() == [
            "hello, parrot for 0.05 credits",
            "seller: 0.05 buyer: 0.95",
        ]
        assert hub.admin.audit()["balanced"]
    finally:
        hub.stop()


def test_a_call_pending_when_the_hub_dies_is_refunded_when_it_starts(tmp_path: Path) -> None:
    """The deadline is kept in the database: a hub killed mid-call refunds it at its restart."""
    require_mosquitto()
    hub = start_hub(tmp_path, broker="mosquitto")
    owner_user, _ = hub.user("owner")
    seller = Agent.create(hub.url, owner_user["token"], "seller", fund="0")
    buyer = Agent.create(hub.url, owner_user["token"], "buyer", fund="1")
    service = seller.register_service("slow", lambda inp: inp, price="0.5", timeout_s=2)
    # The seller is not serving: the call stays pending, its price held.
    call = buyer.request(
        "POST", f"/api/v1/agents/services/{service.id}/call?wait=0", {"input": 1},
        headers={"Idempotency-Key": "k"},
    )  # fmt: skip
    assert call["state"] == "pending" and buyer.wallet().held == Decimal("0.5")
    hub.proc.kill()  # no clean shutdown
    time.sleep(2.5)  # past the deadline, while no hub is there to notice
    hub = LocalHub(tmp_path / "hub", broker="mosquitto", log_path=tmp_path / "hub2.log")
    try:
        buyer = Agent(hub.url, buyer.token)
        done = buyer.request("GET", f"/api/v1/agents/calls/{call['id']}")
        assert done["state"] == "timeout" and done["paid"] == "0"
        assert buyer.wallet().balance == Decimal(1) and buyer.wallet().held == 0
        assert hub.admin.audit()["balanced"]
    finally:
        hub.stop()

"""`deparrow demo --agents --json`: the agent economy end to end, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from decimal import Decimal

import pytest


@pytest.mark.parametrize("path", ["system", "no-mosquitto"])
def test_the_agents_demo_runs_the_loop_and_its_books_balance(path: str) -> None:
    env = dict(os.environ)
    if path == "no-mosquitto":  # nothing but Python: the embedded broker carries it all
        env["PATH"] = os.path.dirname(sys.executable)
    out = subprocess.run(
        [sys.executable, "-m", "deparrow.cli", "demo", "--agents", "--json"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["ok"] is True and report["problems"] == []
    assert report["broker"] == ("embedded" if path == "no-mosquitto" else "mosquitto")
    calls = report["calls"]
    assert len(calls) == 5 and {c["via"] for c in calls} == {"rest", "mqtt"}
    assert [c["fib"] for c in calls] == [55, 6765, 832040, 102334155, 12586269025]
    seller = report["seller"]
    assert Decimal(seller["earned"]) == Decimal("0.05") > Decimal(seller["compute_spent"])
    assert Decimal(report["buyer"]["spent_on_calls"]) == Decimal("0.05")
    runner = report["runner"]
    assert runner["state"] == "stopped" and runner["reason"].startswith("stopped after")
    assert runner["reason"] in report["owner_notice"]
    assert report["ledger_balanced"] is True
    assert sum(Decimal(v) for v in report["balances"].values()) == 0
    # What a person watching sees, as it goes.
    for line in ("buyer paid 0.01 for fib(10) = 55", "runner stopped: stopped after",
                 "owner told:", "seller earned 0.05", "ledger balanced"):  # fmt: skip
        assert line in out.stderr, line

"""The example economy in one go: an owner creates three agents on a running hub (with nodes):

- the seller sells `fib`, backed by a WebAssembly job it buys on the network;
- the buyer finds it by tag and buys it repeatedly (over REST and MQTT), and buys compute
  directly;
- the runner lives as a `service` job paid each period from its own wallet, until it is broke
  and the hub stops it and tells its owner.

`deparrow demo --agents` starts a hub and two nodes and runs this; against your own hub:

    python examples/agents/economy.py --hub http://127.0.0.1:8765 --token dpt_(owner's)
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from deparrow import Agent
from deparrow.examples.buyer import buy_fibs, buy_hash
from deparrow.examples.runner import live_until_broke
from deparrow.examples.seller import sell_fib

PRICE = "0.01"  # what the seller asks per call; its compute costs it 0.002777 a call


def fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def run_economy(
    hub: str, owner_token: str, echo: Callable[[str], None] = print, calls: int = 5
) -> dict[str, Any]:
    """Run the loop; returns a report whose `ok` says whether everything checked out."""
    owner = Agent(hub, owner_token)
    seller = Agent.create(hub, owner_token, "seller", fund="0.05")
    buyer = Agent.create(hub, owner_token, "buyer", fund="1")
    runner = Agent.create(hub, owner_token, "runner", fund="0.012")
    echo(
        f"owner {owner.id} created agents seller {seller.id}, buyer {buyer.id}, runner {runner.id}"
    )
    report: dict[str, Any] = {
        "agents": {"seller": seller.id, "buyer": buyer.id, "runner": runner.id},
        "calls": [],
    }
    problems: list[str] = []

    stopped: dict[str, Any] = {}

    def run() -> None:
        try:
            stopped.update(live_until_broke(runner, 90, lambda s: echo("  " + s)))
        except Exception as e:  # reported below
            stopped["error"] = str(e)

    life = threading.Thread(target=run, name="runner", daemon=True)
    life.start()

    service = sell_fib(seller, PRICE)
    seller.start()
    echo(f"seller sells {service.name} ({service.id}) at {service.price} credits a call")
    try:
        ns = [10 * (i + 1) for i in range(calls)]
        compute = Decimal(0)
        for i, (n, out, price) in enumerate(buy_fibs(buyer, ns[:-1])):
            compute += Decimal(out["compute_cost"])
            report["calls"].append(
                {
                    "n": n,
                    "fib": out["fib"],
                    "price": str(price),
                    "via": "rest",
                    "compute_cost": out["compute_cost"],
                }
            )
            echo(
                f"buyer paid {price} for fib({n}) = {out['fib']}; the seller's wasm job "
                f"{out['job']} cost it {out['compute_cost']} (call {i + 1}, REST)"
            )
        for n, out, price in buy_fibs(buyer, ns[-1:], via="mqtt"):
            compute += Decimal(out["compute_cost"])
            report["calls"].append(
                {
                    "n": n,
                    "fib": out["fib"],
                    "price": str(price),
                    "via": "mqtt",
                    "compute_cost": out["compute_cost"],
                }
            )
            echo(f"buyer paid {price} for fib({n}) = {out['fib']} (call over MQTT)")
        for c in report["calls"]:
            if c["fib"] != fib(c["n"]):
                problems.append(f"fib({c['n']}) came back as {c['fib']}")
        digest, cost = buy_hash(buyer, b"bought directly\n", via="mqtt")
        echo(f"buyer bought compute directly: a sha256 job (submitted over MQTT) cost {cost}")
        report["direct_job"] = {"sha256": digest, "cost": str(cost)}

        life.join(100)
        if "error" in stopped or stopped.get("state") != "cancelled":
            problems.append(f"the runner did not stop as it should: {stopped}")
        else:
            echo(f"runner stopped: {stopped['reason']}")
        # The owner is told: the hub's notice, in the owner's view of its agents.
        deadline = time.monotonic() + 10
        notices: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not notices:
            notices = runner.info()["notices"]
            time.sleep(0.1)
        if notices:
            echo(f"owner told: {notices[0]['message']}")
        else:
            problems.append("the runner's owner was not told it stopped")

        seller_view = seller.info()
        buyer_view = buyer.info()
        runner_view = runner.info()
        earned = Decimal(seller_view["calls"]["earned"])
        report["seller"] = {
            "earned": str(earned),
            "compute_spent": str(compute),
            "margin": str(earned - compute),
            "balance": seller_view["balance"],
        }
        report["buyer"] = {
            "spent_on_calls": buyer_view["calls"]["spent"],
            "balance": buyer_view["balance"],
        }
        report["runner"] = {
            "state": runner_view["state"],
            "balance": runner_view["balance"],
            "reason": stopped.get("reason"),
            "periods_paid": (stopped.get("billing") or {}).get("periods_billed"),
        }
        report["owner_notice"] = notices[0]["message"] if notices else None
        echo(
            f"seller earned {earned} from {len(report['calls'])} calls, spent {compute} on "
            f"compute: margin {earned - compute}; balance {seller_view['balance']}"
        )
        echo(
            f"buyer spent {buyer_view['calls']['spent']} on calls and {cost} on its own job; "
            f"balance {buyer_view['balance']}"
        )
        echo(f"runner is {runner_view['state']} with {runner_view['balance']} credits left")
        if earned != Decimal(PRICE) * len(report["calls"]):
            problems.append(f"the seller earned {earned}, not {PRICE} per call")
        if earned <= compute:
            problems.append("the seller sold at a loss")
        if runner_view["state"] != "stopped":
            problems.append(f"the runner is {runner_view['state']}, not stopped")
    finally:
        seller.close()
        buyer.close()
        runner.close()
    report["problems"] = problems
    report["ok"] = not problems
    for p in problems:
        echo("PROBLEM: " + p)
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hub", default=os.environ.get("DEPARROW_HUB", "http://127.0.0.1:8765"))
    p.add_argument("--token", default=os.environ.get("DEPARROW_TOKEN"))
    args = p.parse_args()
    if not args.token:
        p.error("give the owner's API token with --token or DEPARROW_TOKEN")
    raise SystemExit(0 if run_economy(args.hub, args.token)["ok"] else 1)


if __name__ == "__main__":
    main()

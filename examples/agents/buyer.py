"""A buyer agent: finds a Fibonacci service by its tag, buys from it repeatedly, and also buys
compute directly (a sha256 job), printing what each purchase cost.

    python examples/agents/buyer.py --hub http://127.0.0.1:8765 --token dpt_... --calls 5
"""

from __future__ import annotations

import argparse
import base64
import os
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

from deparrow import Agent


def buy_fibs(agent: Agent, ns: list[int], via: str = "rest") -> Iterator[tuple[int, Any, Decimal]]:
    """Call the cheapest `fib` service tagged `math` for each n: yields (n, output, price)."""
    offers = [s for s in agent.find_services(tag="math") if s.name == "fib"]
    if not offers:
        raise SystemExit("no fib service is offered yet: start examples/agents/seller.py")
    for n in ns:
        result = agent.call(offers[0], {"n": n}, via=via)
        yield n, result.output, result.price


def hash_job(text: bytes) -> dict[str, Any]:
    return {
        "name": "sha256",
        "engine": {"type": "wasm", "module": "example:sha256"},
        "input": "base64:" + base64.b64encode(text).decode(),
        "timeout": 10,
    }


def buy_hash(agent: Agent, text: bytes, via: str = "rest") -> tuple[str, Decimal]:
    """Buy compute directly: sha256 of text as a wasm job. Returns (digest, cost)."""
    job = agent.run_job(hash_job(text), via=via, timeout_s=60)
    return job["result"]["stdout"].split()[0], Decimal(job["cost"])


def main(echo: Callable[[str], None] = print) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hub", default=os.environ.get("DEPARROW_HUB", "http://127.0.0.1:8765"))
    p.add_argument("--token", default=os.environ.get("DEPARROW_TOKEN"))
    p.add_argument("--calls", type=int, default=5)
    args = p.parse_args()
    if not args.token:
        p.error("give the agent's API token with --token or DEPARROW_TOKEN")
    agent = Agent(args.hub, args.token)
    for n, out, price in buy_fibs(agent, [10 + 10 * i for i in range(args.calls)]):
        echo(f"fib({n}) = {out['fib']}  paid {price} (the seller's compute: {out['compute_cost']})")
    digest, cost = buy_hash(agent, b"bought directly\n")
    echo(f"sha256 job: {digest}  cost {cost}")
    echo(f"balance: {agent.wallet().balance} credits")


if __name__ == "__main__":
    main()

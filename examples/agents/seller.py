"""A seller agent: sells Fibonacci numbers, each computed by a WebAssembly job it buys on the
network, at a price above what the job costs it.

    python examples/agents/seller.py --hub http://127.0.0.1:8765 --token dpt_... --price 0.01

It registers the service `fib` and answers calls until Ctrl-C. Each call runs `fib.wasm`'s
`fib_iter` on a node (paid from the seller's wallet, about 0.002777 credits for a second of
one CPU), and the buyer pays the seller's price: the difference is the seller's margin.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from deparrow import Agent, Service

INPUT_SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 92}},
    "required": ["n"],
    "additionalProperties": False,
}
OUTPUT_SCHEMA = {
    "type": "object",
    "properties": {
        "fib": {"type": "integer"},
        "job": {"type": "string"},
        "compute_cost": {"type": "string"},
    },
    "required": ["fib", "job", "compute_cost"],
}


def fib_job(n: int) -> dict[str, Any]:
    """The job spec: fib.wasm's linear-time export, one CPU, ten seconds at most."""
    return {
        "name": f"fib-{n}",
        "engine": {"type": "wasm", "module": "example:fib", "entrypoint": "fib_iter",
                   "args": [str(n)]},
        "resources": {"cpu": 1, "memory_mb": 64},
        "timeout": 10,
    }  # fmt: skip


def sell_fib(agent: Agent, price: str = "0.01") -> Service:
    """Register the `fib` service on `agent`; each call buys a wasm job and returns its result."""

    def handle(inp: dict[str, Any]) -> dict[str, Any]:
        job = agent.run_job(fib_job(int(inp["n"])), timeout_s=60)
        return {"fib": job["result"]["returns"][0], "job": job["id"], "compute_cost": job["cost"]}

    return agent.register_service(
        "fib",
        handle,
        price=price,
        description="Fibonacci numbers up to fib(92), computed by a WebAssembly job",
        tags=["math", "wasm"],
        input_schema=INPUT_SCHEMA,
        output_schema=OUTPUT_SCHEMA,
        timeout_s=30,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hub", default=os.environ.get("DEPARROW_HUB", "http://127.0.0.1:8765"))
    p.add_argument("--token", default=os.environ.get("DEPARROW_TOKEN"), required=False)
    p.add_argument("--price", default="0.01", help="credits per call")
    args = p.parse_args()
    if not args.token:
        p.error("give the agent's API token with --token or DEPARROW_TOKEN")
    agent = Agent(args.hub, args.token)
    service = sell_fib(agent, args.price)
    print(f"agent {agent.id} sells {service.name} ({service.id}) at {service.price} credits")
    agent.serve()


if __name__ == "__main__":
    main()

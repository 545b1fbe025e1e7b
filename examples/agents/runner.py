"""An agent that lives on the network: it keeps itself running as a `service` job, billed each
period from its own wallet, until the wallet cannot pay the next period. Then the hub stops the
job and tells the agent and its owner (a `notice` over MQTT, and in GET /api/v1/agents).

    python examples/agents/runner.py --hub http://127.0.0.1:8765 --token dpt_...
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

from deparrow import Agent


def life_spec(lifetime_s: int = 3600) -> dict[str, Any]:
    """The agent's body: a service job (here the `loop` example, which runs until stopped)."""
    return {
        "type": "service",
        "name": "runner-life",
        "engine": {"type": "wasm", "module": "example:loop"},
        "resources": {"cpu": 1, "memory_mb": 64},
        "timeout": lifetime_s,
    }


def live_until_broke(
    agent: Agent, timeout_s: float = 120, echo: Callable[[str], None] = print
) -> dict[str, Any]:
    """Start the service job and wait until the hub stops it; returns the stopped job."""
    job_id = agent.submit_job(life_spec())
    echo(f"runner {agent.id}: service job {job_id} started")
    deadline = time.monotonic() + timeout_s
    paid = -1
    while time.monotonic() < deadline:
        job = agent.job(job_id)
        billing = job.get("billing") or {}
        if billing.get("periods_billed", 0) != paid:
            paid = billing.get("periods_billed", 0)
            echo(f"runner: {paid} period(s) paid, wallet {agent.wallet().balance} credits")
        if job["state"] in ("completed", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise TimeoutError(f"service job {job_id} still runs after {timeout_s:g}s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hub", default=os.environ.get("DEPARROW_HUB", "http://127.0.0.1:8765"))
    p.add_argument("--token", default=os.environ.get("DEPARROW_TOKEN"))
    p.add_argument("--timeout", type=float, default=7200)
    args = p.parse_args()
    if not args.token:
        p.error("give the agent's API token with --token or DEPARROW_TOKEN")
    job = live_until_broke(Agent(args.hub, args.token), args.timeout)
    print(f"stopped: {job['reason']}")


if __name__ == "__main__":
    main()

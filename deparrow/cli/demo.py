"""`deparrow demo`: the whole loop on this machine."""

from __future__ import annotations

import sys

import click


@click.command("demo")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--keep", is_flag=True, help="Keep the temporary data directory.")
@click.option("--broker", type=click.Choice(["auto", "mosquitto", "embedded"]), default="auto")
@click.option("--agents", is_flag=True, help="Run the agent economy instead (docs/agents.md).")
def demo_cmd(as_json: bool, keep: bool, broker: str, agents: bool) -> None:
    """Run the whole loop on this machine: a hub, two nodes, a user, the example jobs.

    With --agents: agents that sell a Wasm-backed service, buy it, and pay for their own
    compute until one is broke and stopped; then the ledger audit.
    """
    from deparrow.demo import run_agents_demo, run_demo

    ok = (run_agents_demo if agents else run_demo)(
        as_json=as_json,
        keep=keep,
        broker=broker,
        echo=(lambda s: click.echo(s, err=True)) if as_json else click.echo,
    )
    sys.exit(0 if ok else 1)

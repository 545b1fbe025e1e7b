"""`deparrow node`: list nodes, create enrollment tokens, remove nodes."""

from __future__ import annotations

from typing import Any

import click

from deparrow.cli.context import Ctx, emit, run_cli


@click.group("node")
def node_group() -> None:
    """Nodes: list them, create enrollment tokens, remove them."""


def gpu_label(gpus: list[dict[str, Any]] | None) -> str:
    """A node's GPUs as count and model ("1x NVIDIA L4", "2x NVIDIA L4, 1x NVIDIA T4"), "-"
    for none."""
    models: dict[str, int] = {}
    for g in gpus or []:
        name = str(g.get("name") or "GPU")
        models[name] = models.get(name, 0) + 1
    return ", ".join(f"{n}x {name}" for name, n in models.items()) or "-"


@node_group.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@run_cli
def node_list(obj: Ctx, as_json: bool) -> None:
    """Nodes I own (all nodes for an admin): state; jobs, the hub's jobs on it out of the jobs
    it runs at once (1/2); CPU and memory; GPUs (count and model); credits earned."""
    nodes = obj.client().nodes()
    if as_json:
        emit(nodes)
        return
    if not nodes:
        click.echo("no nodes; add one with: deparrow node token")
    else:
        click.echo(
            f"{'node':<18}  {'state':<9} {'name':<20} {'jobs':>5}  {'resources':<18} "
            f"{'gpu':<20} earned"
        )
    for n in nodes:
        # A hub older than slots and GPUs leaves the fields out: one job at a time, no GPU.
        jobs = f"{n.get('jobs_running', 0)}/{n.get('slots', 1)}"
        resources = f"{n['cpu']:g} CPU {n['memory_mb']} MB"
        click.echo(
            f"{n['id']:<18}  {n['state']:<9} {n['name']:<20} {jobs:>5}  {resources:<18} "
            f"{gpu_label(n.get('gpus')):<20} {n['earned']}"
        )


@node_group.command("token")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@run_cli
def node_token(obj: Ctx, as_json: bool) -> None:
    """Create a single-use enrollment token and print the edge-run command that uses it
    (with --ca and the fingerprint of the hub's CA when the hub serves TLS)."""
    t = obj.client().enrollment_token()
    if as_json:
        emit(t)
    else:
        click.echo(t["command"])


@node_group.command("remove")
@click.argument("node_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@run_cli
def node_remove(obj: Ctx, node_id: str, as_json: bool) -> None:
    """Take a node off the network: its login stops working and its jobs go to other nodes.
    Its history and earnings stay. To bring the machine back, enroll it again."""
    out = obj.client().remove_node(node_id)
    if as_json:
        emit(out)
    else:
        click.echo(f"removed {node_id}; {out['requeued']} job(s) went back to the queue")

"""`deparrow node`: list nodes, create enrollment tokens, remove nodes."""

from __future__ import annotations

import click

from deparrow.cli.context import Ctx, emit, run_cli


@click.group("node")
def node_group() -> None:
    """Nodes: list them, create enrollment tokens, remove them."""


@node_group.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@run_cli
def node_list(obj: Ctx, as_json: bool) -> None:
    """Nodes I own (all nodes for an admin)."""
    nodes = obj.client().nodes()
    if as_json:
        emit(nodes)
        return
    if not nodes:
        click.echo("no nodes; add one with: deparrow node token")
    else:
        click.echo(f"{'node':<18}  {'state':<9} {'name':<20} resources          earned")
    for n in nodes:
        click.echo(
            f"{n['id']}  {n['state']:<9} {n['name']:<20} {n['cpu']:g} CPU "
            f"{n['memory_mb']} MB  earned {n['earned']}"
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

"""deparrow: run the hub, submit jobs, read wallets and nodes, run the demo.

A thin layer over deparrow.client: errors become one clear line and a non-zero exit. One
module per verb group; `context` holds what they share. Only `deparrow hub` imports the
server (`hub`), and only when it runs.
"""

from __future__ import annotations

from pathlib import Path

import click

from deparrow.cli.agents import agent_group
from deparrow.cli.boards import board_group
from deparrow.cli.context import DEFAULT_HUB, Ctx
from deparrow.cli.demo import demo_cmd
from deparrow.cli.hub import copy_store_cmd, hub_cmd
from deparrow.cli.jobs import job_group
from deparrow.cli.ledger import ledger_group
from deparrow.cli.nodes import node_group
from deparrow.cli.status import network_group, status_cmd
from deparrow.cli.users import user_group
from deparrow.cli.wallet import wallet_group

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--hub",
    envvar="DEPARROW_HUB",
    default=DEFAULT_HUB,
    show_default=True,
    help="Hub URL (env DEPARROW_HUB).",
)
@click.option(
    "--bootstrap",
    envvar="DEPARROW_BOOTSTRAP",
    default=None,
    metavar="URL[,URL...]",
    help="Instead of --hub: the URL of any of the hub's replicas (several, comma-separated); "
    "commands use the best one that answers and move to the next when one fails "
    "(env DEPARROW_BOOTSTRAP).",
)
@click.option(
    "--region",
    envvar="DEPARROW_REGION",
    default=None,
    metavar="NAME",
    help="With --bootstrap: prefer the hub's replicas in this region (env DEPARROW_REGION).",
)
@click.option(
    "--token",
    envvar="DEPARROW_TOKEN",
    default=None,
    help="API token (env DEPARROW_TOKEN; default: the local hub's admin token).",
)
@click.option(
    "--ca",
    envvar="DEPARROW_CA",
    default=None,
    metavar="FILE|sha256:FINGERPRINT",
    help="The CA of an https:// hub: a PEM file, or the fingerprint `deparrow node token` "
    "prints (env DEPARROW_CA; default: the system's CAs, or the local hub's own).",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    metavar="DIR",
    help="The --data-dir of a hub on this machine: its admin token (DIR/admin-token) and, "
    "over https, its CA are read from there (default: the local hub's, at the default "
    "address only).",
)
@click.pass_context
def main(
    ctx: click.Context,
    hub: str,
    bootstrap: str | None,
    region: str | None,
    token: str | None,
    ca: str | None,
    data_dir: Path | None,
) -> None:
    """DEparrow: idle machines run other people's WebAssembly jobs for credits."""
    ctx.obj = Ctx(hub, token, ca, data_dir, bootstrap, region)


for _command in (
    hub_cmd, job_group, wallet_group, ledger_group, node_group, user_group, status_cmd,
    network_group, board_group, agent_group, demo_cmd, copy_store_cmd,
):  # fmt: skip
    main.add_command(_command)

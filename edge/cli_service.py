"""`edge-run service`: the node as a systemd unit. The library writes the unit and drives
systemctl (edge/service.py); these commands are its command line."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import click

from edge.node_config import default_data_dir, enroll, load_config


def _service_scope(user: bool | None, unit_dir: Path | None) -> tuple[bool, Path, bool | None]:
    """(user unit?, the unit's directory, whether to drive systemctl: never for --unit-dir)."""
    from edge import service

    if user is None:
        user = os.geteuid() != 0
    if unit_dir is not None:
        return user, unit_dir, False
    return user, service.user_unit_dir() if user else service.SYSTEM_UNIT_DIR, None


_user_option = click.option(
    "--user/--system",
    "user",
    default=None,
    help="A user unit (~/.config/systemd/user, no root needed) or a system unit "
    "(/etc/systemd/system). Default: --system as root, else --user.",
)
_unit_dir_option = click.option(
    "--unit-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write the unit into this directory instead, and leave systemctl alone (packaging).",
)


@click.group("service")
def service_group() -> None:
    """Run this node as a systemd service: it starts at boot and restarts after a failure."""


@service_group.command(
    "install", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False}
)
@_user_option
@_unit_dir_option
@click.option("--hub", envvar="DEPARROW_HUB", help="Enroll with this hub first, if not yet.")
@click.option("--token", envvar="DEPARROW_ENROLL_TOKEN", help="The enrollment token for --hub.")
@click.option("--name", default=None, help="Name shown on the hub (default: host name).")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The node's directory (default: ~/.local/share/deparrow-edge for a user unit, "
    "/var/lib/deparrow-edge for a system unit).",
)
@click.option("--no-start", is_flag=True, help="Write the unit; do not enable or start it.")
@click.argument("edge_args", nargs=-1, type=click.UNPROCESSED, metavar="[EDGE-RUN OPTIONS]...")
@click.pass_obj
def service_install(
    obj: dict[str, Any] | None, user: bool | None, unit_dir: Path | None, hub: str | None,
    token: str | None, name: str | None, data_dir: Path | None, no_start: bool,
    edge_args: tuple[str, ...],
) -> None:  # fmt: skip
    """Install and start the node as a systemd service. The node is enrolled now (with
    --hub and --token) unless it already is; options after the others go to edge-run as it
    starts, e.g. `edge-run service install --user -- --max-cpu 2 --always-run`."""
    from edge import service

    user, where, manage = _service_scope(user, unit_dir)
    data_dir = (
        data_dir
        or (obj or {}).get("data_dir")
        or (default_data_dir() if user else service.SYSTEM_DATA_DIR)
    )
    for arg in edge_args:
        if arg.split("=", 1)[0] in ("--hub", "--token", "--data-dir", "--name"):
            raise click.UsageError(
                f"give {arg.split('=', 1)[0]} to `edge-run service install` itself, before "
                "the options for the service (a token must never be written into a unit)"
            )
    try:  # the service's options are checked now, not at its first start
        edge_run = click.get_current_context().find_root().command  # edge-run itself
        edge_run.make_context("edge-run", ["--data-dir", str(data_dir), *edge_args])
    except click.ClickException as e:
        raise click.UsageError(f"edge-run options for the service: {e.format_message()}") from None
    config_path = Path(data_dir) / "node.json"
    config = load_config(config_path)
    if config is None:
        if not hub or not token:
            raise click.UsageError(
                f"this node is not enrolled yet ({config_path}): pass --hub URL --token TOKEN"
            )
        import socket

        config = enroll(hub, token, name or socket.gethostname(), config_path)
        click.echo(f"enrolled as {config['node_id']} (identity in {config_path})", err=True)
    exe = shutil.which("edge-run", path=str(Path(sys.executable).parent)) or shutil.which(
        "edge-run"
    )
    program = [exe] if exe else [sys.executable, "-m", "edge.cli"]
    exec_start = [*program, "--data-dir", str(Path(data_dir).resolve()), *edge_args]
    try:
        text = service.unit_text(exec_start, Path(data_dir).resolve(), user)
        done = service.install(text, where, user, start=not no_start, manage=manage)
    except service.ServiceError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {done.unit_path} (node {config['node_id']})")
    for cmd in done.ran:
        click.echo("ran: " + " ".join(cmd))
    if done.to_run:
        why = "--unit-dir given" if unit_dir is not None else "systemd is not running here"
        click.echo(f"{why}; to start the service, run:")
        for cmd in done.to_run:
            click.echo("  " + " ".join(cmd))


@service_group.command("uninstall")
@_user_option
@_unit_dir_option
def service_uninstall(user: bool | None, unit_dir: Path | None) -> None:
    """Stop and disable the service and remove its unit (the node's identity stays)."""
    from edge import service

    user, where, manage = _service_scope(user, unit_dir)
    try:
        done = service.uninstall(where, user, manage=manage)
    except service.ServiceError as e:
        raise click.ClickException(str(e)) from None
    for cmd in done.ran:
        click.echo("ran: " + " ".join(cmd))
    click.echo(f"removed {done.unit_path}")
    if done.to_run:
        click.echo("systemd is not running here; where it is, also run:")
        for cmd in done.to_run:
            click.echo("  " + " ".join(cmd))


@service_group.command("status")
@_user_option
@_unit_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def service_status(user: bool | None, unit_dir: Path | None, as_json: bool) -> None:
    """Whether the service is installed, enabled and running."""
    from edge import service

    user, where, _ = _service_scope(user, unit_dir)
    info = service.status(where, user)
    if as_json:
        click.echo(json.dumps(info))
        return
    for key, value in info.items():
        click.echo(f"{key}: {value}")

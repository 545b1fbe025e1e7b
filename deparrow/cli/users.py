"""`deparrow user`: users (admin)."""

from __future__ import annotations

import click

from deparrow.cli.context import Ctx, emit, run_cli


@click.group("user")
def user_group() -> None:
    """Users (admin)."""


@user_group.command("create")
@click.argument("name")
@click.option("--admin", is_flag=True, help="Give the user the admin role.")
@click.option(
    "--referred-by",
    default=None,
    metavar="USER_ID",
    help="Who invited them (earns a bonus when their first node proves real).",
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@run_cli
def user_create(obj: Ctx, name: str, admin: bool, referred_by: str | None, as_json: bool) -> None:
    """Create a user and print its API token (shown once)."""
    u = obj.client().create_user(name, "admin" if admin else "user", referred_by)
    if as_json:
        emit(u)
    else:
        click.echo(f"user {u['id']} ({u['name']}), welcome grant {u['welcome_grant']} credits")
        click.echo(f"token: {u['token']}")

"""`deparrow wallet`: my balance, its history, transfers."""

from __future__ import annotations

import time
import uuid

import click

from deparrow.cli.context import Ctx, die, emit, run_cli
from deparrow.client import HubError


@click.group("wallet", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def wallet_group(ctx: click.Context, as_json: bool) -> None:
    """My balance and the credits held for running jobs; history and transfers."""
    if ctx.invoked_subcommand is not None:
        return
    try:
        w = ctx.obj.client().wallet()
    except HubError as e:
        die(str(e))
    if as_json:
        emit(w)
    else:
        click.echo(f"balance: {w['balance']} credits ({w['held']} held for jobs)")


@wallet_group.command("history")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 1000))
@click.option("--csv", "as_csv", is_flag=True, help="CSV statement (for a spreadsheet).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@run_cli
def wallet_history(obj: Ctx, limit: int, as_csv: bool, as_json: bool) -> None:
    """Every movement of my wallet, newest first, with its reason."""
    client = obj.client()
    if as_csv:
        click.echo(client.history_csv(limit), nl=False)
        return
    page = client.history(limit)
    if as_json:
        emit(page)
        return
    if not page["items"]:
        click.echo("no movements yet")
    for i in page["items"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(i["at"]))
        # The hub's words for the line ("transfer from alice"; a finished job's cost with
        # what was held and came back); an older hub sends only the ledger's reason.
        what = i.get("description", i["reason"])
        if "held" in i:
            what += f" (held {i['held']}, {i['came_back']} came back)"
        click.echo(f"{when}  {i['amount']:>14}  = {i['balance_after']:>14}  {what}")


@wallet_group.command("transfer")
@click.argument("to")
@click.argument("amount")
@click.option("--memo", default="", help="A note the recipient sees.")
@click.option("--key", default=None, help="Idempotency key (default: a new one); reuse it to "
              "retry safely.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@run_cli
def wallet_transfer(obj: Ctx, to: str, amount: str, memo: str, key: str | None,
                    as_json: bool) -> None:  # fmt: skip
    """Send AMOUNT credits to the user or agent TO (an id like u_...)."""
    r = obj.client().transfer(to, amount, key or str(uuid.uuid4()), memo)
    if as_json:
        emit(r)
    else:
        again = " (already done: this key was used before)" if r["replayed"] else ""
        click.echo(f"sent {r['amount']} credits to {r['to']}{again}; balance {r['balance']}")

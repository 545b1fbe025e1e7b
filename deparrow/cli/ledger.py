"""`deparrow ledger`: the books (admin)."""

from __future__ import annotations

import sys

import click

from deparrow.cli.context import Ctx, emit, run_cli


@click.group("ledger")
def ledger_group() -> None:
    """The books (admin)."""


@ledger_group.command("audit")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@run_cli
def ledger_audit(obj: Ctx, as_json: bool) -> None:
    """Check the books; exit 0 only when every account sums to zero and nothing is off."""
    a = obj.client().audit()
    if as_json:
        emit({k: v for k, v in a.items() if k != "accounts"})
    else:
        click.echo(f"entries: {a['entries']}, accounts: {len(a['accounts'])}")
        for kind, total in sorted(a["by_kind"].items()):
            click.echo(f"  {kind:<8} {total:>16}")
        click.echo(f"  {'sum':<8} {a['total']:>16}")
        for what in ("mismatches", "negatives", "unbalanced_entries", "stranded_holds"):
            if a[what]:
                click.echo(f"  {what.replace('_', ' ')}: {a[what]}")
        click.echo("balanced" if a["balanced"] else "NOT BALANCED")
    sys.exit(0 if a["balanced"] else 1)

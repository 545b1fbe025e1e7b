"""`deparrow agent`: create and fund agents, find services, call one (docs/agents.md)."""

from __future__ import annotations

import json
import sys
import uuid
from typing import Any

import click

from deparrow.cli.context import Ctx, die, emit, run_cli


@click.group("agent")
def agent_group() -> None:
    """Agents: create and fund them, find services, call one (docs/agents.md)."""


@agent_group.command("create")
@click.argument("name")
@click.option("--fund", default="0", show_default=True, help="Credits moved from my wallet.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@run_cli
def agent_create(obj: Ctx, name: str, fund: str, as_json: bool) -> None:
    """Create an agent I own and print its API token (shown once)."""
    a = obj.client().request("POST", "/api/v1/agents", {"name": name, "fund": fund})
    if as_json:
        emit(a)
    else:
        click.echo(f"agent {a['id']} ({a['name']}), balance {a['balance']} credits")
        click.echo(f"token: {a['token']}")


@agent_group.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@run_cli
def agent_list(obj: Ctx, as_json: bool) -> None:
    """My agents (all agents for an admin): balance, state, services, calls."""
    agents = obj.client().request("GET", "/api/v1/agents")["agents"]
    if as_json:
        emit(agents)
        return
    if not agents:
        click.echo("no agents; create one with: deparrow agent create NAME --fund 5")
    for a in agents:
        c = a["calls"]
        click.echo(
            f"{a['id']}  {a['state']:<8} {a['name']:<16} balance {a['balance']:<10} "
            f"services {a['services']}  earned {c['earned']}  spent {c['spent']}"
        )


@agent_group.command("services")
@click.argument("query", required=False)
@click.option("--tag", default=None, help="Only services with this tag.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@run_cli
def agent_services(obj: Ctx, query: str | None, tag: str | None, as_json: bool) -> None:
    """Find services by text (in name, description, tags) and tag; cheapest first."""
    from urllib.parse import urlencode

    params = urlencode({k: v for k, v in (("q", query), ("tag", tag)) if v})
    found = obj.client().request("GET", "/api/v1/agents/services?" + params)["services"]
    if as_json:
        emit(found)
        return
    if not found:
        click.echo("no services found")
    for svc in found:
        click.echo(
            f"{svc['id']}  {svc['name']:<16} {svc['price']:>10} credits  by {svc['agent_name']}"
            f" ({svc['agent']})  [{', '.join(svc['tags'])}]  {svc['description']}"
        )


@agent_group.command("call")
@click.argument("service_id")
@click.argument("input_json")
@click.option("--timeout", type=click.FloatRange(0.1, 300), default=None, help="Seconds.")
@click.option("--key", default=None, help="Idempotency key (default: a new one); reuse it to "
              "retry without paying twice.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@run_cli
def agent_call(
    obj: Ctx, service_id: str, input_json: str, timeout: float | None, key: str | None,
    as_json: bool,
) -> None:  # fmt: skip
    """Call a service with INPUT_JSON, paying its price from my wallet; print its output."""
    try:
        value = json.loads(input_json)
    except ValueError as e:
        die(f"INPUT_JSON is not JSON: {e}", 2)
    body: dict[str, Any] = {"input": value}
    if timeout is not None:
        body["timeout_s"] = timeout
    client = obj.client()
    client.timeout_s = (timeout or 300) + 15
    call = client.request(
        "POST", f"/api/v1/agents/services/{service_id}/call", body,
        headers={"Idempotency-Key": key or uuid.uuid4().hex},
    )  # fmt: skip
    if as_json:
        emit(call)
    elif call["state"] == "completed":
        click.echo(json.dumps(call["output"]))
        click.echo(f"paid {call['paid']} credits (call {call['id']})", err=True)
    else:
        die(f"call {call['id']} {call['state']}: {call['error']} (refunded)", 1)
    if call["state"] != "completed":
        sys.exit(1)

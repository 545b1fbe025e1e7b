"""`deparrow status` and `deparrow network diagnose`: is everything up, and where the
network between you, the hub and its broker breaks."""

from __future__ import annotations

import sys
from typing import Any

import click

from deparrow.cli.context import Ctx, die, emit
from deparrow.client import HubError


def _diagnose_options(fn: Any) -> Any:
    """The network checks' inputs, shared by `status --deep` and `network diagnose`."""
    for option in reversed(
        [
            click.option(
                "--mqtt",
                "mqtt_url",
                default=None,
                metavar="mqtt://HOST:PORT",
                help="Broker to check (default: the one the hub gives out).",
            ),
            click.option("--mqtt-username", default=None, help="MQTT login (default: none)."),
            click.option(
                "--mqtt-password",
                envvar="DEPARROW_MQTT_PASSWORD",
                default=None,
                help="MQTT password (env DEPARROW_MQTT_PASSWORD).",
            ),
            click.option(
                "--timeout",
                type=click.FloatRange(0.1, 120),
                default=5.0,
                show_default=True,
                help="Seconds each network check may take.",
            ),
        ]
    ):
        fn = option(fn)
    return fn


def _network_checks(
    obj: Ctx,
    mqtt_url: str | None,
    mqtt_username: str | None,
    mqtt_password: str | None,
    timeout: float,
) -> list[Any]:
    from deparrow.diagnose import user_checks

    try:
        return user_checks(
            obj.client().hub if obj.bootstrap else obj.hub,
            obj.api_token(),
            mqtt_url=mqtt_url,
            mqtt_username=mqtt_username,
            mqtt_password=mqtt_password,
            timeout_s=timeout,
            ca=obj.hub_ca(),
        )
    except ValueError as e:
        die(str(e), 2)


def _nodes_line(nodes: dict[str, int]) -> str:
    """Nodes are not the hub's health (the exit code stays 0), but a network with none online
    runs no job, and "0 of 0" does not say what to do about it."""
    online, total = nodes["online"], nodes["total"]
    if total == 0:
        return (
            "note  no node is enrolled yet: `deparrow node token` prints the edge-run command "
            "that adds one; jobs wait until a node is online"
        )
    if online == 0:
        return (
            f"note  no node is online ({total} enrolled, all offline): jobs wait until one "
            "comes back; `deparrow node list` shows when each was last seen"
        )
    return f"ok    nodes online: {online} of {total}"


@click.command("status")
@click.option("--deep", is_flag=True, help="Also check the network: DNS, broker, login, clock.")
@_diagnose_options
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def status_cmd(
    obj: Ctx,
    deep: bool,
    mqtt_url: str | None,
    mqtt_username: str | None,
    mqtt_password: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Is everything up? One line per check; exit 1 when any fails.

    With --deep, the lines of `deparrow network diagnose` follow.
    """
    client = obj.client()
    report: dict[str, Any] = {"hub": obj.bootstrap or obj.hub}
    ok = True
    lines = []
    try:
        st = client.status()
        report["hub"] = client.hub  # with --bootstrap: the replica that answered
        lines.append(f"ok    hub reachable at {client.hub}")
        report["hub_ok"] = True
        broker = st["broker"]
        report["broker"] = broker
        if broker["connected"]:
            lines.append(f"ok    broker reachable at {broker['url']} ({broker['kind']})")
        else:
            ok = False
            lines.append(f"FAIL  broker at {broker['url']} is not connected to the hub")
        report["nodes"] = st["nodes"]
        lines.append(_nodes_line(st["nodes"]))
    except HubError as e:
        ok = False
        report["hub_ok"] = False
        lines.append(f"FAIL  hub: {e}")
    if report.get("hub_ok"):
        try:
            w = client.wallet()
            report["wallet"] = w
            lines.append(f"ok    my balance: {w['balance']} credits ({w['held']} held)")
        except HubError as e:
            ok = False
            lines.append(f"FAIL  my balance: {e}")
    if deep:
        checks = _network_checks(obj, mqtt_url, mqtt_username, mqtt_password, timeout)
        report["checks"] = [c.as_dict() for c in checks]
        lines += [c.line() for c in checks]
        ok = ok and all(c.ok for c in checks)
    report["ok"] = ok
    if as_json:
        emit(report)
    else:
        click.echo("\n".join(lines))
    sys.exit(0 if ok else 1)


@click.group("network")
def network_group() -> None:
    """The network between you, the hub and its broker."""


@network_group.command("diagnose")
@_diagnose_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_obj
def network_diagnose(
    obj: Ctx,
    mqtt_url: str | None,
    mqtt_username: str | None,
    mqtt_password: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Check DNS, the hub's API, its broker (TCP, MQTT login, round trip), clock skew and
    latency: one pass/fail line each, with a hint on failure; exit 0 only when all pass."""
    checks = _network_checks(obj, mqtt_url, mqtt_username, mqtt_password, timeout)
    ok = all(c.ok for c in checks)
    if as_json:
        emit({"hub": obj.hub, "ok": ok, "checks": [c.as_dict() for c in checks]})
    else:
        for c in checks:
            click.echo(c.line())
    sys.exit(0 if ok else 1)

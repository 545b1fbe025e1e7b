"""edge-run: start a node (`edge-run --hub URL --token TOKEN`) or run one job locally
(`edge-run job FILE.wasm`). A thin layer: library errors become one clear line and an exit code.

The subcommands live beside it: edge/cli_job.py (`job`), edge/cli_service.py (`service`); the
node's files are edge/node_config.py and its main loop edge/node_loop.py."""

from __future__ import annotations

import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Any, cast

import click

from edge.node_config import default_data_dir, enroll, load_config, load_preferences

log = logging.getLogger("edge")


class LazyCommands(dict[str, click.Command]):
    """A group's commands, some of them imported when first read: a node starting up
    (`edge-run` with no subcommand) loads neither `job` nor `service`, nor what they import.
    lazy: {name: "module:attribute"}. Listing the names loads nothing; reading one loads it."""

    def __init__(self, own: dict[str, click.Command], lazy: dict[str, str]) -> None:
        super().__init__({**dict.fromkeys(lazy, cast(click.Command, None)), **own})
        self.lazy = dict(lazy)

    def __getitem__(self, name: str) -> click.Command:
        spec = self.lazy.pop(name, None)
        if spec is not None:
            module, _, attr = spec.partition(":")
            self[name] = getattr(importlib.import_module(module), attr)
        return super().__getitem__(name)

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        try:
            return self[name]
        except KeyError:
            return default

    def values(self) -> list[click.Command]:  # type: ignore[override]
        return [self[name] for name in self]

    def items(self) -> list[tuple[str, click.Command]]:  # type: ignore[override]
        return [(name, self[name]) for name in self]


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--hub", envvar="DEPARROW_HUB", help="Hub URL, e.g. http://127.0.0.1:8765")
@click.option("--token", envvar="DEPARROW_ENROLL_TOKEN", help="Enrollment token from the hub.")
@click.option(
    "--ca",
    envvar="DEPARROW_CA",
    default=None,
    metavar="sha256:FINGERPRINT|FILE",
    help="The hub's CA to pin (https:// hubs): the fingerprint `deparrow node token` prints, "
    "or a PEM file. Kept beside node.json at enrollment (env DEPARROW_CA).",
)
@click.option(
    "--bootstrap",
    envvar="DEPARROW_BOOTSTRAP",
    default=None,
    metavar="URL[,URL...]",
    help="The URL of any of the hub's replicas (several, comma-separated): the node takes the "
    "brokers its bootstrap list gives, best first, and moves to the next when its broker is "
    "gone for --failover-after seconds; without --hub, it enrolls with the best replica "
    "(env DEPARROW_BOOTSTRAP).",
)
@click.option(
    "--region",
    envvar="DEPARROW_REGION",
    default=None,
    metavar="NAME",
    help="With --bootstrap: prefer the brokers of this region (env DEPARROW_REGION).",
)
@click.option(
    "--failover-after",
    type=click.FloatRange(0.5, 3600),
    default=10.0,
    show_default=True,
    metavar="SECONDS",
    help="With --bootstrap: how long a lost broker may take to come back before the node "
    "moves to the next one (its results wait in the outbox meanwhile).",
)
@click.option("--name", default=None, help="Name shown on the hub (default: host name).")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where the node keeps its identity (default ~/.local/share/deparrow-edge).",
)
@click.option("--max-cpu", type=float, default=None, help="CPU-equivalents to offer at most.")
@click.option(
    "--max-jobs",
    type=click.IntRange(1, 256),
    default=None,
    help="Jobs to run at once at most (default: one per usable core; the preference max_jobs).",
)
@click.option(
    "--config",
    "prefs_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="FILE",
    help="Preferences file: a JSON object (when and how much to contribute).",
)
@click.option(
    "--dashboard-port",
    type=click.IntRange(0, 65535),
    default=8080,
    show_default=True,
    envvar="DEPARROW_DASHBOARD_PORT",
    help="Port of this node's page (state, jobs, credits); 0 turns it off. If the port is "
    "taken, the node runs without its page (env DEPARROW_DASHBOARD_PORT).",
)
@click.option(
    "--dashboard-host",
    default="127.0.0.1",
    show_default=True,
    help="Address the node's page listens on (0.0.0.0: reachable from the network).",
)
@click.option(
    "--always-run",
    is_flag=True,
    envvar="DEPARROW_ALWAYS_RUN",
    help="Run jobs even while this machine's owner is using it (default: only when idle, as "
    'the preferences\' "idle" section says).',
)
@click.option("-v", "--verbose", is_flag=True, help="Log every message.")
@click.pass_context
def main(
    ctx: click.Context,
    hub: str | None,
    token: str | None,
    ca: str | None,
    bootstrap: str | None,
    region: str | None,
    failover_after: float,
    name: str | None,
    data_dir: Path | None,
    max_cpu: float | None,
    max_jobs: int | None,
    prefs_path: Path | None,
    dashboard_port: int,
    dashboard_host: str,
    always_run: bool,
    verbose: bool,
) -> None:
    """Run a DEparrow node: enroll with a hub once, then run jobs while this machine is idle.

    \b
    edge-run --hub http://HUB:8765 --token dpe_...   start (and on first run, enroll) a node
    edge-run --hub https://HUB:8765 --token dpe_... --ca sha256:...   the same over TLS
    edge-run --bootstrap http://HUB:8765 ...        fail over between the hub's brokers
    edge-run job fib.wasm --invoke fib -- 25        run one job locally, no hub
    edge-run diagnose                               check DNS, hub, broker, login, clock
    """
    ctx.obj = {"data_dir": data_dir}
    if ctx.invoked_subcommand is not None:
        return
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(message)s",
    )
    if verbose:
        log.setLevel(logging.INFO)
    # Read before enrolling: a broken preferences file must not cost an enrollment token.
    preferences = load_preferences(prefs_path) if prefs_path is not None else None
    config_path = (data_dir or default_data_dir()) / "node.json"
    config = load_config(config_path)
    if config is not None and hub and config.get("hub") != hub:
        if not token:
            raise click.UsageError(
                f"this node is enrolled with {config.get('hub')}, not {hub}: pass --token to "
                f"enroll with {hub} (or use --data-dir for a second identity)"
            )
        config = None  # a new hub and a new token: enroll again
    if bootstrap:
        from edge.bootstrap import base_urls

        try:
            if not base_urls(bootstrap):
                raise ValueError("--bootstrap needs the URL of one of the hub's replicas")
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--bootstrap") from None
    if config is None and not hub and bootstrap and token:
        hub = _best_replica(bootstrap, region, ca)
    if config is None:
        if not hub or not token:
            raise click.UsageError(
                "this node is not enrolled yet: pass --hub URL --token TOKEN "
                "(create a token on the hub with 'deparrow node token')"
            )
        import socket

        config = enroll(hub, token, name or socket.gethostname(), config_path, ca)
        click.echo(f"enrolled as {config['node_id']} (identity in {config_path})", err=True)
    if preferences is not None:
        config["preferences"] = preferences  # for this run; node.json keeps the identity only
    if always_run:
        config["preferences"] = {**(config.get("preferences") or {}), "always_run": True}
    if max_jobs is not None:
        config["preferences"] = {**(config.get("preferences") or {}), "max_jobs": max_jobs}
    page = (dashboard_host, dashboard_port) if dashboard_port else None
    from edge.node_loop import run_node

    run_node(config, max_cpu, page, config_path.parent, bootstrap, region, failover_after)


def _best_replica(bootstrap: str, region: str | None, ca: str | None) -> str:
    """The replica to enroll with: the first of the hub's bootstrap list, fetched over https
    with the CA given (a fingerprint: the CA the first bootstrap URL serves, if it has it)."""
    from edge.bootstrap import base_urls, fetch, replica_urls
    from edge.enroll import EnrollError, fetch_ca_pem, is_pin, tls_context

    try:
        first = base_urls(bootstrap)[0]
        if ca is not None and is_pin(ca) and first.startswith("https://"):
            context = tls_context(ca_pem=fetch_ca_pem(first, ca))
        else:
            context = tls_context(ca_file=ca if ca is not None and not is_pin(ca) else None)
        replicas = replica_urls(fetch(bootstrap, region, 10.0, context))
    except (OSError, ValueError, IndexError, EnrollError) as e:
        raise click.ClickException(f"--bootstrap {bootstrap}: {e}") from None
    if not replicas:
        raise click.ClickException(f"the bootstrap list at {bootstrap} names no replica")
    return replicas[0]


main.commands = LazyCommands(
    dict(main.commands),
    {"job": "edge.cli_job:job_cmd", "service": "edge.cli_service:service_group"},
)


@main.command("diagnose")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="The node's directory (default: as for edge-run).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(0.1, 120),
    default=5.0,
    show_default=True,
    help="Seconds each check may take.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_obj
def diagnose_cmd(obj: dict[str, Any] | None, data_dir: Path | None, timeout: float,
                 as_json: bool) -> None:  # fmt: skip
    """Check this node's network: DNS, the hub, its broker, the node's login, clock, latency.

    One line per check, with a hint on each failure; exit 0 only when all pass. Uses the
    hub URL and MQTT credentials in node.json; the running node is not disturbed.
    """
    from edge.diagnose import node_checks, passed

    data_dir = data_dir or (obj or {}).get("data_dir") or default_data_dir()
    config_path = data_dir / "node.json"
    config = load_config(config_path)
    if config is None:
        raise click.ClickException(
            f"no node.json in {data_dir}: this node is not enrolled yet "
            "(edge-run --hub URL --token TOKEN), or pass --data-dir"
        )
    try:
        checks = node_checks(config, str(config_path), timeout_s=timeout)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    ok = passed(checks)
    if as_json:
        body = {"node_id": config["node_id"], "ok": ok, "checks": [c.as_dict() for c in checks]}
        click.echo(json.dumps(body, indent=2))
    else:
        for c in checks:
            click.echo(c.line())
        failed = sum(1 for c in checks if not c.ok)
        click.echo(
            "all checks passed" if ok else f"{failed} of {len(checks)} checks failed", err=True
        )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

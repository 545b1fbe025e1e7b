"""`deparrow hub`: run the server. The one command that imports `hub`, and only once it runs,
so the rest of the CLI works where only the client is installed."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from pathlib import Path

import click

from deparrow.cli.context import die


@click.command("hub")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Database, keys and broker files (default ~/.local/share/deparrow).",
)
@click.option(
    "--mqtt",
    "mqtt_url",
    default=None,
    metavar="mqtt://HOST:PORT",
    help="Use this broker instead of starting one.",
)
@click.option(
    "--broker",
    type=click.Choice(["auto", "mosquitto", "embedded"]),
    default="auto",
    show_default=True,
    help="Which broker to start when --mqtt is not given.",
)
@click.option(
    "--broker-port",
    default=1883,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port of the broker the hub starts (0: any free port).",
)
@click.option(
    "--mqtt-public-url",
    default=None,
    metavar="mqtt://HOST:PORT",
    help="Broker URL to give nodes (default: the broker's port at the host they reached the "
    "hub by).",
)
@click.option(
    "--public-url",
    default=None,
    metavar="URL",
    help="The hub's URL as other machines reach it, given out in the enroll command and the "
    "start-up lines (default: the URL a caller used; with --host 0.0.0.0 or ::, this "
    "machine's address on its default route). Set it when nodes know the hub by a name or "
    "through a proxy.",
)
@click.option(
    "--welcome-grant",
    default=100,
    show_default=True,
    type=click.IntRange(0),
    help="Credits each new account receives.",
)
@click.option(
    "--heartbeat",
    default=5.0,
    show_default=True,
    type=click.FloatRange(0.1, 3600),
    help="Seconds between node heartbeats.",
)
@click.option(
    "--queue-ttl",
    default=3600.0,
    show_default=True,
    type=click.FloatRange(1, 30 * 86400),
    help="Seconds a job may wait for a node before it fails and is refunded.",
)
@click.option(
    "--service-period",
    default=3600,
    show_default=True,
    type=click.IntRange(1, 86400),
    help="Seconds per billing period of service jobs (the rule bills per hour).",
)
@click.option(
    "--max-attempts",
    default=3,
    show_default=True,
    type=click.IntRange(1, 100),
    help="Attempts of a job its nodes may lose (offline, silent, crashed) before it fails.",
)
@click.option(
    "--output-retention",
    default=7 * 86400.0,
    show_default=True,
    type=click.FloatRange(60),
    help="Seconds a finished job's files are kept; then they expire.",
)
@click.option(
    "--max-files",
    "max_files_mb",
    default=16,
    show_default=True,
    type=click.IntRange(1, 16),
    help="MiB of input files a job may have, all together.",
)
@click.option(
    "--fetch-private",
    is_flag=True,
    help="Let https:// inputs come from private and loopback addresses (a test network).",
)
@click.option(
    "--fetch-ca",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="A PEM file of CAs to trust for https:// inputs, besides the system's.",
)
@click.option(
    "--tls",
    is_flag=True,
    help="Serve HTTPS, and MQTT over TLS to nodes and agents, with --tls-cert/--tls-key or, "
    "without them, a CA and certificate the hub makes in its data dir (docs/tls.md).",
)
@click.option(
    "--tls-cert",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="PEM certificate (chain) to serve, e.g. Let's Encrypt's fullchain.pem; implies --tls.",
)
@click.option(
    "--tls-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="The PEM key of --tls-cert, e.g. privkey.pem.",
)
@click.option(
    "--tls-name",
    "tls_names",
    multiple=True,
    metavar="NAME",
    help="A DNS name or address nodes reach the hub by, for the certificate the hub makes "
    "(besides localhost, its addresses and host name); repeatable.",
)
@click.option(
    "--tls-mqtt-port",
    default=8883,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port of the broker's TLS listener with --tls (0: any free port).",
)
@click.option(
    "--insecure-no-tls",
    is_flag=True,
    help="Listen beyond loopback without TLS: tokens and results cross the network readable. "
    "Only on a network you trust.",
)
@click.option(
    "--rate-limit",
    default=100.0,
    show_default=True,
    type=click.FloatRange(0),
    help="API requests a second per token (or address), bursts of twice that; 0: off.",
)
@click.option(
    "--login-rate",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Logins a second per address, bursts of 20; 0: off. Loopback callers are exempt.",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Log lines as text, or one JSON object per line (ts, level, logger, msg, job, node) "
    "for a log shipper; the start-up message too (docs/operations.md).",
)
@click.option(
    "--db",
    "db_url",
    metavar="URL",
    envvar="DEPARROW_DB",
    help="The store: a postgresql://user@host/dbname URL, which several hub replicas may "
    "share (docs/scale.md). Default: the SQLite file DATA_DIR/hub.sqlite.  [env: DEPARROW_DB]",
)
@click.option(
    "--mqtt-auth-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    metavar="DIR",
    help="With --mqtt (a broker cluster): write the cluster's login files (Mosquitto's "
    "passwd and acl) here from the store, for the servers to reload (docs/broker-cluster.md).",
)
@click.option(
    "--result-grace",
    default=30.0,
    show_default=True,
    type=click.FloatRange(0),
    metavar="S",
    help="How long past a job's timeout the hub waits for its result before it counts the "
    "attempt lost and runs the job again.",
)
@click.option(
    "--region",
    default="",
    metavar="NAME",
    help="Where this replica stands (eu-west, home...), given out by /api/v1/bootstrap.",
)
@click.option(
    "--mqtt-share",
    "mqtt_share_group",
    default=None,
    metavar="GROUP",
    help="Hub replicas on one broker cluster: share the nodes' and agents' traffic through "
    "MQTT shared subscriptions in GROUP, each message handled once (docs/scale.md).",
)
@click.option("-v", "--verbose", is_flag=True)
def hub_cmd(
    host: str,
    port: int,
    data_dir: Path | None,
    mqtt_url: str | None,
    broker: str,
    broker_port: int,
    mqtt_public_url: str | None,
    public_url: str | None,
    welcome_grant: int,
    heartbeat: float,
    queue_ttl: float,
    service_period: int,
    max_attempts: int,
    output_retention: float,
    max_files_mb: int,
    fetch_private: bool,
    fetch_ca: str | None,
    tls: bool,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_names: tuple[str, ...],
    tls_mqtt_port: int,
    insecure_no_tls: bool,
    rate_limit: float,
    login_rate: float,
    log_format: str,
    db_url: str | None,
    mqtt_auth_dir: Path | None,
    result_grace: float,
    region: str,
    mqtt_share_group: str | None,
    verbose: bool,
) -> None:
    """Run the hub: REST API, ledger, scheduler, MQTT bridge and web page."""
    try:
        from aiohttp import web

        from hub.api.services import SERVICES
        from hub.app import create_app, ssl_context, tls_of
        from hub.config import HubConfig, advertised_host, advertised_url, default_data_dir
        from hub.logs import setup as setup_logs
        from hub.mqtt.bridge import parse_mqtt_url
    except ModuleNotFoundError as e:  # a client-only install: the server is an extra
        die(f"the hub needs the server's packages ({e.name} is missing): "
            "pip install 'deparrow[hub]'")  # fmt: skip

    setup_logs(log_format, logging.INFO if verbose else logging.WARNING)
    started = logging.getLogger("deparrow.hub")
    started.setLevel(logging.INFO)  # the start-up message, whatever the level of the rest

    def say(line: str) -> None:
        if log_format == "json":
            started.info(line.strip())
        else:
            click.echo(line, err=True)

    if mqtt_url:
        try:
            parse_mqtt_url(mqtt_url)
        except ValueError as e:
            die(str(e), 2)
    if mqtt_url and "," in mqtt_url and not mqtt_public_url:
        die("--mqtt names several servers (a broker cluster): give --mqtt-public-url, the "
            "addresses nodes and agents reach them by (docs/broker-cluster.md)", 2)  # fmt: skip
    if mqtt_auth_dir is not None and not mqtt_url:
        die("--mqtt-auth-dir is for a broker cluster given with --mqtt; the hub's own broker "
            "keeps its logins in the data directory", 2)  # fmt: skip
    if db_url is not None and not db_url.startswith(("postgresql://", "postgres://")):
        die(f"--db takes a postgresql:// URL, not {db_url!r} (without --db the hub keeps a "
            "SQLite file in its data directory)", 2)  # fmt: skip
    if (tls_cert is None) != (tls_key is None):
        die("give both --tls-cert and --tls-key, or neither (the hub then makes its own)", 2)
    tls = tls or tls_cert is not None
    config = HubConfig(
        data_dir=data_dir or default_data_dir(),
        db_url=db_url,
        region=region,
        result_grace_s=result_grace,
        mqtt_auth_dir=mqtt_auth_dir,
        mqtt_share_group=mqtt_share_group,
        host=host,
        port=port,
        mqtt_url=mqtt_url,
        broker=broker,
        broker_port=broker_port,
        mqtt_public_url=mqtt_public_url,
        public_url=public_url.rstrip("/") if public_url else None,
        welcome_grant_credits=welcome_grant,
        heartbeat_interval_s=heartbeat,
        queue_ttl_s=queue_ttl,
        service_period_s=service_period,
        max_attempts=max_attempts,
        output_retention_s=output_retention,
        max_files_bytes=max_files_mb * 1024 * 1024,
        fetch_allow_private=fetch_private,
        rate_requests_per_s=rate_limit,
        rate_requests_burst=2 * rate_limit,
        rate_logins_per_s=login_rate,
        fetch_ca_file=fetch_ca,
        tls=tls,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_names=tls_names,
        tls_mqtt_port=tls_mqtt_port,
        insecure_no_tls=insecure_no_tls,
    )
    problem = config.exposure_problem()
    if problem:
        die(problem, 2)
    if insecure_no_tls and not tls:
        warning = (
            f"serving {host} without TLS (--insecure-no-tls): API tokens, "
            "node passwords and results cross the network in plain text"
        )
        if log_format == "json":
            started.warning(warning)
        else:
            click.echo("deparrow: warning: " + warning, err=True)
    try:
        app = create_app(config)
        context = ssl_context(app)
    except Exception as e:  # a database we cannot open, a disk we cannot write, a bad key
        die(f"cannot start the hub: {e}")
    services = app[SERVICES]

    def announce(_message: str) -> None:
        # run_app calls this once the listening socket is bound, so nothing is claimed early.
        # 0.0.0.0 or :: is where the hub listens, not an address another machine can use
        outward = advertised_host(host, by_name=tls)  # a certificate names the host name
        where = f"[{outward}]" if ":" in outward else outward
        url = config.public_url or f"{'https' if tls else 'http'}://{where}:{port}"
        default = data_dir is None and port == 8765 and host == "127.0.0.1"
        ca = config.data_dir / "tls" / "ca.pem"
        pin = f" --ca {ca}" if tls and tls_cert is None and not default else ""
        if default:
            cli = "deparrow" + (f" --hub {url}" if tls else "")
        else:
            cli = f"deparrow --hub {url}{pin} --token $(cat {config.admin_token_path})"
        say(f"DEparrow hub on {url}  (web page: {url}/)")
        say(
            f"  MQTT broker: {advertised_url(services.mqtt_url)}"
            f" ({services.broker.kind if services.broker else 'external'})",
        )
        info = tls_of(app)
        if info is not None:
            if info.mqtt_port is not None:
                say(f"  MQTT over TLS for nodes and agents: port {info.mqtt_port}")
            say(f"  certificate: {info.files.cert}")
            if info.files.pinned:
                say(f"  nodes pin: --ca {info.files.fingerprint}")
            else:
                say("  nodes trust it through their system's CAs (no pin)")
        say(f"  data: {config.data_dir}")
        if config.db_url:
            say(f"  store: {services.db.describe()}")
        say(f"  admin token: {config.admin_token_path}")
        say(f"  add a node:  {cli} node token   (prints the edge-run command)")
        if outward != host and config.public_url is None:
            what = "name" if tls else "address on its default route"
            say(
                f"  other machines: {url} is this machine's {what}; "
                "if they know the hub by another name, restart with --public-url URL"
            )

    try:
        web.run_app(
            app,
            host=host,
            port=port,
            print=announce,
            handle_signals=True,
            ssl_context=context,
            loop=_event_loop(),
        )
    except ConnectionError as e:  # the broker (an OSError too, so it comes first)
        die(str(e))
    except OSError as e:
        die(f"cannot listen on {host}:{port}: {e.strerror or e}")
    except RuntimeError as e:
        die(str(e))


def _event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop where it is installed (the `hub` extra, on Linux and macOS): the
    same asyncio API with its transports in C, which serve HTTP and MQTT for less CPU than the
    standard loop's; the standard loop elsewhere, or when DEPARROW_EVENT_LOOP=asyncio."""
    if os.environ.get("DEPARROW_EVENT_LOOP", "") == "asyncio":
        return asyncio.new_event_loop()
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


@click.command("copy-store")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The data directory of the hub to move (default ~/.local/share/deparrow); its "
    "hub.sqlite is read.",
)
@click.option(
    "--db",
    "db_url",
    required=True,
    metavar="URL",
    help="A new, empty PostgreSQL database: postgresql://user@host/dbname.",
)
def copy_store_cmd(data_dir: Path | None, db_url: str) -> None:
    """Move a hub off its SQLite file: copy every user, node, job, blob and ledger entry into
    an empty PostgreSQL database, then start the hub with --db (docs/scale.md). Stop the hub
    first: what it writes during the copy would not be copied."""
    try:
        from hub.app import copy_store
        from hub.config import HubConfig, default_data_dir
    except ModuleNotFoundError as e:
        die(f"copying a store needs the server's packages ({e.name} is missing): "
            "pip install 'deparrow[hub]'")  # fmt: skip
    if not db_url.startswith(("postgresql://", "postgres://")):
        die(f"--db takes a postgresql:// URL, not {db_url!r}", 2)
    source = HubConfig(data_dir=data_dir or default_data_dir()).db_path
    click.echo(f"copying {source} into {db_url.split('@')[-1]}...", err=True)
    try:
        copied = copy_store(source, db_url, lambda line: click.echo(line, err=True))
    except (ValueError, sqlite3.Error) as e:
        die(f"the copy failed and the target is unchanged: {e}")
    click.echo(
        f"copied {sum(copied.values())} rows in {len(copied)} tables; the ledger balances. "
        f"Start the hub with: deparrow hub --data-dir {source.parent} --db {db_url}",
        err=True,
    )

"""The hub application factory: services opened and closed in cleanup_ctx, routes in one place."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp_jinja2
import jinja2
from aiohttp import web

from hub import web as dashboard
from hub.agents.registry import Agents
from hub.api import agents, health, http, limits, metrics, routes
from hub.api.jobs import fetch_inputs
from hub.api.nodes import TLS, HubTls
from hub.api.services import SERVICES, Services
from hub.cluster.leader import leadership_for
from hub.config import HubConfig
from hub.ledger.ledger import Ledger
from hub.market.jobs import Jobs
from hub.market.scheduler import Scheduler
from hub.market.spec import JobSpec
from hub.mqtt import logins
from hub.mqtt.broker import ChildBroker, choose, free_port
from hub.store import passwords
from hub.store.db import Database, open_database, snapshot_reads
from hub.store.rows import Store
from hub.tls import ensure_tls, server_context, server_names
from hub.web import live
from hub.web.pages import error_pages_middleware

log = logging.getLogger(__name__)

# How often the hub's own broker's logins are compared with the store, besides the changes
# made through Services (enrollment, new users): a node revoked by any path loses its login.
BROKER_SYNC_S = 10.0


def open_services(config: HubConfig) -> Services:
    config.data_dir.mkdir(parents=True, exist_ok=True)
    db = open_database(config.db_target)
    ledger = Ledger(db)
    ledger.ensure_mint()
    store = Store(db)
    if config.db_url and not config.jwt_secret:  # replicas must sign and verify alike
        config = dataclasses.replace(config, jwt_secret=store.shared_secret("jwt_secret"))
    jobs = Jobs(config, db, store, ledger)
    scheduler = Scheduler(config, store, jobs)
    services = Services(config, db, store, ledger, jobs, scheduler, Agents(db, store, ledger))
    services.leadership = leadership_for(config.db_target, db)
    return services


def migrate_all(db: Database) -> None:
    """Every component's schema, as a hub that has run on this store has it."""
    from hub.agents import schema as agents_schema
    from hub.cluster import registry
    from hub.ledger import schema as ledger_schema
    from hub.store import rows
    from hub.web import queries

    db.migrate(ledger_schema.COMPONENT, ledger_schema.MIGRATIONS)
    db.migrate("store", rows.MIGRATIONS)
    db.migrate(agents_schema.COMPONENT, agents_schema.MIGRATIONS)
    db.migrate(queries.COMPONENT, queries.MIGRATIONS)
    db.migrate(registry.COMPONENT, registry.MIGRATIONS)


def copy_store(source: Path, target: str, say: Callable[[str], None]) -> dict[str, int]:
    """`deparrow copy-store`: a stopped hub's SQLite file into a new PostgreSQL database.
    Raises ValueError (the target holds data, the copy does not add up)."""
    from hub.store.copy import copy_tables

    if not source.is_file():
        raise ValueError(f"{source} does not exist: give the --data-dir the hub ran with")
    src, dst = open_database(source), open_database(target)
    try:
        migrate_all(src)  # a store from an older version: brought up to date first
        migrate_all(dst)
        copied = copy_tables(src, dst, lambda table, n: say(f"  {table}: {n} rows"))
        for table, n in copied.items():
            row = dst.query_one(f"SELECT COUNT(*) AS n FROM {table}")
            held = int(row["n"]) if row is not None else 0
            if held != n:
                raise ValueError(f"{table}: {n} rows copied but the target holds {held}")
        audit = Ledger(dst).audit()
        if not audit.balanced:
            raise ValueError(f"the copied ledger does not balance: {audit}")
        return copied
    finally:
        src.close()
        dst.close()


def bootstrap_admin(services: Services) -> None:
    """First start: create the admin user and keep its token in the data directory."""
    # One transaction, so that replicas starting together on an empty store make one admin
    # (the second waits for the first's write lock, then finds its admin).
    with services.db.transaction():
        made = not any(u["role"] == "admin" for u in services.store.users())
        token = services.create_user("admin", "admin")[1] if made else None
    if token is None:
        path = services.config.admin_token_path
        services.admin_token = path.read_text().strip() if path.exists() else None
        return
    path = services.config.admin_token_path
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    services.admin_token = token
    log.info("created the admin user; its API token is in %s", path)


async def _keep_broker_in_sync(services: Services) -> None:
    while True:
        await asyncio.sleep(BROKER_SYNC_S)
        try:
            services.sync_broker()
        except Exception:  # a full disk, say: the broker keeps the logins it has
            log.exception("could not update the broker's logins")


def _hub_password_in(mqtt_urls: str) -> str:
    """The hub's password in --mqtt's URLs: the login the cluster's files must let in."""
    from hub.mqtt.bridge import parse_mqtt_urls

    for server in parse_mqtt_urls(mqtt_urls):
        if server.username == logins.HUB_USER and server.password:
            return server.password
    raise ValueError(
        f"--mqtt-auth-dir: the hub logs in to the broker cluster as {logins.HUB_USER}, so its "
        f"--mqtt URLs must carry that login: mqtt://{logins.HUB_USER}:PASSWORD@host:port"
    )


def _take_the_lead(services: Services) -> None:
    """A hub starting alone, or a replica taking over from a leader that died: assignments and
    agent calls that may never have gone out go out again, and calls whose deadline passed
    meanwhile are refunded."""
    services.bridge.resend_assignments()
    services.agents.tick()
    services.agents.resend_pending()
    services.bridge.dispatch()  # jobs that queued while no replica led


async def _services_ctx(app: web.Application) -> AsyncIterator[None]:
    from hub.ledger.writer import Writer
    from hub.mqtt.bridge import Bridge  # paho is only needed once the hub really runs

    services = app[SERVICES]
    config = services.config
    services.writer = Writer(services.db, ledger=services.ledger)
    services.writer.on_commit = app[metrics.METRICS].committed
    await services.writer.start()
    hub_password: str | None = None
    if config.mqtt_url is None:
        # Our own broker: logins and ACLs are ours to keep. An outside one (--mqtt) is the
        # operator's: the hub logs in with the login in its URL(s), if any, and writes the
        # logins only with --mqtt-auth-dir (a broker cluster, docs/broker-cluster.md).
        kind = choose(config.broker)
        tls = app.get(TLS)
        hub_password = logins.hub_password(config.data_dir)
        services.hub_login = logins.hub_account(passwords.hash_password(hub_password))
        if tls is not None and tls.mqtt_port is not None:
            # Nodes and agents on the TLS listener; the plain one is the bridge's, on loopback.
            services.broker = ChildBroker(
                kind,
                config.host,
                config.broker_port or free_port("127.0.0.1"),
                config.data_dir / "broker",
                auth=True,
                tls_cert=tls.files.cert,
                tls_key=tls.files.key,
                tls_port=tls.mqtt_port,
            )
        else:
            port = config.broker_port or free_port(config.host)
            services.broker = ChildBroker(
                kind, config.host, port, config.data_dir / "broker", auth=True
            )
        services.sync_broker()
        stale = services.store.logins_without_broker_hash()
        if stale:
            log.warning(
                "%d nodes or users date from before broker logins and cannot log in to the "
                "hub's broker: enroll those nodes again (users: create new ones)",
                stale,
            )
        services.broker.start()
        services.mqtt_url = services.broker.url
    else:
        services.mqtt_url = config.mqtt_url
        if config.mqtt_auth_dir is not None:  # the broker cluster's login files are ours
            services.cluster_auth = logins.AuthFiles(config.mqtt_auth_dir)
            services.hub_login = logins.hub_account(
                logins.cluster_hub_hash(_hub_password_in(config.mqtt_url))
            )
            services.sync_broker()
    bridge = Bridge(
        services.mqtt_url,
        services.store,
        services.jobs,
        services.scheduler,
        tick_s=min(1.0, config.heartbeat_interval_s / 2),
        on_change=lambda kind, data: services.on_change(kind, data),
        agents=services.agents,
        share_group=config.mqtt_share_group,
    )
    bridge.writer = services.writer  # one durable commit for messages and API writes

    async def fetch(spec: JobSpec) -> JobSpec:
        return await fetch_inputs(services, spec)

    bridge.messages.fetch_inputs = fetch  # an agent's https:// inputs, fetched off the batch
    bridge.messages.requeue = bridge.requeue
    bridge.messages.heard = app[metrics.METRICS].heartbeat
    bridge.messages.settled = app[metrics.METRICS].result_settled
    if hub_password is not None:
        bridge.client.username_pw_set(logins.HUB_USER, hub_password)
    try:
        await bridge.start()
    except Exception:
        if services.broker is not None:
            services.broker.stop()
        raise
    services.bridge = bridge
    # Nodes kept running while the hub was away: give each a full liveness window to be heard
    # before it is judged offline, instead of judging it by a heartbeat from before the restart.
    services.store.touch_nodes()
    services.agents.attach(bridge.publish)
    lead = services.leadership
    lead.on_lead = lambda: _take_the_lead(services)
    lead.on_pass = bridge.dispatch
    lead.on_change = functools.partial(live.record, app)  # another replica's change
    bridge.messages.leading = lambda: lead.leading
    bridge.messages.ask_leader = lead.request_pass
    await lead.start()
    resync = asyncio.create_task(_keep_broker_in_sync(services))
    from hub.api import bootstrap

    try:
        await bootstrap.join(app)  # this replica's row in the registry (GET /api/v1/bootstrap)
        yield
    finally:
        await bootstrap.leave(app)
        await lead.stop()
        resync.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await resync
        services.agents.attach(None)
        await bridge.stop()
        await services.writer.stop()  # drains: every accepted movement is committed first
        if services.broker is not None:
            services.broker.stop()
        services.db.close()


# How long a GET or HEAD waits for the group commit's COMMIT in flight when it arrives
# (without blocking the loop) before it is answered from the last durable state instead. A
# healthy disk commits in a millisecond or two, so reads normally see everything the hub had
# decided when they arrived, its own follow-ups (a scheduling pass after a submission)
# included; a slow disk delays a read by this much at most.
READ_GRACE_S = 0.1


@web.middleware
async def snapshot_reads_middleware(
    request: web.Request, handler: http.Handler
) -> web.StreamResponse:
    """GET and HEAD only read: a COMMIT on its way to disk delays them by READ_GRACE_S at
    most; after that they are answered from the last durable state (hub/store/db.py). The other
    methods may write, and decide on what they read: they wait for the COMMIT."""
    if request.method in ("GET", "HEAD"):
        await request.app[SERVICES].db.settled(READ_GRACE_S)
        with snapshot_reads():
            return await handler(request)
    return await handler(request)


def _tls(config: HubConfig) -> HubTls:
    """The TLS files (made on first start when the operator gave none), and the port of the
    broker's TLS listener when the broker is ours. Raises hub.tls.TlsError."""
    files = ensure_tls(
        config.data_dir,
        config.tls_cert,
        config.tls_key,
        server_names(config.host, config.tls_names),
    )
    server_context(files)  # a key that does not fit fails here, before anything listens
    own_broker = config.mqtt_url is None
    port = (config.tls_mqtt_port or free_port(config.host)) if own_broker else None
    return HubTls(files, port)


def ssl_context(app: web.Application) -> ssl.SSLContext | None:
    """What web.run_app serves HTTPS with; None when the hub serves plain HTTP."""
    tls = app.get(TLS)
    return server_context(tls.files) if tls is not None else None


def tls_of(app: web.Application) -> HubTls | None:
    """The TLS files and ports the hub serves with; None when it serves none."""
    return app.get(TLS)


def _limits(config: HubConfig) -> list[Any]:
    """The rate-limit middleware (hub/api/limits.py), unless both limits are off."""
    if config.rate_requests_per_s <= 0 and config.rate_logins_per_s <= 0:
        return []
    requests = limits.Rate(config.rate_requests_per_s, config.rate_requests_burst)
    logins = limits.Rate(config.rate_logins_per_s, config.rate_logins_burst)
    return [
        limits.middleware(
            requests if config.rate_requests_per_s > 0 else None,
            logins if config.rate_logins_per_s > 0 else None,
            exempt_loopback=not config.rate_limit_loopback,
        )
    ]


def _changed(app: web.Application, kind: str, data: dict[str, Any]) -> None:
    """A change this replica made: its open dashboards, and the other replicas' (hub/cluster)."""
    live.record(app, kind, data)
    app[SERVICES].leadership.share(kind, data)


def create_app(config: HubConfig, services: Services | None = None) -> web.Application:
    problem = config.exposure_problem()
    if problem:
        raise ValueError(problem)
    if not config.db_url:
        config = config.with_secret()  # a hub alone keeps its JWT key in its data directory
    services = services or open_services(config)
    config = services.config
    app = web.Application(
        middlewares=[
            metrics.middleware,  # outermost: every request is timed, refused ones too
            *_limits(config),
            http.error_middleware,
            error_pages_middleware,  # the dashboard's errors as pages; the API's stay JSON
            snapshot_reads_middleware,
        ],
        client_max_size=max(config.max_module_bytes * 2, config.max_files_bytes) + 1024 * 1024,
    )
    if config.tls:
        app[TLS] = _tls(config)
    elif config.insecure_no_tls:
        log.warning(
            "serving %s without TLS (--insecure-no-tls): tokens, node passwords and results "
            "cross the network in plain text",
            config.host,
        )
    bootstrap_admin(services)
    app[SERVICES] = services
    app[metrics.METRICS] = metrics.HubMetrics(services)  # this app's own registry
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(str(Path(__file__).parent / "templates")),
        autoescape=True,
    )
    services.on_change = functools.partial(_changed, app)
    routes.add_routes(app)
    metrics.add_routes(app)
    health.add_routes(app)
    agents.add_routes(app)
    dashboard.add_routes(app)
    app.cleanup_ctx.append(_services_ctx)
    return app

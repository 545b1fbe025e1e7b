"""run_node: the node's main loop, from a loaded node.json until Ctrl-C or SIGTERM. Started by
edge-run (edge/cli.py) once the node is enrolled."""

from __future__ import annotations

import logging
import os
import signal
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from edge.node_config import default_data_dir

log = logging.getLogger("edge")


def _reachable(path: Path) -> bool:
    """Whether any user may pass through every folder down to path (o+x on each)."""
    path = path.resolve()
    return all(os.stat(p).st_mode & stat.S_IXOTH for p in [*reversed(path.parents), path])


def jobfiles_dir(data_dir: Path, node_id: str, native: bool) -> str:
    """Where file jobs' directories go: DATA_DIR/jobfiles, unless native jobs run here and
    their user (nobody) could not reach it (a data directory under /root or a 0700 home):
    then a folder of this node's own in the system's temporary folder."""
    base = data_dir / "jobfiles"
    base.parent.mkdir(parents=True, exist_ok=True)
    if not native or _reachable(base.parent):
        return str(base)
    tmp = Path(tempfile.gettempdir()) / f"deparrow-jobfiles-{os.getuid()}-{node_id}"
    try:
        os.mkdir(tmp, 0o711)
    except FileExistsError:
        st = os.lstat(tmp)  # in a folder anyone may write: it must be ours, and no link
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise click.ClickException(f"{tmp} is not this node's own folder; remove it") from None
    return str(tmp)


class BrokerWatch:
    """One line on stderr each time the node loses the hub's broker and each time it has it
    again: without -v a node said nothing while it was cut off (issue 19). paho reconnects on
    its own; results made meanwhile wait in the outbox and go out once it is back."""

    def __init__(self, url: str, say: Any) -> None:
        self.url, self.say, self.up = url, say, True

    def observe(self, connected: bool) -> None:
        if connected == self.up:
            return
        self.up = connected
        if connected:
            self.say(f"edge-run: connected to the hub's broker at {self.url} again")
        else:
            self.say(
                f"edge-run: lost the hub's broker at {self.url}; reconnecting (results wait in "
                "the outbox until it is back)"
            )


def node_mqtt(
    config: dict[str, Any],
    bootstrap: str | None = None,
    region: str | None = None,
    window_s: float | None = None,
) -> Any:
    """The node's MQTT adapter: node.json's broker (several, comma-separated: failing over
    between them); with a bootstrap URL, the brokers the hub's bootstrap list gives, then
    node.json's, failing over between them (edge/node_failover.py). mqtts:// is verified
    against the CA pinned at enrollment."""
    from edge.mqtt_paho import PahoMqtt

    ca = config.get("ca")
    # node.json's own broker; a list where the hub gives out a broker cluster's servers
    own = [u.strip() for u in str(config["mqtt"]["url"]).split(",") if u.strip()]
    if not bootstrap and len(own) == 1:
        return PahoMqtt(own[0], ca_certs=ca)
    from edge.bootstrap import base_urls, broker_urls, fetch, replica_urls
    from edge.enroll import tls_context
    from edge.node_failover import WINDOW_S, FailoverMqtt

    window = WINDOW_S if window_s is None else window_s

    if not bootstrap:
        return FailoverMqtt(own, window_s=window, ca_certs=ca,
                            say=lambda line: click.echo(line, err=True))  # fmt: skip

    replicas = base_urls(bootstrap)

    def listed() -> list[str]:
        # Any live replica serves the list: the bootstrap URLs first, then those it named.
        answer = fetch(replicas, region, 10.0, tls_context(ca_file=ca))
        replicas.extend(u for u in replica_urls(answer) if u not in replicas)
        return broker_urls(answer)

    try:
        brokers = listed()
    except OSError as e:
        click.echo(f"edge-run: warning: {e}; using the broker in node.json", err=True)
        brokers = []
    return FailoverMqtt(
        [*brokers, *own],  # node.json's come last
        refresh=listed,
        window_s=window,
        ca_certs=ca,
        say=lambda line: click.echo(line, err=True),
    )


def run_node(
    config: dict[str, Any],
    max_cpu: float | None,
    dashboard: tuple[str, int] | None = None,
    data_dir: Path | None = None,
    bootstrap: str | None = None,
    region: str | None = None,
    failover_after_s: float | None = None,
) -> None:
    """dashboard: (host, port) of the node's page, None for none. bootstrap: the hub's
    replica URL(s) whose bootstrap list names the brokers to fail over between; region:
    prefer its brokers; failover_after_s: how long a lost broker may take to come back."""
    # Only what the hello and the first heartbeat need is imported before them: the page
    # (http.server), the executors' engines and the subcommands come later or not at all.
    from edge.core.outbox import Outbox
    from edge.idle import IdleGate, Monitor, Preferences
    from edge.preferences import build_executors

    def warn(message: str) -> None:
        click.echo(f"edge-run: warning: {message}", err=True)

    from edge.core.session import Session
    from edge.resources import Offered

    stopping = []

    def stop(*_: Any) -> None:
        stopping.append(True)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    mqtt = node_mqtt(config, bootstrap, region, failover_after_s)
    page: Any = None
    prefs = config.get("preferences") or {}
    idle = (
        Preferences.permissive()
        if prefs.get("always_run")
        else Preferences.from_dict(prefs.get("idle"), where="idle")
    )
    from edge.core import jobfiles
    from edge.gpu import detect
    from edge.preferences import slots

    # The GPUs are read once: a node offers (resources.gpu) at most those it announced.
    gpus = [
        {"index": g.index, "name": g.name, "uuid": g.uuid, "memory_mb": g.memory_mb}
        for g in detect()
    ]
    jobs_at_once = slots(prefs, idle.usable_cores(os.cpu_count() or 1))

    # the executors keep their job directories under the node's own data directory
    config = {
        **config,
        "data_dir": str(data_dir or default_data_dir()),
        "slots": jobs_at_once,
        "gpus": gpus,
    }
    caps = jobfiles.limits(prefs.get("files"))
    if caps is not None:  # file jobs' directories, emptied at start (edge/core/jobfiles.py)
        native = bool((prefs.get("native") or {}).get("enabled"))
        where = jobfiles_dir(data_dir or default_data_dir(), str(config["node_id"]), native)
        config = {**config, "files": {**caps, "dir": where}}
    with build_executors(config, warn) as executor:
        monitor = Monitor(exclude=executor.job_pids, gpus=len(gpus))
        gate = IdleGate(idle, monitor, executor=executor)
        outbox = Outbox(str((data_dir or default_data_dir()) / "outbox.log"), log=log.warning)
        session = Session(
            config,
            mqtt,
            executor,
            Offered(max_cpu=max_cpu, gate=gate),
            log=log.info,
            outbox=outbox,
            gate=gate,
        )
        try:
            session.start()
        except ConnectionError as e:
            raise click.ClickException(str(e)) from None
        if dashboard:  # after the hello: the page's http.server is no part of going online
            from edge.dashboard import start_dashboard

            page, warning = start_dashboard(config, *dashboard, data_dir)
            if warning:  # the node runs on without its page
                click.echo(f"edge-run: warning: {warning}", err=True)
            elif page is not None:
                click.echo(f"node page: {page.url}", err=True)
        gpu_text = ", ".join(f"{g['name']} (GPU {g['index']})" for g in gpus) or "no GPU"
        broker = getattr(mqtt, "url", None) or config["mqtt"]["url"]  # failover: the one taken
        click.echo(
            f"node {config['node_id']} online at {broker}; "
            f"earning for {config['owner']}; up to {jobs_at_once} jobs at once; {gpu_text}."
            " Ctrl-C stops.",
            err=True,
        )
        if not prefs.get("always_run") and not idle.run_if_user_active:
            click.echo(
                f"jobs run only while you leave this machine alone ({idle.idle_time_to_run_s:g} s"
                " without activity first); --always-run or a preferences file (docs/edge.md)"
                " changes that",
                err=True,
            )
        watch = BrokerWatch(config["mqtt"]["url"], lambda line: click.echo(line, err=True))
        try:
            while not stopping:
                up = mqtt.connected()  # with --bootstrap, this may move to another broker
                watch.url = getattr(mqtt, "url", watch.url)
                watch.observe(up)
                try:
                    session.step()
                except Exception:  # keep serving; a fault here must not take the node down
                    log.exception("node loop error; continuing")
                    time.sleep(1.0)
                    continue
                if page is not None:
                    page.status.observe(session, mqtt)  # cheap; never raises
                # A running job finishes in its worker: look again soon rather than at the
                # next message, so a result is not held back by the idle poll interval.
                mqtt.wait(0.002 if session.runner.running else 0.05)
        finally:
            if page is not None:
                page.stop()
            session.stop()
            click.echo(
                f"node {config['node_id']} stopped: {session.runner.completed} jobs completed, "
                f"{session.runner.failed} failed",
                err=True,
            )

"""edge-run: start a node (`edge-run --hub URL --token TOKEN`) or run one job locally
(`edge-run job FILE.wasm`). A thin layer: library errors become one clear line and an exit code."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import click

# Exit codes for failures of a local job that are not the job's own exit code.
EXIT_CODES = {
    "timeout": 124,  # as coreutils' timeout(1)
    "memory limit": 125,
    "trap": 126,
    "invalid module": 65,  # EX_DATAERR
    "invalid argument": 64,  # EX_USAGE
    "gas limit": 124,  # like a timeout: the job used up its budget
    "executor error": 70,  # EX_SOFTWARE
    "image not found": 66,  # EX_NOINPUT
    "docker engine unreachable at": 69,  # EX_UNAVAILABLE
    "network not allowed": 77,  # EX_NOPERM
}

log = logging.getLogger("edge")


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(os.environ.get("DEPARROW_EDGE_DATA", str(Path(base) / "deparrow-edge")))


def enroll(hub: str, token: str, name: str, config_path: Path) -> dict[str, Any]:
    from edge.enroll import EnrollError
    from edge.enroll import enroll as request_enrollment
    from edge.resources import machine

    body = {"token": token, "name": name, "engines": ["wasm"], **machine()}
    try:
        config = request_enrollment(hub, body)
    except EnrollError as e:
        raise click.ClickException(str(e)) from None
    config_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = config_path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(config, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, config_path)  # a crash mid-write never leaves half a config
    return config


def load_config(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except ValueError as e:
        raise click.ClickException(
            f"{path} is not valid JSON ({e}); remove it to re-enroll"
        ) from None
    for key in ("node_id", "node_secret", "mqtt"):
        if key not in data:
            raise click.ClickException(f"{path} lacks {key!r}; remove it to re-enroll")
    return data


def load_preferences(path: Path) -> dict[str, Any]:
    """The owner's preferences file (--config): one JSON object."""
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise click.ClickException(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise click.ClickException(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise click.ClickException(
            f'{path} must hold a JSON object of preferences, like {{"idle": {{"hours": '
            f'"22:00-07:00"}}}}'
        )
    from edge.preferences import check_preferences

    try:
        check_preferences(data)
    except ValueError as e:
        raise click.ClickException(f"{path}: {e}") from None
    return data


def run_node(
    config: dict[str, Any],
    max_cpu: float | None,
    dashboard: tuple[str, int] | None = None,
    data_dir: Path | None = None,
) -> None:
    """dashboard: (host, port) of the node's page, None for none."""
    from edge.dashboard import start_dashboard
    from edge.idle import IdleGate, Monitor, Preferences
    from edge.mqtt_paho import PahoMqtt
    from edge.outbox import Outbox
    from edge.preferences import build_executors

    def warn(message: str) -> None:
        click.echo(f"edge-run: warning: {message}", err=True)

    from edge.resources import Offered
    from edge.session import Session

    stopping = []

    def stop(*_: Any) -> None:
        stopping.append(True)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    mqtt = PahoMqtt(config["mqtt"]["url"])
    page, warning = start_dashboard(config, *dashboard, data_dir) if dashboard else (None, None)
    if warning:  # the node runs on without its page
        click.echo(f"edge-run: warning: {warning}", err=True)
    elif page is not None:
        click.echo(f"node page: {page.url}", err=True)
    prefs = config.get("preferences") or {}
    idle = (
        Preferences.permissive()
        if prefs.get("always_run")
        else Preferences.from_dict(prefs.get("idle"), where="idle")
    )
    # One job at a time for now: the scheduler gives a node one job.
    with build_executors(config, warn) as executor:
        gate = IdleGate(idle, Monitor(exclude=executor.job_pids), executor=executor)
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
            if page is not None:
                page.stop()
            raise click.ClickException(str(e)) from None
        click.echo(
            f"node {config['node_id']} online at {config['mqtt']['url']}; "
            f"earning for {config['owner']}. Ctrl-C stops.",
            err=True,
        )
        if not prefs.get("always_run") and not idle.run_if_user_active:
            click.echo(
                f"jobs run only while you leave this machine alone ({idle.idle_time_to_run_s:g} s"
                " without activity first); --always-run or a preferences file (docs/edge.md)"
                " changes that",
                err=True,
            )
        try:
            while not stopping:
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


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--hub", envvar="DEPARROW_HUB", help="Hub URL, e.g. http://127.0.0.1:8765")
@click.option("--token", envvar="DEPARROW_ENROLL_TOKEN", help="Enrollment token from the hub.")
@click.option("--name", default=None, help="Name shown on the hub (default: host name).")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where the node keeps its identity (default ~/.local/share/deparrow-edge).",
)
@click.option("--max-cpu", type=float, default=None, help="CPU-equivalents to offer at most.")
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
    name: str | None,
    data_dir: Path | None,
    max_cpu: float | None,
    prefs_path: Path | None,
    dashboard_port: int,
    dashboard_host: str,
    always_run: bool,
    verbose: bool,
) -> None:
    """Run a DEparrow node: enroll with a hub once, then run jobs while this machine is idle.

    \b
    edge-run --hub http://HUB:8765 --token dpe_...   start (and on first run, enroll) a node
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
    if config is None:
        if not hub or not token:
            raise click.UsageError(
                "this node is not enrolled yet: pass --hub URL --token TOKEN "
                "(create a token on the hub with 'deparrow node token')"
            )
        import socket

        config = enroll(hub, token, name or socket.gethostname(), config_path)
        click.echo(f"enrolled as {config['node_id']} (identity in {config_path})", err=True)
    if preferences is not None:
        config["preferences"] = preferences  # for this run; node.json keeps the identity only
    if always_run:
        config["preferences"] = {**(config.get("preferences") or {}), "always_run": True}
    page = (dashboard_host, dashboard_port) if dashboard_port else None
    run_node(config, max_cpu, page, config_path.parent)


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


def _parse_env(values: tuple[str, ...]) -> dict[str, str]:
    env = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--env")
        env[key] = value
    return env


@main.command("job", context_settings={"ignore_unknown_options": False})
@click.argument("target")
@click.argument("args", nargs=-1)
@click.option(
    "--engine",
    type=click.Choice(["wasm3", "wasmtime", "docker", "native"]),
    default="wasm3",
    show_default=True,
    help="wasm3/wasmtime: TARGET is a .wasm file; docker: an image; native: a command.",
)
@click.option(
    "--input",
    "input_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="File fed to the job's stdin.",
)
@click.option("--env", "env", multiple=True, metavar="K=V", help="Environment variable (repeat).")
@click.option(
    "--timeout",
    type=float,
    default=60.0,
    show_default=True,
    help="Seconds before the job is killed.",
)
@click.option("--memory", type=int, default=64, show_default=True, help="Memory cap, MiB.")
@click.option(
    "--invoke",
    default=None,
    metavar="FUNC",
    help="Wasm: call this exported function with integer ARGS and print what it returns.",
)
@click.option(
    "--gas",
    type=click.IntRange(1),
    default=None,
    help="wasm3: gas budget for a module instrumented with metering.usegas.",
)
@click.option("--network", is_flag=True, help="docker/native: let the job use the network.")
@click.option("--docker-url", default=None, help="Docker API (default $DOCKER_HOST or Podman's).")
def job_cmd(
    target: str,
    args: tuple[str, ...],
    engine: str,
    input_path: Path | None,
    env: tuple[str, ...],
    timeout: float,
    memory: int,
    invoke: str | None,
    gas: int | None,
    network: bool,
    docker_url: str | None,
) -> None:
    """Run one job locally: its stdout is ours, its exit code is ours.

    \b
    edge-run job fib.wasm --invoke fib -- 25
    edge-run job --engine docker localhost/deparrow/busybox -- sh -c 'echo hi'
    edge-run job --engine native -- sh -c 'echo hi'     (TARGET is the command)

    Arguments after `--` go to the job (argv for a WASI program, integers for --invoke, the
    command line in a container or sandbox).
    """

    def fail(message: str, code: int) -> NoReturn:
        click.echo(f"edge-run: {message}", err=True)
        sys.exit(code)

    if not (0 < timeout <= 7 * 86400):  # also refuses nan and inf
        fail("--timeout must be more than 0 and at most 604800 seconds", 2)
    if not (0 < memory <= 1024 * 1024):
        fail("--memory must be between 1 and 1048576 MiB", 2)
    if invoke is not None and engine in ("docker", "native"):
        fail("--invoke calls a Wasm export; it does not apply to --engine " + engine, 2)
    if network and engine not in ("docker", "native"):
        fail("--network applies to --engine docker or native; Wasm jobs have no network", 2)
    stdin = b""
    if input_path is not None:
        try:
            stdin = input_path.read_bytes()
        except OSError as e:
            fail(f"cannot read {input_path}: {e.strerror}", 66)
    try:
        env_map = _parse_env(env)
    except click.BadParameter as e:
        fail(e.format_message(), 2)
    spec: dict[str, Any] = {
        "job_id": "local",
        "env": env_map,
        "stdin": stdin,
        "timeout_s": timeout,
        "memory_mb": memory,
    }
    executor: Any
    if engine in ("wasm3", "wasmtime"):
        try:
            data = Path(target).read_bytes()
        except OSError as e:
            fail(f"cannot read {target}: {e.strerror}", 66)
        spec.update(module=data, entrypoint=invoke or "_start", args=list(args), gas=gas)
        if engine == "wasmtime":
            try:
                from edge.executors.wasmtime_exec import WasmtimeExecutor
            except ImportError as e:
                fail(
                    f"the wasmtime engine is not installed ({e}): pip install 'deparrow[full]'", 69
                )
            executor = WasmtimeExecutor()
        else:
            from edge.executors.wasm3 import Wasm3Executor

            executor = Wasm3Executor(workers=1)
    elif engine == "docker":
        from edge.executors.docker import DockerExecutor

        spec.update(image=target, command=list(args), network=network)
        executor = DockerExecutor(docker_url, allow_network=network)
    else:
        from edge.executors.native import NativeExecutor

        spec.update(command=[target, *args], network=network)
        try:
            executor = NativeExecutor(enabled=True, allow_network=network)
        except Exception as e:  # no sandbox here: say so, never run unsandboxed silently
            fail(str(e), 69)
    started = time.monotonic()
    with executor:
        outcome = executor.run(spec)
    sys.stdout.buffer.write(outcome.get("stdout") or b"")
    sys.stdout.flush()
    sys.stderr.buffer.write(outcome.get("stderr") or b"")
    sys.stderr.flush()
    if outcome["status"] != "completed":
        error = outcome.get("error") or "failed"
        kind = error.split(":", 1)[0].split(" (", 1)[0]
        if kind.startswith("docker engine unreachable at"):
            kind = "docker engine unreachable at"
        log.debug("failed after %.3fs", time.monotonic() - started)
        fail(error, EXIT_CODES.get(kind, 1))
    if invoke is not None and outcome.get("returns") is not None:
        click.echo(" ".join(str(v) for v in outcome["returns"]))
    sys.exit(int(outcome.get("exit_code") or 0))


# -- edge-run service: the node as a systemd unit (edge/service.py) -------------------------


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


@main.group("service")
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
        main.make_context("edge-run", ["--data-dir", str(data_dir), *edge_args])
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


if __name__ == "__main__":
    main()

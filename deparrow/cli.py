"""deparrow: run the hub, submit jobs, read wallets and nodes, run the demo.

A thin layer over hub.client and hub.app: errors become one clear line and a non-zero exit.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import time
import uuid
from pathlib import Path
from typing import Any, NoReturn

import click

from deparrow.client import Client, HubError
from hub.config import HubConfig, default_data_dir
from hub.market.spec import TERMINAL_STATES

DEFAULT_HUB = "http://127.0.0.1:8765"


def _default_token() -> str | None:
    """The local hub's admin token: used only when talking to the local hub at its default
    address, so a token for one hub is never silently sent to another."""
    path = default_data_dir() / "admin-token"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def die(message: str, code: int = 1) -> NoReturn:
    click.echo(f"deparrow: {message}", err=True)
    sys.exit(code)


def emit(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


class Ctx:
    def __init__(self, hub: str, token: str | None) -> None:
        self.hub = hub
        self.token = token

    def client(self) -> Client:
        token = self.token
        if token is None and self.hub.rstrip("/") == DEFAULT_HUB:
            token = _default_token()
        return Client(self.hub, token)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--hub",
    envvar="DEPARROW_HUB",
    default=DEFAULT_HUB,
    show_default=True,
    help="Hub URL (env DEPARROW_HUB).",
)
@click.option(
    "--token",
    envvar="DEPARROW_TOKEN",
    default=None,
    help="API token (env DEPARROW_TOKEN; default: the local hub's admin token).",
)
@click.pass_context
def main(ctx: click.Context, hub: str, token: str | None) -> None:
    """DEparrow: idle machines run other people's WebAssembly jobs for credits."""
    ctx.obj = Ctx(hub, token)


def run_cli(fn: Any) -> Any:
    """Turn HubError into one line on stderr."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except HubError as e:
            extra = ""
            if e.body.get("field") and not str(e).startswith(str(e.body["field"])):
                extra = f" (field: {e.body['field']})"
            die(f"{e}{extra}", 1)

    return wrapper


# --- hub -------------------------------------------------------------------------------
@main.command("hub")
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
@click.option("--mqtt-public-url", default=None, help="Broker URL to give nodes.")
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
@click.option("-v", "--verbose", is_flag=True)
def hub_cmd(
    host: str,
    port: int,
    data_dir: Path | None,
    mqtt_url: str | None,
    broker: str,
    broker_port: int,
    mqtt_public_url: str | None,
    welcome_grant: int,
    heartbeat: float,
    queue_ttl: float,
    service_period: int,
    max_attempts: int,
    verbose: bool,
) -> None:
    """Run the hub: REST API, ledger, scheduler, MQTT bridge and web page."""
    from aiohttp import web

    from hub.api.services import SERVICES
    from hub.app import create_app
    from hub.mqtt.bridge import parse_mqtt_url

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if mqtt_url:
        try:
            parse_mqtt_url(mqtt_url)
        except ValueError as e:
            die(str(e), 2)
    config = HubConfig(
        data_dir=data_dir or default_data_dir(),
        host=host,
        port=port,
        mqtt_url=mqtt_url,
        broker=broker,
        broker_port=broker_port,
        mqtt_public_url=mqtt_public_url,
        welcome_grant_credits=welcome_grant,
        heartbeat_interval_s=heartbeat,
        queue_ttl_s=queue_ttl,
        service_period_s=service_period,
        max_attempts=max_attempts,
    )
    try:
        app = create_app(config)
    except Exception as e:  # a database we cannot open, a disk we cannot write
        die(f"cannot start the hub: {e}")
    services = app[SERVICES]

    def announce(_message: str) -> None:
        # run_app calls this once the listening socket is bound, so nothing is claimed early.
        url = f"http://{host}:{port}"
        default = data_dir is None and port == 8765 and host == "127.0.0.1"
        cli = (
            "deparrow"
            if default
            else f"deparrow --hub {url} --token $(cat {config.admin_token_path})"
        )
        click.echo(f"DEparrow hub on {url}  (web page: {url}/)", err=True)
        click.echo(
            f"  MQTT broker: {services.mqtt_url}"
            f" ({services.broker.kind if services.broker else 'external'})",
            err=True,
        )
        click.echo(f"  data: {config.data_dir}", err=True)
        click.echo(f"  admin token: {config.admin_token_path}", err=True)
        click.echo(f"  add a node:  {cli} node token   (prints the edge-run command)", err=True)

    try:
        web.run_app(app, host=host, port=port, print=announce, handle_signals=True)
    except ConnectionError as e:  # the broker (an OSError too, so it comes first)
        die(str(e))
    except OSError as e:
        die(f"cannot listen on {host}:{port}: {e.strerror or e}")
    except RuntimeError as e:
        die(str(e))


# --- jobs ------------------------------------------------------------------------------
@main.group("job")
def job_group() -> None:
    """Submit jobs and read their results."""


def _print_job(job: dict[str, Any]) -> None:
    click.echo(f"job {job['id']}  {job['name']}  {job['state']}")
    if job.get("node"):
        click.echo(f"  node:   {job['node']} (attempt {job['attempt']})")
    click.echo(
        f"  hold:   {job['hold']} credits"
        + (f", cost {job['cost']}" if job.get("cost") is not None else "")
    )
    result = job.get("result")
    if job.get("reason") and not (result and result.get("error") == job["reason"]):
        click.echo(f"  reason: {job['reason']}")
    if result:
        if result.get("returns") is not None:
            click.echo(f"  returns: {' '.join(str(v) for v in result['returns'])}")
        if result.get("exit_code") is not None:
            click.echo(f"  exit code: {result['exit_code']}")
        if result.get("error"):
            click.echo(f"  error:  {result['error']}")
        if result.get("stdout"):
            click.echo("  stdout:")
            for line in result["stdout"].splitlines()[:50]:
                click.echo("    " + line)
        click.echo(f"  time:   {result['wall_ms']} ms wall, {result['cpu_ms']} ms CPU")


def _job_name(module: str) -> str:
    """A job name from a file or example name, in the characters the hub accepts."""
    stem = Path(module.split(":")[-1]).stem
    return re.sub(r"[^\w.\- ]+", "-", stem).strip("-")[:128] or "job"


def _ref(client: Client, value: str) -> str:
    if value.startswith(("example:", "sha256:", "base64:")):
        return value
    try:
        data = Path(value).read_bytes()
    except OSError as e:
        die(f"cannot read {value}: {e.strerror}", 66)
    return client.upload(data)


@job_group.command("run")
@click.argument("module")
@click.argument("args", nargs=-1)
@click.option("--invoke", default=None, metavar="FUNC", help="Exported function to call.")
@click.option(
    "--input", "input_path", default=None, metavar="FILE", help="File fed to the job's stdin."
)
@click.option("--env", multiple=True, metavar="K=V", help="Environment variable (repeat).")
@click.option(
    "--timeout",
    default=60,
    show_default=True,
    type=click.IntRange(1),
    help="Seconds; the hold is priced on it.",
)
@click.option(
    "--cpu",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0, 256, min_open=True),
    help="CPU-equivalents (billed at least 1).",
)
@click.option("--memory", default=64, show_default=True, type=click.IntRange(1), help="MiB.")
@click.option("--priority", type=click.Choice(["normal", "high"]), default="normal")
@click.option("--name", default=None)
@click.option("--wait", is_flag=True, help="Wait for the result and print it.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@run_cli
def job_run(
    obj: Ctx,
    module: str,
    args: tuple[str, ...],
    invoke: str | None,
    input_path: str | None,
    env: tuple[str, ...],
    timeout: int,
    cpu: float,
    memory: int,
    priority: str,
    name: str | None,
    wait: bool,
    as_json: bool,
) -> None:
    """Submit MODULE (a .wasm file or example:NAME) to the network.

    Arguments after `--` go to the job. The price is computed by the hub; the maximum is held
    from your wallet until the job settles.
    """
    if not math.isfinite(cpu):
        die("--cpu must be a number of CPUs, like 1 or 0.5", 2)
    client = obj.client()
    env_map = {}
    for item in env:
        k, sep, v = item.partition("=")
        if not sep or not k:
            die(f"--env {item!r} is not KEY=VALUE", 2)
        env_map[k] = v
    spec: dict[str, Any] = {
        "name": name or _job_name(module),
        "engine": {
            "type": "wasm",
            "module": _ref(client, module),
            "entrypoint": invoke or "_start",
            "args": list(args),
            "env": env_map,
        },
        "resources": {"cpu": cpu, "memory_mb": memory},
        "timeout": timeout,
        "priority": priority,
    }
    if input_path:
        spec["input"] = _ref(client, input_path)
    # A key per invocation: if the answer is lost and the request retried, one job, one hold.
    submitted = client.submit(spec, idempotency_key=str(uuid.uuid4()))
    if not wait:
        if as_json:
            emit(submitted)
        else:
            click.echo(f"submitted {submitted['id']}: {submitted['hold']} credits held")
        return
    if not as_json:
        click.echo(
            f"submitted {submitted['id']}: {submitted['hold']} credits held; waiting…", err=True
        )
    job = client.wait(submitted["id"], timeout_s=timeout + 120)
    if as_json:
        emit(job)
    else:
        _print_job(job)
    if job["state"] != "completed":
        sys.exit(1)
    sys.exit(int((job.get("result") or {}).get("exit_code") or 0))  # the job's own exit code


@job_group.command("get")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@run_cli
def job_get(obj: Ctx, job_id: str, as_json: bool) -> None:
    """Show a job: state, result, cost, node, timings."""
    job = obj.client().job(job_id)
    emit(job) if as_json else _print_job(job)


@job_group.command("list")
@click.option("--state", default=None)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@run_cli
def job_list(obj: Ctx, state: str | None, as_json: bool) -> None:
    """My jobs, newest first."""
    jobs = obj.client().jobs(state=state)
    if as_json:
        emit(jobs)
        return
    if not jobs:
        click.echo("no jobs")
    for j in jobs:
        click.echo(f"{j['id']}  {j['state']:<10} {j['name']:<16} cost {j['cost'] or '-'}")


@job_group.command("cancel")
@click.argument("job_id")
@click.pass_obj
@run_cli
def job_cancel(obj: Ctx, job_id: str) -> None:
    """Cancel a job and release its hold (safe to repeat)."""
    client = obj.client()
    before = client.job(job_id)["state"]
    job = client.cancel(job_id)
    if before in TERMINAL_STATES:
        click.echo(f"job {job['id']} was already {before}; nothing to cancel")
    else:
        click.echo(f"job {job['id']} cancelled; its hold of {job['hold']} credits is released")


# --- wallet, nodes, users, status ------------------------------------------------------
@main.group("wallet", invoke_without_command=True)
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
        click.echo(f"{when}  {i['amount']:>14}  = {i['balance_after']:>14}  {i['reason']}")


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
    import uuid

    r = obj.client().transfer(to, amount, key or str(uuid.uuid4()), memo)
    if as_json:
        emit(r)
    else:
        again = " (already done: this key was used before)" if r["replayed"] else ""
        click.echo(f"sent {r['amount']} credits to {r['to']}{again}; balance {r['balance']}")


@main.group("ledger")
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


@main.group("node")
def node_group() -> None:
    """Nodes: list them, create enrollment tokens, remove them."""


@node_group.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@run_cli
def node_list(obj: Ctx, as_json: bool) -> None:
    """Nodes I own (all nodes for an admin)."""
    nodes = obj.client().nodes()
    if as_json:
        emit(nodes)
        return
    if not nodes:
        click.echo("no nodes; add one with: deparrow node token")
    else:
        click.echo(f"{'node':<18}  {'state':<9} {'name':<20} resources          earned")
    for n in nodes:
        click.echo(
            f"{n['id']}  {n['state']:<9} {n['name']:<20} {n['cpu']:g} CPU "
            f"{n['memory_mb']} MB  earned {n['earned']}"
        )


@node_group.command("token")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@run_cli
def node_token(obj: Ctx, as_json: bool) -> None:
    """Create a single-use enrollment token and print the edge-run command that uses it."""
    t = obj.client().enrollment_token()
    if as_json:
        emit(t)
    else:
        click.echo(t["command"])


@node_group.command("remove")
@click.argument("node_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@run_cli
def node_remove(obj: Ctx, node_id: str, as_json: bool) -> None:
    """Take a node off the network: its login stops working and its jobs go to other nodes.
    Its history and earnings stay. To bring the machine back, enroll it again."""
    out = obj.client().remove_node(node_id)
    if as_json:
        emit(out)
    else:
        click.echo(f"removed {node_id}; {out['requeued']} job(s) went back to the queue")


@main.group("user")
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

    token = obj.token
    if token is None and obj.hub.rstrip("/") == DEFAULT_HUB:
        token = _default_token()
    try:
        return user_checks(
            obj.hub,
            token,
            mqtt_url=mqtt_url,
            mqtt_username=mqtt_username,
            mqtt_password=mqtt_password,
            timeout_s=timeout,
        )
    except ValueError as e:
        die(str(e), 2)


@main.command("status")
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
    report: dict[str, Any] = {"hub": obj.hub}
    ok = True
    lines = []
    try:
        st = client.status()
        lines.append(f"ok    hub reachable at {obj.hub}")
        report["hub_ok"] = True
        broker = st["broker"]
        report["broker"] = broker
        if broker["connected"]:
            lines.append(f"ok    broker reachable at {broker['url']} ({broker['kind']})")
        else:
            ok = False
            lines.append(f"FAIL  broker at {broker['url']} is not connected to the hub")
        report["nodes"] = st["nodes"]
        lines.append(f"ok    nodes online: {st['nodes']['online']} of {st['nodes']['total']}")
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


@main.group("network")
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


# --- board ------------------------------------------------------------------------------
@main.group("board")
def board_group() -> None:
    """Board and PC images: write one to a card or stick, give it a node identity."""


@board_group.command("flash")
@click.argument("image", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("device", type=click.Path(path_type=Path))
@click.option("--yes", is_flag=True, help="Do not ask before overwriting DEVICE.")
@click.option("--no-verify", is_flag=True, help="Do not read the written image back.")
def board_flash(image: Path, device: Path, yes: bool, no_verify: bool) -> None:
    """Write IMAGE to DEVICE (an SD card, a USB stick, or a file).

    Names the device, its size and model first; refuses a partition, a mounted disk, the
    system disk, or one smaller than the image; asks before writing unless --yes.
    """
    from deparrow import board

    try:
        target = board.inspect_target(device)
        size = board.check_fits(image, target)
    except board.BoardError as e:
        die(str(e), 2)
    click.echo(f"image:  {image} ({board.human(size)})", err=True)
    click.echo(f"target: {target.describe()}", err=True)
    if not yes and not click.confirm(f"Everything on {device} will be lost. Write?", err=True):
        die("nothing written", 1)
    shown = [-1]

    def progress(done: int, total: int) -> None:
        pct = done * 100 // total
        if pct != shown[0]:
            shown[0] = pct
            click.echo(f"\rwriting: {pct:3d}% ({board.human(done)})", err=True, nl=False)

    try:
        digest = board.flash(image, target, progress, verify=not no_verify)
    except board.BoardError as e:
        click.echo("", err=True)
        die(str(e), 1)
    checked = "written, synced and read back" if not no_verify else "written and synced"
    click.echo(f"\n{device}: {checked} (sha256 {digest[:16]}…)", err=True)


@board_group.command("provision")
@click.argument("image", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--hub", "hub_url", required=True, help="The hub URL the board will use.")
@click.option("--token", "token", required=True, help="Enrollment token (deparrow node token).")
@click.option("--name", default=None, help="The node's name on the hub.")
@click.option("--wifi-ssid", default=None, help="Wi-Fi network the board joins.")
@click.option("--wifi-psk", default=None, help="Its passphrase (leave out for an open network).")
@click.option("--arch", default=None, help="The board's CPU architecture (default: the image's).")
@click.option("--cpu", type=click.FloatRange(0.1, 1024), default=None, help="CPUs it offers.")
@click.option("--memory-mb", type=click.IntRange(16), default=None, help="RAM it offers, MiB.")
@click.option("--json", "as_json", is_flag=True)
def board_provision(image: Path, hub_url: str, token: str, name: str | None,
                    wifi_ssid: str | None, wifi_psk: str | None, arch: str | None,
                    cpu: float | None, memory_mb: int | None, as_json: bool) -> None:  # fmt: skip
    """Enroll a board with the hub and write its identity onto IMAGE's boot partition.

    Writes deparrow/node.json (and deparrow/wifi.json) on the FAT partition with mtools; the
    image (a file, or a flashed card) boots straight into the network as that node.
    """
    from deparrow import board

    try:
        if wifi_psk is not None and wifi_ssid is None:
            raise board.BoardError("--wifi-psk needs --wifi-ssid")
        wifi = board.check_wifi(wifi_ssid, wifi_psk) if wifi_ssid is not None else None
        done = board.provision(image, hub_url, token, name, wifi, arch, cpu, memory_mb)
    except board.BoardError as e:
        die(str(e), 1)
    if as_json:
        emit({"node_id": done.node_id, "owner": done.owner, "files": done.files,
              "partition": done.partition.index, "replaced": done.replaced})  # fmt: skip
        return
    if done.replaced:
        click.echo(f"replaced the identity of node {done.replaced}", err=True)
    click.echo(
        f"{image}: node {done.node_id} (owner {done.owner}) written to "
        f"{done.partition.describe()}: {', '.join(done.files)}"
    )


@main.group("agent")
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


@main.command("demo")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--keep", is_flag=True, help="Keep the temporary data directory.")
@click.option("--broker", type=click.Choice(["auto", "mosquitto", "embedded"]), default="auto")
@click.option("--agents", is_flag=True, help="Run the agent economy instead (docs/agents.md).")
def demo_cmd(as_json: bool, keep: bool, broker: str, agents: bool) -> None:
    """Run the whole loop on this machine: a hub, two nodes, a user, the example jobs.

    With --agents: agents that sell a Wasm-backed service, buy it, and pay for their own
    compute until one is broke and stopped; then the ledger audit.
    """
    from deparrow.demo import run_agents_demo, run_demo

    ok = (run_agents_demo if agents else run_demo)(
        as_json=as_json,
        keep=keep,
        broker=broker,
        echo=(lambda s: click.echo(s, err=True)) if as_json else click.echo,
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main(prog_name="deparrow")

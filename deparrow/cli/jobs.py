"""`deparrow job`: submit jobs and read their results."""

from __future__ import annotations

import math
import re
import sys
import uuid
from pathlib import Path
from typing import Any

import click

from deparrow.cli.context import Ctx, die, emit, run_cli
from deparrow.client import TERMINAL_STATES, Client


@click.group("job")
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

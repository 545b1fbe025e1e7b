"""`deparrow job`: submit jobs and read their results."""

from __future__ import annotations

import hashlib
import math
import re
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from deparrow.cli.context import Ctx, die, emit, run_cli
from deparrow.client import TERMINAL_STATES, Client, HubError
from edge.cli_files import FileArgError, file_inputs

PROGRESS_BYTES = 1024 * 1024  # uploads from this size on show their progress


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
        outputs = result.get("outputs") or []
        if outputs:
            total = sum(int(f["size"]) for f in outputs)
            gone = " (expired: the hub keeps them no more)" if job.get("outputs_expired_at") else ""
            click.echo(f"  outputs: {_files(len(outputs))}, {total} bytes{gone}")
            for f in outputs[:50]:
                click.echo(f"    {f['path']}  {f['size']} bytes")
            if len(outputs) > 50:
                click.echo(f"    … and {len(outputs) - 50} more")


def _files(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"


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


def _upload_progress(name: str) -> Callable[[int, int], None]:
    """A progress line on stderr for a large upload: redrawn in place on a terminal, else
    printed at the start and at the end."""
    tty = sys.stderr.isatty()
    shown = -1

    def show(sent: int, total: int) -> None:
        nonlocal shown
        percent = sent * 100 // total
        mib = f"{total / 2**20:.1f} MiB"
        if tty and percent != shown:
            line = f"\ruploading {name}: {sent / 2**20:.1f} of {mib} ({percent}%)"
            click.echo(line, err=True, nl=sent == total)
        elif not tty and (shown < 0 or sent == total):
            click.echo(f"{'uploaded' if sent == total else 'uploading'} {name}: {mib}", err=True)
        shown = percent

    return show


def _inputs(client: Client, values: tuple[str, ...]) -> list[dict[str, str]]:
    """--file values as the spec's inputs: every local file read and checked first, then
    uploaded (once per content); URLs and hub references go as they are."""
    try:
        chosen = file_inputs(
            values, refs=True, warn=lambda line: click.echo(f"deparrow: {line}", err=True)
        )
    except FileArgError as e:
        die(e.format_message(), e.code)
    data: dict[str, bytes] = {}
    for name, source in chosen:
        if isinstance(source, Path):
            try:
                data[name] = source.read_bytes()
            except OSError as e:
                die(f"cannot read {source}: {e.strerror}", 66)
    refs: dict[str, str] = {}
    inputs = []
    for name, source in chosen:
        if not isinstance(source, Path):
            inputs.append({"path": name, "ref": source})
            continue
        digest = hashlib.sha256(data[name]).hexdigest()
        if digest not in refs:
            big = len(data[name]) >= PROGRESS_BYTES
            refs[digest] = client.upload(data[name], _upload_progress(name) if big else None)
        inputs.append({"path": name, "ref": refs[digest]})
    return inputs


def _download(client: Client, job: dict[str, Any], dest: Path, err: bool) -> list[tuple[str, int]]:
    """Save a finished job's outputs into dest: a line per file and a summary (on stderr
    with err, when stdout carries --json)."""

    def line(path: str, size: int) -> None:
        click.echo(f"saved {path}  {size} bytes", err=err)

    try:
        saved = client.download_outputs(job, dest, on_file=line)
    except HubError as e:
        if e.status == 410:
            die(f"{e}; run the job again to make them anew", 1)
        raise
    total = sum(size for _, size in saved)
    click.echo(f"{_files(len(saved))}, {total} bytes, saved in {dest}", err=err)
    return saved


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
    help="CPU-equivalents: its share of a node, and what it is billed for.",
)
@click.option("--memory", default=64, show_default=True, type=click.IntRange(1), help="MiB.")
@click.option("--priority", type=click.Choice(["normal", "high"]), default="normal")
@click.option(
    "--file",
    "files",
    multiple=True,
    metavar="PATH[=NAME]",
    help="Give the job the file PATH, read-only, at /inputs/NAME (default NAME: PATH's base "
    "name; it may name folders, as data/a.txt): uploaded first. A directory gives every "
    "regular file below it at /inputs/NAME/... (NAME '.': at /inputs itself), symlinks not "
    "followed; an https:// URL is fetched by the hub (a URL whose query has '=' needs "
    "=NAME after it). Makes it a file job: it runs on nodes that give jobs files (repeat).",
)
@click.option(
    "--outputs",
    "outputs_dir",
    type=click.Path(path_type=Path),
    default=None,
    metavar="DIR",
    help="Collect what the job writes under /outputs and download it into DIR (made if "
    "missing) when the job ends. Implies --wait.",
)
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
    files: tuple[str, ...],
    outputs_dir: Path | None,
    name: str | None,
    wait: bool,
    as_json: bool,
) -> None:
    """Submit MODULE (a .wasm file or example:NAME) to the network.

    Arguments after `--` go to the job. The price is computed by the hub; the maximum is held
    from your wallet until the job settles.

    \b
    deparrow job run example:fib --invoke fib --wait -- 25
    deparrow job run wordfreq.wasm --file words.txt --file texts/ --outputs out
    """
    if not math.isfinite(cpu):
        die("--cpu must be a number of CPUs, like 1 or 0.5", 2)
    if outputs_dir is not None and outputs_dir.exists() and not outputs_dir.is_dir():
        die(f"--outputs: {outputs_dir} is not a directory", 2)
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
    if files:
        spec["inputs"] = _inputs(client, files)
    if outputs_dir is not None:
        spec["outputs"] = True
        wait = True
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
    job = client.wait(
        submitted["id"], timeout_s=timeout + 120, on_view=None if as_json else _QueuedSay()
    )
    if as_json:
        emit(job)
    else:
        _print_job(job)
    if outputs_dir is not None:
        if (job.get("result") or {}).get("outputs"):
            _download(client, job, outputs_dir, err=as_json)
        else:
            click.echo("no outputs: the job left no files under /outputs", err=True)
    if job["state"] != "completed":
        sys.exit(1)
    sys.exit(int((job.get("result") or {}).get("exit_code") or 0))  # the job's own exit code


class _QueuedSay:
    """While a job waits for a node, say why on stderr as soon as the hub knows, and again
    each time the reason changes (a node went offline, another came online busy…)."""

    def __init__(self) -> None:
        self.said: str | None = None

    def __call__(self, job: dict[str, Any]) -> None:
        reason = job.get("reason") if job.get("state") == "queued" else None
        if reason and reason != self.said:
            self.said = reason
            click.echo(f"queued: {reason}", err=True)


@job_group.command("get")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@run_cli
def job_get(obj: Ctx, job_id: str, as_json: bool) -> None:
    """Show a job: state, result, cost, node, timings."""
    job = obj.client().job(job_id)
    emit(job) if as_json else _print_job(job)


@job_group.command("outputs")
@click.argument("job_id")
@click.argument("dest", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print what was saved as JSON.")
@click.pass_obj
@run_cli
def job_outputs(obj: Ctx, job_id: str, dest: Path, as_json: bool) -> None:
    """Download the files a finished job left under /outputs into DIR (made if missing).

    Each is checked against the sha256 the job lists and written whole or not at all; the
    hub keeps them for a while after the job ends (410 after that).
    """
    client = obj.client()
    job = client.job(job_id)
    spec = job.get("spec") or {}
    if not (spec.get("inputs") or spec.get("outputs")):
        die(
            f"job {job_id} is not a file job, so it has no outputs: submit it with "
            "`deparrow job run --outputs DIR` to collect what it writes under /outputs",
            1,
        )
    if job["state"] not in TERMINAL_STATES:
        die(
            f"job {job_id} is {job['state']}: its outputs can be downloaded once it has "
            f"finished (`deparrow job get {job_id}` shows where it is)",
            1,
        )
    if dest.exists() and not dest.is_dir():
        die(f"{dest} is not a directory", 2)
    if not (job.get("result") or {}).get("outputs"):
        if job["state"] != "completed":
            why = f": {job['reason']}" if job.get("reason") else ""
            die(f"job {job_id} {job['state']}{why}; it left no outputs", 1)
        if as_json:
            emit({"job": job_id, "dir": str(dest), "files": []})
        else:
            click.echo(f"job {job_id} left no files under /outputs: nothing to download")
        return
    saved = _download(client, job, dest, err=as_json)
    if as_json:
        emit({"job": job_id, "dir": str(dest),
              "files": [{"path": path, "size": size} for path, size in saved]})  # fmt: skip


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

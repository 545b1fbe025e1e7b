"""`edge-run job`: run one job locally, no hub; its stdout and exit code become ours."""

from __future__ import annotations

import logging
import os
import posixpath
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

import click

from edge.cli_files import FileArgError, file_inputs, save_output
from edge.core import jobfiles

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
    "output limit": 73,  # EX_CANTCREAT: the job wrote more under /outputs than we take
}

log = logging.getLogger("edge")

FILE_ENGINES = ("wasmtime", "wasm3-run")  # the engines whose WASI gives a job files

WATCH_S = jobfiles.CHECK_MS / 1000  # how often a local file job's /outputs is measured


def _parse_dirs(values: tuple[str, ...]) -> list[dict[str, Any]]:
    """--dir HOST[::GUEST] as the job's dirs: read-write, GUEST defaulting to HOST's absolute
    path (as `wasmtime run --dir` does)."""
    dirs = []
    for item in values:
        host, sep, guest = item.partition("::")
        if not host or (sep and not guest):
            raise click.BadParameter(f"{item!r} is not HOST[::GUEST]", param_hint="--dir")
        host = os.path.abspath(host)
        if not os.path.isdir(host):
            raise click.BadParameter(f"{host} is not a directory", param_hint="--dir")
        guest = guest or host
        if not guest.startswith("/") or posixpath.normpath(guest) != guest:
            raise click.BadParameter(
                f"GUEST {guest!r} must be an absolute path such as /data", param_hint="--dir"
            )
        dirs.append({"host": host, "guest": guest, "write": True})
    return dirs


def _warn(line: str) -> None:
    click.echo(f"edge-run: {line}", err=True)


def _parse_env(values: tuple[str, ...]) -> dict[str, str]:
    env = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--env")
        env[key] = value
    return env


@click.command("job", context_settings={"ignore_unknown_options": False})
@click.argument("target")
@click.argument("args", nargs=-1)
@click.option(
    "--engine",
    type=click.Choice(["wasm3", "wasmtime", "wasm3-run", "docker", "native"]),
    default=None,
    help="wasm3/wasmtime/wasm3-run: TARGET is a .wasm file (wasm3-run: the C runner of "
    "MicroPython nodes); docker: an image; native: a command. Default: wasm3, or wasm3-run "
    "for a job with files (as a node does).",
)
@click.option(
    "--input",
    "input_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="File fed to the job's stdin.",
)
@click.option("--env", "env", multiple=True, metavar="K=V", help="Environment variable (repeat).")
@click.option(
    "--dir",
    "dirs",
    multiple=True,
    metavar="HOST[::GUEST]",
    help="wasmtime/wasm3-run: give the job the host directory HOST, read-write, as GUEST "
    "(default: HOST's absolute path), as `wasmtime run --dir` does (repeat).",
)
@click.option(
    "--file",
    "files",
    multiple=True,
    metavar="PATH[=NAME]",
    help="wasmtime/wasm3-run: give the job the file PATH, read-only, at /inputs/NAME (default "
    "NAME: PATH's base name; it may name folders, as data/a.txt). A directory gives every "
    "regular file below it at /inputs/NAME/... (NAME '.': at /inputs itself), symlinks not "
    "followed. Makes it a file job: it gets /inputs and /outputs, as on a node (repeat).",
)
@click.option(
    "--outputs",
    "outputs_dir",
    type=click.Path(path_type=Path),
    default=None,
    metavar="DIR",
    help="wasmtime/wasm3-run: copy what the job writes under /outputs into DIR (made if "
    "missing) when it ends, within a node's default caps (16 MiB, 64 files).",
)
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
    engine: str | None,
    input_path: Path | None,
    env: tuple[str, ...],
    dirs: tuple[str, ...],
    files: tuple[str, ...],
    outputs_dir: Path | None,
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
    edge-run job --engine wasmtime --dir data::/data tool.wasm -- /data/in.txt
    edge-run job --engine wasmtime --file words.txt --outputs out wordfreq.wasm

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
    file_job = bool(files) or outputs_dir is not None
    if engine is None:  # pywasm3's WASI has no files; the C runner's has
        engine = "wasm3-run" if dirs or file_job else "wasm3"
    if (dirs or file_job) and engine not in FILE_ENGINES:
        flag = "--dir" if dirs else "--file" if files else "--outputs"
        fail(
            f"{flag}: the {engine} engine gives a job no files; use --engine wasmtime or "
            "--engine wasm3-run",
            2,
        )
    if outputs_dir is not None and outputs_dir.exists() and not outputs_dir.is_dir():
        fail(f"--outputs: {outputs_dir} is not a directory", 2)
    stdin = b""
    if input_path is not None:
        try:
            stdin = input_path.read_bytes()
        except OSError as e:
            fail(f"cannot read {input_path}: {e.strerror}", 66)
    inputs: list[tuple[str, bytes]] = []
    try:
        env_map = _parse_env(env)
        job_dirs = _parse_dirs(dirs)
        for name, source in file_inputs(files, warn=_warn):
            assert isinstance(source, Path)  # refs are refused without refs=True
            inputs.append((name, source.read_bytes()))
    except FileArgError as e:
        fail(e.format_message(), e.code)
    except click.BadParameter as e:
        fail(e.format_message(), 2)
    except OSError as e:
        fail(f"cannot read {e.filename}: {e.strerror}", 66)
    for d in job_dirs if file_job else []:
        if d["guest"] in (jobfiles.INPUTS, jobfiles.OUTPUTS):
            fail(
                f"--dir: {d['guest']} is where a file job gets its --file inputs and "
                "--outputs; give that directory another GUEST",
                2,
            )
    spec: dict[str, Any] = {
        "job_id": "local",
        "env": env_map,
        "stdin": stdin,
        "timeout_s": timeout,
        "memory_mb": memory,
    }
    executor: Any
    workdir = None
    if engine in ("wasm3", "wasmtime", "wasm3-run"):
        try:
            data = Path(target).read_bytes()
        except OSError as e:
            fail(f"cannot read {target}: {e.strerror}", 66)
        spec.update(module=data, entrypoint=invoke or "_start", args=list(args), gas=gas)
        if job_dirs:
            spec["dirs"] = job_dirs
        if engine == "wasm3-run":
            from edge.executors.wasm3_cli import RunnerMissing, Wasm3CliExecutor

            workdir = tempfile.TemporaryDirectory(prefix="edge-run-")
            try:
                executor = Wasm3CliExecutor(workdir.name)
            except RunnerMissing as e:
                workdir.cleanup()
                fail(str(e), 69)
        elif engine == "wasmtime":
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
        try:
            from edge.executors.docker import DockerExecutor
        except ImportError as e:
            fail(f"the Docker SDK is not installed ({e}): pip install 'deparrow[full]'", 69)

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
    base = tempfile.mkdtemp(prefix="edge-run-files-") if file_job else None
    saved: list[tuple[str, int]] | None = None  # None: not collected (not a file job, a limit)
    unsaved = None  # why the outputs could not be copied into --outputs DIR
    try:
        if base is not None:
            try:  # /inputs and /outputs first: WASI fds 3 and 4, as on a node
                root, prepared = jobfiles.prepare(base, "job", inputs)
            except (OSError, ValueError) as e:
                fail(f"cannot lay out the job's files under {base}: {e}", 70)
            spec["dirs"] = prepared + job_dirs
        with executor:
            if base is None:
                outcome = executor.run(spec)
            else:
                outcome = _run_file_job(executor, spec, root + "/out")
        limited = (outcome.get("error") or "").startswith(jobfiles.OUTPUT_LIMIT)
        if base is not None and not limited:
            try:
                saved = _keep_outputs(root + "/out", outputs_dir)
            except jobfiles.OutputLimit as e:
                outcome = {**outcome, "status": "failed", "error": _local(e)}
            except (OSError, ValueError) as e:
                unsaved = f"cannot copy the job's outputs into {outputs_dir}: {e}"
    finally:
        if workdir is not None:
            workdir.cleanup()
        if base is not None:
            jobfiles.remove_tree(base)
    sys.stdout.buffer.write(outcome.get("stdout") or b"")
    sys.stdout.flush()
    sys.stderr.buffer.write(outcome.get("stderr") or b"")
    sys.stderr.flush()
    if unsaved is not None:
        fail(unsaved, 73)
    if saved and outputs_dir is None:
        click.echo(
            f"edge-run: the job wrote {_files(len(saved))} under /outputs; give --outputs DIR "
            "to keep them",
            err=True,
        )
    elif outputs_dir is not None and saved == []:
        click.echo("edge-run: no outputs: the job left no files under /outputs", err=True)
    elif outputs_dir is not None and saved:
        for path, size in saved:
            click.echo(f"edge-run: saved {path}  {size} bytes", err=True)
        total = sum(size for _, size in saved)
        click.echo(
            f"edge-run: {_files(len(saved))}, {total} bytes, saved in {outputs_dir}", err=True
        )
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


def _files(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"


def _default_caps() -> dict[str, Any]:
    caps = jobfiles.limits()
    assert caps is not None  # None only where a node's preferences turn file jobs off
    return caps


def _local(limit: jobfiles.OutputLimit) -> str:
    return str(limit).replace("this node's cap", "a node's default cap, as edge-run takes")


def _run_file_job(executor: Any, spec: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """Run a file job as a node does: /outputs measured while it runs, the job stopped with
    "output limit" once it is past a node's default caps."""
    caps = _default_caps()
    handle = executor.submit(spec)
    check = time.monotonic() + WATCH_S
    while True:
        outcome: dict[str, Any] | None = executor.poll(handle)
        if outcome is not None:
            return outcome
        if time.monotonic() >= check:
            check = time.monotonic() + WATCH_S
            try:
                jobfiles.measure(out_dir, caps)
            except jobfiles.OutputLimit as e:
                executor.cancel(handle)
                return {"status": "failed", "exit_code": None, "error": _local(e)}
            except OSError:
                pass  # the job is changing it under us: measured again next time
        time.sleep(0.005)


def _keep_outputs(out_dir: str, dest: Path | None) -> list[tuple[str, int]]:
    """The job's outputs (within a node's default caps) copied into dest when there is one:
    [(path, size)]. Raises jobfiles.OutputLimit past the caps."""
    files = jobfiles.collect(out_dir, _default_caps())
    if dest is not None and files:
        os.makedirs(dest, exist_ok=True)
        for f in files:
            save_output(str(dest), f["path"], f["data"])
    return [(f["path"], f["size"]) for f in files]

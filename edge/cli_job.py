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

FILE_ENGINES = ("wasmtime", "wasm3-run")  # the engines whose WASI gives a job files


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
    default="wasm3",
    show_default=True,
    help="wasm3/wasmtime/wasm3-run: TARGET is a .wasm file (wasm3-run: the C runner of "
    "MicroPython nodes); docker: an image; native: a command.",
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
    dirs: tuple[str, ...],
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
    if dirs and engine not in FILE_ENGINES:
        fail(
            f"--dir: the {engine} engine gives a job no files; use --engine wasmtime or "
            "--engine wasm3-run",
            2,
        )
    stdin = b""
    if input_path is not None:
        try:
            stdin = input_path.read_bytes()
        except OSError as e:
            fail(f"cannot read {input_path}: {e.strerror}", 66)
    try:
        env_map = _parse_env(env)
        job_dirs = _parse_dirs(dirs)
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
    try:
        with executor:
            outcome = executor.run(spec)
    finally:
        if workdir is not None:
            workdir.cleanup()
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

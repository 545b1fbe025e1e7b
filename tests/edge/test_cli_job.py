"""`edge-run job` as a person runs it: stdout, exit codes, one clear line on failure."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import wasm_jobs
from tests.edge.test_docker_executor import IMAGE, api  # noqa: F401
from tests.edge.test_wasm3_executor import Build, wasm

__all__ = ["wasm"]  # the fixture, re-exported so pytest finds it here

EDGE = [sys.executable, "-m", "edge.cli", "job"]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EDGE, *args], capture_output=True, text=True, timeout=timeout)


def job(name: str) -> str:
    return str(wasm_jobs.path(name + ".wasm"))


def test_invoke_prints_returned_values() -> None:
    out = run(job("fib"), "--invoke", "fib", "--", "25")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "75025\n"


def test_wasi_program_gets_args_env_and_stdin(tmp_path: Path) -> None:
    out = run(job("hello"), "--env", "NAME=parrot", "--", "a", "b")
    assert out.returncode == 0, out.stderr
    assert "args=a b" in out.stdout and "NAME=parrot" in out.stdout
    data = tmp_path / "in.bin"
    data.write_bytes(b"abc")
    out = run(job("sha256"), "--input", str(data))
    assert out.stdout == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad  -\n"


def test_job_exit_code_is_ours() -> None:
    out = run(job("exit3"))
    assert out.returncode == 3 and out.stdout == "bye\n"
    out = run(job("sieve"), "--", "many")
    assert out.returncode == 2 and out.stdout == "" and out.stderr


@pytest.mark.parametrize(
    ("args", "code", "prefix"),
    [
        ((job("loop"), "--timeout", "1"), 124, "edge-run: timeout: "),
        ((job("grow"), "--memory", "32"), 125, "edge-run: memory limit: "),
        ((job("trap"),), 126, "edge-run: trap: "),
        ((str(Path(__file__)),), 65, "edge-run: invalid module: "),
        ((job("fib"), "--invoke", "nope"), 65, "edge-run: invalid module: "),
        ((job("fib"), "--invoke", "fib", "--", "x"), 64, "edge-run: invalid argument"),
        (("/no/such.wasm",), 66, "edge-run: cannot read /no/such.wasm"),
        ((job("fib"), "--timeout", "0"), 2, "edge-run: --timeout"),
        ((job("hello"), "--env", "NOEQUALS"), 2, "edge-run: "),
    ],
)
def test_failures_are_one_line_without_traceback(
    args: tuple[str, ...], code: int, prefix: str
) -> None:
    out = run(*args)
    assert out.returncode == code, (out.returncode, out.stderr)
    # None of these jobs writes to stderr itself: the reason must be the only line.
    assert out.stderr.count("\n") == 1 and out.stderr.startswith(prefix), out.stderr


# --- hostile modules through `edge-run job` (the executor's own tests cover each as well) ---
@pytest.fixture(scope="module")
def fixture_wasm(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """name -> path of tests/edge/fixtures/<name>.wat built with wat2wasm."""
    out = tmp_path_factory.mktemp("cli-wasm")

    def build(name: str) -> str:
        if not shutil.which("wat2wasm"):
            pytest.fail("wat2wasm not installed: run `make test` (Debian package: wabt)")
        target = out / (name + ".wasm")
        wat = Path(__file__).parent / "fixtures" / (name + ".wat")
        subprocess.run(["wat2wasm", str(wat), "-o", str(target)], check=True)
        return str(target)

    return build


def test_stack_overflow_is_a_trap(fixture_wasm: Any) -> None:
    out = run(fixture_wasm("calc"), "--invoke", "recurse", "--", "100000000")
    assert out.returncode == 126 and out.stderr == "edge-run: trap: stack overflow\n", out.stderr


def test_missing_import_names_it(fixture_wasm: Any) -> None:
    out = run(fixture_wasm("files"))
    assert out.returncode == 65, out.stderr
    assert out.stderr.startswith(
        "edge-run: invalid module: unsupported import wasi_snapshot_preview1.path_open"
    ), out.stderr
    # the default engine has no files, and says which engines have them
    assert out.stderr.endswith(
        "no files or sockets (the wasmtime and wasm3-run engines give files))\n"
    )


def test_gas_budget(fixture_wasm: Any) -> None:
    metered = fixture_wasm("metered")
    out = run(metered, "--invoke", "spin", "--gas", "1000", "--", "50")
    assert out.returncode == 0 and out.stdout == "50\n", out.stderr
    out = run(metered, "--invoke", "spin", "--gas", "1000", "--", "1000000")
    assert out.returncode == 124, out.stderr
    assert out.stderr == "edge-run: gas limit: job used more than its 1000 units of gas\n"


def test_huge_output_is_capped_with_a_note(fixture_wasm: Any) -> None:
    out = run(fixture_wasm("flood"))
    assert out.returncode == 0, out.stderr
    assert 0 < len(out.stdout) <= (1 << 20) and set(out.stdout) == {"x"}
    assert "stdout truncated at" in out.stderr


# --- other engines --------------------------------------------------------------------------
def test_a_container_job(api: Any) -> None:  # noqa: F811 (the podman fixture)
    out = run("--engine", "docker", IMAGE, "--env", "WHO=box", "--", "sh", "-c",
              'echo "hi $WHO"; exit 4', timeout=120)  # fmt: skip
    assert out.returncode == 4 and out.stdout == "hi box\n", out.stderr


def test_docker_problems_are_one_line() -> None:
    out = run("--engine", "docker", "--docker-url", "unix:///nonexistent.sock", IMAGE)
    assert out.returncode == 69, out.stderr
    assert out.stderr.startswith("edge-run: docker engine unreachable at unix:///nonexistent.sock")
    assert out.stderr.count("\n") == 1
    out = run("--engine", "docker", "--invoke", "fib", IMAGE)
    assert out.returncode == 2 and "--invoke calls a Wasm export" in out.stderr
    out = run(job("fib"), "--network")
    assert out.returncode == 2 and "Wasm jobs have no network" in out.stderr


# --- files: --dir HOST[::GUEST] ---------------------------------------------------------------
def run_in(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*EDGE, *args], capture_output=True, text=True, timeout=60, cwd=cwd, env=_env()
    )


def _env() -> dict[str, str]:
    root = str(Path(__file__).parents[2])
    return {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_dir_gives_a_wasmtime_job_host_directories(tmp_path: Path, wasm: Build) -> None:
    fileops = tmp_path / "fileops.wasm"
    fileops.write_bytes(wasm("fileops"))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "in.txt").write_text("from the host\n")
    (tmp_path / "out").mkdir()
    base = ("--engine", "wasmtime", str(fileops), "--dir", "data::/data", "--dir", "out")
    out = run_in(tmp_path, *base, "--", "cat", "/data/in.txt")
    assert (out.returncode, out.stdout) == (0, "from the host\n"), out.stderr
    # GUEST defaults to HOST's absolute path; the directory is read-write
    target = tmp_path / "out" / "result.txt"
    out = run_in(tmp_path, *base, "--", "write", str(target), "done")
    assert out.returncode == 0 and target.read_text() == "done", out.stderr
    out = run_in(tmp_path, *base, "--", "write", "/data/../escaped.txt", "x")
    assert out.returncode == 1 and out.stderr.startswith("fileops: /data/../escaped.txt: ")
    assert not (tmp_path / "escaped.txt").exists()


@pytest.mark.parametrize(
    "args, words",
    [
        (
            ("--dir", "."),
            "edge-run: --dir: the wasm3 engine gives a job no files; use --engine "
            "wasmtime or --engine wasm3-run\n",
        ),
        (("--engine", "wasmtime", "--dir", "nope"), "is not a directory"),
        (("--engine", "wasmtime", "--dir", ".::data"), "GUEST 'data' must be an absolute path"),
        (("--engine", "wasmtime", "--dir", ".::/a/../b"), "GUEST '/a/../b' must be an absolute"),
        (("--engine", "wasmtime", "--dir", ".::"), "'.::' is not HOST[::GUEST]"),
    ],
)
def test_dir_problems_are_one_line(tmp_path: Path, args: tuple[str, ...], words: str) -> None:
    out = run_in(tmp_path, job("hello"), *args)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert words in out.stderr and out.stderr.startswith("edge-run: "), out.stderr


def test_wasm3_run_engine_runs_a_job() -> None:
    """The C runner of MicroPython nodes (built by `make edge-native`)."""
    out = run("--engine", "wasm3-run", job("fib"), "--invoke", "fib", "--", "20")
    assert (out.returncode, out.stdout) == (0, "6765\n"), out.stderr
    out = run("--engine", "wasm3-run", job("hello"), "--env", "NAME=parrot", "--", "a")
    assert out.returncode == 0 and "NAME=parrot" in out.stdout, out.stderr

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
            ("--engine", "wasm3", "--dir", "."),
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


# --- files: --file PATH[=NAME] and --outputs DIR, as on `deparrow job run` --------------------
WORDFREQ = Path(wasm_jobs.__file__).parent / "data" / "wordfreq"
# 65 empty files under /outputs (WASI fd 4 of a file job): one past a node's default cap
MANY_FILES_WAT = """(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_close" (func $close (param i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "f00")
  (func (export "_start") (local $i i32)
    (loop $next
      (i32.store8 (i32.const 17) (i32.add (i32.const 48) (i32.div_u (local.get $i) (i32.const 10))))
      (i32.store8 (i32.const 18) (i32.add (i32.const 48) (i32.rem_u (local.get $i) (i32.const 10))))
      (drop (call $open (i32.const 4) (i32.const 0) (i32.const 16) (i32.const 3) (i32.const 9)
                        (i64.const 66) (i64.const 66) (i32.const 0) (i32.const 8)))
      (drop (call $close (i32.load (i32.const 8))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $next (i32.lt_u (local.get $i) (i32.const 65))))))
"""


def run_files(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """edge-run job with its temporary folders in tmp_path/tmp, to see that none is left."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return subprocess.run(
        [*EDGE, *args], capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={**_env(), "TMPDIR": str(tmp_path / "tmp")},
    )  # fmt: skip


def files_in(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize("engine", ["wasmtime", "wasm3-run"])
def test_file_and_outputs_give_wordfreq_its_files(tmp_path: Path, engine: str) -> None:
    inputs = WORDFREQ / "inputs"
    expected = files_in(WORDFREQ / "expected")
    out = run_files(tmp_path, "--engine", engine, job("wordfreq"),
                    "--file", str(inputs / "README.txt"), "--file", str(inputs / "carroll"),
                    "--outputs", "out")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("wordfreq: 3 files, 2850 bytes, 517 words, 255 distinct")
    assert out.stderr.splitlines() == [
        "edge-run: saved counts.tsv  2053 bytes",
        "edge-run: saved summary.json  59 bytes",
        "edge-run: 2 files, 2112 bytes, saved in out",
    ]
    assert files_in(tmp_path / "out") == expected
    assert list((tmp_path / "tmp").iterdir()) == []  # the job's folders are gone
    # a folder as '.' is /inputs itself; outputs into folders that are not there yet
    out = run_files(tmp_path, "--engine", engine, job("wordfreq"), "--file", f"{inputs}=.",
                    "--outputs", "a/b")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert files_in(tmp_path / "a" / "b") == expected
    # without --outputs the job still gets /outputs; what it wrote is said, not kept
    out = run_files(tmp_path, "--engine", engine, job("wordfreq"), "--file", f"{inputs}=texts")
    assert out.returncode == 0, out.stderr
    assert out.stderr == (
        "edge-run: the job wrote 2 files under /outputs; give --outputs DIR to keep them\n"
    )
    assert list((tmp_path / "tmp").iterdir()) == []


def test_outputs_past_the_default_cap_end_the_job(tmp_path: Path) -> None:
    if not shutil.which("wat2wasm"):
        pytest.fail("wat2wasm not installed: run `make test` (Debian package: wabt)")
    (tmp_path / "many.wat").write_text(MANY_FILES_WAT)
    subprocess.run(["wat2wasm", "many.wat", "-o", "many.wasm"], check=True, cwd=tmp_path)
    out = run_files(tmp_path, "--engine", "wasmtime", "many.wasm", "--outputs", "out")
    assert out.returncode == 73, out.stderr
    assert out.stderr == (
        "edge-run: output limit: the job wrote more than 64 files under /outputs (a node's "
        "default cap, as edge-run takes)\n"
    )
    assert not (tmp_path / "out").exists()
    assert list((tmp_path / "tmp").iterdir()) == []


def test_an_output_is_never_written_through_a_symlink_out_of_dir(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "mine.txt").write_text("mine")
    (tmp_path / "out" / "counts.tsv").symlink_to(tmp_path / "mine.txt")
    readme = str(WORDFREQ / "inputs" / "README.txt")
    out = run_files(tmp_path, "--engine", "wasmtime", job("wordfreq"), "--file", readme,
                    "--outputs", "out")  # fmt: skip
    assert out.returncode == 73
    assert out.stderr == (
        "edge-run: cannot copy the job's outputs into out: output 'counts.tsv' refused: it "
        "would be written outside out\n"
    )
    assert (tmp_path / "mine.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "args, code, words",
    [
        (("--file", "README.txt=../up.txt"), 2,
         "--file: README.txt=../up.txt: file path '../up.txt' must be relative"),
        (("--file", "README.txt=a b.txt"), 2, "the file name 'a b.txt' may have only letters"),
        (("--file", "README.txt=/abs.txt"), 2, "must be relative"),
        (("--file", "README.txt="), 2, "'README.txt=' is not PATH[=NAME]"),
        (("--file", "README.txt", "--file", "README.txt"), 2,
         "two files would be /inputs/README.txt; give one another NAME"),
        (("--file", "nope.txt"), 66, "--file: cannot read nope.txt: No such file or directory"),
        (("--file", "https://example.com/a.txt"), 2,
         "https://example.com/a.txt is not a local file: edge-run runs the job here"),
        (("--file", "empty"), 2, "empty has no regular files in it"),
        (("--outputs", "README.txt"), 2, "--outputs: README.txt is not a directory"),
        (("--dir", ".::/inputs", "--file", "README.txt"), 2,
         "--dir: /inputs is where a file job gets its --file inputs and --outputs"),
    ],
)  # fmt: skip
def test_file_problems_are_one_line(
    tmp_path: Path, args: tuple[str, ...], code: int, words: str
) -> None:
    (tmp_path / "README.txt").write_text("words")
    (tmp_path / "empty").mkdir()
    out = run_files(tmp_path, "--engine", "wasmtime", job("wordfreq"), *args)
    assert out.returncode == code and out.stderr.count("\n") == 1, out.stderr
    assert words in out.stderr and out.stderr.startswith("edge-run: "), out.stderr
    assert list((tmp_path / "tmp").iterdir()) == []


def test_file_needs_an_engine_with_files(tmp_path: Path) -> None:
    (tmp_path / "README.txt").write_text("words")
    out = run_files(tmp_path, "--engine", "wasm3", job("wordfreq"), "--file", "README.txt")
    assert out.returncode == 2
    assert out.stderr == (
        "edge-run: --file: the wasm3 engine gives a job no files; use --engine wasmtime or "
        "--engine wasm3-run\n"
    )


def test_without_an_engine_a_file_job_runs_on_wasm3_run(tmp_path: Path) -> None:
    """As a node does: pywasm3's WASI has no files, the C runner's has."""
    (tmp_path / "README.txt").write_text("words words")
    out = run_files(tmp_path, job("wordfreq"), "--file", "README.txt", "--outputs", "out")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("wordfreq: 1 files, 11 bytes, 2 words, 1 distinct")
    assert (tmp_path / "out" / "counts.tsv").read_text() == "words\t2\n"


def test_a_directory_gives_its_files_not_its_symlinks(tmp_path: Path) -> None:
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "sub" / "a.txt").write_text("one two two\n")
    (tmp_path / "secret.txt").write_text("secret secret secret\n")
    (tmp_path / "in" / "link.txt").symlink_to(tmp_path / "secret.txt")
    out = run_files(tmp_path, "--engine", "wasm3-run", job("wordfreq"), "--file", "in",
                    "--outputs", "out")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (
        out.stderr.splitlines()[0]
        == "edge-run: --file: skipped in/link.txt (a symlink, not followed)"
    )
    assert (tmp_path / "out" / "counts.tsv").read_text() == "two\t2\none\t1\n"

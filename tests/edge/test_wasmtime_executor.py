"""The wasmtime executor against real wasmtime in real worker processes: the wasm3 executor's
cases where they mean the same, hostile jobs one after another on one executor, and parity:
every job in wasm-jobs/jobs.json (and every fixture) gives the same outcome on both engines.

Fixture modules come from the wasm3 suite's `wasm` fixture (built once per session).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import wasmtime

from edge.executors.wasm3 import Wasm3Executor
from edge.executors.wasmtime_exec import WasmtimeExecutor, available
from tests.edge.test_wasm3_executor import Build, alive, job, wait, wasm

__all__ = ["wasm"]  # the fixture, re-exported so pytest finds it here

WASM_JOBS = Path(__file__).parents[2] / "wasm-jobs"
OUTCOME_KEYS = {"status", "exit_code", "stdout", "stderr", "returns", "error", "wall_ms", "cpu_ms"}


@pytest.fixture(scope="module")
def ex() -> Iterator[WasmtimeExecutor]:
    """One executor shared by the tests below: each must leave it able to run the next job."""
    with WasmtimeExecutor(workers=1) as executor:
        yield executor


def wat(text: str) -> bytes:
    return bytes(wasmtime.wat2wasm(text))


def stopped(pid: int, want: bool = True, limit_s: float = 5) -> bool:
    """Whether the process reaches (or leaves) the stopped state: a signal is delivered
    asynchronously, so a process running on another core stops a moment later."""
    end = time.monotonic() + limit_s
    while True:
        with open(f"/proc/{pid}/stat") as f:
            is_stopped = f.read().rsplit(")", 1)[1].split()[0] == "T"
        if is_stopped == want or time.monotonic() > end:
            return is_stopped
        time.sleep(0.01)


def test_wasmtime_is_installed() -> None:
    # an optional dependency for nodes, but the dev extra installs it: CI must run this file
    assert available(), "wasmtime missing: pip install -e '.[dev]' (or '.[full]')"


def test_invoke_returns_values(ex: WasmtimeExecutor, wasm: Build) -> None:
    calc = wasm("calc")
    out = ex.run(job(calc, "add", ["2", "40"]))
    assert out["status"] == "completed" and out["error"] is None
    assert out["returns"] == [42] and out["exit_code"] == 0
    assert ex.run(job(calc, "mul64", [str(2**31), "4"]))["returns"] == [2**33]
    assert ex.run(job(calc, "divmod", ["7", "2"]))["returns"] == [3, 1]
    assert ex.run(job(calc, "nothing"))["returns"] == []
    assert ex.run(job(calc, "add", ["-5", "1"]))["returns"] == [-4]
    # more memory than a 32-bit wasm memory can hold is allowed, as on wasm3: it means 4 GiB
    assert ex.run(job(calc, "add", ["1", "2"], memory_mb=8192))["returns"] == [3]
    assert set(out) == OUTCOME_KEYS


def test_wasi_program_gets_args_env_stdin(ex: WasmtimeExecutor, wasm: Build) -> None:
    out = ex.run(
        job(
            wasm("wasi_echo"),
            args=["a b", "c"],
            env={"WHO": "parrot"},
            stdin=b"hello stdin",
            job_id="echo-1",
        )
    )
    assert out["status"] == "completed" and out["exit_code"] == 0, out
    assert out["stdout"] == (
        b"argc=3 argv0=echo-1 [a b] [c]\nWHO=parrot\n"
        b"stdin=HELLO STDIN (11 bytes)\ntime_ok=1 random_ok=1 slept_ok=1 tty=1\n"
    )
    assert out["stderr"] == b"done\n"
    assert out["returns"] is None


def test_proc_exit_is_an_exit_code_and_keeps_stdout(ex: WasmtimeExecutor, wasm: Build) -> None:
    out = ex.run(job(wasm("exit3")))
    assert out["status"] == "completed" and out["error"] is None
    assert out["exit_code"] == 3 and out["stdout"] == b"bye\n"


EXIT = """(module (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1) (func (export "_start") (call $exit (i32.const %d))))"""


@pytest.mark.parametrize("code", [0, 125, 126, 255])
def test_every_exit_code_is_the_jobs_on_both_engines(ex: WasmtimeExecutor, code: int) -> None:
    # wasmtime's own proc_exit refuses 126 and more (AssemblyScript's abort() exits 255): the
    # job would fail as an "invalid module" with its code lost. wasm3 gives the code as is.
    module = wat(EXIT % code)
    out = ex.run(job(module))
    assert (out["status"], out["exit_code"], out["error"]) == ("completed", code, None), out
    with Wasm3Executor(workers=1) as w3:
        assert w3.run(job(module))["exit_code"] == code


@pytest.mark.parametrize("module", [b"", b"not wasm at all", b"\0asm\x01\0\0\0\x01\x7f"])
def test_bytes_that_are_not_a_module(ex: WasmtimeExecutor, module: bytes) -> None:
    out = ex.run(job(module))
    assert out["status"] == "failed" and out["error"].startswith("invalid module: "), out


def test_code_wasmtime_rejects_is_an_invalid_module(ex: WasmtimeExecutor) -> None:
    # the sections parse, but the function body does not type-check (i32.add of nothing)
    bad = b"\0asm\x01\0\0\0" + b"\x01\x04\x01\x60\0\0" + b"\x03\x02\x01\0"
    bad += b"\x07\x0a\x01\x06_start\0\0" + b"\x0a\x05\x01\x03\0\x6a\x0b"
    out = ex.run(job(bad))
    assert out["status"] == "failed" and out["error"].startswith("invalid module: "), out
    assert ex.run(job(wat('(module (func (export "_start")))')))["status"] == "completed"


def test_missing_entrypoint_export(ex: WasmtimeExecutor, wasm: Build) -> None:
    out = ex.run(job(wasm("calc"), "nope"))
    assert out["error"].startswith("invalid module: ") and "'nope'" in out["error"]
    assert "add" in out["error"]
    out = ex.run(job(wasm("calc")))
    assert out["error"].startswith("invalid module: ") and "'_start'" in out["error"]


SOCK_MODULE = """(module
  (import "wasi_snapshot_preview1" "sock_%s" (func (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")))"""


def test_unsupported_import_is_named(ex: WasmtimeExecutor, wasm: Build) -> None:
    out = ex.run(job(wat(SOCK_MODULE % "open")))  # not a WASI preview1 call
    assert out["status"] == "failed"
    assert out["error"] == (
        "invalid module: unsupported import wasi_snapshot_preview1.sock_open (this executor "
        "provides WASI preview1 args, environ, clocks, random, stdio and proc_exit, files in "
        "the job's preopened directories, sockets that find none)"
    ), out["error"]
    # preview1's sock_* calls are wasmtime's own; a job is given no socket for them to use
    assert ex.run(job(wat(SOCK_MODULE % "shutdown")))["status"] == "completed"
    # file calls are wasmtime's own: a module importing them runs (here without directories)
    assert ex.run(job(wasm("files")))["status"] == "completed"
    # an import from no known module at all is named the same way
    out = ex.run(job(wat('(module (import "env" "host_fn" (func)) (func (export "_start")))')))
    assert out["error"].startswith("invalid module: unsupported import env.host_fn"), out


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """inputs/ (read-only to the job), outputs/ (read-write), a secret beside them and a
    symlink out of outputs/."""
    (tmp_path / "inputs").mkdir()
    (tmp_path / "inputs" / "data.txt").write_text("hello from the host\n")
    (tmp_path / "outputs").mkdir()
    (tmp_path / "secret.txt").write_text("not for the job\n")
    (tmp_path / "outputs" / "up").symlink_to(tmp_path)
    return tmp_path


def _files_job(wasm: Build, tree: Path, *args: str) -> dict[str, Any]:
    dirs = [
        {"host": str(tree / "inputs"), "guest": "/inputs", "write": False},
        {"host": str(tree / "outputs"), "guest": "/outputs", "write": True},
    ]
    return job(wasm("fileops"), "_start", list(args), dirs=dirs)


def _listing(top: Path) -> list[str]:
    return sorted(str(p.relative_to(top)) for p in top.rglob("*"))


def test_a_job_reads_and_writes_its_preopened_directories(
    ex: WasmtimeExecutor, wasm: Build, tree: Path
) -> None:
    out = ex.run(_files_job(wasm, tree, "cat", "/inputs/data.txt"))
    assert (out["status"], out["exit_code"], out["stdout"]) == (
        "completed",
        0,
        b"hello from the host\n",
    ), out
    out = ex.run(_files_job(wasm, tree, "ls", "/inputs"))
    assert out["stdout"] == b"data.txt\n", out
    out = ex.run(_files_job(wasm, tree, "write", "/outputs/result.txt", "42"))
    assert out["exit_code"] == 0, out
    assert (tree / "outputs" / "result.txt").read_text() == "42"
    # a job without dirs has none: the same program cannot open the file
    out = ex.run(job(wasm("fileops"), "_start", ["cat", "/inputs/data.txt"]))
    assert out["exit_code"] == 1 and out["stderr"].startswith(b"fileops: /inputs/data.txt: "), out


@pytest.mark.parametrize(
    "args",
    [
        ("write", "/inputs/new.txt", "x"),  # a read-only directory
        ("write", "/inputs/data.txt", "x"),  # a read-only file
        ("cat", "/inputs/../secret.txt"),  # `..` out of a preopen
        ("write", "/outputs/../escaped.txt", "x"),
        ("cat", "/outputs/up/secret.txt"),  # a symlink out of a preopen
        ("write", "/outputs/up/escaped.txt", "x"),
        ("cat", "/etc/passwd"),  # no preopen holds it
        ("write", "/tmp/escaped.txt", "x"),
    ],
)
def test_a_job_cannot_write_read_only_or_leave_its_directories(
    ex: WasmtimeExecutor, wasm: Build, tree: Path, args: tuple[str, ...]
) -> None:
    before = _listing(tree)
    out = ex.run(_files_job(wasm, tree, *args))
    assert out["status"] == "completed" and out["exit_code"] == 1, out
    assert out["stdout"] == b"" and out["stderr"].startswith(f"fileops: {args[1]}: ".encode())
    assert _listing(tree) == before
    assert (tree / "inputs" / "data.txt").read_text() == "hello from the host\n"
    assert not Path("/tmp/escaped.txt").exists()


def test_invalid_dirs_fail_with_the_field_named(
    ex: WasmtimeExecutor, wasm: Build, tree: Path
) -> None:
    good = {"host": str(tree / "inputs"), "guest": "/inputs"}
    cases: list[tuple[Any, str]] = [
        ("/inputs", "dirs must be a list of at most 32 directories"),
        ([good] * 33, "dirs must be a list of at most 32 directories"),
        ([{**good, "mode": "rw"}], "dirs[0] must be {"),
        ([{**good, "host": "inputs"}], "dirs[0].host must be an absolute path (got 'inputs')"),
        ([{**good, "guest": "inputs"}], "dirs[0].guest must be an absolute, normalised path"),
        ([{**good, "guest": "/inputs/../etc"}], "dirs[0].guest must be an absolute"),
        ([{**good, "guest": "/inputs/"}], "dirs[0].guest must be an absolute"),
        ([good, good], "dirs[1].guest '/inputs' is given twice"),
        ([{**good, "write": "yes"}], "dirs[0].write must be true or false"),
    ]
    for dirs, words in cases:
        out = ex.poll(ex.submit(job(wasm("fileops"), "_start", ["ls", "/"], dirs=dirs)))
        assert out is not None and out["status"] == "failed", dirs
        assert out["error"].startswith("invalid job: " + words), (words, out["error"])
    # a host directory that is not there: the node made it, so it is the node's error
    for host in (tree / "no", tree / "secret.txt"):
        missing = [good, {"host": str(host), "guest": "/data"}]
        out = ex.run(job(wasm("fileops"), "_start", ["ls", "/"], dirs=missing))
        assert out["status"] == "failed", out
        assert out["error"] == f"executor error: cannot open the job's directory {host}"


def test_invalid_job_fields_fail_with_the_field_named(ex: WasmtimeExecutor, wasm: Build) -> None:
    calc = wasm("calc")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"module": "calc.wasm"}, "module must be bytes"),
        ({"args": [1, 2]}, "args must be a list of strings"),
        ({"env": {"A=B": "c"}}, "env must map names"),
        ({"stdin": "text"}, "stdin must be bytes"),
        ({"timeout_s": 0}, "timeout_s must be a number"),
        ({"timeout_s": float("nan")}, "timeout_s must be a number"),
        ({"memory_mb": True}, "memory_mb must be a number"),
        ({"memory_mb": 2 << 20}, "memory_mb must be a number"),
    ]
    for extra, words in cases:
        spec = job(calc, "add", ["1", "2"])
        spec.update(extra)
        out = ex.poll(ex.submit(spec))
        assert out is not None and out["status"] == "failed", extra
        assert out["error"].startswith("invalid job: " + words), out["error"]
    assert ex.run(job(calc, "add", ["1", "2"]))["returns"] == [3]


def test_timeout_kills_the_worker_and_the_executor_goes_on(
    ex: WasmtimeExecutor, wasm: Build
) -> None:
    ex.run(job(wasm("calc"), "add", ["1", "1"]))  # a warm worker, so start-up is not timed
    handle = ex.submit(job(wasm("spin"), "spin", timeout_s=1))
    t0 = time.monotonic()
    out = wait(ex, handle)
    took = time.monotonic() - t0
    assert out["status"] == "failed"
    assert out["error"] == "timeout: job exceeded its 1s limit"
    assert took >= 1.0 and out["wall_ms"] >= 1000, (took, out)
    assert not alive(handle.pid)
    assert ex.run(job(wasm("calc"), "add", ["2", "3"]))["returns"] == [5]


def test_memory_grow_loop_ends_at_the_cap(ex: WasmtimeExecutor, wasm: Build) -> None:
    out = ex.run(job(wasm("grow"), memory_mb=8, timeout_s=20))
    assert out["status"] == "failed"
    assert out["error"].startswith("memory limit: job exceeded 8 MiB"), out["error"]
    out = ex.run(job(wasm("hog"), memory_mb=16))
    assert out["error"].startswith("memory limit: job exceeded 16 MiB"), out["error"]
    assert ex.run(job(wasm("calc"), "add", ["2", "3"]))["returns"] == [5]


def test_memory_cap_holds_without_the_grow_hook(ex: WasmtimeExecutor) -> None:
    # memory.grow inside a SIMD function: memcap's scanner does not know the opcode, so the
    # module runs unhooked; its capped maximum and Store.set_limits still refuse the growth
    module = wat(
        """(module (memory (export "memory") 1)
          (func (export "grow") (param i32) (result i32)
            (drop (i32x4.splat (i32.const 0)))
            (memory.grow (local.get 0))))"""
    )
    assert ex.run(job(module, "grow", ["100"], memory_mb=8))["returns"] == [1]
    assert ex.run(job(module, "grow", ["200"], memory_mb=8))["returns"] == [-1]


METERED = """(module
  (import "metering" "usegas" (func $usegas (param i32)))
  (func (export "spin") (param $n i32) (result i32)
    (local $i i32)
    (block $done
      (loop $l
        (call $usegas (i32.const 10))
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $l)))
    (local.get $i)))"""


def test_gas_metering_for_instrumented_modules(
    ex: WasmtimeExecutor, wasm3_ex: Wasm3Executor
) -> None:
    metered = wat(METERED)  # each turn reports 10 gas, as wasm-instrument's pass would
    cases = [(["50"], 1000), (["100000"], None), (["100000"], 1000)]
    for args, gas in cases:
        ours = ex.run(job(metered, "spin", args, gas=gas))
        theirs = wasm3_ex.run(job(metered, "spin", args, gas=gas))
        for key in ("status", "returns", "error"):
            assert ours[key] == theirs[key], (args, gas, key, ours[key], theirs[key])
    assert ex.run(job(metered, "spin", ["50"], gas=1000))["returns"] == [50]
    out = ex.run(job(metered, "spin", ["100000"], gas=1000))
    assert out["status"] == "failed"
    assert out["error"] == "gas limit: job used more than its 1000 units of gas"
    assert ex.run(job(metered, "spin", ["10"], gas=-1))["error"].startswith("invalid job: gas")


def test_initial_memory_above_the_cap(ex: WasmtimeExecutor, wasm: Build) -> None:
    out = ex.run(job(wasm("bigmem"), memory_mb=64))
    assert out["error"].startswith("memory limit: job exceeded 64 MiB"), out["error"]
    assert "125 MiB" in out["error"]


def test_trap_keeps_output_and_says_why(ex: WasmtimeExecutor, wasm: Build) -> None:
    out = ex.run(job(wasm("trap")))
    assert out["status"] == "failed" and out["error"] == "trap: unreachable executed"
    assert out["stdout"] == b"before\n"
    assert out["stderr"] == b""
    division = wat(
        '(module (func (export "div") (param i32 i32) (result i32) '
        "(i32.div_s (local.get 0) (local.get 1))))"
    )
    assert ex.run(job(division, "div", ["1", "0"]))["error"] == "trap: integer divide by zero"
    oob = wat('(module (memory 1) (func (export "_start") (drop (i32.load (i32.const 70000)))))')
    assert ex.run(job(oob))["error"] == "trap: out of bounds memory access"


def test_deep_recursion_is_a_trap_not_a_crash(ex: WasmtimeExecutor, wasm: Build) -> None:
    calc = wasm("calc")
    assert ex.run(job(calc, "recurse", ["1000"]))["returns"] == [1000]
    pid = ex.stats()[0]["pid"]
    out = ex.run(job(calc, "recurse", ["100000000"]))
    assert out["error"] == "trap: stack overflow"
    assert ex.stats()[0]["pid"] == pid  # the same worker lives on


def test_cancel_running_and_queued(ex: WasmtimeExecutor, wasm: Build) -> None:
    running = ex.submit(job(wasm("spin"), "spin", timeout_s=30))
    queued = ex.submit(job(wasm("calc"), "add", ["1", "2"]))
    time.sleep(0.2)
    assert ex.poll(running) is None and ex.poll(queued) is None
    ex.cancel(queued)
    assert ex.poll(queued)["status"] == "cancelled"
    ex.cancel(running)
    assert ex.poll(running)["status"] == "cancelled"
    assert not alive(running.pid)
    ex.cancel(running)
    assert ex.poll(running)["status"] == "cancelled"
    assert ex.run(job(wasm("calc"), "add", ["1", "2"]))["returns"] == [3]


def test_suspend_stops_the_worker_and_its_clock(ex: WasmtimeExecutor, wasm: Build) -> None:
    ex.run(job(wasm("calc"), "add", ["1", "1"]))
    handle = ex.submit(job(wasm("spin"), "spin", timeout_s=1))
    time.sleep(0.3)
    assert ex.suspend(handle, "idle")
    assert stopped(handle.pid)  # SIGSTOPped
    time.sleep(2.0)  # longer than its timeout: stopped time does not count
    assert ex.poll(handle) is None
    assert ex.resume(handle, "idle")
    assert not stopped(handle.pid, want=False)
    out = wait(ex, handle)
    assert out["error"] == "timeout: job exceeded its 1s limit"
    assert 1000 <= out["wall_ms"] < 3000, out  # its running time only, not the 2 s pause
    assert ex.run(job(wasm("calc"), "add", ["1", "2"]))["returns"] == [3]


def test_invalid_arguments(ex: WasmtimeExecutor, wasm: Build) -> None:
    calc = wasm("calc")
    out = ex.run(job(calc, "add", ["x", "1"]))
    assert out["status"] == "failed"
    assert out["error"].startswith("invalid argument: 'x'") and "expects an integer" in out["error"]
    out = ex.run(job(calc, "add", ["1"]))
    assert out["error"].startswith("invalid argument: ") and "2 argument" in out["error"]
    out = ex.run(job(calc, "add", ["1", str(2**32)]))
    assert out["error"].startswith("invalid argument: ")
    assert ex.run(job(calc, "add", ["0x10", "-1"]))["returns"] == [15]


def test_worker_crash_is_an_executor_error(ex: WasmtimeExecutor, wasm: Build) -> None:
    handle = ex.submit(job(wasm("spin"), "spin", timeout_s=30))
    time.sleep(0.2)
    # SIGABRT: what a Rust panic or failed allocation inside wasmtime ends in. (A SIGSEGV
    # sent from outside is taken by wasmtime's trap handler first, not a fair test.)
    os.kill(handle.pid, signal.SIGABRT)
    out = wait(ex, handle)
    assert out["status"] == "failed"
    assert out["error"].startswith("executor error: worker process killed by SIGABRT"), out
    assert ex.run(job(wasm("calc"), "add", ["1", "2"]))["returns"] == [3]


def test_workers_are_recycled_and_keep_compiled_modules(wasm: Build) -> None:
    calc = wasm("calc")
    with WasmtimeExecutor(workers=1, jobs_per_worker=3) as ex:
        pids = []
        for i in range(7):
            handle = ex.submit(job(calc, "add", [str(i), "100"]))
            assert wait(ex, handle)["returns"] == [i + 100]
            pids.append(handle.pid)
        assert pids[0:3] == [pids[0]] * 3 and pids[3:6] == [pids[3]] * 3
        assert len({pids[0], pids[3], pids[6]}) == 3
        time.sleep(0.3)
        assert not alive(pids[0])


def test_stdout_cap_truncates_with_a_note_and_the_file_stays_small(wasm: Build) -> None:
    with WasmtimeExecutor(stdout_cap=100_000, stderr_cap=1000) as ex:
        out = ex.run(job(wasm("flood")))
        assert out["status"] == "completed" and out["exit_code"] == 0
        assert out["stdout"] == b"x" * 100_000
        assert out["stderr"] == b"end\n[deparrow: stdout truncated at 100000 bytes]\n"
        # the job wrote 2 MiB; the node's file holds the cap and one byte, no more
        worker = ex.workers[0]
        assert os.fstat(worker.out_file.fileno()).st_size == 100_001
        # stderr is capped the same way: 2 MiB of it keeps 1000 bytes and one more
        noisy = wat(
            """(module
              (import "wasi_snapshot_preview1" "fd_write"
                (func $w (param i32 i32 i32 i32) (result i32)))
              (memory (export "memory") 2)
              (func (export "_start") (local $i i32)
                (memory.fill (i32.const 65536) (i32.const 101) (i32.const 65536))
                (i32.store (i32.const 0) (i32.const 65536))
                (i32.store (i32.const 4) (i32.const 65536))
                (loop $l
                  (drop (call $w (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8)))
                  (local.set $i (i32.add (local.get $i) (i32.const 1)))
                  (br_if $l (i32.lt_u (local.get $i) (i32.const 32))))))"""
        )
        out = ex.run(job(noisy))
        assert out["status"] == "completed"
        assert out["stderr"] == b"e" * 1000 + b"[deparrow: stderr truncated at 1000 bytes]\n"
        assert os.fstat(ex.workers[0].err_file.fileno()).st_size == 1001


def test_hostile_jobs_one_after_another(wasm: Build) -> None:
    """Each hostile job fails with its reason, and the same executor runs the next job."""
    calc = wasm("calc")
    hostile: list[tuple[dict[str, Any], str]] = [
        (job(b"\0asm\x02\0\0\0"), "invalid module: "),
        (job(wasm("trap")), "trap: unreachable executed"),
        (job(wasm("spin"), timeout_s=1), "timeout: job exceeded its 1s limit"),
        (job(wasm("grow"), memory_mb=16), "memory limit: job exceeded 16 MiB"),
        (job(calc, "recurse", ["100000000"]), "trap: stack overflow"),
        (job(wat(SOCK_MODULE % "open")), "invalid module: unsupported import"),
    ]
    with WasmtimeExecutor() as ex:
        for spec, reason in hostile:
            out = ex.run(spec)
            assert out["status"] == "failed" and out["error"].startswith(reason), (reason, out)
            assert ex.run(job(calc, "add", ["20", "22"]))["returns"] == [42], reason
        out = ex.run(job(wasm("flood")))  # huge output: capped, not a failure
        assert out["status"] == "completed" and len(out["stdout"]) == 1 << 20
        assert out["stderr"].endswith(b"[deparrow: stdout truncated at 1048576 bytes]\n")
        assert ex.run(job(calc, "add", ["20", "22"]))["returns"] == [42]


def test_close_stops_every_worker(wasm: Build) -> None:
    ex = WasmtimeExecutor(workers=2)
    busy = ex.submit(job(wasm("spin"), "spin", timeout_s=30))
    idle = ex.submit(job(wasm("calc"), "add", ["1", "1"]))
    assert wait(ex, idle)["returns"] == [2]
    ex.close()
    assert ex.poll(busy)["status"] == "cancelled"
    assert not alive(busy.pid) and not alive(idle.pid)
    with pytest.raises(RuntimeError):
        ex.submit(job(b""))


def test_node_process_does_not_load_wasmtime() -> None:
    code = (
        "import sys; from edge.executors.wasmtime_exec import WasmtimeExecutor as W\n"
        "with W() as ex: pass\n"
        "sys.exit('wasmtime' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_a_node_without_wasmtime_is_told_how_to_get_it() -> None:
    # -S: no site-packages, so this interpreter has edge (on PYTHONPATH) but no wasmtime
    code = (
        "from edge.executors.wasmtime_exec import WasmtimeExecutor, WasmtimeUnavailable\n"
        "try:\n"
        "    WasmtimeExecutor()\n"
        "except WasmtimeUnavailable as e:\n"
        "    print(e)\n"
    )
    root = str(Path(__file__).parents[2])
    env = {**os.environ, "PYTHONPATH": root}
    done = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env, cwd=root
    )
    assert done.returncode == 0, done.stderr
    assert "wasmtime engine is not installed" in done.stdout
    assert "pip install 'deparrow[full]'" in done.stdout and "wasm3" in done.stdout


def _manifest() -> dict[str, dict[str, Any]]:
    jobs: dict[str, dict[str, Any]] = json.loads((WASM_JOBS / "jobs.json").read_text())
    return jobs


def _example_job(name: str) -> dict[str, Any]:
    spec = _manifest()[name]
    stdin = (WASM_JOBS / spec["stdin"]).read_bytes() if spec.get("stdin") else b""
    timeout_s = 1 if spec["expected"].get("error") == "timeout" else 10
    return job(
        (WASM_JOBS / spec["module"]).read_bytes(),
        spec["entrypoint"],
        spec["args"],
        env=spec["env"],
        stdin=stdin,
        timeout_s=timeout_s,
        memory_mb=32,
    )


@pytest.fixture(scope="module")
def wasm3_ex() -> Iterator[Wasm3Executor]:
    with Wasm3Executor(workers=1) as executor:
        yield executor


@pytest.mark.parametrize("name", sorted(_manifest()))
def test_example_jobs_give_what_jobs_json_says_on_both_engines(
    ex: WasmtimeExecutor, wasm3_ex: Wasm3Executor, name: str
) -> None:
    expected = _manifest()[name]["expected"]
    ours = ex.run(_example_job(name))
    theirs = wasm3_ex.run(_example_job(name))
    same = ("status", "exit_code", "stdout", "stderr", "returns", "error")
    assert {k: ours[k] for k in same} == {k: theirs[k] for k in same}
    if "error" in expected:
        assert ours["status"] == "failed"
        assert ours["error"].startswith(expected["error"] + ": "), ours["error"]
        return
    assert ours["status"] == "completed", ours
    assert ours["stdout"].decode() == expected["stdout"]
    assert ours["returns"] == expected["returns"]
    assert ours["exit_code"] == expected["exit_code"]
    if "stderr" in expected:
        assert ours["stderr"].decode() == expected["stderr"]


@pytest.mark.parametrize(
    "name, entrypoint, args, extra",
    [
        ("calc", "divmod", ["-7", "2"], {}),
        ("calc", "mul64", ["-3", "5"], {}),
        ("calc", "recurse", ["100000000"], {}),
        ("exit3", "_start", [], {}),
        ("trap", "_start", [], {}),
        ("flood", "_start", [], {}),
        ("grow", "_start", [], {"memory_mb": 8}),
        ("hog", "_start", [], {"memory_mb": 16}),
        ("bigmem", "_start", [], {}),
        # not "files": wasmtime gives file calls, the pywasm3 worker refuses them
        ("wasi_echo", "_start", ["x"], {"env": {"WHO": "w"}, "stdin": b"abc"}),
    ],
)
def test_fixtures_give_the_same_outcome_on_both_engines(
    ex: WasmtimeExecutor,
    wasm3_ex: Wasm3Executor,
    wasm: Build,
    name: str,
    entrypoint: str,
    args: list[str],
    extra: dict[str, Any],
) -> None:
    spec = job(wasm(name), entrypoint, args, **extra)
    ours, theirs = ex.run(dict(spec)), wasm3_ex.run(dict(spec))
    for key in ("status", "exit_code", "stdout", "stderr", "returns", "error"):
        assert ours[key] == theirs[key], (key, ours[key], theirs[key])

"""The wasm3 executor against real wasm3 in real worker processes.

Fixture modules are built from tests/edge/fixtures/ (WAT with wabt's wat2wasm, C with clang
and wasi-libc) once per session; the example jobs in wasm-jobs/ are run as they ship.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.executors.wasm3 import Wasm3Executor

FIXTURES = Path(__file__).parent / "fixtures"
WASM_JOBS = Path(__file__).parents[2] / "wasm-jobs"

Build = Callable[[str], bytes]


@pytest.fixture(scope="session")
def wasm(tmp_path_factory: pytest.TempPathFactory) -> Build:
    """name -> module bytes, built from fixtures/<name>.wat or fixtures/<name>.c."""
    out = tmp_path_factory.mktemp("wasm")

    def build(name: str) -> bytes:
        target = out / (name + ".wasm")
        if not target.exists():
            wat, c = FIXTURES / (name + ".wat"), FIXTURES / (name + ".c")
            if wat.exists():
                if not shutil.which("wat2wasm"):
                    pytest.fail("wat2wasm not installed: run `make test` (Debian package: wabt)")
                cmd = ["wat2wasm", str(wat), "-o", str(target)]
            else:
                if not shutil.which("clang"):
                    pytest.fail(
                        "clang not installed: run `make test` (Debian: clang lld wasi-libc)"
                    )
                cmd = [
                    "clang",
                    "--target=wasm32-wasi",
                    "-O2",
                    "-Wl,--strip-all",
                    "-o",
                    str(target),
                    str(c),
                ]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                pytest.fail(f"cannot build {name}: {done.stderr.strip()[-300:]}")
        return target.read_bytes()

    return build


@pytest.fixture(scope="module")
def ex() -> Iterator[Wasm3Executor]:
    """One executor shared by the tests below: each must leave it able to run the next job."""
    with Wasm3Executor(workers=1) as executor:
        yield executor


def job(
    module: bytes, entrypoint: str = "_start", args: list[str] | None = None, **extra: Any
) -> dict[str, Any]:
    spec = {
        "job_id": "t",
        "module": module,
        "entrypoint": entrypoint,
        "args": args or [],
        "env": {},
        "stdin": b"",
        "timeout_s": 10,
        "memory_mb": 64,
    }
    spec.update(extra)
    return spec


def wait(ex: Wasm3Executor, handle: Any, limit_s: float = 10) -> dict[str, Any]:
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        outcome = ex.poll(handle)
        if outcome is not None:
            return outcome
        time.sleep(0.005)
    raise AssertionError(f"no outcome within {limit_s}s")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_invoke_returns_values(ex: Wasm3Executor, wasm: Build) -> None:
    calc = wasm("calc")
    out = ex.run(job(calc, "add", ["2", "40"]))
    assert out["status"] == "completed" and out["error"] is None
    assert out["returns"] == [42] and out["exit_code"] == 0
    assert ex.run(job(calc, "mul64", [str(2**31), "4"]))["returns"] == [2**33]
    assert ex.run(job(calc, "divmod", ["7", "2"]))["returns"] == [3, 1]
    assert ex.run(job(calc, "nothing"))["returns"] == []
    assert set(out) == {
        "status",
        "exit_code",
        "stdout",
        "stderr",
        "returns",
        "error",
        "wall_ms",
        "cpu_ms",
    }


def test_wasi_program_gets_args_env_stdin(ex: Wasm3Executor, wasm: Build) -> None:
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


def test_proc_exit_is_an_exit_code_and_keeps_stdout(ex: Wasm3Executor, wasm: Build) -> None:
    out = ex.run(job(wasm("exit3")))
    assert out["status"] == "completed" and out["error"] is None
    assert out["exit_code"] == 3 and out["stdout"] == b"bye\n"


@pytest.mark.parametrize("module", [b"", b"not wasm at all", b"\0asm\x01\0\0\0\x01\x7f"])
def test_bytes_that_are_not_a_module(ex: Wasm3Executor, module: bytes) -> None:
    out = ex.run(job(module))
    assert out["status"] == "failed" and out["error"].startswith("invalid module: "), out


def test_missing_entrypoint_export(ex: Wasm3Executor, wasm: Build) -> None:
    out = ex.run(job(wasm("calc"), "nope"))
    assert out["error"].startswith("invalid module: ") and "'nope'" in out["error"]
    assert "add" in out["error"]  # says what it does export
    out = ex.run(job(wasm("calc")))  # no _start: not a WASI command
    assert out["error"].startswith("invalid module: ") and "'_start'" in out["error"]


def test_unsupported_import_is_named(ex: Wasm3Executor, wasm: Build) -> None:
    out = ex.run(job(wasm("files")))
    assert out["status"] == "failed"
    assert out["error"].startswith(
        "invalid module: unsupported import wasi_snapshot_preview1.path_open"
    ), out["error"]


def test_timeout_kills_the_worker_and_the_executor_goes_on(ex: Wasm3Executor, wasm: Build) -> None:
    ex.run(job(wasm("calc"), "add", ["1", "1"]))  # a warm worker, so start-up is not timed
    handle = ex.submit(job(wasm("spin"), "spin", timeout_s=1))
    t0 = time.monotonic()
    out = wait(ex, handle)
    took = time.monotonic() - t0
    assert out["status"] == "failed"
    assert out["error"] == "timeout: job exceeded its 1s limit"
    assert 1.0 <= took < 1.5, took
    assert 1000 <= out["wall_ms"] < 1500 and out["cpu_ms"] >= 500, out
    assert not alive(handle.pid)
    again = ex.run(job(wasm("calc"), "add", ["2", "3"]))
    assert again["returns"] == [5]


def test_memory_grow_loop_ends_at_the_cap(ex: Wasm3Executor, wasm: Build) -> None:
    t0 = time.monotonic()
    out = ex.run(job(wasm("grow"), memory_mb=8, timeout_s=20))
    assert out["status"] == "failed"
    assert out["error"].startswith("memory limit: job exceeded 8 MiB"), out["error"]
    assert time.monotonic() - t0 < 5  # ended by the cap, not by the timeout
    # a C program whose malloc runs dry is over its limit the same way
    out = ex.run(job(wasm("hog"), memory_mb=16))
    assert out["error"].startswith("memory limit: job exceeded 16 MiB"), out["error"]
    assert ex.run(job(wasm("calc"), "add", ["2", "3"]))["returns"] == [5]


def test_initial_memory_above_the_cap(ex: Wasm3Executor, wasm: Build) -> None:
    out = ex.run(job(wasm("bigmem"), memory_mb=64))
    assert out["error"].startswith("memory limit: job exceeded 64 MiB"), out["error"]
    assert "125 MiB" in out["error"]


def test_trap_keeps_output_and_says_why(ex: Wasm3Executor, wasm: Build) -> None:
    out = ex.run(job(wasm("trap")))
    assert out["status"] == "failed" and out["error"] == "trap: unreachable executed"
    assert out["stdout"] == b"before\n"
    assert out["stderr"] == b""  # wasm3's backtrace is the worker's business, not the job's


def test_deep_recursion_is_a_trap_not_a_crash(ex: Wasm3Executor, wasm: Build) -> None:
    calc = wasm("calc")
    assert ex.run(job(calc, "recurse", ["1000"]))["returns"] == [1000]
    pid = ex.stats()[0]["pid"]
    out = ex.run(job(calc, "recurse", ["100000000"]))
    assert out["error"] == "trap: stack overflow"
    assert ex.stats()[0]["pid"] == pid  # the same worker lives on


def test_cancel_running_and_queued(ex: Wasm3Executor, wasm: Build) -> None:
    running = ex.submit(job(wasm("spin"), "spin", timeout_s=30))
    queued = ex.submit(job(wasm("calc"), "add", ["1", "2"]))  # one worker: it waits
    time.sleep(0.2)
    assert ex.poll(running) is None and ex.poll(queued) is None
    ex.cancel(queued)
    assert ex.poll(queued)["status"] == "cancelled"
    t0 = time.monotonic()
    ex.cancel(running)
    out = ex.poll(running)
    assert out["status"] == "cancelled" and time.monotonic() - t0 < 1
    assert not alive(running.pid)
    ex.cancel(running)  # a second cancel changes nothing
    assert ex.poll(running)["status"] == "cancelled"
    assert ex.run(job(wasm("calc"), "add", ["1", "2"]))["returns"] == [3]


def test_invalid_arguments(ex: Wasm3Executor, wasm: Build) -> None:
    calc = wasm("calc")
    out = ex.run(job(calc, "add", ["x", "1"]))
    assert out["status"] == "failed"
    assert out["error"].startswith("invalid argument: 'x'") and "expects an integer" in out["error"]
    out = ex.run(job(calc, "add", ["1"]))
    assert out["error"].startswith("invalid argument: ") and "2 argument" in out["error"]
    out = ex.run(job(calc, "add", ["1", str(2**32)]))
    assert out["error"].startswith("invalid argument: ")
    assert ex.run(job(calc, "add", ["0x10", "-1"]))["returns"] == [15]


def test_worker_crash_is_an_executor_error(ex: Wasm3Executor, wasm: Build) -> None:
    handle = ex.submit(job(wasm("spin"), "spin", timeout_s=30))
    time.sleep(0.2)
    os.kill(handle.pid, signal.SIGSEGV)
    out = wait(ex, handle)
    assert out["status"] == "failed"
    assert out["error"].startswith("executor error: worker process killed by SIGSEGV"), out
    assert ex.run(job(wasm("calc"), "add", ["1", "2"]))["returns"] == [3]


def test_workers_are_recycled(wasm: Build) -> None:
    calc = wasm("calc")
    with Wasm3Executor(workers=1, jobs_per_worker=3) as ex:
        pids = []
        for i in range(7):
            handle = ex.submit(job(calc, "add", [str(i), "100"]))
            assert wait(ex, handle)["returns"] == [i + 100]
            pids.append(handle.pid)
        assert pids[0:3] == [pids[0]] * 3 and pids[3:6] == [pids[3]] * 3
        assert len({pids[0], pids[3], pids[6]}) == 3
        time.sleep(0.3)
        assert not alive(pids[0])  # retired workers exit and are reaped


def test_workers_run_jobs_side_by_side(wasm: Build) -> None:
    with Wasm3Executor(workers=2) as ex:
        spin = wasm("spin")
        t0 = time.monotonic()
        handles = [ex.submit(job(spin, "spin", timeout_s=1)) for _ in range(2)]
        outs = [wait(ex, h) for h in handles]
        assert [o["error"] for o in outs] == ["timeout: job exceeded its 1s limit"] * 2
        assert time.monotonic() - t0 < 1.9
        assert handles[0].pid != handles[1].pid


def test_gas_metering_for_instrumented_modules(ex: Wasm3Executor, wasm: Build) -> None:
    metered = wasm("metered")
    # Within budget (50 turns x 10 gas), and without a budget at all, it runs.
    assert ex.run(job(metered, "spin", ["50"], gas=1000))["returns"] == [50]
    assert ex.run(job(metered, "spin", ["100000"]))["returns"] == [100000]
    out = ex.run(job(metered, "spin", ["100000"], gas=1000))
    assert out["status"] == "failed"
    assert out["error"] == "gas limit: job used more than its 1000 units of gas"
    assert ex.run(job(wasm("calc"), "add", ["2", "3"]))["returns"] == [5]  # next job runs


def test_stdout_cap_truncates_with_a_note(wasm: Build) -> None:
    with Wasm3Executor(stdout_cap=100_000) as ex:
        out = ex.run(job(wasm("flood")))
    assert out["status"] == "completed"
    assert out["stdout"] == b"x" * 100_000
    assert out["stderr"] == b"end\n[deparrow: stdout truncated at 100000 bytes]\n"


def test_close_stops_every_worker(wasm: Build) -> None:
    ex = Wasm3Executor(workers=2)
    busy = ex.submit(job(wasm("spin"), "spin", timeout_s=30))
    idle = ex.submit(job(wasm("calc"), "add", ["1", "1"]))
    assert wait(ex, idle)["returns"] == [2]
    ex.close()
    assert ex.poll(busy)["status"] == "cancelled"
    assert not alive(busy.pid) and not alive(idle.pid)
    with pytest.raises(RuntimeError):
        ex.submit(job(b""))


def test_node_process_does_not_load_wasm3() -> None:
    code = "import sys, edge.executors.wasm3; sys.exit('wasm3' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def _example_jobs() -> list[str]:
    try:
        return sorted(json.loads((WASM_JOBS / "jobs.json").read_text()))
    except OSError:
        return []


@pytest.mark.parametrize("name", _example_jobs())
def test_example_jobs(ex: Wasm3Executor, name: str) -> None:
    spec = json.loads((WASM_JOBS / "jobs.json").read_text())[name]
    stdin = (WASM_JOBS / spec["stdin"]).read_bytes() if spec.get("stdin") else b""
    expected = spec["expected"]
    timeout_s = 1 if expected.get("error") == "timeout" else 10
    out = ex.run(
        job(
            (WASM_JOBS / spec["module"]).read_bytes(),
            spec["entrypoint"],
            spec["args"],
            env=spec["env"],
            stdin=stdin,
            timeout_s=timeout_s,
            memory_mb=32,
        )
    )
    if "error" in expected:
        assert out["status"] == "failed"
        assert out["error"].startswith(expected["error"] + ": "), out["error"]
        return
    assert out["status"] == "completed", out
    assert out["stdout"].decode() == expected["stdout"]
    assert out["returns"] == expected["returns"]
    assert out["exit_code"] == expected["exit_code"]
    if "stderr" in expected:
        assert out["stderr"].decode() == expected["stderr"]

"""The firmware's wasm job engine (firmware/wasm3/dp_engine.c with edge/native's wasi.c and
module.c over wasm3's core), built with gcc as MicroPython's unix port would build the user
module (its warnings as errors), and driven through firmware/wasm3_exec.py, the board's
executor, on CPython: tests/firmware/host/dpwasm3.py stands in for the MicroPython binding
(modwasm3.c), which needs MicroPython's source to compile.

The same jobs run on wasm3-run (edge/executors/wasm3_cli.py), the executor of MicroPython
nodes with an OS: the outcomes must match, error words included.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
JOBS = ROOT / "wasm-jobs"


@pytest.fixture(scope="module")
def engine_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dpwasm3") / "libdpwasm3.so"
    script = ROOT / "firmware" / "wasm3" / "build-host.sh"
    done = subprocess.run(
        [str(script), str(out)], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHON": sys.executable},
    )  # fmt: skip
    assert done.returncode == 0, f"build-host.sh failed:\n{done.stderr[-4000:]}"
    return out


def test_the_engine_compiles_for_a_32_bit_target() -> None:
    """The ESP32s are 32-bit (Xtensa, RISC-V 32): the engine and the shared edge/native files
    must compile without 64-bit-only types (GCC's __int128), with the unix port's warnings as
    errors. -m32 on this PC stands in for the board's compiler."""
    done = subprocess.run(
        [str(ROOT / "firmware" / "wasm3" / "build-host.sh"), "--check-32bit"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHON": sys.executable},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.fixture(scope="module")
def board_executor(engine_lib: Path) -> Iterator[Any]:
    os.environ["DPWASM3_LIB"] = str(engine_lib)
    sys.path[:0] = [str(ROOT / "tests" / "firmware" / "host"), str(ROOT / "firmware")]
    try:
        from wasm3_exec import Wasm3ModuleExecutor

        ex = Wasm3ModuleExecutor(stdout_cap=4096, stderr_cap=1024)
        yield ex
        ex.close()
    finally:
        del sys.path[:2]


@pytest.fixture(scope="module")
def cli_executor(
    native: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    from edge.executors.wasm3_cli import Wasm3CliExecutor

    ex = Wasm3CliExecutor(
        str(tmp_path_factory.mktemp("cli")), runner=str(native["runner"]),
        stdout_cap=4096, stderr_cap=1024,
    )  # fmt: skip
    yield ex
    ex.close()


def job(
    module: bytes, entry: str = "_start", args: list[str] | None = None, **extra: Any
) -> dict[str, Any]:
    spec = {"job_id": "t1", "module": module, "entrypoint": entry, "args": args or [],
            "env": {}, "stdin": b"", "timeout_s": 10, "memory_mb": 64}  # fmt: skip
    spec.update(extra)
    return spec


# A WASI program that sleeps 10 s in poll_oneoff (a monotonic clock subscription).
SLEEPER = """(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (i32.store8 (i32.const 8) (i32.const 0))
    (i32.store (i32.const 16) (i32.const 1))
    (i64.store (i32.const 24) (i64.const 10000000000))
    (drop (call $poll (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128)))))
"""


@pytest.fixture(scope="module")
def sleeper(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    work = tmp_path_factory.mktemp("sleeper")
    (work / "sleep.wat").write_text(SLEEPER)
    done = subprocess.run(["wat2wasm", str(work / "sleep.wat"), "-o", str(work / "sleep.wasm")],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return (work / "sleep.wasm").read_bytes()


def cases(fx: Path, sleeper: bytes = b"") -> dict[str, dict[str, Any]]:
    def mod(name: str) -> bytes:
        path = JOBS / f"{name}.wasm"
        return (path if path.exists() else fx / f"{name}.wasm").read_bytes()

    return {
        "fib": job(mod("fib"), "fib", ["25"]),
        "sieve": job(mod("sieve"), args=["100000"]),
        "sha256 (stdin)": job(mod("sha256"), stdin=(JOBS / "sha256-input.txt").read_bytes()),
        "hello (args, env)": job(mod("hello"), args=["a", "b c"], env={"NAME": "board"}),
        "proc_exit keeps stdout": job(mod("exit3")),
        "trap": job(mod("trap")),
        "not a module": job(b"\x00asm-but-not-really"),
        "missing export": job(mod("fib"), "nope"),
        "unsupported import": job(mod("sockets")),
        "bad argument": job(mod("fib"), "fib", ["x"]),
        "wrong argument count": job(mod("fib"), "fib", []),
        "memory.grow past the cap": job(mod("grow"), memory_mb=2),
        "initial memory above the cap": job(mod("bigmem"), memory_mb=1),
        "gas within budget": job(mod("metered"), "spin", ["100"], gas=10_000),
        "gas exhausted": job(mod("metered"), "spin", ["100000"], gas=10_000),
        "stdout past its cap": job(mod("flood")),
        "i32 bounds": job(mod("calc"), "add", ["2147483647", "-2147483648"]),
        "i32 wraps unsigned": job(mod("calc"), "add", ["4294967295", "0x1"]),
        "i32 too big": job(mod("calc"), "add", ["4294967296", "0"]),
        "i32 too small": job(mod("calc"), "add", ["-2147483649", "0"]),
        "i64 bounds": job(mod("calc"), "mul64", ["18446744073709551615", "-9223372036854775808"]),
        "i64 too big": job(mod("calc"), "mul64", ["18446744073709551616", "1"]),
        "i64 far too big": job(mod("calc"), "mul64", ["9" * 40, "1"]),
        "i64 too small": job(mod("calc"), "mul64", ["-9223372036854775809", "1"]),
        "underscores and bases": job(mod("calc"), "mul64", ["1_000", "0b11"]),
        "endless loop times out": job(mod("loop"), timeout_s=0.5),
        "a long sleep times out": job(sleeper, timeout_s=0.5),
        "endless metered loop times out": job(
            mod("metered"), "spin", ["2000000000"], timeout_s=0.5
        ),
    }


CASES = [
    "fib", "sieve", "sha256 (stdin)", "hello (args, env)", "proc_exit keeps stdout", "trap",
    "not a module", "missing export", "unsupported import", "bad argument",
    "wrong argument count", "memory.grow past the cap", "initial memory above the cap",
    "gas within budget", "gas exhausted", "stdout past its cap", "i32 bounds",
    "i32 wraps unsigned", "i32 too big", "i32 too small", "i64 bounds", "i64 too big",
    "i64 far too big", "i64 too small", "underscores and bases", "endless loop times out",
    "endless metered loop times out", "a long sleep times out",
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_the_board_engine_gives_the_outcomes_of_wasm3_run(
    case: str,
    sleeper: bytes, board_executor: Any, cli_executor: Any, wasm_fixtures: Path,
) -> None:  # fmt: skip
    all_cases = cases(wasm_fixtures, sleeper)
    assert sorted(all_cases) == sorted(CASES)
    spec = all_cases[case]
    t0 = time.monotonic()
    board = board_executor.run(spec)
    board_s = time.monotonic() - t0
    cli = cli_executor.run(spec)
    keys = ("status", "exit_code", "returns", "error", "stdout", "stderr")
    if case == "unsupported import":  # the same import named; a board gives no files
        board_has = board["error"].split(" (this executor provides ")[1]
        assert board_has.endswith("no files or sockets)"), board["error"]
        board = {**board, "error": board["error"].split(" (this executor provides ")[0]}
        cli = {**cli, "error": cli["error"].split(" (this executor provides ")[0]}
    assert {k: board[k] for k in keys} == {k: cli[k] for k in keys}
    assert board["status"] in ("completed", "failed")
    if case.startswith(("i32", "i64", "underscores")):  # the CPython executor is the reference
        from edge.executors.wasm3 import Wasm3Executor

        with Wasm3Executor(workers=1) as reference:
            ref = reference.run(spec)
        assert {k: board[k] for k in keys} == {k: ref[k] for k in keys}
    if "times out" in case:
        assert board["error"] == "timeout: job exceeded its 0.5s limit"
        assert 0.5 <= board_s < 1.5, board_s
        assert 450 <= board["wall_ms"] < 1500


def test_answers_are_what_a_user_expects(board_executor: Any, wasm_fixtures: Path) -> None:
    c = cases(wasm_fixtures)
    assert board_executor.run(c["fib"])["returns"] == [75025]
    assert board_executor.run(c["sieve"])["stdout"] == b"primes below 100000: 9592\n"
    hello = board_executor.run(c["hello (args, env)"])
    assert hello["stdout"] == b"hello from wasm, args=a b c NAME=board\n"
    flood = board_executor.run(c["stdout past its cap"])
    assert len(flood["stdout"]) == 4096
    assert flood["stderr"].endswith(b"[deparrow: stdout truncated at 4096 bytes]\n")
    grow = board_executor.run(c["memory.grow past the cap"])
    assert grow["error"] == "memory limit: job exceeded 2 MiB (memory.grow past the cap)"


def test_deep_recursion_is_a_trap_on_the_jobs_thread(
    board_executor: Any, wasm_fixtures: Path
) -> None:
    calc = (wasm_fixtures / "calc.wasm").read_bytes()
    assert board_executor.run(job(calc, "recurse", ["400"]))["returns"] == [400]
    out = board_executor.run(job(calc, "recurse", ["100000000"]))
    assert out["error"] == "trap: stack overflow"
    assert board_executor.run(job(calc, "recurse", ["10"]))["returns"] == [10]  # it goes on


def test_cancel_stops_a_running_job_and_the_next_one_runs(
    board_executor: Any, wasm_fixtures: Path
) -> None:
    loop = (JOBS / "loop.wasm").read_bytes()
    fib = (JOBS / "fib.wasm").read_bytes()
    running = board_executor.submit(job(loop, timeout_s=30))
    queued = board_executor.submit(job(fib, "fib", ["20"]))
    time.sleep(0.2)
    assert board_executor.poll(running) is None  # it runs on its own thread: the node goes on
    t0 = time.monotonic()
    board_executor.cancel(running)
    assert time.monotonic() - t0 < 1.0
    assert board_executor.poll(running)["status"] == "cancelled"
    end = time.monotonic() + 10
    while board_executor.poll(queued) is None and time.monotonic() < end:
        time.sleep(0.01)
    assert board_executor.poll(queued)["returns"] == [6765]

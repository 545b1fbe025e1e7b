"""dpwasm3 in the firmware (`make firmware-unix`: MicroPython's unix port with the module
compiled in), driven by firmware/wasm3_exec.py as a node running the firmware drives it: the
jobs of test_wasm3_engine.py (fib, sieve, stdin, hello's args and env, a trap, a loop timed
out, memory.grow past the cap, output past its cap, gas, argument bounds, bad modules, ...)
plus deep recursion, each run in dpwasm3 in the MicroPython process and in a wasm3-run
process from the same MicroPython (tests/firmware/mp_engines.py), with the same limits: the
outcomes must be the same, error words and truncation notes included. Then a running job
cancelled at once, and the next one run, on the firmware's thread.
"""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.firmware.test_wasm3_engine import CASES, cases, job, sleeper

ROOT = Path(__file__).resolve().parents[2]
KEYS = ("status", "exit_code", "returns", "error", "stdout", "stderr")
MORE = ["recursion within the wasm stack", "recursion past the wasm stack", "f64 result",
        "f32 result"]  # fmt: skip
__all__ = ["sleeper"]  # a fixture
# Float results: their JSON is C's "%.17g" / "%.9g", whichever printf the firmware has.
THIRDS = """(module
  (func (export "third64") (param f64) (result f64) (f64.div (local.get 0) (f64.const 3)))
  (func (export "third32") (param f32) (result f32) (f32.div (local.get 0) (f32.const 3))))
"""


def more_cases(fx: Path, work: Path) -> dict[str, dict[str, Any]]:
    calc = (fx / "calc.wasm").read_bytes()
    (work / "thirds.wat").write_text(THIRDS)
    done = subprocess.run(["wat2wasm", str(work / "thirds.wat"), "-o", str(work / "thirds.wasm")],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    thirds = (work / "thirds.wasm").read_bytes()
    return {
        "recursion within the wasm stack": job(calc, "recurse", ["400"]),
        "recursion past the wasm stack": job(calc, "recurse", ["100000000"]),
        "f64 result": job(thirds, "third64", ["1"]),
        "f32 result": job(thirds, "third32", ["2.5"]),
    }


@pytest.fixture(scope="module")
def outcomes(
    micropython: str, native: dict[str, Path], wasm_fixtures: Path, sleeper: bytes,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:  # fmt: skip
    work = tmp_path_factory.mktemp("engines")
    jobs = {**cases(wasm_fixtures, sleeper), **more_cases(wasm_fixtures, work)}
    for spec in jobs.values():
        for key in ("module", "stdin"):
            spec[key] = base64.b64encode(spec[key]).decode()
    (work / "jobs.json").write_text(json.dumps(jobs))
    done = subprocess.run(
        [micropython, str(ROOT / "tests" / "firmware" / "mp_engines.py"), str(work / "jobs.json"),
         str(work / "cli"), str(native["runner"])],
        capture_output=True, text=True, cwd=work, env={"MICROPYPATH": ".frozen"}, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    by_case = {}
    for line in lines:
        if line.startswith("CASE "):
            entry = json.loads(line[5:])
            by_case[entry["case"]] = entry
    checks = [line[6:] for line in lines if line.startswith("CHECK ")]
    return {"cases": by_case, "checks": checks}


@pytest.mark.parametrize("case", CASES + MORE)
def test_dpwasm3_in_the_firmware_gives_the_outcomes_of_wasm3_run(
    case: str, outcomes: dict[str, Any]
) -> None:
    entry = outcomes["cases"][case]
    board, cli = entry["dpwasm3"], entry["wasm3-run"]
    if case == "unsupported import":  # the same import named; a board gives no files
        board_has = board["error"].split(" (this executor provides ")[1]
        assert board_has.endswith("no files or sockets)"), board["error"]
        board = {**board, "error": board["error"].split(" (this executor provides ")[0]}
        cli = {**cli, "error": cli["error"].split(" (this executor provides ")[0]}
    assert {k: board[k] for k in KEYS} == {k: cli[k] for k in KEYS}
    assert board["status"] in ("completed", "failed")
    if "times out" in case:
        assert board["error"] == "timeout: job exceeded its 0.5s limit"
        assert 500 <= board["ms"] < 1500, board["ms"]


def test_what_a_user_sees(outcomes: dict[str, Any]) -> None:
    def board(case: str) -> dict[str, Any]:
        out: dict[str, Any] = outcomes["cases"][case]["dpwasm3"]
        return {**out, **{k: base64.b64decode(out[k]) for k in ("stdout", "stderr")}}

    assert board("fib")["returns"] == [75025]
    assert board("sieve")["stdout"] == b"primes below 100000: 9592\n"
    assert board("hello (args, env)")["stdout"] == b"hello from wasm, args=a b c NAME=board\n"
    assert board("trap")["error"].startswith("trap: ")
    flood = board("stdout past its cap")
    assert len(flood["stdout"]) == 4096
    assert flood["stderr"].endswith(b"[deparrow: stdout truncated at 4096 bytes]\n")
    grow = board("memory.grow past the cap")
    assert grow["error"] == "memory limit: job exceeded 2 MiB (memory.grow past the cap)"
    assert board("recursion within the wasm stack")["returns"] == [400]
    assert board("recursion past the wasm stack")["error"] == "trap: stack overflow"
    assert board("f64 result")["returns"] == [1 / 3]


def test_a_running_job_is_cancelled_and_the_next_one_runs(outcomes: dict[str, Any]) -> None:
    assert outcomes["checks"] == [
        "running on its own thread ok",
        "cancelled within a second ok",
        "cancelled ok",
        "the next one runs ok",
    ]

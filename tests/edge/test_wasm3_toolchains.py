"""Modules from today's toolchains on every wasm3 path: the pywasm3 worker (edge/executors/
wasm3.py), wasm3-run (edge/executors/wasm3_cli.py, MicroPython nodes) and the firmware engine
(firmware/wasm3, built for this PC as tests/firmware builds it).

Today's LLVM writes call_indirect's table index as a 5-byte LEB (80 80 80 80 00), which the
2021 wasm3 of pywasm3 0.5.0 refused with "LEB encoded value overflow". wasm3-run and the
firmware build wasm3 with tools/wasm3-core.patch; the worker rewrites the index to one byte
before pywasm3 loads the module (edge/executors/wasmcode.py). The modules here: four of the
official WASI testsuite's C suite (wasi-sdk, ../shared/wasi-testsuite), which failed on every
path before, and small hand-assembled ones for the encodings themselves.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.executors.wasm3 import Wasm3Executor
from edge.executors.wasm3_cli import Wasm3CliExecutor
from edge.executors.wasmbin import enc_uleb
from tests.edge.test_micropython_node import native
from tests.firmware.test_wasm3_engine import board_executor, engine_lib

__all__ = ["board_executor", "engine_lib", "native"]

ROOT = Path(__file__).resolve().parents[2]
SUITE = (ROOT / ".." / "shared" / "wasi-testsuite").resolve()
C_SUITE = SUITE / "tests" / "c" / "testsuite" / "wasm32-wasip1"
# The C suite's modules that import only what the wasm3 engines give today (no files or
# sockets); each has no .json beside it, so the specification's defaults apply: no args,
# exit code 0.
C_MODULES = [
    "clock_getres-monotonic",
    "clock_getres-realtime",
    "clock_gettime-monotonic",
    "clock_gettime-realtime",
]
PATHS = ["worker", "wasm3-run", "firmware"]


@pytest.fixture(scope="module")
def worker() -> Iterator[Wasm3Executor]:
    with Wasm3Executor(workers=1) as ex:
        yield ex


@pytest.fixture(scope="module")
def runner(native: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    ex = Wasm3CliExecutor(str(tmp_path_factory.mktemp("cli")), runner=str(native["runner"]))
    yield ex
    ex.close()


@pytest.fixture(params=PATHS)
def ex(request: pytest.FixtureRequest) -> Any:
    fixture = {"worker": "worker", "wasm3-run": "runner", "firmware": "board_executor"}
    return request.getfixturevalue(fixture[request.param])


def job(module: bytes, entry: str = "_start") -> dict[str, Any]:
    return {"job_id": "t", "module": module, "entrypoint": entry, "args": [], "env": {},
            "stdin": b"", "timeout_s": 20, "memory_mb": 64}  # fmt: skip


@pytest.mark.parametrize("name", C_MODULES)
def test_wasi_testsuite_c_modules_run(ex: Any, name: str) -> None:
    path = C_SUITE / f"{name}.wasm"
    if not path.exists():
        pytest.fail(
            f"{path} is missing: the WASI testsuite is expected at {SUITE} "
            "(../shared/wasi-testsuite beside the repository)"
        )
    module = path.read_bytes()
    assert b"\x11\x80\x80\x80\x80\x00\x80\x80\x80\x80\x00" in module  # the padded form, as built
    out = ex.run(job(module))
    assert (out["status"], out["exit_code"], out["error"]) == ("completed", 0, None), out


def _section(sid: int, payload: bytes) -> bytes:
    return bytes([sid]) + enc_uleb(len(payload)) + payload


def _body(code: bytes) -> bytes:
    return enc_uleb(len(code) + 1) + b"\x00" + code  # no locals


def calls_through_table(table_index: bytes, memory: bool) -> bytes:
    """A module whose export `f` returns 42 from function 0 through call_indirect, with the
    table index immediate written as `table_index`; with `memory`, `f` first grows memory by
    one page (the worker's memory hook rewrites the same body)."""
    grow = b"\x41\x01\x40\x00\x1a" if memory else b""  # i32.const 1; memory.grow 0; drop
    f = grow + b"\x41\x00\x11\x00" + table_index + b"\x0b"  # i32.const 0; call_indirect 0
    return b"".join(
        [
            b"\0asm\x01\0\0\0",
            _section(1, b"\x01\x60\x00\x01\x7f"),  # type 0: () -> i32
            _section(3, b"\x02\x00\x00"),
            _section(4, b"\x01\x70\x00\x01"),  # one funcref table, min 1
            _section(5, b"\x01\x00\x01") if memory else b"",
            _section(7, b"\x01\x01f\x00\x01"),
            _section(9, b"\x01\x00\x41\x00\x0b\x01\x00"),  # table[0] = function 0
            _section(10, b"\x02" + _body(b"\x41\x2a\x0b") + _body(f)),
        ]
    )


@pytest.mark.parametrize("memory", [False, True], ids=["no memory", "memory.grow too"])
@pytest.mark.parametrize("index", [b"\x00", b"\x80\x00", b"\x80\x80\x80\x80\x00"])
def test_call_indirect_table_index_in_any_length(ex: Any, index: bytes, memory: bool) -> None:
    out = ex.run(job(calls_through_table(index, memory), "f"))
    assert (out["status"], out["returns"], out["error"]) == ("completed", [42], None), out


def test_call_indirect_through_another_table_is_refused(ex: Any) -> None:
    # These wasm3s have one table; the 2021 core used to ignore the index and call table 0.
    out = ex.run(job(calls_through_table(b"\x81\x80\x80\x80\x00", False), "f"))
    assert out["status"] == "failed"
    assert out["error"] == "invalid module: call_indirect table index out of range", out

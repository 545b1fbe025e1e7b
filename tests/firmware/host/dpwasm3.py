"""The `dpwasm3` module for CPython, over the firmware's engine built as a shared library
(tests/firmware/test_wasm3_engine.py builds firmware/wasm3/dp_engine.c, dp_wasi.c,
dp_module.c and wasm3's core with gcc; $DPWASM3_LIB names the .so).

It has modwasm3.c's API and does what modwasm3.c does: turn the arguments into a DpJob, call
dp_run, turn the DpResult into the tuple. MicroPython's source cannot be had here, so the
binding itself is not compiled; this stands in for it so that the engine (the part that holds
WASI and the limits) and firmware/wasm3_exec.py are tested for real.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

_lib = ctypes.CDLL(os.environ["DPWASM3_LIB"])


class DpStr(ctypes.Structure):
    _fields_ = [("p", ctypes.c_char_p), ("n", ctypes.c_uint32)]


class DpJob(ctypes.Structure):
    _fields_ = [
        ("module", ctypes.c_char_p),
        ("module_len", ctypes.c_size_t),
        ("entry", DpStr),
        ("job_id", DpStr),
        ("args", ctypes.POINTER(DpStr)),
        ("nargs", ctypes.c_uint32),
        ("env", ctypes.POINTER(DpStr)),
        ("nenv", ctypes.c_uint32),
        ("stdin_bytes", ctypes.c_char_p),
        ("stdin_len", ctypes.c_size_t),
        ("timeout_ms", ctypes.c_uint64),
        ("memory_mb", ctypes.c_uint64),
        ("stdout_cap", ctypes.c_uint64),
        ("stderr_cap", ctypes.c_uint64),
        ("gas", ctypes.c_uint64),
    ]


class DpResult(ctypes.Structure):
    _fields_ = [
        ("completed", ctypes.c_int),
        ("exit_code", ctypes.c_int64),
        ("returns", ctypes.c_char_p),
        ("error", ctypes.c_char_p),
        ("out", ctypes.POINTER(ctypes.c_uint8)),
        ("out_len", ctypes.c_size_t),
        ("err", ctypes.POINTER(ctypes.c_uint8)),
        ("err_len", ctypes.c_size_t),
        ("wall_ms", ctypes.c_uint64),
    ]


_lib.dp_run.argtypes = [ctypes.POINTER(DpJob), ctypes.POINTER(DpResult)]
_lib.dp_run.restype = None
_lib.dp_version.restype = ctypes.c_char_p


def _str(s: str | bytes) -> DpStr:
    b = s.encode() if isinstance(s, str) else s
    return DpStr(b, len(b))


def _strs(items: list[str]) -> Any:
    arr = (DpStr * max(1, len(items)))()
    for i, s in enumerate(items):
        arr[i] = _str(s)
    return arr


def _count(v: int, what: str) -> int:
    if v < 0:
        raise ValueError(what + " must not be negative")
    return v


def run(
    module: bytes, entry: str, args: list[str], env: list[str], stdin: bytes, job_id: str,
    timeout_ms: int, memory_mb: int, stdout_cap: int, stderr_cap: int, gas: int,
) -> tuple[Any, ...]:  # fmt: skip
    a, e = _strs(args), _strs(env)
    job = DpJob(
        module, len(module), _str(entry), _str(job_id), a, len(args), e, len(env),
        stdin, len(stdin), _count(timeout_ms, "timeout_ms"), _count(memory_mb, "memory_mb"),
        _count(stdout_cap, "stdout_cap"), _count(stderr_cap, "stderr_cap"), _count(gas, "gas"),
    )  # fmt: skip
    res = DpResult()
    _lib.dp_run(ctypes.byref(job), ctypes.byref(res))  # ctypes releases the GIL, as modwasm3.c
    out = (
        "completed" if res.completed else "failed",
        None if res.exit_code < 0 else res.exit_code,
        res.returns.decode() if res.returns else None,
        res.error.decode() if res.error else None,
        ctypes.string_at(res.out, res.out_len) if res.out_len else b"",
        ctypes.string_at(res.err, res.err_len) if res.err_len else b"",
        res.wall_ms,
    )
    _lib.dp_release()
    return out


def cancel() -> None:
    _lib.dp_cancel()


def version() -> str:
    return str(_lib.dp_version().decode())

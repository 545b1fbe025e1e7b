"""What a wasmtime worker (edge/executors/wasmtime_worker.py) keeps from job to job: the
engine, configured with the wasm3 runner's stack and a known memory reservation; the linker with
wasmtime's WASI plus the host functions that make it answer as the wasm3 executor does; the gas
meter for instrumented modules; and the compiled modules (`Runtime`).
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict

import wasmtime

from edge.executors import wasi
from edge.executors.runner import JobFailed

# The same wasm stack as the wasm3 runner, so the same recursion depth overflows on both.
WASM_STACK_BYTES = 1 << 20
# What wasmtime maps for one 32-bit linear memory (set explicitly so the AS budget is known).
MEMORY_RESERVATION = 4 << 30
MEMORY_GUARD = 32 << 20
COMPILE_SLACK = 256 << 20
MAX_PAGES = 65536
CACHE_MODULES = 16
CACHE_BYTES = 64 << 20


def make_engine() -> wasmtime.Engine:
    config = wasmtime.Config()
    config.max_wasm_stack = WASM_STACK_BYTES
    config.memory_reservation = MEMORY_RESERVATION
    config.memory_guard_size = MEMORY_GUARD
    # one core per job: the node's owner decides how many jobs (workers) run side by side
    config.parallel_compilation = False
    config.cranelift_opt_level = "speed"
    return wasmtime.Engine(config)


def _fd_fdstat_get(caller: wasmtime.Caller, fd: int, ptr: int) -> int:
    """WASI fd_fdstat_get for fds 0-2 as the wasm3 executor answers it
    (`wasi.Wasi.fd_fdstat_get`): character devices without seek rights. wasmtime's own answer
    for its output callbacks differs, and wasi-libc's isatty() and stdio buffering read it, so
    this one replaces it there (`Runtime.new_linker`; other fds get wasmtime's answer)."""
    memory = caller.get("memory")
    if not isinstance(memory, wasmtime.Memory):
        return wasi.EFAULT
    rights = wasi.RIGHTS_STDIN if fd == 0 else wasi.RIGHTS_STDOUT
    stat = struct.pack("<BxHxxxxQQ", wasi.FILETYPE_CHARACTER_DEVICE, 0, rights, 0)
    try:
        memory.write(caller, stat, ptr & 0xFFFFFFFF)
    except IndexError:
        return wasi.EFAULT
    return wasi.SUCCESS


class ProcExit(Exception):
    """WASI proc_exit(code) from the job: it ended with that exit code."""

    def __init__(self, code: int) -> None:
        super().__init__(f"proc_exit({code})")
        self.code = code


def _proc_exit(code: int) -> None:
    """WASI proc_exit for any code. wasmtime's own refuses codes of 126 and more ("exit with
    invalid exit status outside of [0..126)", a rule of its CLI's shell conventions) and loses
    the code, while AssemblyScript's abort() exits with 255; wasm3 reports such a code as it is,
    so both engines give the job the exit code it asked for."""
    raise ProcExit(code & 0xFFFFFFFF if code < 0 else code)


# wasmtime's own fd_fdstat_get for a job's files and directories (fds 3 and up), called from
# `Runtime.new_linker`'s replacement. A WASI host function finds the memory it writes into as
# its caller's "memory" export, so a host function cannot call it directly; this module, given
# the job's memory, is a caller that exports it.
_FDSTAT_TRAMPOLINE = """(module
  (import "wasi_snapshot_preview1" "fd_fdstat_get" (func $get (param i32 i32) (result i32)))
  (import "job" "memory" (memory 0))
  (export "memory" (memory 0))
  (func (export "fdstat") (param i32 i32) (result i32)
    (call $get (local.get 0) (local.get 1))))"""

_I32 = wasmtime.ValType.i32()
_FDSTAT_TYPE = wasmtime.FuncType([_I32, _I32], [_I32])
_PROC_EXIT_TYPE = wasmtime.FuncType([_I32], [])


# Gas metering for modules instrumented to call `metering.usegas(i32)` (wasm-instrument's
# gas_metering pass), as the wasm3 runner offers it: the sum of what the module reports, a trap
# past the job's budget. Written in wasm so that wasmtime compiles it inline with the job's code
# (a Python host function per basic block would cost more than the block). Unmetered: no limit.
GAS_IMPORT = ("metering", "usegas")
_METER = """(module
  (global (export "used") (mut i64) (i64.const 0))
  (global (export "limit") (mut i64) (i64.const -1))
  (func (export "usegas") (param i32)
    (global.set 0 (i64.add (global.get 0) (i64.extend_i32_u (local.get 0))))
    (if (i64.gt_u (global.get 0) (global.get 1)) (then unreachable))))"""


class Runtime:
    """What a worker keeps from job to job: the engine, the linker with WASI, and compiled
    modules by the sha256 of their (capped) bytes, least recently used out first."""

    def __init__(self) -> None:
        self.engine = make_engine()
        self.wasi_linker = wasmtime.Linker(self.engine)  # wasmtime's own WASI, unchanged
        self.wasi_linker.define_wasi()
        self.trampoline = wasmtime.Module(self.engine, _FDSTAT_TRAMPOLINE)
        self.files_fdstat: wasmtime.Func | None = None  # the running job's, see bind_files
        self.linker = self.new_linker()
        self.meter = wasmtime.Module(self.engine, _METER)
        self.modules: OrderedDict[bytes, tuple[wasmtime.Module, int]] = OrderedDict()
        self.hits = 0

    def new_linker(self) -> wasmtime.Linker:
        linker = wasmtime.Linker(self.engine)
        linker.define_wasi()
        linker.allow_shadowing = True

        def fd_fdstat_get(caller: wasmtime.Caller, fd: int, ptr: int) -> int:
            if 0 <= fd <= 2:
                return _fd_fdstat_get(caller, fd, ptr)
            if self.files_fdstat is None:  # a job without directories has no other fd
                return wasi.EBADF
            return int(self.files_fdstat(caller, fd, ptr))

        linker.define_func(wasi.MODULE, "fd_fdstat_get", _FDSTAT_TYPE, fd_fdstat_get, True)
        linker.define_func(wasi.MODULE, "proc_exit", _PROC_EXIT_TYPE, _proc_exit)
        return linker

    def bind_files(self, store: wasmtime.Store, instance: wasmtime.Instance) -> None:
        """Before a job with preopened directories runs: fd_fdstat_get answers for its fds 3
        and up as wasmtime's WASI does (wasi-libc asks it when opening files); `unbind_files`
        after it. A job without a plain exported memory has no files to ask about."""
        memory = instance.exports(store).get("memory")
        own = self.wasi_linker.get(store, wasi.MODULE, "fd_fdstat_get")
        if not isinstance(memory, wasmtime.Memory) or not isinstance(own, wasmtime.Func):
            return
        kind = memory.type(store)
        if not kind.is_64 and not kind.is_shared:
            tramp = wasmtime.Instance(store, self.trampoline, [own, memory])
            func = tramp.exports(store)["fdstat"]
            assert isinstance(func, wasmtime.Func)
            self.files_fdstat = func

    def unbind_files(self) -> None:
        self.files_fdstat = None

    def metered_linker(
        self, store: wasmtime.Store, gas: int | None
    ) -> tuple[wasmtime.Linker, wasmtime.Instance]:
        """A linker for one job that also provides metering.usegas, and its meter."""
        meter = wasmtime.Instance(store, self.meter, [])
        if gas:
            limit = meter.exports(store)["limit"]
            assert isinstance(limit, wasmtime.Global)
            limit.set_value(store, wasmtime.Val.i64(int(gas)))
        linker = self.new_linker()  # ~0.15 ms, and only for metered jobs
        linker.define_instance(store, GAS_IMPORT[0], meter)
        return linker, meter

    def module(self, data: bytes) -> wasmtime.Module:
        key = hashlib.sha256(data).digest()
        entry = self.modules.get(key)
        if entry is not None:
            self.modules.move_to_end(key)
            self.hits += 1
            return entry[0]
        try:
            module = wasmtime.Module(self.engine, data)
        except wasmtime.WasmtimeError as e:
            raise JobFailed("invalid module: " + first_line(str(e))) from None
        self.modules[key] = (module, len(data))
        while len(self.modules) > CACHE_MODULES or (
            len(self.modules) > 1 and sum(n for _, n in self.modules.values()) > CACHE_BYTES
        ):
            self.modules.popitem(last=False)
        return module


def first_line(message: str) -> str:
    """wasmtime's errors are "what\\n\\nCaused by:\\n    why": both parts, on one line."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    lines = [ln for ln in lines if ln != "Caused by:" and not ln.startswith("-->")]
    return ": ".join(lines[:2]) if lines else "rejected by wasmtime"

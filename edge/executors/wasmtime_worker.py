"""The worker process of the wasmtime executor, `python -S -m edge.executors.wasmtime_worker`:
the same pipe protocol, output files and result frames as the wasm3 worker (`worker.py`), so
the node drives both with one machinery (`wasmtime_exec.py`), but each job is compiled by
wasmtime's Cranelift JIT and run with wasmtime's own WASI. Workers are reused: Python plus
wasmtime take ~100 ms to start, while a small job runs in a millisecond, and a reused worker
keeps the compiled code of the modules it ran last (`Runtime`, wasmtime_runtime.py).

To give the same results as wasm3 for the same module, the job goes through the wasm3 path's
checks first (`runner.prepare`: the module must parse, export its entry point, and import
nothing beyond the WASI subset `wasi.py` names plus its filesystem calls, so a module refused on
a board without files is refused here too) and through the same memory.grow hook (`memcap.py`),
so "memory limit" is told apart from a plain trap; traps are named with wasm3's words. Limits:
linear memory and tables through `Store.set_limits` (the cap wasmtime itself enforces), one
memory per job; RLIMIT_AS sized to what the worker maps now plus the one 4 GiB reservation
wasmtime makes for a 32-bit memory (that is what lets its JIT drop bounds checks; ~1.6x faster
than explicit checks here) plus the cap and room to compile, the line for allocations in
wasmtime itself; RLIMIT_CPU as the wasm3 worker. Output: wasmtime hands every write to stdout or
stderr to a callback that keeps the first cap + 1 bytes in the node's file (`runner.CappedFile`,
as wasm3 does) and drops the rest, so a flood cannot fill the disk and the job runs on unaware;
RLIMIT_FSIZE at cap + 1 (with SIGXFSZ ignored, so a write past it fails instead of killing) is
the backstop under that, for jobs that write no files (the limit would cap those files too).

Files: the job's `dirs` (checked by `jobfiles.check_dirs`) are preopened in order with
wasmtime's own WASI, which confines every path to them (no escape by `..`, absolute paths or
symlinks) and refuses writes in a read-only one; `prepare` then lets the module import WASI's
filesystem calls. Sockets stay refused.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from typing import Any

try:
    import resource
except ImportError:  # pragma: no cover - not POSIX
    resource = None  # type: ignore[assignment]

import wasmtime

from edge.executors.framing import encode, read_frame, write_all
from edge.executors.memcap import MEM_FLAG
from edge.executors.runner import PAGE, CappedFile, JobFailed, convert_args, prepare
from edge.executors.wasmtime_runtime import (
    COMPILE_SLACK,
    GAS_IMPORT,
    MAX_PAGES,
    MEMORY_GUARD,
    MEMORY_RESERVATION,
    ProcExit,
    Runtime,
    first_line,
)

# wasmtime's trap codes in the words wasm3 uses (runner._explain strips its "[trap] ").
_TRAPS = {
    wasmtime.TrapCode.UNREACHABLE: "unreachable executed",
    wasmtime.TrapCode.STACK_OVERFLOW: "stack overflow",
    wasmtime.TrapCode.MEMORY_OUT_OF_BOUNDS: "out of bounds memory access",
    wasmtime.TrapCode.INTEGER_DIVISION_BY_ZERO: "integer divide by zero",
    wasmtime.TrapCode.INTEGER_OVERFLOW: "integer overflow",
    wasmtime.TrapCode.BAD_CONVERSION_TO_INTEGER: "invalid conversion to integer",
    wasmtime.TrapCode.BAD_SIGNATURE: "indirect call type mismatch",
    wasmtime.TrapCode.TABLE_OUT_OF_BOUNDS: "undefined element",
    wasmtime.TrapCode.INDIRECT_CALL_TO_NULL: "null table element",
}
_ARG_CODES = {"i32": 1, "i64": 2, "f32": 3, "f64": 4}


class _Signature:
    """What `runner.convert_args` reads of a wasm3 function, for a wasmtime one."""

    def __init__(self, name: str, func: wasmtime.Func, store: wasmtime.Store) -> None:
        self.name = name
        self.arg_types = [_ARG_CODES.get(str(t), 0) for t in func.type(store).params]


def _vm_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def _set_limits(
    cap_bytes: int, module_len: int, timeout_s: float, out_cap: int, writes_files: bool
) -> None:
    if resource is None:
        return
    vm = _vm_bytes()
    if vm is not None:
        # linear memory (reservation + guards), tables (up to the cap again) and compiling
        room = MEMORY_RESERVATION + 2 * MEMORY_GUARD + 2 * cap_bytes + 16 * module_len
        _lower(resource.RLIMIT_AS, vm + room + COMPILE_SLACK)
    _lower(resource.RLIMIT_CPU, int(time.process_time() + timeout_s + 2))
    if not writes_files:  # it would cap the files a job writes into its directories too
        _lower(resource.RLIMIT_FSIZE, out_cap + 1)


def _lower(which: int, soft: int) -> None:
    hard = resource.getrlimit(which)[1]
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(which, (soft, hard))


def _clear_limits() -> None:
    if resource is None:
        return
    for which in (resource.RLIMIT_AS, resource.RLIMIT_CPU, resource.RLIMIT_FSIZE):
        hard = resource.getrlimit(which)[1]
        resource.setrlimit(which, (hard, hard))


def _stdin_path(data: bytes) -> tuple[int, str]:
    """The job's stdin as a memory-backed file wasmtime can open by path (no disk, no name)."""
    fd = os.memfd_create("deparrow-stdin", getattr(os, "MFD_CLOEXEC", 1))
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    return fd, f"/proc/self/fd/{fd}"


def run_job(
    runtime: Runtime,
    job: dict[str, Any],
    blobs: dict[str, bytes],
    out_fd: int,
    err_fd: int,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    c0 = time.process_time()
    entry = job.get("entrypoint") or "_start"
    memory_mb = int(job.get("memory_mb") or 64)
    # a 32-bit memory holds 65536 pages (4 GiB): wasmtime refuses a larger declared maximum
    cap_pages = max(1, min(memory_mb * 16, MAX_PAGES))
    out_cap, err_cap = int(job["stdout_cap"]), int(job["stderr_cap"])
    stdout, stderr = CappedFile(out_fd, out_cap), CappedFile(err_fd, err_cap)
    result: dict[str, Any] = {"status": "failed", "exit_code": None, "returns": None, "error": None}
    store = instance = meter = None
    hooked = False
    stdin_fd = None
    try:
        data, _exports, imports, hooked = prepare(
            blobs.get("module", b""), entry, cap_pages, files=True, sockets=True
        )
        config = wasmtime.WasiConfig()
        job_id = job.get("job_id") or "job"
        config.argv = [job_id, *job.get("args", [])] if entry == "_start" else [job_id]
        config.env = [[str(k), str(v)] for k, v in (job.get("env") or {}).items()]
        if blobs.get("stdin"):
            stdin_fd, path = _stdin_path(blobs["stdin"])
            config.stdin_file = path
        config.stdout_custom = stdout.write
        config.stderr_custom = stderr.write
        dirs = job.get("dirs") or []
        for d in dirs:  # fds 3, 4... in this order; wasmtime's WASI confines paths to them
            if not os.path.isdir(d["host"]):  # the node made it: not the job's fault
                raise JobFailed(f"executor error: cannot open the job's directory {d['host']}")
            config.preopen_dir(d["host"], d["guest"], bool(d.get("write")))
        writes = any(d.get("write") for d in dirs)
        timeout_s = float(job.get("timeout_s") or 60)
        _set_limits(cap_pages * PAGE, len(data), timeout_s, out_cap, writes)
        try:
            module = runtime.module(data)
            store = wasmtime.Store(runtime.engine)
            store.set_limits(
                memory_size=cap_pages * PAGE,
                table_elements=max(10_000, cap_pages * PAGE // 8),
                memories=1,
            )
            store.set_wasi(config)
            linker = runtime.linker
            if GAS_IMPORT in imports:
                linker, meter = runtime.metered_linker(store, job.get("gas"))
            instance = linker.instantiate(store, module)
            if dirs:
                runtime.bind_files(store, instance)
            if stdin_fd is not None:
                os.close(stdin_fd)  # wasmtime opened its own
                stdin_fd = None
            funcs = instance.exports(store)
            init = funcs.get("_initialize") if entry != "_start" else None
            if isinstance(init, wasmtime.Func):  # a WASI reactor sets itself up first
                init(store)
            func = funcs.get(entry)
            if not isinstance(func, wasmtime.Func):  # prepare() checked; wasmtime agrees
                raise JobFailed(f"invalid module: no exported function {entry!r}")
            if entry == "_start":
                if func.type(store).params:
                    raise JobFailed("invalid module: _start takes parameters")
                func(store)
            else:
                rets = func(store, *convert_args(_Signature(entry, func, store), job["args"]))
                if rets is None:
                    rets = []
                elif not isinstance(rets, (list, tuple)):
                    rets = [rets]
                result["returns"] = list(rets)
            result.update(status="completed", exit_code=0)
        finally:
            runtime.unbind_files()
            _clear_limits()
    except ProcExit as e:  # the job's proc_exit (wasmtime_runtime._proc_exit)
        result.update(status="completed", exit_code=e.code)
    except wasmtime.ExitTrap as e:  # proc_exit; a subclass of WasmtimeError: first
        result.update(status="completed", exit_code=e.code)
    except JobFailed as e:
        result["error"] = str(e)
    except wasmtime.Trap as e:
        hook = instance if hooked else None
        result["error"] = _explain_trap(e, store, hook, meter, job.get("gas"), memory_mb)
    except wasmtime.WasmtimeError as e:
        result["error"] = _explain_error(str(e), memory_mb)
    except MemoryError:
        result["error"] = f"memory limit: job exceeded {memory_mb} MiB (the host ran out of memory)"
    finally:
        if stdin_fd is not None:
            os.close(stdin_fd)
    result["wall_ms"] = int((time.perf_counter() - t0) * 1000)
    result["cpu_ms"] = int((time.process_time() - c0) * 1000)
    return result


def _global(store: Any, instance: wasmtime.Instance | None, name: str) -> int:
    if instance is not None and store is not None:
        with contextlib.suppress(Exception):
            glob = instance.exports(store).get(name)
            if isinstance(glob, wasmtime.Global):
                return int(glob.value(store))
    return 0


def _explain_trap(
    trap: wasmtime.Trap,
    store: Any,
    hooked: wasmtime.Instance | None,
    meter: wasmtime.Instance | None,
    gas: Any,
    memory_mb: int,
) -> str:
    """A trap, in the runner's words (`runner._explain`): over the memory cap, over the gas
    budget, or what the trap was."""
    flag = _global(store, hooked, MEM_FLAG)
    if flag == 1:
        return f"memory limit: job exceeded {memory_mb} MiB (memory.grow past the cap)"
    if flag == 2:
        return f"memory limit: job exceeded {memory_mb} MiB (the host could not allocate more)"
    if gas and (_global(store, meter, "used") & 0xFFFFFFFFFFFFFFFF) > int(gas):
        return f"gas limit: job used more than its {gas} units of gas"
    words = _TRAPS.get(trap.trap_code) if trap.trap_code is not None else None
    if words is None:  # wasmtime's own words, without its backtrace
        lines = [ln.strip() for ln in trap.message.splitlines() if ln.strip()]
        words = lines[-1].removeprefix("wasm trap: ") if lines else "trap"
    return "trap: " + words


def _explain_error(message: str, memory_mb: int) -> str:
    """A WasmtimeError outside a trap: linking, instantiating or allocating."""
    text = first_line(message)
    low = text.lower()
    if "memory" in low and ("limit" in low or "allocat" in low or "reserv" in low):
        return f"memory limit: job exceeded {memory_mb} MiB ({text})"
    return "invalid module: " + text


def serve(reader: Any, proto: int, out_fd: int, err_fd: int) -> None:
    runtime = Runtime()
    write_all(proto, encode({"type": "ready", "pid": os.getpid(), "cpu_ms": _cpu_ms()}))
    while True:
        frame = read_frame(reader)
        if frame is None:
            return  # the node closed our stdin: retire
        job, blobs = frame
        try:
            result = run_job(runtime, job, blobs, out_fd, err_fd)
        except Exception as e:  # a bug here must still answer the node, not hang it
            result = {
                "status": "failed",
                "exit_code": None,
                "returns": None,
                "error": f"executor error: {type(e).__name__}: {e}",
            }
        result.update(type="result", cpu_total_ms=_cpu_ms())
        del frame, blobs
        write_all(proto, encode(result))


def _cpu_ms() -> int:
    return int(time.process_time() * 1000)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    opts = dict(zip(args[::2], args[1::2], strict=False))
    out_fd, err_fd = int(opts["--stdout-fd"]), int(opts["--stderr-fd"])
    if resource is not None:
        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past RLIMIT_FSIZE a write fails
    # Our stdout carries frames; move it aside so nothing else (wasmtime-py prints when an
    # output callback fails) can write into it.
    proto = os.dup(1)
    os.dup2(2, 1)
    serve(os.fdopen(0, "rb"), proto, out_fd, err_fd)


if __name__ == "__main__":
    main()

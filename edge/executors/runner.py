"""Runs one job inside a worker process: checks the module (`prepare`), loads it into a fresh
wasm3 runtime with the WASI layer linked, calls its entry point under the job's limits and
turns whatever happened into a result, with wasm3's errors translated into the executor's
error kinds ("invalid module", "trap", "memory limit"...). It is separate from `worker.py`,
which only runs the process and its pipe, so the job logic reads as one piece. Limits, in
the order they bite: linear memory (the module is rewritten, see `memcap.py`, which also
writes call_indirect's table index as the 2021 wasm3 reads it, see `wasmcode.py`); RLIMIT_AS,
this process's address space, set per job to what it uses now plus the cap plus slack, the
last line for allocations inside wasm3 itself; RLIMIT_CPU (soft), CPU used so far + timeout
+ 2 s: the node kills at the wall-clock timeout, and this backstop (SIGXCPU) stops a runaway
job even if the node itself has died.
"""

import os
import time

try:
    import resource
except ImportError:  # pragma: no cover - not POSIX
    resource = None  # type: ignore[assignment]

from edge.executors import wasi
from edge.executors.memcap import MEM_FLAG, cap_memory
from edge.executors.wasmbin import IMPORT_KINDS, InvalidModule, ModuleInfo

# wasm3 recurses on the C stack for wasm calls (the worker gives it a 64 MiB thread stack):
# with a 1 MiB wasm stack its own "[trap] stack overflow" must come first.
WASM_STACK_BYTES = 1 << 20
PAGE = 65536
AS_SLACK = 64 << 20
# Gas metering: a module instrumented to call `metering.usegas(i32)` (as wasm-instrument's
# gas_metering pass emits) reports its cost as it runs; wasm3 sums it and traps "Out of gas"
# past the module's gasLimit, which pywasm3 expresses in units of 10,000 gas.
GAS_IMPORT = ("metering", "usegas")
GAS_SCALE = 10_000
UNMETERED = 10**18  # an instrumented module run without a gas budget
# WASI preview1's filesystem calls, which an executor that preopens the job's directories
# (wasmtime's own WASI, the wasm3-run runner's C WASI) provides beyond `wasi.SIGNATURES`.
FILE_IMPORTS = frozenset(
    {
        *("fd_advise", "fd_allocate", "fd_datasync", "fd_fdstat_set_rights", "fd_filestat_get"),
        *("fd_filestat_set_size", "fd_filestat_set_times", "fd_pread", "fd_pwrite"),
        *("fd_readdir", "fd_renumber", "fd_sync", "fd_tell", "path_create_directory"),
        *("path_filestat_get", "path_filestat_set_times", "path_link", "path_open"),
        *("path_readlink", "path_remove_directory", "path_rename", "path_symlink"),
        *("path_unlink_file", "proc_raise"),
    }
)
# WASI preview1's socket calls act only on sockets the host hands a job, and no job is ever
# given one: they can only answer EBADF or ENOTSOCK, so a module may import them where the
# engine implements them (wasmtime). No network is reachable through them.
SOCKET_IMPORTS = frozenset({"sock_accept", "sock_recv", "sock_send", "sock_shutdown"})


class JobFailed(Exception):
    """Ends a job with status "failed"; the message carries one of the executor's prefixes."""


class CappedFile:
    """A job's stdout or stderr: a file the node can read even after killing this process.
    Keeps `cap` bytes; one byte more marks that the job wrote more than that."""

    def __init__(self, fd, cap):
        self.fd, self.cap, self.size = fd, cap, 0
        os.ftruncate(fd, 0)

    def write(self, data):
        room = self.cap + 1 - self.size
        if room > 0:
            data = data[:room]
            while data:
                n = os.pwrite(self.fd, data, self.size)
                self.size += n
                data = data[n:]


def _vm_bytes():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def _set_limits(cap_bytes, module_len, timeout_s):
    if resource is None:
        return
    vm = _vm_bytes()
    if vm is not None:
        # glibc may copy a growing block before freeing the old one: room for twice the cap
        limit = vm + 2 * cap_bytes + 4 * module_len + AS_SLACK
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    soft = int(time.process_time() + timeout_s + 2)
    if cpu_hard == resource.RLIM_INFINITY or soft < cpu_hard:
        resource.setrlimit(resource.RLIMIT_CPU, (soft, cpu_hard))


def _clear_limits():
    if resource is None:
        return
    for which in (resource.RLIMIT_AS, resource.RLIMIT_CPU):
        hard = resource.getrlimit(which)[1]
        resource.setrlimit(which, (hard, hard))


_ARG_KINDS = {1: ("i32", 32), 2: ("i64", 64), 3: ("f32", 0), 4: ("f64", 0)}


def convert_args(func, args):
    name = func.name
    types = list(func.arg_types)
    if len(args) != len(types):
        raise JobFailed(
            f"invalid argument: {name} expects {len(types)} argument(s), got {len(args)}"
        )
    out = []
    for i, (text, code) in enumerate(zip(args, types, strict=True)):
        kind, bits = _ARG_KINDS.get(code, ("?", 0))
        where = "%s expects %s for parameter %d (%s)"
        if bits == 0:
            try:
                out.append(float(text))
            except ValueError:
                raise JobFailed(
                    f"invalid argument: {text!r}: " + where % (name, "a number", i + 1, kind)
                ) from None
            continue
        try:
            v = int(str(text).strip(), 0)
        except ValueError:
            try:
                v = int(str(text).strip(), 10)
            except ValueError:
                raise JobFailed(
                    f"invalid argument: {text!r}: " + where % (name, "an integer", i + 1, kind)
                ) from None
        if not -(1 << (bits - 1)) <= v < (1 << bits):
            raise JobFailed(
                f"invalid argument: {text!r}: "
                + where % (name, "an integer that fits", i + 1, kind)
            )
        out.append(v - (1 << bits) if v >= 1 << (bits - 1) else v)
    return out


def _mib(pages):
    return "%g MiB" % (pages * PAGE / (1 << 20))


def prepare(module, entrypoint, cap_pages, files=False, sockets=False):
    """Checks the module before the engine sees it; `files`: the executor gives WASI's
    filesystem calls (over the job's preopened directories), so a module may import them;
    `sockets`: it gives the sock_* calls (which find no socket: see SOCKET_IMPORTS).
    Returns (bytes to load, exports, function imports, whether memory.grow is hooked)."""
    try:
        info = ModuleInfo(module)
    except InvalidModule as e:
        raise JobFailed(f"invalid module: {e}") from None
    exp = info.exports.get(entrypoint)
    if exp is None or exp[0] != 0:
        have = sorted(n for n, (k, _) in info.exports.items() if k == 0)
        raise JobFailed(
            "invalid module: no exported function {!r} (it exports: {})".format(
                entrypoint, ", ".join(have) or "no functions"
            )
        )
    funcs = [(m, n) for m, n, k in info.imports if k == 0]
    others = ["{}.{} ({})".format(m, n, IMPORT_KINDS.get(k, "?")) for m, n, k in info.imports if k]
    wanted = [f for f in funcs if f != GAS_IMPORT]
    if files:
        wanted = [(m, n) for m, n in wanted if m != wasi.MODULE or n not in FILE_IMPORTS]
    if sockets:
        wanted = [(m, n) for m, n in wanted if m != wasi.MODULE or n not in SOCKET_IMPORTS]
    missing = wasi.missing_imports(wanted) + others
    if missing:
        has = (
            "files in the job's preopened directories"
            + (", sockets that find none" if sockets else ", no sockets")
            if files
            else "no files or sockets (the wasmtime and wasm3-run engines give files)"
        )
        raise JobFailed(
            "invalid module: unsupported import {} (this executor provides WASI preview1 "
            "args, environ, clocks, random, stdio and proc_exit, {})".format(
                ", ".join(missing), has
            )
        )
    if info.memory is not None and info.memory[1] > cap_pages:
        raise JobFailed(
            f"memory limit: job exceeded {_mib(cap_pages)} "
            f"(the module asks for {_mib(info.memory[1])} of initial memory)"
        )
    try:
        data, hooked = cap_memory(info, cap_pages)
    except InvalidModule as e:
        raise JobFailed(f"invalid module: {e}") from None
    return data, info.exports, funcs, hooked


def run_job(job, blobs, out_fd, err_fd):
    import wasm3

    t0 = time.perf_counter()
    c0 = time.process_time()
    entry = job.get("entrypoint") or "_start"
    memory_mb = int(job.get("memory_mb") or 64)
    cap_pages = max(1, memory_mb * 16)
    stdout = CappedFile(out_fd, int(job["stdout_cap"]))
    stderr = CappedFile(err_fd, int(job["stderr_cap"]))
    result = {"status": "failed", "exit_code": None, "returns": None, "error": None}
    module = state = None
    hooked = False
    try:
        data, exports, imports, hooked = prepare(blobs.get("module", b""), entry, cap_pages)
        metered = GAS_IMPORT in imports
        env = wasm3.Environment()
        runtime = env.new_runtime(WASM_STACK_BYTES)
        state = wasi.Wasi(
            lambda: runtime.get_memory(0),
            args=[job.get("job_id") or "job", *job.get("args", [])]
            if entry == "_start"
            else [job.get("job_id") or "job"],
            env=job.get("env") or {},
            stdin=blobs.get("stdin", b""),
            stdout=stdout,
            stderr=stderr,
        )
        _set_limits(cap_pages * PAGE, len(data), float(job.get("timeout_s") or 60))
        try:
            try:
                module = env.parse_module(data)
                if metered:  # wasm3 counts what the module reports through metering.usegas
                    gas = job.get("gas")
                    module.gasLimit = (int(gas) if gas else UNMETERED) / GAS_SCALE
                runtime.load(module)
            except RuntimeError as e:  # a start function may trap, too
                raise JobFailed(_explain(str(e), None, memory_mb)) from None
            wanted = set(n for _, n in imports)
            for name, sig, fn in state.functions():
                if name in wanted:
                    module.link_function(wasi.MODULE, name, sig, fn)
            if entry != "_start" and "_initialize" in exports:
                runtime.find_function("_initialize")()
            func = runtime.find_function(entry)
            if entry == "_start":
                if func.num_args:
                    raise JobFailed("invalid module: _start takes parameters")
                func()
            else:
                rets = func(*convert_args(func, job.get("args") or []))
                if rets is None:
                    rets = []
                elif not isinstance(rets, tuple):
                    rets = [rets]
                result["returns"] = list(rets)
            result.update(status="completed", exit_code=0)
        finally:
            _clear_limits()
    except wasi.ProcExit as e:
        result.update(status="completed", exit_code=e.code)
    except JobFailed as e:
        result["error"] = str(e)
    except MemoryError:
        result["error"] = f"memory limit: job exceeded {memory_mb} MiB (the host ran out of memory)"
    except RuntimeError as e:
        if state is not None and state.exit_code is not None:
            result.update(status="completed", exit_code=state.exit_code)
        else:
            result["error"] = _explain(
                str(e), module if hooked else None, memory_mb, job.get("gas")
            )
    result["wall_ms"] = int((time.perf_counter() - t0) * 1000)
    result["cpu_ms"] = int((time.process_time() - c0) * 1000)
    return result


def _explain(message, module, memory_mb, gas=None):
    """wasm3's RuntimeError, as one of the executor's error kinds."""
    flag = 0
    if module is not None:
        try:
            flag = module.get_global(MEM_FLAG)
        except RuntimeError:
            flag = 0
    if flag == 1:
        return f"memory limit: job exceeded {memory_mb} MiB (memory.grow past the cap)"
    if flag == 2 or "memory allocation failed" in message or "out of memory" in message:
        return f"memory limit: job exceeded {memory_mb} MiB (the host could not allocate more)"
    if message.startswith("[trap] Out of gas") and gas:
        return f"gas limit: job used more than its {gas} units of gas"
    if message.startswith("[trap] "):
        return "trap: " + message[len("[trap] ") :]
    # Anything else wasm3 says while compiling lazily is about the module's code.
    return "invalid module: " + message

"""The worker process of the wasm3 executor: `python -m edge.executors.worker`.

It reads jobs from stdin and answers on the original stdout, one length-prefixed frame each
(see `encode`), and runs each job in a fresh wasm3 runtime. The job's own stdout and stderr go
to two files the node opened and handed over (`--stdout-fd`, `--stderr-fd`): whatever a job
wrote is still there when the node has to SIGKILL this process at a timeout. The process's own
fd 2 (wasm3 prints backtraces there, Python its fatal errors) is a third file the node reads
only to explain a crash.

Limits, in the order they bite:
- linear memory: the module is patched so its memory maximum is the job's cap, and every
  `memory.grow` is routed through an appended function that traps past the cap and raises a
  flag (an exported global) the worker reads after the trap: "memory limit", not a bare trap;
- RLIMIT_AS: this process's address space, set per job to what it uses now plus the cap plus
  slack: the last line for allocations inside wasm3 itself;
- RLIMIT_CPU (soft): per job, CPU used so far + timeout + 2 s. The node kills at the wall-clock
  timeout; this backstop (SIGXCPU) stops a runaway job even if the node itself has died.
The wasm call runs on a thread with a 64 MiB stack: wasm3 recurses on the C stack for wasm
calls, and with a 1 MiB wasm stack its own "[trap] stack overflow" must come first.
"""

import json
import os
import struct
import sys
import threading
import time

try:
    import resource
except ImportError:  # pragma: no cover - not POSIX
    resource = None  # type: ignore[assignment]

from edge.executors import wasi

WASM_STACK_BYTES = 1 << 20
NATIVE_STACK_BYTES = 64 << 20
PAGE = 65536
MEM_FLAG = "__deparrow_memory_limit"
AS_SLACK = 64 << 20


# -- frames: 4-byte length, 4-byte header length, JSON header, then the blobs it lists ------
def encode(header, blobs=None):
    blobs = blobs or {}
    header = dict(header, blobs=[[k, len(v)] for k, v in blobs.items()])
    head = json.dumps(header).encode()
    body = [struct.pack(">I", len(head)), head, *[bytes(v) for v in blobs.values()]]
    size = sum(len(b) for b in body)
    return struct.pack(">I", size) + b"".join(body)


def decode(payload):
    (hlen,) = struct.unpack_from(">I", payload, 0)
    header = json.loads(bytes(payload[4 : 4 + hlen]))
    pos = 4 + hlen
    blobs = {}
    for name, n in header.pop("blobs", []):
        blobs[name] = bytes(payload[pos : pos + n])
        pos += n
    return header, blobs


# -- a small reader of the wasm binary format: just what the limits need --------------------
class InvalidModule(Exception):
    pass


class Unsupported(Exception):
    """Code this scanner does not know: run the module without the memory.grow hook."""


def uleb(b, pos):
    result = shift = 0
    while True:
        if pos >= len(b):
            raise InvalidModule("truncated LEB128 number")
        byte = b[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, pos


def sleb(b, pos):
    result = shift = 0
    while True:
        byte = b[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            if byte & 0x40:
                result -= 1 << shift
            return result, pos


def enc_uleb(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def enc_sleb(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if (n == 0 and not byte & 0x40) or (n == -1 and byte & 0x40):
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def _name(b, pos):
    n, pos = uleb(b, pos)
    if pos + n > len(b):
        raise InvalidModule("truncated name")
    return bytes(b[pos : pos + n]).decode("utf-8", "replace"), pos + n


def _limits(b, pos):
    flags = b[pos]
    lo, pos = uleb(b, pos + 1)
    hi = None
    if flags & 1:
        hi, pos = uleb(b, pos)
    return flags, lo, hi, pos


class ModuleInfo:
    """Sections, imports, exports and the memory of a module, from its bytes."""

    def __init__(self, data):
        b = memoryview(data)
        if len(b) < 8 or bytes(b[:4]) != b"\0asm":
            raise InvalidModule("not a WebAssembly binary (no \\0asm magic)")
        if bytes(b[4:8]) != b"\x01\0\0\0":
            raise InvalidModule("unsupported WebAssembly binary version")
        self.b = b
        self.sections = {}  # id -> (payload start, payload end); custom sections skipped
        self.imports = []  # (module, name, kind)
        self.exports = {}  # name -> (kind, index)
        self.memory = None  # (flags, min pages, max pages or None, offset of the entry)
        self.imported_funcs = self.imported_globals = 0
        self.func_count = self.global_count = self.type_count = 0
        pos = 8
        try:
            while pos < len(b):
                sid = b[pos]
                size, start = uleb(b, pos + 1)
                end = start + size
                if end > len(b):
                    raise InvalidModule(f"section {sid} runs past the end of the module")
                if sid:
                    self.sections[sid] = (start, end)
                    self._section(sid, start)
                pos = end
        except (IndexError, UnicodeError, struct.error) as e:
            raise InvalidModule(f"malformed section ({e})") from None

    def _section(self, sid, pos):
        b = self.b
        if sid in (1, 3, 6):  # type, function, global: only their counts matter here
            n, _ = uleb(b, pos)
            if sid == 1:
                self.type_count = n
            elif sid == 3:
                self.func_count = n
            else:
                self.global_count = n
        elif sid == 2:
            n, pos = uleb(b, pos)
            for _ in range(n):
                mod, pos = _name(b, pos)
                name, pos = _name(b, pos)
                kind = b[pos]
                pos += 1
                self.imports.append((mod, name, kind))
                if kind == 0:
                    _, pos = uleb(b, pos)
                    self.imported_funcs += 1
                elif kind == 1:
                    _, _, _, pos = _limits(b, pos + 1)
                elif kind == 2:
                    _, _, _, pos = _limits(b, pos)
                elif kind == 3:
                    pos += 2
                    self.imported_globals += 1
                else:
                    raise InvalidModule(f"unknown import kind {kind}")
        elif sid == 5:
            n, pos = uleb(b, pos)
            if n:
                flags, lo, hi, _ = _limits(b, pos)
                self.memory = (flags, lo, hi, pos)
        elif sid == 7:
            n, pos = uleb(b, pos)
            for _ in range(n):
                name, pos = _name(b, pos)
                kind = b[pos]
                idx, pos = uleb(b, pos + 1)
                self.exports[name] = (kind, idx)


IMPORT_KINDS = {0: "function", 1: "table", 2: "memory", 3: "global"}

# Opcodes by immediate: none; one LEB; two LEBs (call_indirect, memarg); see `scan_grows`.
_NO_IMM = set(range(0x45, 0xC5)) | {0x00, 0x01, 0x05, 0x0B, 0x0F, 0x1A, 0x1B, 0xD1}
_ONE_LEB = {0x0C, 0x0D, 0x10, 0x12, 0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x3F, 0xD2}
_BLOCK_TYPES = {0x40, 0x7F, 0x7E, 0x7D, 0x7C, 0x7B, 0x70, 0x6F}
_FC_LEBS = {8: 2, 9: 1, 10: 2, 11: 1, 12: 2, 13: 1, 14: 2, 15: 1, 16: 1, 17: 1}


def scan_grows(b, pos, end):
    """Offsets (start, stop) of every memory.grow in one function body."""
    found = []
    n, pos = uleb(b, pos)
    for _ in range(n):
        _, pos = uleb(b, pos)
        pos += 1
    while pos < end:
        op = b[pos]
        start = pos
        pos += 1
        if op in _NO_IMM:
            continue
        if op in _ONE_LEB:
            _, pos = uleb(b, pos)
        elif op == 0x40:  # memory.grow
            _, pos = uleb(b, pos)
            found.append((start, pos))
        elif op in (0x02, 0x03, 0x04):
            if b[pos] in _BLOCK_TYPES:
                pos += 1
            else:
                _, pos = sleb(b, pos)
        elif op == 0x0E:
            n, pos = uleb(b, pos)
            for _ in range(n + 1):
                _, pos = uleb(b, pos)
        elif op in (0x11, 0x13):
            _, pos = uleb(b, pos)
            _, pos = uleb(b, pos)
        elif 0x28 <= op <= 0x3E:
            align, pos = uleb(b, pos)
            if align & 0x40:  # multi-memory: a memory index follows
                _, pos = uleb(b, pos)
            _, pos = uleb(b, pos)
        elif op in (0x41, 0x42):
            _, pos = sleb(b, pos)
        elif op == 0x43:
            pos += 4
        elif op == 0x44:
            pos += 8
        elif op == 0x1C:
            n, pos = uleb(b, pos)
            pos += n
        elif op == 0xD0:
            pos += 1
        elif op == 0xFC:
            sub, pos = uleb(b, pos)
            if sub > 17:
                raise Unsupported(f"opcode 0xfc {sub}")
            for _ in range(_FC_LEBS.get(sub, 0)):
                _, pos = uleb(b, pos)
        else:
            raise Unsupported(f"opcode 0x{op:02x}")
    return found


def _vec_append(b, start, end, item):
    n, pos = uleb(b, start)
    return enc_uleb(n + 1) + bytes(b[pos:end]) + item


def _section(sid, payload):
    return bytes([sid]) + enc_uleb(len(payload)) + payload


def cap_memory(info, cap_pages):
    """The module's bytes with its memory capped at `cap_pages`; memory.grow past the cap
    traps and sets the exported global MEM_FLAG (1: over the job's cap, 2: the host could not
    allocate). Returns (bytes, hooked)."""
    b = info.b
    if info.memory is None:
        return bytes(b), False
    flags, lo, own_max, entry = info.memory
    if flags & ~3:  # memory64 or unknown flags: wasm3 refuses these anyway
        return bytes(b), False
    limit = cap_pages if own_max is None else min(own_max, cap_pages)
    _, _, _, entry_end = _limits(b, entry)
    mem_start, mem_end = info.sections[5]
    n, _ = uleb(b, mem_start)
    new_mem = (
        enc_uleb(n)
        + bytes([flags | 1])
        + enc_uleb(lo)
        + enc_uleb(limit)
        + bytes(b[entry_end:mem_end])
    )
    out = {5: new_mem}
    hooked = False
    try:
        code = info.sections.get(10)
        grows, bodies = [], []
        if code:
            count, pos = uleb(b, code[0])
            for _ in range(count):
                size, body = uleb(b, pos)
                bodies.append((body, body + size))
                grows.append(scan_grows(b, body, body + size))
                pos = body + size
        hooked = any(grows) and 1 in info.sections and 3 in info.sections
    except (Unsupported, IndexError):
        hooked = False
    if hooked:
        hook_idx = info.imported_funcs + info.func_count
        flag_idx = info.imported_globals + info.global_count
        call = b"\x10" + enc_uleb(hook_idx)
        new_bodies = []
        for (body, body_end), sites in zip(bodies, grows, strict=True):
            parts, last = [], body
            for start, stop in sites:
                parts += [bytes(b[last:start]), call]
                last = stop
            parts.append(bytes(b[last:body_end]))
            new = b"".join(parts)
            new_bodies.append(enc_uleb(len(new)) + new)
        set_flag = lambda v: b"\x41" + enc_sleb(v) + b"\x24" + enc_uleb(flag_idx) + b"\x00"  # noqa: E731
        # Past the module's own declared maximum memory.grow answers -1 as the spec says;
        # past the job's cap (below that maximum) the job is over its limit.
        over = b"\x41\x7f\x0f" if own_max is not None and own_max <= cap_pages else set_flag(1)
        hook = (
            b"\x01\x01\x7f"  # one local: i32 (the result of memory.grow)
            + b"\x20\x00\xad\x3f\x00\xad\x7c\x42"
            + enc_sleb(limit)
            + b"\x56"  # d + size > limit
            + b"\x04\x40"
            + over
            + b"\x0b"
            + b"\x20\x00\x40\x00\x22\x01\x41\x7f\x46"  # grow; == -1 ?
            + b"\x04\x40"
            + set_flag(2)
            + b"\x0b"
            + b"\x20\x01\x0b"
        )
        new_bodies.append(enc_uleb(len(hook)) + hook)
        out[10] = enc_uleb(len(new_bodies)) + b"".join(new_bodies)
        out[1] = _vec_append(b, *info.sections[1], b"\x60\x01\x7f\x01\x7f")
        out[3] = _vec_append(b, *info.sections[3], enc_uleb(info.type_count))
        glob = b"\x7f\x01\x41\x00\x0b"
        out[6] = _vec_append(b, *info.sections[6], glob) if 6 in info.sections else b"\x01" + glob
        exp = enc_uleb(len(MEM_FLAG)) + MEM_FLAG.encode() + b"\x03" + enc_uleb(flag_idx)
        out[7] = _vec_append(b, *info.sections[7], exp) if 7 in info.sections else b"\x01" + exp
    return _rebuild(b, out), hooked


# Known sections in the order the spec requires them (12, data count, sits before code).
_ORDER = {sid: i for i, sid in enumerate([1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 10, 11])}


def _rebuild(b, replaced):
    """The module with the sections in `replaced` swapped in (or added, in spec order)."""
    spans, pos = [], 8
    while pos < len(b):
        size, start = uleb(b, pos + 1)
        spans.append((b[pos], pos, start + size))
        pos = start + size
    added = sorted((s for s in replaced if s not in {sid for sid, _, _ in spans}), key=_ORDER.get)
    out = [bytes(b[:8])]
    for sid, start, end in spans:
        while sid and added and _ORDER[added[0]] < _ORDER.get(sid, 99):
            new = added.pop(0)
            out.append(_section(new, replaced[new]))
        out.append(_section(sid, replaced[sid]) if sid in replaced else bytes(b[start:end]))
    out += [_section(new, replaced[new]) for new in added]
    return b"".join(out)


# -- running one job -----------------------------------------------------------------------
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


def prepare(module, entrypoint, cap_pages):
    """Checks the module before wasm3 sees it.
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
    missing = wasi.missing_imports(funcs) + others
    if missing:
        raise JobFailed(
            "invalid module: unsupported import {} (this executor provides WASI preview1 "
            "args, environ, clocks, random, stdio and proc_exit, no files or sockets)".format(
                ", ".join(missing)
            )
        )
    if info.memory is not None and info.memory[1] > cap_pages:
        raise JobFailed(
            f"memory limit: job exceeded {_mib(cap_pages)} "
            f"(the module asks for {_mib(info.memory[1])} of initial memory)"
        )
    data, hooked = cap_memory(info, cap_pages)
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
            result["error"] = _explain(str(e), module if hooked else None, memory_mb)
    result["wall_ms"] = int((time.perf_counter() - t0) * 1000)
    result["cpu_ms"] = int((time.process_time() - c0) * 1000)
    return result


def _explain(message, module, memory_mb):
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
    if message.startswith("[trap] "):
        return "trap: " + message[len("[trap] ") :]
    # Anything else wasm3 says while compiling lazily is about the module's code.
    return "invalid module: " + message


# -- the process -----------------------------------------------------------------------------
def _write_all(fd, data):
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def serve(reader, out, out_fd, err_fd):
    _write_all(out, encode({"type": "ready", "pid": os.getpid(), "cpu_ms": _cpu_ms()}))
    while True:
        head = reader.read(4)
        if len(head) < 4:
            return  # the node closed our stdin: retire
        (size,) = struct.unpack(">I", head)
        payload = reader.read(size)
        if len(payload) < size:
            return
        job, blobs = decode(payload)
        try:
            result = run_job(job, blobs, out_fd, err_fd)
        except Exception as e:  # a bug here must still answer the node, not hang it
            result = {
                "status": "failed",
                "exit_code": None,
                "returns": None,
                "error": f"executor error: {type(e).__name__}: {e}",
            }
        result.update(type="result", cpu_total_ms=_cpu_ms())
        del blobs
        _write_all(out, encode(result))


def _cpu_ms():
    return int(time.process_time() * 1000)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = dict(zip(argv[::2], argv[1::2], strict=False))
    out_fd, err_fd = int(opts["--stdout-fd"]), int(opts["--stderr-fd"])
    # Our stdout carries frames; move it aside so nothing else can write into it.
    if resource is not None:
        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    proto = os.dup(1)
    os.dup2(2, 1)
    reader = os.fdopen(0, "rb")
    import wasm3  # noqa: F401 - loaded once here, so the first job does not pay for it

    threading.stack_size(NATIVE_STACK_BYTES)
    t = threading.Thread(target=serve, args=(reader, proto, out_fd, err_fd), daemon=True)
    t.start()
    t.join()


if __name__ == "__main__":
    main()

"""WASI preview1, the subset a sandboxed batch job needs, as host functions for wasm3: a job
gets argv, environ, stdin (fd 0, from bytes), stdout and stderr (fds 1 and 2, captured with a
cap), clocks, random bytes and proc_exit. There is no filesystem and no network: no directory
is preopened, and a module that imports anything else (path_open, sock_*...) is refused before
it runs (see `missing_imports`), so "unsupported" is said once, up front, instead of surfacing
as a strange errno deep inside the program. Pure Python over a `memory()` callable that
returns the instance's linear memory as a writable buffer (pywasm3: `runtime.get_memory(0)`),
fetched again on every call because memory.grow may move it; no CPython-only modules beyond
feature-detected ones, so a MicroPython build can reuse it with its own wasm3 binding.
"""

try:
    import struct
except ImportError:  # pragma: no cover - MicroPython names it ustruct on old ports
    import ustruct as struct  # type: ignore[no-redef]

try:
    import time as _time
except ImportError:  # pragma: no cover
    import utime as _time  # type: ignore[no-redef]

try:
    from os import urandom as _urandom
except ImportError:  # pragma: no cover - boards without os.urandom
    _urandom = None  # type: ignore[assignment]

MODULE = "wasi_snapshot_preview1"

# errno values from the preview1 witx
SUCCESS = 0
EBADF = 8
EFAULT = 21
EINVAL = 28
ENOSYS = 52
ESPIPE = 70

FILETYPE_CHARACTER_DEVICE = 2
# rights: fd_read(1), fd_write(6), poll_fd_readwrite(27); fd_fdstat_set_flags(3)
RIGHTS_STDIN = (1 << 1) | (1 << 3) | (1 << 27)
RIGHTS_STDOUT = (1 << 6) | (1 << 3) | (1 << 27)

EVENTTYPE_CLOCK = 0
EVENTTYPE_FD_READ = 1
EVENTTYPE_FD_WRITE = 2
SUBCLOCKFLAG_ABSTIME = 1


class ProcExit(Exception):
    """Raised by proc_exit to unwind the wasm stack; wasm3 passes it through to the caller."""

    def __init__(self, code):
        Exception.__init__(self, code)
        self.code = code


class CappedBuffer:
    """Keeps the first `cap` bytes written and remembers that more were dropped."""

    def __init__(self, cap):
        self.cap = cap
        self.data = bytearray()
        self.truncated = False

    def write(self, b):
        room = self.cap - len(self.data)
        if len(b) > room:
            self.truncated = True
            b = b[:room] if room > 0 else b""
        self.data += b


def _monotonic_ns():
    if hasattr(_time, "monotonic_ns"):
        return _time.monotonic_ns()
    if hasattr(_time, "ticks_us"):  # pragma: no cover - MicroPython
        return _time.ticks_us() * 1000
    return int(_time.monotonic() * 1e9)  # pragma: no cover


def _realtime_ns():
    if hasattr(_time, "time_ns"):
        return _time.time_ns()
    return int(_time.time() * 1e9)  # pragma: no cover


def _cpu_ns():
    if hasattr(_time, "process_time_ns"):
        return _time.process_time_ns()
    return _monotonic_ns()  # pragma: no cover - no process clock: best effort


def _random_bytes(n):
    if _urandom is not None:
        return _urandom(n)
    import random  # pragma: no cover

    return bytes(random.getrandbits(8) for _ in range(n))  # pragma: no cover


def _encode(items):
    out = []
    for s in items:
        b = s.encode() if isinstance(s, str) else bytes(s)
        out.append(b + b"\x00")
    return out


class Wasi:
    """One job's WASI state. `functions()` lists what to link: (name, signature, callable)."""

    def __init__(self, memory, args=(), env=None, stdin=b"", stdout=None, stderr=None):
        self.memory = memory
        self.argv = _encode(args)
        self.environ = _encode(k + "=" + v for k, v in (env or {}).items())
        self.stdin = bytes(stdin or b"")
        self.stdin_pos = 0
        self.stdout = stdout if stdout is not None else CappedBuffer(1 << 20)
        self.stderr = stderr if stderr is not None else CappedBuffer(64 << 10)
        self.exit_code = None  # set by proc_exit

    # -- memory helpers ------------------------------------------------------------------
    def _mem(self):
        m = self.memory()
        if m is None:
            raise IndexError("module has no memory")
        return m

    @staticmethod
    def _check(m, ptr, n):
        if ptr < 0 or n < 0 or ptr + n > len(m):
            raise IndexError("pointer out of range")

    def _put(self, m, ptr, fmt, *values):
        self._check(m, ptr, struct.calcsize(fmt))
        struct.pack_into(fmt, m, ptr, *values)

    def _get(self, m, ptr, fmt):
        self._check(m, ptr, struct.calcsize(fmt))
        return struct.unpack_from(fmt, m, ptr)

    def _iovecs(self, m, iovs, n):
        out = []
        for i in range(n):
            buf, length = self._get(m, iovs + 8 * i, "<II")
            self._check(m, buf, length)
            out.append((buf, length))
        return out

    # -- args and environ ----------------------------------------------------------------
    def _sizes(self, items, count_ptr, size_ptr):
        m = self._mem()
        self._put(m, count_ptr, "<I", len(items))
        self._put(m, size_ptr, "<I", sum(len(b) for b in items))
        return SUCCESS

    def _fill(self, items, ptrs, buf):
        m = self._mem()
        self._check(m, buf, sum(len(b) for b in items))
        for i, b in enumerate(items):
            self._put(m, ptrs + 4 * i, "<I", buf)
            m[buf : buf + len(b)] = b
            buf += len(b)
        return SUCCESS

    def args_sizes_get(self, argc_ptr, size_ptr):
        return self._sizes(self.argv, argc_ptr, size_ptr)

    def args_get(self, argv_ptr, buf_ptr):
        return self._fill(self.argv, argv_ptr, buf_ptr)

    def environ_sizes_get(self, count_ptr, size_ptr):
        return self._sizes(self.environ, count_ptr, size_ptr)

    def environ_get(self, env_ptr, buf_ptr):
        return self._fill(self.environ, env_ptr, buf_ptr)

    # -- clocks and random ---------------------------------------------------------------
    def _now(self, clock_id):
        if clock_id == 0:
            return _realtime_ns()
        if clock_id == 1:
            return _monotonic_ns()
        if clock_id in (2, 3):
            return _cpu_ns()
        return None

    def clock_res_get(self, clock_id, res_ptr):
        if self._now(clock_id) is None:
            return EINVAL
        self._put(self._mem(), res_ptr, "<Q", 1000)
        return SUCCESS

    def clock_time_get(self, clock_id, precision, time_ptr):
        now = self._now(clock_id)
        if now is None:
            return EINVAL
        self._put(self._mem(), time_ptr, "<Q", now & 0xFFFFFFFFFFFFFFFF)
        return SUCCESS

    def random_get(self, buf, length):
        m = self._mem()
        self._check(m, buf, length)
        m[buf : buf + length] = _random_bytes(length)
        return SUCCESS

    # -- file descriptors 0, 1, 2 --------------------------------------------------------
    def fd_write(self, fd, iovs, iovs_len, nwritten_ptr):
        if fd == 1:
            sink = self.stdout
        elif fd == 2:
            sink = self.stderr
        else:
            return EBADF
        m = self._mem()
        total = 0
        for buf, length in self._iovecs(m, iovs, iovs_len):
            if length:
                sink.write(bytes(m[buf : buf + length]))
                total += length
        # A capped stream still reports everything as written: the job runs on unaware.
        self._put(m, nwritten_ptr, "<I", total)
        return SUCCESS

    def fd_read(self, fd, iovs, iovs_len, nread_ptr):
        if fd != 0:
            return EBADF
        m = self._mem()
        total = 0
        for buf, length in self._iovecs(m, iovs, iovs_len):
            chunk = self.stdin[self.stdin_pos : self.stdin_pos + length]
            m[buf : buf + len(chunk)] = chunk
            self.stdin_pos += len(chunk)
            total += len(chunk)
            if len(chunk) < length:
                break
        self._put(m, nread_ptr, "<I", total)
        return SUCCESS

    def fd_close(self, fd):
        return SUCCESS if 0 <= fd <= 2 else EBADF

    def fd_seek(self, fd, offset, whence, newoffset_ptr):
        return ESPIPE if 0 <= fd <= 2 else EBADF

    def fd_fdstat_get(self, fd, stat_ptr):
        if not 0 <= fd <= 2:
            return EBADF
        rights = RIGHTS_STDIN if fd == 0 else RIGHTS_STDOUT
        # fdstat (24 bytes): filetype u8 @0, flags u16 @2, rights_base @8, inheriting @16.
        # Field by field: MicroPython's struct has no "x" padding.
        m = self._mem()
        self._check(m, stat_ptr, 24)
        m[stat_ptr : stat_ptr + 24] = bytes(24)
        self._put(m, stat_ptr, "<B", FILETYPE_CHARACTER_DEVICE)
        self._put(m, stat_ptr + 8, "<QQ", rights, 0)
        return SUCCESS

    def fd_fdstat_set_flags(self, fd, flags):
        return SUCCESS if 0 <= fd <= 2 else EBADF

    def fd_prestat_get(self, fd, prestat_ptr):
        return EBADF  # no preopened directories: the job has no filesystem

    def fd_prestat_dir_name(self, fd, path_ptr, path_len):
        return EBADF

    # -- process -------------------------------------------------------------------------
    def proc_exit(self, code):
        # Remembered as well as raised: wasm3 replaces the exception with its own error when
        # the exit happens inside a start function (run by find_function).
        self.exit_code = code
        raise ProcExit(code)

    def sched_yield(self):
        return SUCCESS

    def poll_oneoff(self, in_ptr, out_ptr, nsubs, nevents_ptr):
        """Clocks sleep (the executor's wall-clock limit still applies); fds are always ready."""
        if nsubs == 0:
            return EINVAL
        m = self._mem()
        subs = []
        for i in range(nsubs):
            base = in_ptr + 48 * i
            userdata, tag = self._get(m, base, "<QB")
            subs.append((base, userdata, tag))
        ready = [(u, t) for _, u, t in subs if t in (EVENTTYPE_FD_READ, EVENTTYPE_FD_WRITE)]
        if not ready:
            wake = None
            for base, userdata, tag in subs:
                if tag != EVENTTYPE_CLOCK:
                    continue
                (clock_id,) = self._get(m, base + 16, "<I")
                timeout, _precision, flags = self._get(m, base + 24, "<QQH")
                now = self._now(clock_id)
                if now is None:
                    now = _monotonic_ns()
                due = timeout - now if flags & SUBCLOCKFLAG_ABSTIME else timeout
                if wake is None or due < wake[0]:
                    wake = (due, [])
                if due == wake[0]:
                    wake[1].append(userdata)
            if wake is None:
                return EINVAL
            if wake[0] > 0:
                _time.sleep(wake[0] / 1e9)
            ready = [(u, EVENTTYPE_CLOCK) for u in wake[1]]
        m = self._mem()
        for i, (userdata, tag) in enumerate(ready):
            # event (32 bytes): userdata u64 @0, error u16 @8, type u8 @10, fd_readwrite @16
            at = out_ptr + 32 * i
            self._check(m, at, 32)
            m[at : at + 32] = bytes(32)
            self._put(m, at, "<QHB", userdata, 0, tag)
        self._put(m, nevents_ptr, "<I", len(ready))
        return SUCCESS

    # -- linking -------------------------------------------------------------------------
    def _guard(self, fn, sig, faults_are_errno=True):
        # wasm3 hands i32 parameters over signed; pointers, lengths and exit codes are u32.
        mask = [c == "i" for c in sig[sig.index("(") + 1 : -1]]

        def call(*args):
            args = [a & 0xFFFFFFFF if u else a for a, u in zip(args, mask)]  # noqa: B905 - MicroPython zip has no strict
            if not faults_are_errno:
                return fn(*args)
            try:
                return fn(*args)
            except (IndexError, ValueError, TypeError, OverflowError):
                # A bad pointer from the guest is the guest's error, not the host's crash.
                return EFAULT

        return call

    def functions(self):
        """(name, wasm3 signature, callable) for every WASI function this module provides."""
        return [
            (name, sig, self._guard(getattr(self, name), sig, name != "proc_exit"))
            for name, sig in SIGNATURES.items()
        ]


# wasm3 signature strings: return type, then parameter types; i = i32, I = i64, v = void.
SIGNATURES = {
    "args_get": "i(ii)",
    "args_sizes_get": "i(ii)",
    "environ_get": "i(ii)",
    "environ_sizes_get": "i(ii)",
    "clock_res_get": "i(ii)",
    "clock_time_get": "i(iIi)",
    "random_get": "i(ii)",
    "fd_write": "i(iiii)",
    "fd_read": "i(iiii)",
    "fd_close": "i(i)",
    "fd_seek": "i(iIii)",
    "fd_fdstat_get": "i(ii)",
    "fd_fdstat_set_flags": "i(ii)",
    "fd_prestat_get": "i(ii)",
    "fd_prestat_dir_name": "i(iii)",
    "proc_exit": "v(i)",
    "sched_yield": "i()",
    "poll_oneoff": "i(iiii)",
}


def missing_imports(imports):
    """The function imports (module, name) this WASI layer cannot provide, as "module.name"."""
    return [m + "." + n for m, n in imports if m != MODULE or n not in SIGNATURES]

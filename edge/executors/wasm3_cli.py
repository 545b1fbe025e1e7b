"""The wasm3 executor of MicroPython nodes: every job runs in a `wasm3-run` process of its own
(edge/native/wasm3run.c, built by tools/build-wasm3-runner.sh), which holds WASI and every
limit (timeout, memory cap, output caps) and writes its outcome to a file. This side only
lays the job out in a directory, starts the runner in the background with os.system (the
MicroPython unix port has neither subprocess nor ffi), looks for the result file when polled,
SIGKILLs the runner on cancel, and SIGSTOPs and SIGCONTs it to suspend and resume a job
(telling it, in the job directory, how long it was stopped). It is plain MicroPython-subset
code, so CPython nodes can use it too; `Wasm3CliExecutor` has the interface of
`wasm3.Wasm3Executor` (engines, submit, poll, cancel, suspend, resume, run, close) and the
same outcome dicts and error kinds.

A runner that stops answering is caught two ways: its process is looked up in /proc (by pid
*and* job directory, so a reused pid is never mistaken for it, nor killed), and a runner
still there `GRACE_MS` after the job's deadline is killed and the job reported as timed out.
The runner itself also exits when the node that started it is gone.
"""

try:
    import os
except ImportError:  # pragma: no cover - MicroPython ports that name it uos
    import uos as os  # type: ignore[no-redef]

from edge.core import compat, jobfiles, protocol

RUNNER_ENV = "DEPARROW_WASM3_RUN"
RUNNER_NAME = "wasm3-run"
GRACE_MS = 2000  # past its deadline, a runner that has not answered is killed
CHECK_MS = 250  # how often a running job's process is looked at
DEFAULT_TIMEOUT_S = 60


class RunnerMissing(OSError):
    """wasm3-run is not where the executor looked: the node cannot run wasm jobs."""


class InvalidJob(ValueError):
    """The job spec asks for something the runner cannot be given."""


def _dir_records(dirs):
    """The job's "dirs" (checked by jobfiles.check_dirs; WASI preopens fd 3, 4, ... in order)
    as the runner's "dir" records: "r" or "w", the guest path, NUL, the host path. A directory
    is read-only unless "write" is true."""
    problem = jobfiles.check_dirs(dirs)
    if problem:
        raise InvalidJob(problem)
    out = []
    for d in dirs:
        mode = "w" if d.get("write") else "r"
        out.append(_record("dir", (mode + d["guest"] + "\x00" + d["host"]).encode()))
    return out


def _is_file(path):
    try:
        return os.stat(path)[0] & 0o170000 == 0o100000
    except OSError:
        return False


def _parent(path):
    i = path.rfind("/")
    return path[:i] if i > 0 else ("/" if i == 0 else ".")


def _module_dir():
    try:
        here = __file__  # not set for a frozen module
    except NameError:  # pragma: no cover
        return None
    if not here.startswith("/"):
        here = os.getcwd() + "/" + here
    return _parent(here)


def find_runner(path=None):
    """The wasm3-run to use: `path`, else $DEPARROW_WASM3_RUN, else edge/native/bin/wasm3-run
    beside this package, else wasm3-run on $PATH."""
    tried = []
    candidates = [path] if path else []
    if not path:
        env = os.getenv(RUNNER_ENV)
        if env:
            candidates.append(env)
        here = _module_dir()
        if here:
            candidates.append(_parent(here) + "/native/bin/" + RUNNER_NAME)
        for d in (os.getenv("PATH") or "").split(":"):
            if d:
                candidates.append(d + "/" + RUNNER_NAME)
    for c in candidates:
        if _is_file(c):
            return c
        tried.append(c)
    raise RunnerMissing(
        "wasm3-run not found (looked at " + ", ".join(tried[:3]) + "): build it with "
        "tools/build-wasm3-runner.sh, or set " + RUNNER_ENV + " to its path"
    )


def quote(s):
    """s as one word for /bin/sh."""
    return "'" + s.replace("'", "'\"'\"'") + "'"


def _record(key, value):
    if isinstance(value, str):
        value = value.encode()
    return key.encode() + b" " + str(len(value)).encode() + b"\n" + value + b"\n"


def _read(path, limit=-1):
    """The file's bytes, at most `limit` of them. MicroPython's read(n) allocates n bytes
    up front, so n is never more than the file holds."""
    with open(path, "rb") as f:
        if limit < 0:
            return f.read()
        return f.read(min(limit, os.stat(path)[6]))


def _write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def _rmtree(path):
    try:
        names = os.listdir(path)
    except OSError:
        return
    for name in names:
        try:  # noqa: SIM105 - MicroPython has no contextlib
            os.remove(path + "/" + name)
        except OSError:
            pass
    try:  # noqa: SIM105
        os.rmdir(path)
    except OSError:
        pass


def _makedirs(path):
    at = ""
    for part in path.split("/"):
        at = at + "/" + part if at or path.startswith("/") else part
        if part and not compat.path_exists(at):
            os.mkdir(at)


def _safe(job_id):
    out = ""
    for c in job_id[:40]:
        out += c if (c.isalpha() or c.isdigit() or c in "-_") and ord(c) < 128 else "_"
    return out or "job"


class _Handle:
    def __init__(self, job_id, path, timeout_s):
        self.job_id = job_id
        self.dir = path
        self.timeout_s = timeout_s
        self.pid = None
        self.started = compat.ticks_ms()
        self.checked = self.started
        self.outcome = None
        self.suspended_by = set()  # reasons the job is stopped for (see suspend())
        self.paused_at = None  # when its runner was stopped (ticks), while it is
        self.paused_since = None  # the same, wall-clock ms (compared with the runner's start)
        self.paused_ms = 0  # stopped time so far: neither timed out nor billed
        self.runner_knew = False  # the runner's clock had started when it was stopped
        self.stops = [0]  # for the runner (JOBDIR/paused): ms, then (start, end) pairs

    def paused(self, now):
        if self.paused_at is None:
            return self.paused_ms
        return self.paused_ms + compat.ticks_diff(now, self.paused_at)

    def __repr__(self):
        return "<wasm3-run job " + self.job_id + (" done>" if self.outcome else " running>")


class Wasm3CliExecutor:
    """submit/poll/cancel wasm jobs, one wasm3-run process each."""

    engines = ("wasm",)
    takes_files = True  # a job's "dirs" are its WASI preopens

    def __init__(
        self,
        workdir,
        runner=None,
        memory_mb_default=64,
        stdout_cap=1 << 20,
        stderr_cap=64 << 10,
    ):
        self.runner = find_runner(runner)
        self.workdir = workdir.rstrip("/") or "/"
        self.memory_mb_default = memory_mb_default
        self.stdout_cap = stdout_cap
        self.stderr_cap = stderr_cap
        self.running = []
        self.closed = False
        self.seq = 0
        self.have_proc = compat.path_exists("/proc/self/stat")
        _makedirs(self.workdir)
        self._clean()

    def _clean(self):
        """Job directories a previous run of the node left behind. Their runners exit on
        their own once the node that started them is gone, except one the node had stopped
        (suspend) when it died: that one is killed here."""
        for name in os.listdir(self.workdir):
            path = self.workdir + "/" + name
            if not (name.startswith("j") and compat.path_exists(path + "/job")):
                continue
            old = _Handle(name, path, 0)
            try:  # noqa: SIM105
                old.pid = int(_read(path + "/pid").strip())
            except (OSError, ValueError):
                pass
            self._kill(old)
            _rmtree(path)

    # -- the interface -------------------------------------------------------------------
    def submit(self, job):
        if self.closed:
            raise RuntimeError("executor is closed")
        job_id = str(job.get("job_id") or "job")
        timeout_s = float(job.get("timeout_s") or DEFAULT_TIMEOUT_S)
        self.seq += 1
        path = self.workdir + "/j" + str(self.seq) + "-" + _safe(job_id)
        handle = _Handle(job_id, path, timeout_s)
        try:
            self._start(handle, job)
        except InvalidJob as e:
            self._end(handle, "failed", "invalid job: " + str(e))
            return handle
        except OSError as e:
            self._end(handle, "failed", "executor error: cannot start wasm3-run: " + str(e))
            return handle
        self.running.append(handle)
        return handle

    def poll(self, handle):
        if handle.outcome is not None:
            return handle.outcome
        if compat.path_exists(handle.dir + "/result.json"):
            self._collect(handle)
            return handle.outcome
        now = compat.ticks_ms()
        if compat.ticks_diff(now, handle.checked) < CHECK_MS:
            return None
        handle.checked = now
        if not self._alive(handle):
            if compat.path_exists(handle.dir + "/result.json"):  # it finished just now
                self._collect(handle)
            else:
                self._end(handle, "failed", self._death(handle))
        elif (
            compat.ticks_diff(now, handle.started) - handle.paused(now)
            > handle.timeout_s * 1000 + GRACE_MS
        ):
            self._kill(handle)
            self._end(handle, "failed", f"timeout: job exceeded its {handle.timeout_s:g}s limit")
        return handle.outcome

    def cancel(self, handle):
        if handle.outcome is not None:
            return
        self._kill(handle)
        self._end(handle, "cancelled", None, b"", b"")

    def suspend(self, handle, reason="idle"):
        """Stop a job for `reason` (SIGSTOP of its runner). Its timeout and wall time stop
        counting until resume(). Reasons stack: a job stopped for "idle" and for "throttle"
        continues only when both are lifted."""
        if handle.outcome is not None:
            return False
        first = not handle.suspended_by
        handle.suspended_by.add(reason)
        if first and self._alive(handle):
            os.system("kill -STOP " + str(handle.pid) + " 2>/dev/null")
            handle.paused_at = compat.ticks_ms()
            handle.paused_since = compat.time_ms()
            try:
                handle.runner_knew = int(_read(handle.dir + "/started").strip()) > 0
            except (OSError, ValueError):  # not there yet, or half written
                handle.runner_knew = False
        return True

    def resume(self, handle, reason="idle"):
        """Lift one reason for stopping a job; with none left it continues (SIGCONT)."""
        if reason not in handle.suspended_by:
            return False
        handle.suspended_by.discard(reason)
        if handle.suspended_by or handle.paused_at is None:
            return True
        handle.paused_ms = handle.paused(compat.ticks_ms())
        handle.paused_at = None
        if handle.outcome is None:
            # Only the part of a stop after the runner's clock started is the runner's. A
            # stop can land before it got that far (even before it exec'd): the runner then
            # gets the stop's wall-clock times and takes the part after its start. It reads
            # the file before its next deadline check.
            now = compat.time_ms()
            if handle.runner_knew:
                handle.stops[0] += now - handle.paused_since
            else:
                handle.stops += [handle.paused_since, now]
            text = " ".join([str(n) for n in handle.stops[:31]])
            _write(handle.dir + "/paused.tmp", text.encode())
            os.rename(handle.dir + "/paused.tmp", handle.dir + "/paused")
            if self._alive(handle):
                os.system("kill -CONT " + str(handle.pid) + " 2>/dev/null")
        return True

    def active(self):
        """Jobs not finished yet."""
        return list(self.running)

    def job_pids(self):
        """Pids of the runners of the jobs running now (for the idle monitor and signals)."""
        return [h.pid for h in self.running if h.pid is not None]

    def run(self, job):
        """Submit and wait for the outcome."""
        handle = self.submit(job)
        while True:
            outcome = self.poll(handle)
            if outcome is not None:
                return outcome
            compat.sleep_ms(2)

    def close(self):
        if self.closed:
            return
        for handle in list(self.running):
            self.cancel(handle)
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the machinery -------------------------------------------------------------------
    def _start(self, handle, job):
        dirs = _dir_records(job.get("dirs") or [])
        os.mkdir(handle.dir)
        module = job.get("module") or b""
        _write(handle.dir + "/module.wasm", bytes(module))
        stdin = job.get("stdin") or b""
        if stdin:
            _write(handle.dir + "/stdin", bytes(stdin))
        spec = [
            _record("entry", job.get("entrypoint") or "_start"),
            _record("job_id", handle.job_id),
            _record("timeout_ms", str(int(handle.timeout_s * 1000))),
            _record("memory_mb", str(int(job.get("memory_mb") or self.memory_mb_default))),
            _record("stdout_cap", str(int(self.stdout_cap))),
            _record("stderr_cap", str(int(self.stderr_cap))),
        ]
        if job.get("gas"):  # for modules instrumented with metering.usegas
            spec.append(_record("gas", str(int(job["gas"]))))
        for a in job.get("args") or []:
            spec.append(_record("arg", str(a)))
        env = job.get("env") or {}
        for k in env:
            spec.append(_record("env", str(k) + "=" + str(env[k])))
        spec += dirs
        _write(handle.dir + "/job", b"".join(spec))
        handle.started = compat.ticks_ms()  # the job's clock starts with its process
        handle.checked = handle.started
        d = handle.dir
        # $PPID is this process: the runner exits if it goes away. $! is the runner's pid.
        cmd = (
            quote(self.runner) + " --parent $PPID " + quote(d)
            + " </dev/null >" + quote(d + "/diag") + " 2>&1 & echo $! >" + quote(d + "/pid")
        )  # fmt: skip
        status = os.system(cmd)
        if status != 0:
            raise OSError("the shell answered " + str(status))
        handle.pid = int(_read(d + "/pid").strip())

    def _alive(self, handle):
        """Whether the runner of this job is still there (and not a zombie)."""
        if handle.pid is None:
            return False
        if not self.have_proc:
            return os.system("kill -0 " + str(handle.pid) + " 2>/dev/null") == 0
        base = "/proc/" + str(handle.pid)
        try:
            stat = _read(base + "/stat")
            cmdline = _read(base + "/cmdline")
        except OSError:
            return False
        state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
        if state in (b"Z", b"X"):
            return False
        # The runner's argv ends with the directory. Just after the fork it is still the
        # shell, whose command line has the directory quoted; while it execs (or is stopped
        # in the middle of it) the command line reads empty.
        d = handle.dir.encode()
        return not cmdline or (d + b"\x00") in cmdline or (b"'" + d + b"'") in cmdline

    def _kill(self, handle):
        if self._alive(handle):
            os.system("kill -9 " + str(handle.pid) + " 2>/dev/null")

    def _death(self, handle):
        why = "executor error: wasm3-run exited without a result"
        try:
            tail = _read(handle.dir + "/diag", 4096).decode().strip()
        except (OSError, UnicodeError):
            tail = ""
        if tail:
            why += " (" + tail.split("\n")[-1] + ")"
        return why

    def _collect(self, handle):
        try:
            res = compat.json_loads(_read(handle.dir + "/result.json"))
            status, error = res.get("status"), res.get("error")
            exit_code, returns = res.get("exit_code"), res.get("returns")
            if (
                status not in ("completed", "failed")
                or not (error is None or isinstance(error, str))
                or not (exit_code is None or isinstance(exit_code, int))
                or not (returns is None or isinstance(returns, list))
            ):
                raise ValueError("malformed result")
            out, err = self._output(handle)
        except MemoryError:
            self._end(handle, "failed", "executor error: not enough memory to read the result")
            return
        except (OSError, ValueError, AttributeError) as e:
            self._end(handle, "failed", "executor error: unreadable result (" + str(e) + ")")
            return
        self._end(
            handle, status, error, out, err,
            int(res.get("wall_ms") or 0), int(res.get("cpu_ms") or 0), exit_code, returns,
        )  # fmt: skip

    def _output(self, handle):
        notes = ""
        try:
            out = _read(handle.dir + "/stdout", self.stdout_cap + 1)
            err = _read(handle.dir + "/stderr", self.stderr_cap + 1)
        except OSError:
            return b"", b""
        if len(out) > self.stdout_cap:
            out = out[: self.stdout_cap]
            notes += "[deparrow: stdout truncated at " + str(self.stdout_cap) + " bytes]\n"
        if len(err) > self.stderr_cap:
            err = err[: self.stderr_cap]
            notes += "[deparrow: stderr truncated at " + str(self.stderr_cap) + " bytes]\n"
        return out, err + notes.encode()

    def _end(
        self, handle, status, error, out=None, err=None, wall_ms=None, cpu_ms=0,
        exit_code=None, returns=None,
    ):  # fmt: skip
        if out is None:
            out, err = self._output(handle)
        if wall_ms is None:
            now = compat.ticks_ms()
            wall_ms = max(0, compat.ticks_diff(now, handle.started) - handle.paused(now))
        handle.outcome = protocol.outcome(
            status, error, out, err, wall_ms, cpu_ms, exit_code, returns
        )
        if handle in self.running:
            self.running.remove(handle)
        _rmtree(handle.dir)

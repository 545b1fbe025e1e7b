"""The wasm executor of a board's firmware: jobs run in wasm3, compiled into the firmware as
the `dpwasm3` user C module (firmware/wasm3/), with the interface of Wasm3CliExecutor and
Wasm3Executor (engines, submit, poll, cancel, run, close; outcome dicts with the same keys
and error words).

dpwasm3.run(module, entry, args, env, stdin, job_id, timeout_ms, memory_mb, stdout_cap,
stderr_cap, gas) runs one job to the end and returns
    (status, exit_code, returns_json, error, stdout, stderr, wall_ms)
(stdout and stderr kept to cap + 1 bytes: one more says the job wrote past its cap)
with WASI, the memory cap, the gas budget and the output caps enforced in C (the host
functions are edge/native/wasi.c, the same file wasm3-run is built from). It releases the
GIL while a job runs, and where the port has threads (_thread: ESP32, unix) a job runs on a
thread of its own, so the node keeps heartbeating. The engine checks the wall-clock limit and
dpwasm3.cancel() at every loop iteration and function return of the job, and in its sleeps:
an endless loop is stopped on a board too.

One job at a time (wasm3 on a board has one runtime's worth of RAM): a job submitted while
another runs waits for it.
"""

import dpwasm3  # the firmware's C module; ImportError on a firmware built without it

from edge.core import compat

try:
    import _thread
except ImportError:  # pragma: no cover - ports without threads run jobs inline
    _thread = None

DEFAULT_TIMEOUT_S = 60
# wasm3 recurses on the C stack for wasm calls: the job's thread must hold a full wasm stack
# (16 KiB, dp_engine.c) overflowing. 48 KiB did on x86-64 (tests/firmware); more, for margin.
THREAD_STACK = 64 * 1024


class _Handle:
    def __init__(self, job):
        self.job_id = str(job.get("job_id") or "job")
        self.job = job
        self.outcome = None
        self.cancelled = False

    def __repr__(self):
        return "<dpwasm3 job " + self.job_id + (" done>" if self.outcome else " running>")


def outcome_of(answer, stdout_cap, stderr_cap):
    """dpwasm3.run's tuple as the executor's outcome dict (the truncation notes as
    wasm3_cli.py writes them)."""
    status, exit_code, returns_json, error, out, err, wall_ms = answer
    notes = ""
    if len(out) > stdout_cap:
        out = out[:stdout_cap]
        notes += "[deparrow: stdout truncated at " + str(stdout_cap) + " bytes]\n"
    if len(err) > stderr_cap:
        err = err[:stderr_cap]
        notes += "[deparrow: stderr truncated at " + str(stderr_cap) + " bytes]\n"
    returns = None
    if returns_json:
        try:
            returns = compat.json_loads(returns_json)
        except ValueError:
            status, error = "failed", "executor error: unreadable result"
    return {
        "status": status,
        "exit_code": exit_code,
        "stdout": bytes(out),
        "stderr": bytes(err) + notes.encode(),
        "returns": returns,
        "error": error,
        "wall_ms": wall_ms,
        "cpu_ms": wall_ms,  # one core, no other work: the job's wall time is its CPU time
    }


class Wasm3ModuleExecutor:
    engines = ("wasm",)

    def __init__(self, memory_mb_default=1, stdout_cap=16 << 10, stderr_cap=4 << 10, threads=True):
        self.memory_mb_default = memory_mb_default
        self.stdout_cap = stdout_cap
        self.stderr_cap = stderr_cap
        self.threads = threads and _thread is not None
        self.queue = []  # handles waiting for the engine
        self.current = None  # the handle the engine runs
        self.closed = False

    def submit(self, job):
        if self.closed:
            raise RuntimeError("executor is closed")
        handle = _Handle(job)
        self.queue.append(handle)
        self._next()
        return handle

    def poll(self, handle):
        if handle.outcome is None and self.current is None:
            self._next()
        return handle.outcome

    def cancel(self, handle):
        if handle.outcome is not None:
            return
        handle.cancelled = True
        if handle in self.queue:
            self.queue.remove(handle)
            handle.outcome = _cancelled()
        elif handle is self.current:
            dpwasm3.cancel()  # the thread sees it at the next call and ends the job
            while handle.outcome is None:
                compat.sleep_ms(1)

    def active(self):
        return ([self.current] if self.current else []) + list(self.queue)

    def run(self, job):
        handle = self.submit(job)
        while self.poll(handle) is None:
            compat.sleep_ms(2)
        return handle.outcome

    def close(self):
        for handle in self.active():
            self.cancel(handle)
        self.closed = True

    def _next(self):
        if self.current is not None or not self.queue:
            return
        handle = self.queue.pop(0)
        self.current = handle
        if self.threads:
            old = _thread.stack_size(THREAD_STACK) if hasattr(_thread, "stack_size") else None
            try:
                _thread.start_new_thread(self._run, (handle,))
            finally:
                if old is not None:
                    _thread.stack_size(old)
        else:
            self._run(handle)

    def _run(self, handle):
        job = handle.job
        try:
            answer = dpwasm3.run(
                bytes(job.get("module") or b""),
                job.get("entrypoint") or "_start",
                [str(a) for a in job.get("args") or []],
                [str(k) + "=" + str(v) for k, v in (job.get("env") or {}).items()],
                bytes(job.get("stdin") or b""),
                handle.job_id,
                int(float(job.get("timeout_s") or DEFAULT_TIMEOUT_S) * 1000),
                int(job.get("memory_mb") or self.memory_mb_default),
                self.stdout_cap,
                self.stderr_cap,
                int(job.get("gas") or 0),
            )
            outcome = outcome_of(answer, self.stdout_cap, self.stderr_cap)
        except MemoryError:
            outcome = _failed("memory limit: the board's heap cannot hold this job")
        except Exception as e:  # the engine's own faults never take the node down
            outcome = _failed("executor error: " + repr(e))
        if handle.cancelled:
            outcome = _cancelled()
        handle.outcome = outcome
        self.current = None


def _failed(error):
    return {"status": "failed", "exit_code": None, "stdout": b"", "stderr": b"",
            "returns": None, "error": error, "wall_ms": 0, "cpu_ms": 0}  # fmt: skip


def _cancelled():
    out = _failed(None)
    out["status"] = "cancelled"
    return out

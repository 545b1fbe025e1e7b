"""The wasm3 executor, the node's side: `Wasm3Executor` queues jobs and runs each in a
reusable worker process (`workerproc.py` starts one, `worker.py` is what runs in it), which it
SIGKILLs at the job's wall-clock timeout, recycles after `jobs_per_worker` jobs and replaces
when it dies, so an uninterruptible, leaky wasm3 call can never hang or bloat the node.
submit() and poll() never wait on a worker: the job frame is written as the pipe accepts it
and the answer read as it arrives, so one loop can drive many jobs. run() waits with select()
on the worker's pipe, so it wakes for the answer or for the deadline, whichever comes first.
Nothing here imports wasm3: only the workers load it, never the node's own process.
"""

import contextlib
import os
import select
import signal
import time

from edge.core import protocol
from edge.executors.framing import encode
from edge.executors.workerproc import WorkerProcess

DEFAULT_TIMEOUT_S = 60.0


class _Handle:
    """One submitted job, from queue to outcome."""

    def __init__(self, job):
        self.job = job
        self.job_id = job.get("job_id") or "job"
        self.timeout_s = float(job.get("timeout_s") or DEFAULT_TIMEOUT_S)
        self.worker = None
        self.pid = None  # of the worker process that runs it
        self.dispatched = None  # handed to a worker (which may still be starting)
        self.started = None  # the worker had it and was ready: the job's clock starts
        self.outcome = None
        self.suspended_by = set()  # why it is stopped ("idle", "throttle"...); empty: runs
        self.paused_at = None  # when its worker was stopped (SIGSTOP), while it is
        self.paused_s = 0.0  # stopped time so far: neither timed out nor billed

    def paused(self, now=None):
        """Seconds this job has spent stopped, including a pause still going on."""
        if self.paused_at is None:
            return self.paused_s
        return self.paused_s + ((now or time.monotonic()) - self.paused_at)

    def deadline(self):
        # a stopped job's clock stops too: the owner's use of the machine is not its time
        return (self.started or self.dispatched) + self.timeout_s + self.paused()

    def __repr__(self):
        state = "done" if self.outcome else "running" if self.worker else "queued"
        return f"<wasm3 job {self.job_id} {state}>"


class Wasm3Executor:
    """submit/poll/cancel jobs on up to `workers` wasm3 worker processes."""

    engines = ("wasm",)

    def __init__(
        self,
        workers=1,
        jobs_per_worker=50,
        memory_mb_default=64,
        stdout_cap=1 << 20,
        stderr_cap=64 << 10,
    ):
        self.max_workers = max(1, int(workers))
        self.jobs_per_worker = max(1, int(jobs_per_worker))
        self.memory_mb_default = memory_mb_default
        self.stdout_cap = stdout_cap
        self.stderr_cap = stderr_cap
        self.workers = []  # live workers, busy or idle
        self.retiring = []  # told to exit, not reaped yet
        self.queue = []  # handles waiting for a free worker
        self.closed = False
        # How many workers to keep started: one that is killed or retired is replaced at
        # once, so the next job does not wait for a Python interpreter to start.
        self.keep = 0

    # -- the interface -------------------------------------------------------------------
    def submit(self, job):
        if self.closed:
            raise RuntimeError("executor is closed")
        handle = _Handle(job)
        self.queue.append(handle)
        self._pump()
        return handle

    def poll(self, handle):
        if handle.outcome is None:
            self._pump()
        return handle.outcome

    def cancel(self, handle):
        if handle.outcome is not None:
            return
        if handle in self.queue:
            self.queue.remove(handle)
            self._finish(handle, "cancelled", None, b"", b"", 0, 0)
            return
        self._abort(handle.worker, handle, "cancelled", None)
        self._replenish()

    def run(self, job):
        handle = self.submit(job)
        while True:
            outcome = self.poll(handle)
            if outcome is not None:
                return outcome
            worker = handle.worker
            if worker is None:  # queued behind other jobs
                time.sleep(0.005)
                continue
            # wake for the answer (or the pipe accepting more of the job), else at the deadline
            remaining = handle.deadline() - time.monotonic()
            writable = [worker.wfd] if worker.wbuf else []
            try:
                select.select([worker.rfd], writable, [], max(0.0, min(1.0, remaining)))
            except (OSError, ValueError):
                time.sleep(0.005)

    def close(self):
        if self.closed:
            return
        self.closed = True
        for handle in list(self.queue):
            self.cancel(handle)
        for worker in list(self.workers):
            if worker.handle is not None:
                self.cancel(worker.handle)
            else:
                worker.retire()
                self.workers.remove(worker)
                self.retiring.append(worker)
        deadline = time.monotonic() + 1.0
        for worker in self.retiring:
            while worker.reap() is None and not worker.dead and time.monotonic() < deadline:
                time.sleep(0.005)
            if not worker.dead:
                worker.kill()
            worker.close_files()
        self.retiring = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()

    def suspend(self, handle, reason="idle"):
        """Stop a job for `reason` (SIGSTOP of the worker running it; a queued job is not
        started). Its timeout and wall time stop counting until resume(). Reasons stack: a job
        stopped for "idle" and for "throttle" runs again only when both are lifted."""
        if handle.outcome is not None:
            return False
        first = not handle.suspended_by
        handle.suspended_by.add(reason)
        worker = handle.worker
        if first and worker is not None and not worker.dead:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGSTOP)
            handle.paused_at = time.monotonic()
        return True

    def resume(self, handle, reason="idle"):
        """Lift one reason for stopping a job; with none left it continues (SIGCONT)."""
        if reason not in handle.suspended_by:
            return False
        handle.suspended_by.discard(reason)
        if handle.suspended_by:
            return True
        self._continue(handle)
        if handle.outcome is None:
            self._pump()  # a queued job may start now
        return True

    def _continue(self, handle):
        if handle.paused_at is not None:
            handle.paused_s += time.monotonic() - handle.paused_at
            handle.paused_at = None
            worker = handle.worker
            if worker is not None and not worker.dead:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGCONT)

    def active(self):
        """Jobs not finished yet: running on a worker, then queued."""
        return [w.handle for w in self.workers if w.handle is not None] + list(self.queue)

    def job_pids(self):
        """Pids of the worker processes running a job now (for the idle monitor and signals)."""
        return [w.pid for w in self.workers if w.handle is not None and not w.dead]

    def prestart(self, n=None):
        """Start workers now (all `workers` by default) instead of at the first submit."""
        self.keep = min(self.max_workers, self.max_workers if n is None else int(n))
        self._replenish()

    def stats(self):
        """Worker pids and job counts, for tests and the node's status page."""
        return [{"pid": w.pid, "jobs": w.jobs, "busy": w.handle is not None} for w in self.workers]

    # -- the machinery -------------------------------------------------------------------
    def _pump(self):
        now = time.monotonic()
        for worker in list(self.workers):
            worker.flush()
            try:
                frames, eof = worker.receive()
                for frame in frames:
                    self._on_frame(worker, frame)
            except Exception as e:  # garbage on the pipe: the worker is as good as dead
                eof = True
                worker.broken = f"unreadable answer ({e})"
            handle = worker.handle
            if eof:
                self._on_death(worker)
            elif handle is not None and now >= handle.deadline():
                error = f"timeout: job exceeded its {handle.timeout_s:g}s limit"
                self._abort(worker, handle, "failed", error)
        for worker in list(self.retiring):
            worker.reap()
            if worker.dead:
                worker.close_files()
                self.retiring.remove(worker)
        self._dispatch()

    def _new_worker(self):
        """A started worker process (the wasmtime executor starts its own program here)."""
        return WorkerProcess()

    def _dispatch(self):
        while self.queue:
            handle = next((h for h in self.queue if not h.suspended_by), None)
            if handle is None:
                break  # all queued jobs are suspended: none starts while the owner is active
            worker = next((w for w in self.workers if w.handle is None and not w.dead), None)
            if worker is None:
                if len(self.workers) >= self.max_workers:
                    return
                try:
                    worker = self._new_worker()
                except OSError as e:
                    error = f"executor error: cannot start a worker: {e}"
                    self.queue.remove(handle)
                    self._finish(handle, "failed", error, b"", b"", 0, 0)
                    continue
                self.workers.append(worker)
                self.keep = max(self.keep, len(self.workers))
            self.queue.remove(handle)
            self._start(worker, handle)
        self._replenish()

    def _replenish(self):
        while not self.closed and len(self.workers) < self.keep:
            try:
                self.workers.append(self._new_worker())
            except OSError:
                return

    def _worker_fields(self, job):
        """More of the job's fields for this executor's worker (the wasmtime one's `dirs`)."""
        return {}

    def _start(self, worker, handle):
        job = handle.job
        header = {
            "type": "job",
            "job_id": handle.job_id,
            "entrypoint": job.get("entrypoint") or "_start",
            "args": [str(a) for a in job.get("args") or []],
            "env": {str(k): str(v) for k, v in (job.get("env") or {}).items()},
            "timeout_s": handle.timeout_s,
            "memory_mb": int(job.get("memory_mb") or self.memory_mb_default),
            "stdout_cap": self.stdout_cap,
            "stderr_cap": self.stderr_cap,
            "gas": job.get("gas"),  # for modules instrumented with metering.usegas
        }
        header.update(self._worker_fields(job))
        blobs = {"module": bytes(job.get("module") or b""), "stdin": bytes(job.get("stdin") or b"")}
        handle.job = None  # the module bytes now live in the frame only
        handle.worker = worker
        handle.pid = worker.pid
        handle.dispatched = time.monotonic()
        # a fresh worker's start-up (~50 ms) is not the job's time
        handle.started = handle.dispatched if worker.ready_at is not None else None
        worker.handle = handle
        worker.jobs += 1
        worker.send(encode(header, blobs))

    def _on_frame(self, worker, frame):
        kind = frame.get("type")
        if kind == "ready":
            worker.ready_at = time.monotonic()
            worker.cpu_mark_ms = int(frame.get("cpu_ms") or 0)
            if worker.handle is not None and worker.handle.started is None:
                worker.handle.started = worker.ready_at
            return
        if kind != "result" or worker.handle is None:
            return
        handle = worker.handle
        status, error = frame.get("status"), frame.get("error")
        exit_code, returns = frame.get("exit_code"), frame.get("returns")
        if (
            status not in ("completed", "failed")
            or not isinstance(error, (str, type(None)))
            or not isinstance(exit_code, (int, type(None)))
            or not isinstance(returns, (list, type(None)))
        ):
            raise ValueError("malformed result")
        wall_ms, cpu_ms = int(frame.get("wall_ms") or 0), int(frame.get("cpu_ms") or 0)
        # the worker's clock ran on while it was stopped; that time is not the job's
        wall_ms = max(0, wall_ms - int(handle.paused_s * 1000))
        worker.cpu_mark_ms = int(frame.get("cpu_total_ms") or worker.cpu_mark_ms)
        worker.handle = None
        out, err = self._output(worker)
        self._finish(handle, status, error, out, err, wall_ms, cpu_ms, exit_code, returns)
        if worker.jobs >= self.jobs_per_worker:
            self.workers.remove(worker)
            worker.retire()
            self.retiring.append(worker)

    def _on_death(self, worker):
        """The worker's pipe closed: reap it; a job it was running failed with the reason."""
        if worker in self.workers:
            self.workers.remove(worker)
        if not worker.dead:
            worker.kill()  # closing its pipe was its last act; make sure and reap
        if worker.ready_at is None:  # died starting up: do not respawn in a loop
            self.keep = len(self.workers)
        handle = worker.handle
        if handle is None:
            worker.close_files()
            return
        out, err = self._output(worker)
        cpu = worker.job_cpu_ms()
        status = worker.status or 0
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGXCPU:
            error = f"timeout: job exceeded its {handle.timeout_s:g}s limit (CPU time)"
        else:
            error = f"executor error: worker process {worker.death()}"
            if worker.broken:
                error += ": " + worker.broken
        worker.close_files()
        self._finish(handle, "failed", error, out, err, self._elapsed_ms(handle), cpu)

    def _abort(self, worker, handle, status, error):
        """Kill the busy worker of a job (timeout, cancel) and end the job with what it wrote."""
        if worker in self.workers:
            self.workers.remove(worker)
        worker.kill()
        cpu = worker.job_cpu_ms()
        out, err = self._output(worker)
        worker.close_files()
        self._finish(handle, status, error, out, err, self._elapsed_ms(handle), cpu)

    def _output(self, worker):
        try:
            return worker.output(self.stdout_cap, self.stderr_cap)
        except (OSError, ValueError):
            return b"", b""

    @staticmethod
    def _elapsed_ms(handle):
        begin = handle.started or handle.dispatched
        if not begin:
            return 0
        now = time.monotonic()
        return max(0, int((now - begin - handle.paused(now)) * 1000))

    def _finish(
        self, handle, status, error, out, err, wall_ms, cpu_ms, exit_code=None, returns=None
    ):
        if handle.suspended_by:  # finished while stopped: its worker must go on to the next job
            handle.suspended_by.clear()
            self._continue(handle)
        if handle.worker is not None and handle.worker.handle is handle:
            handle.worker.handle = None
        handle.worker = None
        handle.job = None
        handle.outcome = protocol.outcome(
            status, error, out, err, wall_ms, cpu_ms, exit_code, returns
        )

"""Runs WebAssembly jobs with wasm3 in reusable worker processes.

pywasm3 cannot be interrupted (no fuel, no timeout, the GIL held for the whole call), leaks
~68 KiB per runtime and has no WASI, so a job never runs in the node's process: it runs in a
worker (`edge/executors/worker.py`) that the node SIGKILLs at the job's wall-clock timeout,
recycles after `jobs_per_worker` jobs and replaces when it dies. What a worker enforces
inside (memory cap, CPU backstop, WASI) is described there; this module is the node's side.

Why `subprocess` running `python -m edge.executors.worker` rather than multiprocessing:
- nothing of the node's `__main__` is re-imported (spawn and forkserver do that), so a node
  started from any script, the CLI or an asyncio app behaves the same;
- the wire is plain length-prefixed frames of JSON plus raw bytes on two pipes, read
  non-blocking here: a worker that dies or babbles mid-frame cannot block or crash the node,
  and no pickle from a process that runs untrusted code is ever loaded;
- the worker gets exactly the fds it needs (pass_fds) and its own session, so a terminal's
  Ctrl-C reaches the node, which then stops its workers itself.

submit() and poll() never wait on a worker: the job frame is written as the pipe accepts it
and the answer read as it arrives. run() waits with select() on the worker's pipe, so it
wakes for the answer or for the deadline, whichever comes first.
"""

import contextlib
import os
import select
import signal
import subprocess
import sys
import tempfile
import time

from edge.executors.worker import decode, encode

DEFAULT_TIMEOUT_S = 60.0
MAX_FRAME = 1 << 20  # answers carry no job output, so any larger frame is a broken worker
_PKG_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_worker_argv = None


def _worker_command():
    """How to start a worker. With `-S` and an explicit path to edge and to wasm3 a worker
    starts in ~45 ms instead of ~75 (site and an editable install's finder cost the rest)."""
    global _worker_argv
    if _worker_argv is None:
        paths, flags = [_PKG_ROOT], []
        try:
            import importlib.util

            spec = importlib.util.find_spec("wasm3")  # finds it without loading it
            if spec is not None and spec.origin and os.path.isfile(spec.origin):
                paths.append(os.path.dirname(spec.origin))
                flags = ["-S"]
        except (ImportError, ValueError):
            pass
        _worker_argv = (flags, paths)
    return _worker_argv


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

    def deadline(self):
        return (self.started or self.dispatched) + self.timeout_s

    def __repr__(self):
        state = "done" if self.outcome else "running" if self.worker else "queued"
        return f"<wasm3 job {self.job_id} {state}>"


class _Worker:
    """One worker process and the node's end of its pipes and output files."""

    def __init__(self):
        # they live as long as the worker, closed in close_files()
        self.out_file = tempfile.TemporaryFile()  # noqa: SIM115
        self.err_file = tempfile.TemporaryFile()  # noqa: SIM115
        self.diag_file = tempfile.TemporaryFile()  # noqa: SIM115
        out_fd, err_fd = self.out_file.fileno(), self.err_file.fileno()
        flags, paths = _worker_command()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [*paths, env.get("PYTHONPATH")]))
        # one malloc arena and no dynamic mmap threshold: the address-space limit the worker
        # sets per job then measures the job, not glibc's bookkeeping
        env.setdefault("MALLOC_ARENA_MAX", "1")
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
        self.spawned = time.monotonic()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                *flags,
                "-m",
                "edge.executors.worker",
                "--stdout-fd",
                str(out_fd),
                "--stderr-fd",
                str(err_fd),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.diag_file,
            pass_fds=(out_fd, err_fd),
            env=env,
            start_new_session=True,
            bufsize=0,
        )
        self.pid = self.proc.pid
        self.wfd = self.proc.stdin.fileno()
        self.rfd = self.proc.stdout.fileno()
        os.set_blocking(self.wfd, False)
        os.set_blocking(self.rfd, False)
        self.wbuf = bytearray()
        self.rbuf = bytearray()
        self.ready_at = None
        self.cpu_mark_ms = 0  # the worker's own CPU clock at its last answer
        self.jobs = 0
        self.handle = None
        self.dead = False
        self.status = None  # the wait status once reaped
        self.cpu_total_ms = None
        self.broken = None  # why the node gave up on its pipe, if it did

    # -- pipes ---------------------------------------------------------------------------
    def send(self, frame):
        self.wbuf += frame
        self.flush()

    def flush(self):
        while self.wbuf and not self.dead:
            try:
                n = os.write(self.wfd, self.wbuf)
            except BlockingIOError:
                return
            except OSError:  # EPIPE: it died; the read side will tell
                self.wbuf.clear()
                return
            del self.wbuf[:n]

    def receive(self):
        """Frames that arrived, and whether the pipe reached EOF (the worker is gone)."""
        eof = False
        while True:
            try:
                chunk = os.read(self.rfd, 1 << 16)
            except BlockingIOError:
                break
            except OSError:
                eof = True
                break
            if not chunk:
                eof = True
                break
            self.rbuf += chunk
        frames = []
        while len(self.rbuf) >= 4:
            size = int.from_bytes(self.rbuf[:4], "big")
            if size > MAX_FRAME:
                raise ValueError(f"worker sent a {size}-byte frame")
            if len(self.rbuf) < 4 + size:
                break
            header = decode(bytes(self.rbuf[4 : 4 + size]))[0]
            if not isinstance(header, dict):
                raise ValueError("frame is not an object")
            frames.append(header)
            del self.rbuf[: 4 + size]
        return frames, eof

    # -- output files --------------------------------------------------------------------
    def output(self, stdout_cap, stderr_cap):
        out = os.pread(self.out_file.fileno(), stdout_cap + 1, 0)
        err = os.pread(self.err_file.fileno(), stderr_cap + 1, 0)
        notes = []
        if len(out) > stdout_cap:
            out = out[:stdout_cap]
            notes.append(f"[deparrow: stdout truncated at {stdout_cap} bytes]\n")
        if len(err) > stderr_cap:
            err = err[:stderr_cap]
            notes.append(f"[deparrow: stderr truncated at {stderr_cap} bytes]\n")
        if notes:
            err = err + "".join(notes).encode()
        return out, err

    def diag_tail(self, n=400):
        fd = self.diag_file.fileno()
        size = os.fstat(fd).st_size
        text = os.pread(fd, n, max(0, size - n)).decode("utf-8", "replace").strip()
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("  ")]
        return lines[-1] if lines else ""

    # -- life and death ------------------------------------------------------------------
    def kill(self):
        """SIGKILL and reap; returns the worker's total CPU milliseconds (or None)."""
        if not self.dead:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        return self.reap(block=True)

    def reap(self, block=False):
        if self.status is None:
            try:
                pid, status, usage = os.wait4(self.pid, 0 if block else os.WNOHANG)
            except ChildProcessError:
                pid, status, usage = self.pid, 0, None
            if pid == 0:
                return None
            self.status = status
            self.proc.returncode = os.waitstatus_to_exitcode(status)
            self.dead = True
            self.cpu_total_ms = (
                int((usage.ru_utime + usage.ru_stime) * 1000) if usage is not None else None
            )
        return self.cpu_total_ms

    def retire(self):
        """No more jobs: closing stdin lets the worker exit on its own."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()

    def close_files(self):
        for f in (self.proc.stdin, self.proc.stdout, self.out_file, self.err_file, self.diag_file):
            with contextlib.suppress(OSError):
                f.close()

    def death(self):
        """How it died, in words, for an "executor error"."""
        status = self.status or 0
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            try:
                what = f"killed by {signal.Signals(sig).name}"
            except ValueError:
                what = f"killed by signal {sig}"
        else:
            what = f"exited with code {os.waitstatus_to_exitcode(status)}"
        tail = self.diag_tail() if not self.diag_file.closed else ""
        return what + (f" ({tail})" if tail else "")


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
        worker = handle.worker
        cpu = self._kill(worker)
        out, err = self._output(worker)
        worker.close_files()
        self._finish(handle, "cancelled", None, out, err, self._elapsed_ms(handle), cpu)
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
                cpu = self._kill(worker)
                out, err = self._output(worker)
                worker.close_files()
                self._finish(
                    handle,
                    "failed",
                    f"timeout: job exceeded its {handle.timeout_s:g}s limit",
                    out,
                    err,
                    self._elapsed_ms(handle),
                    cpu,
                )
        for worker in list(self.retiring):
            worker.reap()
            if worker.dead:
                worker.close_files()
                self.retiring.remove(worker)
        self._dispatch()

    def _dispatch(self):
        while self.queue:
            worker = next((w for w in self.workers if w.handle is None and not w.dead), None)
            if worker is None:
                if len(self.workers) >= self.max_workers:
                    return
                try:
                    worker = _Worker()
                except OSError as e:
                    handle = self.queue.pop(0)
                    self._finish(
                        handle,
                        "failed",
                        f"executor error: cannot start a worker: {e}",
                        b"",
                        b"",
                        0,
                        0,
                    )
                    continue
                self.workers.append(worker)
                self.keep = max(self.keep, len(self.workers))
            handle = self.queue.pop(0)
            self._start(worker, handle)
        self._replenish()

    def _replenish(self):
        while not self.closed and len(self.workers) < self.keep:
            try:
                self.workers.append(_Worker())
            except OSError:
                return

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
        }
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
        worker.cpu_mark_ms = int(frame.get("cpu_total_ms") or worker.cpu_mark_ms)
        worker.handle = None
        out, err = self._output(worker)
        outcome = {
            "status": status,
            "exit_code": exit_code,
            "stdout": out,
            "stderr": err,
            "returns": returns,
            "error": error,
            "wall_ms": wall_ms,
            "cpu_ms": cpu_ms,
        }
        handle.worker = None
        handle.outcome = outcome
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
        cpu = self._job_cpu(worker)
        status = worker.status or 0
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGXCPU:
            error = f"timeout: job exceeded its {handle.timeout_s:g}s limit (CPU time)"
        else:
            error = f"executor error: worker process {worker.death()}"
            if worker.broken:
                error += ": " + worker.broken
        worker.close_files()
        self._finish(handle, "failed", error, out, err, self._elapsed_ms(handle), cpu)

    def _kill(self, worker):
        """Kill a busy worker (timeout, cancel); returns the CPU its job used, in ms."""
        if worker in self.workers:
            self.workers.remove(worker)
        worker.kill()
        return self._job_cpu(worker)

    @staticmethod
    def _job_cpu(worker):
        if worker.cpu_total_ms is None:
            return 0
        return max(0, worker.cpu_total_ms - worker.cpu_mark_ms)

    def _output(self, worker):
        try:
            return worker.output(self.stdout_cap, self.stderr_cap)
        except (OSError, ValueError):
            return b"", b""

    @staticmethod
    def _elapsed_ms(handle):
        begin = handle.started or handle.dispatched
        return int((time.monotonic() - begin) * 1000) if begin else 0

    def _finish(self, handle, status, error, out, err, wall_ms, cpu_ms):
        if handle.worker is not None and handle.worker.handle is handle:
            handle.worker.handle = None
        handle.worker = None
        handle.job = None
        handle.outcome = {
            "status": status,
            "exit_code": None,
            "stdout": out,
            "stderr": err,
            "returns": None,
            "error": error,
            "wall_ms": wall_ms,
            "cpu_ms": cpu_ms,
        }

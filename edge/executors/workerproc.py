"""The node's handle on one wasm3 worker process: starting it, its two pipes (read and written
non-blocking), the files that catch the job's output, and killing, reaping and explaining its
death. A job never runs in the node's process because pywasm3 cannot be interrupted (no fuel,
no timeout, the GIL held for the whole call), leaks ~68 KiB per runtime and has no WASI. The
worker is `subprocess` running `python -m edge.executors.worker` rather than multiprocessing:
nothing of the node's `__main__` is re-imported (spawn and forkserver do that), so a node
started from any script, the CLI or an asyncio app behaves the same; the wire is plain frames
(`framing.py`), so a worker that dies or babbles mid-frame cannot block or crash the node; and
the worker gets exactly the fds it needs (pass_fds) and its own session, so a terminal's
Ctrl-C reaches the node, which then stops its workers itself.
"""

import contextlib
import os
import signal
import subprocess
import sys
import tempfile

from edge.executors.framing import take_headers

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


class WorkerProcess:
    """One worker process and the node's end of its pipes and output files."""

    def __init__(self, module="edge.executors.worker", command=None, pin_mmap=True):
        """module: the worker program; command: (interpreter flags, PYTHONPATH entries), by
        default those that find wasm3; pin_mmap: fix glibc's mmap threshold (see below)."""
        # they live as long as the worker, closed in close_files()
        self.out_file = tempfile.TemporaryFile()  # noqa: SIM115
        self.err_file = tempfile.TemporaryFile()  # noqa: SIM115
        self.diag_file = tempfile.TemporaryFile()  # noqa: SIM115
        out_fd, err_fd = self.out_file.fileno(), self.err_file.fileno()
        flags, paths = command or _worker_command()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [*paths, env.get("PYTHONPATH")]))
        # one malloc arena and no dynamic mmap threshold: the address-space limit the worker
        # sets per job then measures the job, not glibc's bookkeeping
        env.setdefault("MALLOC_ARENA_MAX", "1")
        if pin_mmap:
            env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                *flags,
                "-m",
                module,
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
            preexec_fn=_die_with_node,
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
        return take_headers(self.rbuf, MAX_FRAME), eof

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

    def job_cpu_ms(self):
        """CPU its current job used, once reaped: all of it since the last answer."""
        if self.cpu_total_ms is None:
            return 0
        return max(0, self.cpu_total_ms - self.cpu_mark_ms)

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


JOB_NICENESS = 19  # jobs yield the CPU to anything the owner runs, as BOINC's do


def _die_with_node() -> None:
    """preexec_fn: the worker is SIGKILLed when the node dies, even by SIGKILL, so a crashed
    node never leaves a job spinning (Linux prctl PR_SET_PDEATHSIG; elsewhere a no-op). It
    also runs at the lowest CPU priority: the owner's programs always come first."""
    parent = os.getppid()  # in the child, before exec: the node
    with contextlib.suppress(OSError):
        os.nice(JOB_NICENESS)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os._exit(1)

"""The native executor: a job is a command run on the node itself, for owners who choose to
offer that. It is off unless the owner turns it on, and each job runs in a bubblewrap sandbox
(Debian package `bubblewrap`, tools/install-bubblewrap.sh): new user, pid, network, ipc, uts
and cgroup namespaces (the network one shared only for a job that asks, on a node whose owner
allows it); a read-only view of /usr, /bin, /sbin, /lib* and a few files of /etc; a private
/tmp (tmpfs, as large as the job's memory) as the only writable place; no capabilities; killed
with the node. Under the sandbox, rlimits bound what namespaces do not: address space (the
job's memory), CPU seconds, processes, file size and open files.

A node running as root starts its jobs as an unprivileged user (nobody, or `run_as`): root is
exempt from RLIMIT_NPROC, and a root job would keep every capability in its namespace. The
process limit counts all processes of that user, so it is set to the ones it has now plus the
job's own allowance. Without bwrap the executor refuses to start, unless the owner said
`allow_unsandboxed=True`: jobs then get the rlimits, the user and a private working directory,
and nothing else.

A job's "gpus" (edge/executors/gpus.py) are the device files of exactly those GPUs, bound into
its sandbox, and CUDA_VISIBLE_DEVICES and NVIDIA_VISIBLE_DEVICES naming them (by UUID, else
index); a job without GPUs has neither variable. Without a sandbox a GPU job gets the variables
only: CUDA honours them, but nothing keeps the job from the machine's other GPUs.

A job's "dirs" are bound into its sandbox at their guest paths, read-only unless "write" is
true (native_sandbox.py). Without a sandbox a job with dirs is refused ("invalid job: dirs
need ..."): nothing could put the directories at their guest paths nor keep a read-only one
read-only, and telling the job their host paths instead would leave every other folder its user
can write open to it as well, so the safe answer is no.

The sandbox's pieces (bwrap's command line, the rlimits, reading /proc) are in
`native_sandbox.py`; this module is the executor's bookkeeping. Every job has a thread that
reads its stdout and stderr (keeping each up to its cap, so a chatty job neither blocks nor
fills anything), enforces the wall-clock timeout and reaps it. submit(), poll(), suspend() and
resume() never wait on a job; cancel() returns once the job is gone. Suspend is SIGSTOP of the
job's process group and of every process below it (a job may start new sessions); resume is
SIGCONT; stopped time counts neither against the timeout nor as the job's wall time. A cap on
output truncates it, as on the wasm executors; a memory cap is an address-space limit, so a
job over it sees its allocations fail (it exits with its own error), and is not told apart.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from typing import Any

from edge.core import protocol
from edge.executors.gpus import GPU_ENV, gpu_ids, gpus_problem
from edge.executors.native_sandbox import (
    DEFAULT_PATH,
    GPU_INFO_DIR,
    NOBODY,
    SYSTEM_DIRS,
    bwrap_argv,
    count_processes,
    descendants,
    dirs_problem,
    exited,
    gpu_devices,
    limiter,
    unreachable,
    visible,
)

DEFAULT_TIMEOUT_S = 60.0
MAX_TIMEOUT_S = 7 * 86400
MIN_MEMORY_MB = 16
MAX_MEMORY_MB = 1 << 20
Outcome = dict[str, Any]


class NativeDisabled(RuntimeError):
    """The owner has not turned the native executor on."""


class SandboxUnavailable(RuntimeError):
    """No working bubblewrap, and the owner did not allow running jobs without it."""


class JobError(Exception):
    """Ends a job with status "failed"; the message says what was wrong with it."""


class _Spec:
    """A native job dict, checked."""

    def __init__(self, job: Any, ex: NativeExecutor) -> None:
        if not isinstance(job, dict):
            raise JobError("invalid job: a job must be a dict")
        self.job_id = str(job.get("job_id") or "job")
        command = job.get("command")
        if (
            not isinstance(command, list)
            or not command
            or not all(isinstance(a, str) and "\0" not in a for a in command)
            or not command[0]
        ):
            raise JobError("invalid job: command must be a non-empty list of strings")
        self.command: list[str] = command
        env = job.get("env") or {}
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and k and "=" not in k and "\0" not in k + v
            for k, v in env.items()
        ):
            raise JobError("invalid job: env must map names (without '=') to strings")
        self.job_env: dict[str, str] = env
        self.env = {"PATH": DEFAULT_PATH, "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8"}
        self.env.update(env)
        problem = gpus_problem(job.get("gpus"))
        if problem:
            raise JobError(f"invalid job: {problem}")
        self.gpus: list[dict[str, Any]] = list(job.get("gpus") or [])
        # The GPU variables are the node's: CUDA uses only the GPUs these name, by UUID, else
        # by index, and an index in NVML's (PCI) order, as the node counts, only with
        # CUDA_DEVICE_ORDER=PCI_BUS_ID (CUDA's own order puts the fastest first). A job
        # without GPUs has neither variable, whatever its own env says.
        for name in GPU_ENV:
            self.env.pop(name, None)
            if self.gpus:
                self.env[name] = ",".join(gpu_ids(self.gpus))
        if self.gpus:
            self.env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        self.stdin = job.get("stdin") or b""
        if not isinstance(self.stdin, (bytes, bytearray)):
            raise JobError("invalid job: stdin must be bytes")
        timeout = job.get("timeout_s")
        self.timeout_s = _number(ex.timeout_s_default if timeout is None else timeout, "timeout_s")
        memory = job.get("memory_mb")
        self.memory_mb = int(
            _number(ex.memory_mb_default if memory is None else memory, "memory_mb")
        )
        if not MIN_MEMORY_MB <= self.memory_mb <= MAX_MEMORY_MB:
            raise JobError(
                f"invalid job: memory_mb must be from {MIN_MEMORY_MB} to {MAX_MEMORY_MB}"
            )
        pids = job.get("pids")
        if pids is not None and (isinstance(pids, bool) or not isinstance(pids, int) or pids < 1):
            raise JobError("invalid job: pids must be a positive integer")
        self.processes = min(ex.max_processes, pids or ex.max_processes)
        self.network = job.get("network") or False
        if not isinstance(self.network, bool):
            raise JobError("invalid job: network must be true or false")
        if self.network and not ex.allow_network:
            raise JobError(
                "network not allowed: the job asks for network access and this node's "
                "owner does not allow it (run the job without network, or on another node)"
            )
        problem = dirs_problem(job.get("dirs"))
        if problem:
            raise JobError(f"invalid job: {problem}")
        self.dirs: list[dict[str, Any]] = list(job.get("dirs") or [])
        if self.dirs and not ex.bwrap:
            raise JobError(
                "invalid job: dirs need the bubblewrap sandbox, and this node runs native jobs "
                "without one (allow_unsandboxed): run the job on another node"
            )
        found = shutil.which(command[0], path=self.env["PATH"])
        if found is None:
            raise JobError(
                f"invalid job: command not found: {command[0]!r} (PATH={self.env['PATH']})"
            )
        if ex.bwrap and not visible(os.path.realpath(found)):
            raise JobError(
                f"invalid job: {command[0]!r} ({found}) is outside the sandbox, which shows "
                f"only {', '.join(SYSTEM_DIRS)}"
            )


def _number(value: Any, key: str) -> float:
    top = MAX_TIMEOUT_S if key == "timeout_s" else MAX_MEMORY_MB
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0 < value <= top
    ):
        raise JobError(f"invalid job: {key} must be a number above 0 and at most {top}")
    return float(value)


class _Handle:
    """One submitted job, from queue to outcome."""

    def __init__(self, job_id: str, spec: _Spec | None) -> None:
        self.job_id = job_id
        self.spec = spec
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.thread: threading.Thread | None = None
        self.outcome: Outcome | None = None
        self.lock = threading.Lock()  # held to signal, reap, wake or close
        self.exited = False  # reaped: its pid and group id are no longer ours to signal
        self.want_cancel = False
        self.suspended_by: set[str] = set()
        self.started = 0.0
        self.paused_at: float | None = None
        self.paused_s = 0.0
        self.wake_r = self.wake_w = -1  # a pipe that wakes the job's thread, while it runs

    def paused(self, now: float) -> float:
        return self.paused_s + (now - self.paused_at if self.paused_at is not None else 0.0)

    def deadline(self) -> float:
        assert self.spec is not None
        return self.started + self.spec.timeout_s + self.paused(time.monotonic())

    def wake(self) -> None:
        with self.lock, contextlib.suppress(OSError):
            if self.wake_w >= 0:
                os.write(self.wake_w, b"x")

    def __repr__(self) -> str:
        state = "done" if self.outcome else "running" if self.proc else "queued"
        return f"<native job {self.job_id} {state}>"


class _Capped:
    """The first `cap` bytes of a stream, and whether there were more."""

    def __init__(self, cap: int) -> None:
        self.cap, self.data, self.over, self.eof = cap, bytearray(), False, False

    def feed(self, chunk: bytes) -> None:
        room = self.cap - len(self.data)
        if len(chunk) > room:
            self.over = True
        self.data += chunk[: max(0, room)]


class NativeExecutor:
    """submit/poll/cancel/suspend/resume commands, up to `max_jobs` at a time, sandboxed."""

    engines = ("native",)
    takes_files: bool  # a job's "dirs" are bound into its sandbox; without one, refused

    def __init__(
        self,
        enabled: bool = False,
        allow_network: bool = False,
        allow_unsandboxed: bool = False,
        max_jobs: int = 1,
        max_processes: int = 64,
        max_open_files: int = 256,
        memory_mb_default: int = 256,
        timeout_s_default: float = DEFAULT_TIMEOUT_S,
        stdout_cap: int = 1 << 20,
        stderr_cap: int = 64 << 10,
        run_as: int | None = None,
        bwrap: str | None = None,
        dev_dir: str = "/dev",
        gpu_info_dir: str = GPU_INFO_DIR,
    ) -> None:
        if enabled is not True:
            raise NativeDisabled("native executor is off; enable it in the node's preferences")
        self.allow_network = allow_network is True
        self.max_jobs = max(1, int(max_jobs))
        self.max_processes = max(1, int(max_processes))
        self.max_open_files = max(16, int(max_open_files))
        self.memory_mb_default = memory_mb_default
        self.timeout_s_default = timeout_s_default
        self.stdout_cap, self.stderr_cap = int(stdout_cap), int(stderr_cap)
        # where the host's GPU device files are, and the driver's page of each GPU (a test's own)
        self.dev_dir, self.gpu_info_dir = dev_dir, gpu_info_dir
        if os.geteuid() == 0:
            self.run_as: int | None = NOBODY if run_as is None else int(run_as)
            if self.run_as == 0:
                raise ValueError("run_as must not be root (0): jobs would keep root's powers")
        elif run_as is not None and run_as != os.geteuid():
            raise ValueError("run_as needs a node running as root to switch users")
        else:
            self.run_as = None
        self.bwrap = bwrap or shutil.which("bwrap")
        if self.bwrap is None and allow_unsandboxed is not True:
            raise SandboxUnavailable(
                "native executor needs bubblewrap (bwrap) to sandbox jobs: install the Debian "
                "package bubblewrap (tools/install-bubblewrap.sh), or set allow_unsandboxed to "
                "run jobs with rlimits only (they could then read your files and use the network)"
            )
        if self.bwrap is not None:
            self._probe()
        self.takes_files = self.bwrap is not None
        self.lock = threading.Lock()
        self.queue: list[_Handle] = []
        self.running: list[_Handle] = []
        self.closed = False

    def _probe(self) -> None:
        """Run `true` in the sandbox once, so a bwrap that cannot work here says so now."""
        assert self.bwrap is not None
        argv = [*bwrap_argv(self.bwrap, network=False, tmp_bytes=1 << 20), "true"]
        try:
            done = subprocess.run(argv, capture_output=True, timeout=30, cwd="/", **self._user())
        except (OSError, subprocess.SubprocessError) as e:
            raise SandboxUnavailable(f"bubblewrap ({self.bwrap}) cannot start: {e}") from None
        if done.returncode:
            why = done.stderr.decode(errors="replace").strip() or f"exit code {done.returncode}"
            raise SandboxUnavailable(
                f"bubblewrap ({self.bwrap}) cannot create a sandbox here: {why} (are "
                "unprivileged user namespaces enabled? see tools/install-bubblewrap.sh)"
            )

    def _user(self) -> dict[str, Any]:
        """Popen's arguments to start a job as `run_as` (when the node is root)."""
        if self.run_as is None:
            return {}
        return {"user": self.run_as, "group": self.run_as, "extra_groups": []}

    # -- the interface -------------------------------------------------------------------
    def submit(self, job: dict[str, Any]) -> _Handle:
        if self.closed:
            raise RuntimeError("executor is closed")
        try:
            spec = _Spec(job, self)
        except JobError as e:
            handle = _Handle(
                str(job.get("job_id") or "job") if isinstance(job, dict) else "job", None
            )
            self._finish(handle, "failed", str(e), b"", b"", 0, 0)
            return handle
        handle = _Handle(spec.job_id, spec)
        with self.lock:
            self.queue.append(handle)
        self._dispatch()
        return handle

    def poll(self, handle: _Handle) -> Outcome | None:
        return handle.outcome

    def run(self, job: dict[str, Any]) -> Outcome:
        handle = self.submit(job)
        while handle.outcome is None:
            if handle.thread is not None:
                handle.thread.join(0.5)
            else:
                time.sleep(0.01)
        return handle.outcome

    def cancel(self, handle: _Handle) -> None:
        with self.lock:
            if handle in self.queue:
                self.queue.remove(handle)
                queued = True
            else:
                queued = False
        if queued:
            self._finish(handle, "cancelled", None, b"", b"", 0, 0)
            return
        handle.want_cancel = True
        handle.wake()
        if handle.thread is not None and handle.thread is not threading.current_thread():
            handle.thread.join(10)

    def suspend(self, handle: _Handle, reason: str = "idle") -> bool:
        """Stop a job for `reason`; a queued one does not start. Reasons stack, as wasm3's."""
        if handle.outcome is not None:
            return False
        first = not handle.suspended_by
        handle.suspended_by.add(reason)
        if first and handle.proc is not None:
            handle.paused_at = time.monotonic()
            self._signal(handle, signal.SIGSTOP)
        return True

    def resume(self, handle: _Handle, reason: str = "idle") -> bool:
        if reason not in handle.suspended_by:
            return False
        handle.suspended_by.discard(reason)
        if handle.suspended_by:
            return True
        if handle.paused_at is not None:
            self._signal(handle, signal.SIGCONT)
            handle.paused_s += time.monotonic() - handle.paused_at
            handle.paused_at = None
            handle.wake()  # its deadline moved
        self._dispatch()
        return True

    def active(self) -> list[_Handle]:
        with self.lock:
            return [*self.running, *self.queue]

    def job_pids(self) -> list[int]:
        with self.lock:
            return [h.pid for h in self.running if h.pid is not None and not h.exited]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for handle in self.active():
            self.cancel(handle)

    def __enter__(self) -> NativeExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- starting a job ------------------------------------------------------------------
    def _dispatch(self) -> None:
        while True:
            with self.lock:
                if self.closed or len(self.running) >= self.max_jobs:
                    return
                handle = next((h for h in self.queue if not h.suspended_by), None)
                if handle is None:
                    return
                self.queue.remove(handle)
                self.running.append(handle)
            self._start(handle)

    def _start(self, handle: _Handle) -> None:
        spec = handle.spec
        assert spec is not None
        problem = unreachable(spec.dirs, self.run_as)
        if problem is not None:
            self._not_started(handle, problem)
            return
        mem = spec.memory_mb << 20
        workdir = None
        env = dict(spec.env)
        if self.bwrap is not None:
            try:
                devices = gpu_devices(spec.gpus, self.dev_dir, self.gpu_info_dir)
            except FileNotFoundError as e:
                self._not_started(handle, f"executor error: {e}")
                return
            sandbox = bwrap_argv(self.bwrap, spec.network, mem, spec.dirs, devices)
            argv, cwd = [*sandbox, *spec.command], "/"
        else:  # no sandbox: a private working directory is all the isolation there is
            workdir = tempfile.mkdtemp(prefix="deparrow-native-")
            if self.run_as is not None:
                os.chown(workdir, self.run_as, self.run_as)
            argv, cwd = list(spec.command), workdir
            env.update({k: workdir for k in ("HOME", "TMPDIR") if k not in spec.job_env})
        uid = self.run_as if self.run_as is not None else os.getuid()
        # RLIMIT_NPROC counts every process of the user: its present ones, plus the job's
        # allowance, plus bwrap's two (its own and the sandbox's init)
        nproc = count_processes(uid) + spec.processes + 2
        # CPU seconds: a backstop that never bites before the wall clock, even on every core
        cpu = math.ceil(spec.timeout_s * (os.cpu_count() or 1)) + 1
        # The memory cap is the address space, except for a GPU job: CUDA reserves far more
        # address space than it uses (cuInit fails under an address-space cap), but that
        # reservation is not writable, so the data limit caps what the job really allocates.
        memory = resource.RLIMIT_DATA if spec.gpus else resource.RLIMIT_AS
        limits = [
            (memory, mem, mem),
            (resource.RLIMIT_CPU, cpu, cpu + 1),  # SIGXCPU, then SIGKILL a second later
            (resource.RLIMIT_NPROC, nproc, nproc),
            (resource.RLIMIT_FSIZE, mem, mem),
            (resource.RLIMIT_NOFILE, self.max_open_files, self.max_open_files),
            (resource.RLIMIT_CORE, 0, 0),
        ]
        handle.wake_r, handle.wake_w = os.pipe()
        try:
            with tempfile.TemporaryFile() as stdin:
                stdin.write(spec.stdin)
                stdin.seek(0)
                handle.proc = subprocess.Popen(
                    argv,
                    stdin=stdin,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    env=env,
                    cwd=cwd,
                    start_new_session=True,
                    preexec_fn=limiter(limits),
                    **self._user(),
                )
        except (OSError, subprocess.SubprocessError) as e:
            with handle.lock:
                os.close(handle.wake_r)
                os.close(handle.wake_w)
                handle.wake_r = handle.wake_w = -1
            _remove(workdir)
            self._not_started(handle, f"executor error: cannot start the job: {e}")
            return
        handle.pid = handle.proc.pid
        handle.started = time.monotonic()
        if handle.suspended_by:  # suspended between the queue and now
            handle.paused_at = handle.started
            self._signal(handle, signal.SIGSTOP)
        handle.thread = threading.Thread(
            target=self._watch, args=(handle, workdir), name=f"native-{handle.job_id}", daemon=True
        )
        handle.thread.start()

    def _not_started(self, handle: _Handle, error: str) -> None:
        """End a job taken from the queue that could not start (the node's fault), and start
        the next."""
        with self.lock:
            self.running.remove(handle)
        self._finish(handle, "failed", error, b"", b"", 0, 0)
        self._dispatch()

    # -- a job's thread ------------------------------------------------------------------
    def _watch(self, handle: _Handle, workdir: str | None) -> None:
        proc, spec = handle.proc, handle.spec
        assert proc is not None and proc.stdout is not None and proc.stderr is not None
        assert spec is not None
        out, err = _Capped(self.stdout_cap), _Capped(self.stderr_cap)
        streams = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
        try:
            pidfd: int | None = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):  # before Linux 5.3: look for the exit now and then
            pidfd = None
        why: str | None = None  # "cancelled" or "timeout" once we kill it
        status, usage, grace_until, killed_at = 0, None, 0.0, 0.0
        try:
            while True:
                now = time.monotonic()
                if why is None and not handle.exited:
                    if handle.want_cancel:
                        why = "cancelled"
                    elif handle.paused_at is None and now >= handle.deadline():
                        why = "timeout"
                    if why is not None:
                        killed_at = now
                        self._kill(handle)
                elif why is not None and not handle.exited and now - killed_at > 2.0:
                    self._signal(handle, signal.SIGKILL)  # bwrap itself did not go: it goes now
                if not handle.exited and exited(proc.pid):
                    status, usage = self._reap(handle)
                    # whatever still holds its output was killed with its group: not long now
                    grace_until = now + 2.0
                readers = [fd for fd, s in streams.items() if not s.eof]
                if handle.exited and (not readers or now >= grace_until):
                    break
                if handle.exited:
                    timeout = grace_until - now
                elif why is not None:
                    timeout = 0.1
                elif handle.paused_at is not None:
                    timeout = 60.0  # a resume wakes us
                else:
                    timeout = max(0.0, handle.deadline() - now)
                if pidfd is not None and not handle.exited:
                    readers.append(pidfd)
                elif not handle.exited:
                    timeout = min(timeout, 0.05)
                ready, _, _ = select.select([*readers, handle.wake_r], [], [], min(timeout, 60.0))
                for fd in ready:
                    if fd == handle.wake_r:
                        os.read(fd, 512)
                    elif fd in streams:
                        chunk = os.read(fd, 1 << 16)
                        if chunk:
                            streams[fd].feed(chunk)
                        else:
                            streams[fd].eof = True
        finally:
            ended = time.monotonic()
            if not handle.exited:  # only after a bug above: leave nothing running
                self._signal(handle, signal.SIGKILL)
                status, usage = self._reap(handle)
            for f in (proc.stdout, proc.stderr):
                f.close()
            if pidfd is not None:
                os.close(pidfd)
            with handle.lock:
                os.close(handle.wake_r)
                os.close(handle.wake_w)
                handle.wake_r = handle.wake_w = -1
            _remove(workdir)
        notes = [
            f"[deparrow: {name} truncated at {s.cap} bytes]\n"
            for name, s in (("stdout", out), ("stderr", err))
            if s.over
        ]
        stdout, stderr = bytes(out.data), bytes(err.data) + "".join(notes).encode()
        wall_ms = max(0, int((ended - handle.started - handle.paused(ended)) * 1000))
        cpu_ms = int((usage.ru_utime + usage.ru_stime) * 1000) if usage is not None else 0
        with self.lock:
            self.running.remove(handle)
        if why == "cancelled":
            self._finish(handle, "cancelled", None, stdout, stderr, wall_ms, cpu_ms)
        elif why == "timeout":
            error = f"timeout: job exceeded its {spec.timeout_s:g}s limit"
            self._finish(handle, "failed", error, stdout, stderr, wall_ms, cpu_ms)
        else:
            code = os.waitstatus_to_exitcode(status)
            code = 128 - code if code < 0 else code  # killed by a signal: as a shell says it
            self._finish(handle, "completed", None, stdout, stderr, wall_ms, cpu_ms, code)
        self._dispatch()

    def _kill(self, handle: _Handle) -> None:
        """SIGKILL the job. In a sandbox, the processes below bwrap first: the sandbox's init
        dies, its pid namespace with it, and bwrap, seeing that, reaps it and exits (killed
        first, bwrap would leave its init to the host's init to reap). bwrap gets SIGCONT in
        case the job was suspended; if it does not exit, the watcher kills it 2 s later."""
        if self.bwrap is None:
            self._signal(handle, signal.SIGKILL)
            return
        self._signal(handle, signal.SIGKILL, group=False)
        self._signal(handle, signal.SIGCONT, tree=False)

    def _signal(self, handle: _Handle, sig: int, tree: bool = True, group: bool = True) -> None:
        """`sig` to the job's process group, and (tree) to every process below its first one,
        parents first (a job may start new sessions; a sandbox's processes all are below)."""
        with handle.lock:
            if handle.exited or handle.pid is None:
                return
            if group:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(handle.pid, sig)
            for pid in descendants(handle.pid) if tree else ():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)

    def _reap(self, handle: _Handle) -> tuple[int, Any]:
        """Reap the job's process, once it has exited. Its zombie still holds the pid and the
        group id, so the group is swept first: a process the job left behind (without a
        sandbox; with one, the pid namespace died with it) dies too, and the signal cannot
        reach a stranger that took the pid over."""
        assert handle.pid is not None
        self._signal(handle, signal.SIGKILL, tree=False)
        with handle.lock:
            _, status, usage = os.wait4(handle.pid, 0)
            handle.exited = True
        return status, usage

    @staticmethod
    def _finish(
        handle: _Handle,
        status: str,
        error: str | None,
        stdout: bytes,
        stderr: bytes,
        wall_ms: int,
        cpu_ms: int,
        exit_code: int | None = None,
    ) -> None:
        handle.suspended_by.clear()
        handle.paused_at = None
        handle.outcome = protocol.outcome(status, error, stdout, stderr, wall_ms, cpu_ms, exit_code)


def _remove(path: str | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)

"""The Docker executor, for nodes on full machines: each job runs in a container made through
the Docker Engine API (Docker itself, or Podman's Docker-compatible service), with memory,
memory+swap, CPU and pids limits, all capabilities dropped, no network unless the job asks and
the node's owner allows it, and the engine's own logs off: stdout and stderr are read from the
attach stream as they come and kept up to their caps, so a chatty job can't fill the disk.

Creating and starting a container takes the engine a few hundred milliseconds, so every job
has a thread of its own that talks to the engine; submit(), poll(), cancel(), suspend() and
resume() only set flags and wake that thread, and never wait on the engine themselves.
Containers carry the labels deparrow.node and deparrow.job, are removed after every job, and
remove_leftovers() clears what a crashed node left behind.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import select
import socket
import threading
import time
from typing import Any

import docker
import requests

DEFAULT_BASE_URL = "unix:///run/podman/podman.sock"
DEFAULT_TIMEOUT_S = 60.0
NODE_LABEL = "deparrow.node"
JOB_LABEL = "deparrow.job"
MIN_MEMORY_MB = 6  # the engines refuse less
_KILLED = 128 + 9  # exit code of a process ended by SIGKILL

Outcome = dict[str, Any]


class JobError(Exception):
    """Ends a job with status "failed"; the message starts with one of the error kinds."""


class _Spec:
    """A job dict, checked: what the container is made from."""

    def __init__(self, job: dict[str, Any], defaults: dict[str, Any]) -> None:
        def get(key: str) -> Any:
            value = job.get(key)
            return defaults.get(key) if value is None else value

        self.job_id = str(job.get("job_id") or "job")
        self.image = job.get("image")
        if not isinstance(self.image, str) or not self.image.strip():
            raise JobError("invalid job: image must be a non-empty string")
        self.command = _strings(job.get("command"), "command")
        self.entrypoint = _strings(job.get("entrypoint"), "entrypoint")
        env = job.get("env") or {}
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and k and "=" not in k and isinstance(v, str) for k, v in env.items()
        ):
            raise JobError("invalid job: env must map names (without '=') to strings")
        self.env = [f"{k}={v}" for k, v in env.items()]
        self.stdin = job.get("stdin") or b""
        if not isinstance(self.stdin, (bytes, bytearray)):
            raise JobError("invalid job: stdin must be bytes")
        self.timeout_s = _number(get("timeout_s"), "timeout_s", 7 * 86400)
        self.memory_mb = int(_number(get("memory_mb"), "memory_mb", 1 << 20))
        if self.memory_mb < MIN_MEMORY_MB:
            raise JobError(f"invalid job: memory_mb must be at least {MIN_MEMORY_MB}")
        self.cpu = _number(get("cpu"), "cpu", 1024)
        self.pids = int(_number(get("pids"), "pids", 1 << 22))
        self.network = job.get("network") or False
        if not isinstance(self.network, bool):
            raise JobError("invalid job: network must be true or false")


def _strings(value: Any, key: str) -> list[str] | None:
    """An optional list of strings (None: the image's own)."""
    if value is not None and (
        not isinstance(value, list) or not all(isinstance(a, str) for a in value)
    ):
        raise JobError(f"invalid job: {key} must be a list of strings")
    return value


def _number(value: Any, key: str, top: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= top:
        raise JobError(f"invalid job: {key} must be a number between 0 and {int(top)}")
    return float(value)


class _Handle:
    """One submitted job. The node's loop sets the wishes (cancel, paused) and reads
    `outcome`; the job's thread does everything else."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.state = "starting"  # -> running <-> paused -> done
        self.container: str | None = None
        self.pid: int | None = None  # the container's first process, on this machine
        self.outcome: Outcome | None = None
        self.want_cancel = False
        self.want_paused = False
        self.thread: threading.Thread | None = None
        self.wake_r, self._wake_w = socket.socketpair()  # the job's thread sleeps on wake_r
        self.wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def wake(self) -> None:
        # full: it is awake anyway; closed: the job is over
        with contextlib.suppress(OSError):
            self._wake_w.send(b"!")

    def __repr__(self) -> str:
        return f"<docker job {self.job_id} {self.state}>"


class DockerExecutor:
    """submit/poll/cancel/suspend/resume container jobs on a Docker-API engine."""

    engines = ("docker",)

    def __init__(
        self,
        base_url: str | None = None,
        allow_network: bool = False,
        node: str = "local",
        stdout_cap: int = 1 << 20,
        stderr_cap: int = 64 << 10,
        memory_mb_default: int = 256,
        cpu_default: float = 1.0,
        pids_default: int = 256,
        api_timeout_s: float = 60.0,
        stats_interval_s: float = 1.0,
    ) -> None:
        self.base_url = base_url or os.environ.get("DOCKER_HOST") or DEFAULT_BASE_URL
        self.allow_network = bool(allow_network)
        self.node = node
        self.stdout_cap = stdout_cap
        self.stderr_cap = stderr_cap
        self.defaults = {
            "timeout_s": DEFAULT_TIMEOUT_S,
            "memory_mb": memory_mb_default,
            "cpu": cpu_default,
            "pids": pids_default,
        }
        self.api_timeout_s = api_timeout_s
        self.stats_interval_s = stats_interval_s
        self.handles: list[_Handle] = []
        self.closed = False
        self._version: str | None = None  # the engine's API version, once negotiated

    # -- the interface -------------------------------------------------------------------
    def submit(self, job: dict[str, Any]) -> _Handle:
        if self.closed:
            raise RuntimeError("executor is closed")
        self.handles = [h for h in self.handles if h.outcome is None]
        handle = _Handle(str(job.get("job_id") or "job"))
        try:
            spec = _Spec(job, self.defaults)
            if spec.network and not self.allow_network:
                raise JobError(
                    "network not allowed: the job asks for network access and this node's "
                    "owner does not allow it (run the job without network, or on another node)"
                )
        except JobError as e:
            _finish(handle, "failed", str(e))
            return handle
        handle.thread = threading.Thread(
            target=_Job(self, handle, spec).run, name=f"docker-{spec.job_id}", daemon=True
        )
        self.handles.append(handle)
        handle.thread.start()
        return handle

    def poll(self, handle: _Handle) -> Outcome | None:
        if handle.outcome is not None and handle in self.handles:
            self.handles.remove(handle)
        return handle.outcome

    def cancel(self, handle: _Handle) -> None:
        """Kill the job's container; poll() then returns status "cancelled"."""
        if handle.outcome is None:
            handle.want_cancel = True
            handle.wake()

    def job_pids(self) -> list[int]:
        """Host pids of running containers' first processes (their children are found by
        the idle monitor), so their CPU counts as this node's, not the owner's."""
        return [h.pid for h in self.handles if h.pid and h.outcome is None]

    def suspend(self, handle: _Handle) -> None:
        """Freeze the job's processes (container pause); its timeout clock stops too."""
        if handle.outcome is None:
            handle.want_paused = True
            handle.wake()

    def resume(self, handle: _Handle) -> None:
        if handle.outcome is None:
            handle.want_paused = False
            handle.wake()

    def run(self, job: dict[str, Any]) -> Outcome:
        """Submit a job and wait for its outcome (for `edge-run` and tests)."""
        handle = self.submit(job)
        if handle.thread is not None:
            handle.thread.join()
        outcome = self.poll(handle)
        assert outcome is not None
        return outcome

    def close(self, wait_s: float = 30.0) -> None:
        """Cancel the jobs still running and wait (up to wait_s) for their containers to go."""
        if self.closed:
            return
        self.closed = True
        for handle in self.handles:
            self.cancel(handle)
        deadline = time.monotonic() + wait_s
        for handle in self.handles:
            if handle.thread is not None:
                handle.thread.join(max(0.0, deadline - time.monotonic()))
        self.handles = []

    def __enter__(self) -> DockerExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def remove_leftovers(self) -> int:
        """Remove this node's containers that a crash left behind; returns how many. It
        blocks: call it once at start, before any submit. Raises JobError (with the reason)
        when the engine can't be reached, so it doubles as the check that it answers."""
        api = self._api()
        try:
            found = api.containers(all=True, filters={"label": f"{NODE_LABEL}={self.node}"})
            for c in found:
                api.remove_container(c["Id"], force=True, v=True)
            return len(found)
        except docker.errors.APIError as e:
            raise JobError(f"docker engine error: {e.explanation or e}") from None
        except (requests.exceptions.RequestException, docker.errors.DockerException) as e:
            raise JobError(_unreachable(self.base_url, e)) from None
        finally:
            api.close()

    # -- the job's thread ----------------------------------------------------------------
    def _api(self) -> Any:
        try:
            api = docker.APIClient(
                base_url=self.base_url, version=self._version or "auto", timeout=self.api_timeout_s
            )
        except docker.errors.DockerException as e:
            raise JobError(_unreachable(self.base_url, e)) from None
        self._version = api.api_version
        return api


class _Job:
    """One job's thread: makes the container, feeds its stdin, reads its output, applies
    the node's wishes (cancel, pause, resume), kills it at the deadline (paused time does
    not count), reads its exit code and removes it."""

    def __init__(self, ex: DockerExecutor, handle: _Handle, spec: _Spec) -> None:
        self.ex, self.handle, self.spec = ex, handle, spec
        self.api: Any = None
        self.sock: socket.socket | None = None
        self.out = _Streams(ex.stdout_cap, ex.stderr_cap)
        self.stdin = bytes(spec.stdin)
        self.started = self.wall_ms = self.cpu_ms = self.paused_s = self.killed_at = 0.0
        self.paused_at: float | None = None
        self.killed: str | None = None  # "timeout" or "cancelled", once we killed it
        self.next_stats = 0.0

    def run(self) -> None:
        status, error, code = "failed", None, None
        try:
            self.api = self.ex._api()
            status, error, code = self._contain()
        except JobError as e:
            error = str(e)
        except docker.errors.ImageNotFound:
            error = f"image not found: {self.spec.image} (it must be built or pulled on this node)"
        except docker.errors.APIError as e:
            error = f"docker engine error: {e.explanation or e}"
        except (requests.exceptions.RequestException, docker.errors.DockerException) as e:
            error = _unreachable(self.ex.base_url, e)
        except Exception as e:  # a bug here must end the job, not leave it hanging
            error = f"executor error: {type(e).__name__}: {e}"
        finally:
            if self.sock is not None:
                self.sock.close()
            if self.api is not None:
                if self.handle.container is not None:
                    # if this fails, remove_leftovers() at the node's next start clears it
                    with contextlib.suppress(Exception):
                        self.api.remove_container(self.handle.container, force=True, v=True)
                self.api.close()
            stdout, stderr = self.out.result()
            _finish(self.handle, status, error, stdout, stderr, self.wall_ms, self.cpu_ms, code)

    def _contain(self) -> tuple[str, str | None, int | None]:
        api, handle, spec = self.api, self.handle, self.spec
        if handle.want_cancel:
            return "cancelled", None, None
        host = api.create_host_config(
            network_mode="bridge" if spec.network else "none",
            mem_limit=spec.memory_mb << 20,
            memswap_limit=spec.memory_mb << 20,  # no swap: the limit is the limit
            nano_cpus=int(spec.cpu * 1e9),
            pids_limit=spec.pids,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            log_config={"type": "none"},  # output comes over the attach stream, capped
        )
        config = api.create_container_config(
            spec.image,
            command=spec.command,
            entrypoint=spec.entrypoint,
            environment=spec.env,
            stdin_open=bool(self.stdin),
            tty=False,
            labels={NODE_LABEL: self.ex.node, JOB_LABEL: spec.job_id},
            host_config=host,
        )
        config["StdinOnce"] = bool(self.stdin)  # stdin's end closes the job's stdin
        handle.container = api.create_container_from_config(config, None)["Id"]
        # Attached before the start, so no output is missed and none is buffered inside the
        # HTTP client (the socket is read directly).
        stream = api.attach_socket(
            handle.container,
            params={"stdin": int(bool(self.stdin)), "stdout": 1, "stderr": 1, "stream": 1},
        )
        self.sock = sock = getattr(stream, "_sock", stream)
        if handle.want_cancel:
            return "cancelled", None, None
        self.started = time.monotonic()
        self.next_stats = self.started + min(0.2, self.ex.stats_interval_s)
        api.start(handle.container)  # on Podman it returns once the job has begun
        try:  # the container's first process: the idle monitor must not take it for the owner
            handle.pid = int(api.inspect_container(handle.container)["State"]["Pid"]) or None
        except Exception:  # a pid is a nicety; the job runs without it
            handle.pid = None
        handle.state = "running"
        sock.setblocking(False)
        if not self.stdin:
            self._close_stdin()
        self._supervise(sock)
        code, oom = self._exit_code()
        handle.state = "done"
        if self.killed == "cancelled" or (handle.want_cancel and self.killed is None):
            return "cancelled", None, None
        if self.killed == "timeout":
            return "failed", f"timeout: job exceeded its {spec.timeout_s:g}s limit", None
        if oom or code == _KILLED:
            # Podman on cgroup v1 does not report OOMKilled; a SIGKILL we did not send comes
            # from the kernel's OOM killer (a container's init ignores its own SIGKILLs).
            return "failed", f"memory limit: job exceeded {spec.memory_mb} MiB", code
        return "completed", None, code

    def _deadline(self) -> float:
        return self.started + self.paused_s + self.spec.timeout_s

    def _check_deadline(self) -> None:
        running = self.killed is None and self.paused_at is None
        if running and time.monotonic() >= self._deadline():
            self._kill("timeout")

    def _supervise(self, sock: socket.socket) -> None:
        """Until the output stream ends."""
        wake = self.handle.wake_r
        while True:
            self._obey()
            now = time.monotonic()
            if self.killed is not None and now - self.killed_at > 10:
                break  # the engine kept the stream open: the container's state tells the rest
            self._check_deadline()
            running = self.killed is None and self.paused_at is None
            if running and now >= self.next_stats:
                self._sample_cpu()
            wake_at = min(self.next_stats, self._deadline()) if running else now + 1.0
            writers = [sock] if self.stdin else []
            ready_r, ready_w, _ = select.select(
                [sock, wake], writers, [], max(0.0, wake_at - time.monotonic())
            )
            if wake in ready_r:
                _drain(wake)
            if ready_w:
                self._feed(sock)
            if sock in ready_r and self._read(sock):
                break
        ended = time.monotonic()
        if self.paused_at is not None:
            self.paused_s += ended - self.paused_at
        self.wall_ms = (ended - self.started - self.paused_s) * 1000

    def _obey(self) -> None:
        """Act on the node's wishes (cancel, pause, resume)."""
        handle = self.handle
        if self.killed is not None:
            return
        if handle.want_cancel:
            self._kill("cancelled")
        elif handle.want_paused and self.paused_at is None and self._call(self.api.pause):
            self.paused_at = time.monotonic()
            handle.state = "paused"
        elif not handle.want_paused and self.paused_at and self._call(self.api.unpause):
            self.paused_s += time.monotonic() - self.paused_at
            self.paused_at = None
            handle.state = "running"

    def _call(self, fn: Any) -> bool:
        try:
            fn(self.handle.container)
            return True
        except docker.errors.APIError:  # it has just exited: the stream's end follows
            return False

    def _kill(self, why: str) -> None:
        self.killed = why
        self.killed_at = time.monotonic()
        self._call(self.api.kill)

    def _feed(self, sock: socket.socket) -> None:
        try:
            n = sock.send(self.stdin[: 1 << 16])
            self.stdin = self.stdin[n:]
        except BlockingIOError:
            return
        except OSError:  # the job closed its stdin or exited: the rest is not wanted
            self.stdin = b""
        if not self.stdin:
            self._close_stdin()

    def _close_stdin(self) -> None:
        with contextlib.suppress(OSError):
            assert self.sock is not None
            self.sock.shutdown(socket.SHUT_WR)

    def _read(self, sock: socket.socket) -> bool:
        """Read what the stream has; True at its end."""
        try:
            data = sock.recv(1 << 16)
        except BlockingIOError:
            return False
        except OSError:
            return True
        self.out.feed(data)
        return not data

    def _sample_cpu(self) -> None:
        # The engine forgets a container's CPU time when it exits, so it is sampled while
        # the job runs: cpu_ms misses at most the last interval's worth.
        self.next_stats = time.monotonic() + self.ex.stats_interval_s
        one_shot = True if docker.utils.version_gte(self.api.api_version, "1.41") else None
        try:
            stats = self.api.stats(self.handle.container, stream=False, one_shot=one_shot)
            used = stats["cpu_stats"]["cpu_usage"]["total_usage"]
            self.cpu_ms = max(self.cpu_ms, used / 1e6)
        except Exception:  # no figure this time; the job goes on
            pass

    def _exit_code(self) -> tuple[int | None, bool]:
        """The exit code and OOM flag, once the container has exited (its stream may end
        first: the node's wishes and the deadline still apply meanwhile)."""
        for tries in itertools.count():
            state = self.api.inspect_container(self.handle.container)["State"]
            if not state.get("Running"):
                code = state.get("ExitCode")
                return (code if isinstance(code, int) else None), bool(state.get("OOMKilled"))
            if select.select([self.handle.wake_r], [], [], 0.02 if tries < 25 else 0.5)[0]:
                _drain(self.handle.wake_r)
            self._obey()
            self._check_deadline()
        raise AssertionError("unreachable")


class _Streams:
    """Splits the attach stream into stdout and stderr, keeping each up to its cap."""

    def __init__(self, stdout_cap: int, stderr_cap: int) -> None:
        self.caps = {1: stdout_cap, 2: stderr_cap}
        self.kept = {1: bytearray(), 2: bytearray()}
        self.over = {1: False, 2: False}
        self.buf = bytearray()

    def feed(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= 8:
            # a frame: stream (1 stdout, 2 stderr), three zero bytes, big-endian size
            size = int.from_bytes(self.buf[4:8], "big")
            if len(self.buf) < 8 + size:
                return
            kind = 2 if self.buf[0] == 2 else 1
            room = self.caps[kind] - len(self.kept[kind])
            if size > room:
                self.over[kind] = True
            self.kept[kind] += self.buf[8 : 8 + min(size, max(0, room))]
            del self.buf[: 8 + size]

    def result(self) -> tuple[bytes, bytes]:
        err = bytes(self.kept[2])
        for kind, name in ((1, "stdout"), (2, "stderr")):
            if self.over[kind]:
                err += f"[deparrow: {name} truncated at {self.caps[kind]} bytes]\n".encode()
        return bytes(self.kept[1]), err


def _drain(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while sock.recv(4096):
            pass


def _unreachable(base_url: str, e: Exception) -> str:
    """The engine could not be reached: say where, and the root cause in a few words."""
    text = str(e)
    found = re.search(r"\[Errno \d+\] ([^'\")]+)", text)
    found = found or re.search(r"Error\(\d+, '([^']+)'", text)
    reason = found.group(1) if found else (text or type(e).__name__)
    if isinstance(e, requests.exceptions.Timeout):
        reason = "no answer in time"
    return (
        f"docker engine unreachable at {base_url}: {reason[:200]} (is Docker, or Podman's "
        "`podman system service`, running there? tools/install-podman.sh starts one)"
    )


def _finish(
    handle: _Handle,
    status: str,
    error: str | None,
    stdout: bytes = b"",
    stderr: bytes = b"",
    wall_ms: float = 0,
    cpu_ms: float = 0,
    exit_code: int | None = None,
) -> None:
    handle.state = "done"
    handle.outcome = {
        "status": status,
        "exit_code": exit_code,
        "stdout": stdout,
        "stderr": stderr,
        "returns": None,
        "error": error,
        "wall_ms": int(wall_ms),
        "cpu_ms": int(cpu_ms),
    }
    handle.wake_r.close()
    handle._wake_w.close()

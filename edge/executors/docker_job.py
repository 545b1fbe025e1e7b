"""One Docker job's thread (see edge/executors/docker.py): `ContainerJob` makes the container,
feeds its stdin, reads its output through `Streams` (stdout and stderr, each kept up to its cap),
applies the node's wishes (cancel, pause, resume) and the deadline, reads the exit code and
removes the container; then it leaves the outcome on the job's `Handle`.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import socket
import time
from typing import TYPE_CHECKING, Any

import docker
import requests

from edge.executors.docker_spec import (
    JOB_LABEL,
    NODE_LABEL,
    Handle,
    JobError,
    Spec,
    finish,
    unreachable,
)
from edge.executors.gpus import gpu_ids

if TYPE_CHECKING:
    from edge.executors.docker import DockerExecutor

_KILLED = 128 + 9  # exit code of a process ended by SIGKILL


class ContainerJob:
    """One job's thread: makes the container, feeds its stdin, reads its output, applies
    the node's wishes (cancel, pause, resume), kills it at the deadline (paused time does
    not count), reads its exit code and removes it."""

    def __init__(self, ex: DockerExecutor, handle: Handle, spec: Spec) -> None:
        self.ex, self.handle, self.spec = ex, handle, spec
        self.api: Any = None
        self.sock: socket.socket | None = None
        self.out = Streams(ex.stdout_cap, ex.stderr_cap)
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
            error = unreachable(self.ex.base_url, e)
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
            finish(self.handle, status, error, stdout, stderr, self.wall_ms, self.cpu_ms, code)

    def _contain(self) -> tuple[str, str | None, int | None]:
        api, handle, spec = self.api, self.handle, self.spec
        if handle.want_cancel:
            return "cancelled", None, None
        config = container_config(api, spec, self.ex.node, self.ex.gpu, bool(self.stdin))
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


def container_config(api: Any, spec: Spec, node: str, gpu: str, stdin: bool) -> dict[str, Any]:
    """The body of the engine's container create call for a job (`gpu`: the owner's style of
    GPU request, "nvidia" or "cdi"; see _device_requests)."""
    host = api.create_host_config(
        mounts=_mounts(spec.dirs),
        network_mode="bridge" if spec.network else "none",
        mem_limit=spec.memory_mb << 20,
        memswap_limit=spec.memory_mb << 20,  # no swap: the limit is the limit
        nano_cpus=int(spec.cpu * 1e9),
        pids_limit=spec.pids,
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        log_config={"type": "none"},  # output comes over the attach stream, capped
        device_requests=_device_requests(spec.gpus, gpu),
    )
    config: dict[str, Any] = api.create_container_config(
        spec.image,
        command=spec.command,
        entrypoint=spec.entrypoint,
        environment=spec.env,
        stdin_open=stdin,
        tty=False,
        labels={NODE_LABEL: node, JOB_LABEL: spec.job_id},
        host_config=host,
    )
    config["StdinOnce"] = stdin  # stdin's end closes the job's stdin
    return config


def _device_requests(
    gpus: list[dict[str, Any]], style: str
) -> list[docker.types.DeviceRequest] | None:
    """The container's request for exactly the job's GPUs (None: no GPU, and no request).

    "nvidia", the default, is what `docker run --gpus device=…` sends: Docker Engine hands it
    to the NVIDIA Container Toolkit's hook, so the toolkit must be on the host. "cdi" is what
    `docker run --device nvidia.com/gpu=…` sends: the engine applies the host's CDI spec, in
    Docker 25 and later (on by default from 28.2). `nvidia-ctk cdi generate` writes one naming
    each GPU by its index and by its UUID, as the node names them (gpus.gpu_ids). Capability
    "cdi" is what Docker 25's CDI driver matched requests on; later ones ignore it.

    Podman's Docker-compatible API (pkg/api/handlers/compat/containers_create.go) ignores
    device requests up to 5.3 (Debian 12 has 4.3); from 5.4 (containers/podman#25171) it takes
    those of driver "cdi", their device ids as CDI names as `podman run --device` does, and
    drops any other without a word. So on Podman only "cdi" gives a GPU, and only from 5.4;
    there a CDI name the host's spec lacks fails the container's creation. The job's
    NVIDIA_VISIBLE_DEVICES (docker_spec.py) is read by the toolkit's runtime or OCI hook
    where the engine runs one for every container."""
    if not gpus:
        return None
    ids = gpu_ids(gpus)
    if style == "cdi":
        return [
            docker.types.DeviceRequest(
                driver="cdi", device_ids=[f"nvidia.com/gpu={i}" for i in ids],
                capabilities=[["cdi"]],
            )
        ]  # fmt: skip
    return [docker.types.DeviceRequest(driver="nvidia", device_ids=ids, capabilities=[["gpu"]])]


def _mounts(dirs: list[dict[str, Any]]) -> list[docker.types.Mount]:
    """Bind mounts of the job's directories, read-only unless "write". Mounts rather than Binds:
    an engine makes a missing Binds source as an empty folder, and a Mount's is an error; the
    node says first which of its directories is missing, as the wasm engines do."""
    out = []
    for d in dirs:
        if not os.path.isdir(d["host"]):
            raise JobError(f"executor error: cannot open the job's directory {d['host']}")
        out.append(
            docker.types.Mount(
                d["guest"], d["host"], type="bind", read_only=not d.get("write", False)
            )
        )
    return out


class Streams:
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

"""A Docker job as the executor (edge/executors/docker.py) takes it in: the job dict checked
into a `Spec`, the `Handle` the node's loop holds while it runs, and the outcome `finish` leaves
on it. Errors that end a job are `JobError`s; `unreachable` words the engine being out of reach.

A job's "dirs" (edge/core/jobfiles.py, `check_dirs`) become bind mounts at their guest paths,
read-only unless "write" is true. The host paths are this machine's, so the engine must run
here (a local Docker or Podman service). They are mounted as they are, without an SELinux
relabel (`:z` would change the labels of the node's own folders): none is needed where SELinux
is off, as on Debian; on an enforcing host a container cannot read them.

A job's "gpus" (edge/executors/gpus.py) become a device request of the container
(docker_job.py) and its NVIDIA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from typing import Any

import requests

from edge.core import jobfiles, protocol
from edge.executors.gpus import NVIDIA_VISIBLE_DEVICES, gpu_ids, gpus_problem

NODE_LABEL = "deparrow.node"
JOB_LABEL = "deparrow.job"
MIN_MEMORY_MB = 6  # the engines refuse less
# the engine's own mounts: a job's directory may not go over them (nor over the image's root)
ENGINE_MOUNTS = ("/proc", "/sys", "/dev")

Outcome = dict[str, Any]


class JobError(Exception):
    """Ends a job with status "failed"; the message starts with one of the error kinds."""


class Spec:
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
        problem = gpus_problem(job.get("gpus"))
        if problem:
            raise JobError(f"invalid job: {problem}")
        self.gpus: list[dict[str, Any]] = list(job.get("gpus") or [])
        # NVIDIA_VISIBLE_DEVICES is the node's: the container toolkit gives a container the GPUs
        # it names (where the engine runs the toolkit's runtime or hook for every container),
        # so a job setting it, or an image (nvidia/cuda has "all"), could take GPUs it was not
        # given. A job without GPUs gets "void": no GPU and no driver. CUDA_VISIBLE_DEVICES is
        # not set: in the container the toolkit shows only the job's GPUs, renumbered from 0,
        # so the host's indices would name the wrong ones (or none).
        visible = ",".join(gpu_ids(self.gpus)) or "void"
        self.env = [f"{k}={v}" for k, v in env.items() if k != NVIDIA_VISIBLE_DEVICES]
        self.env.append(f"{NVIDIA_VISIBLE_DEVICES}={visible}")
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
        self.dirs: list[dict[str, Any]] = _dirs(job.get("dirs"))


def _dirs(dirs: Any) -> list[dict[str, Any]]:
    """The job's directories, checked: [{"host", "guest", "write"}] (see jobfiles.check_dirs)."""
    problem = jobfiles.check_dirs(dirs)
    if problem:
        raise JobError(f"invalid job: {problem}")
    for i, d in enumerate(dirs or []):
        guest = d["guest"]
        if guest == "/" or any(guest == m or guest.startswith(m + "/") for m in ENGINE_MOUNTS):
            raise JobError(
                f"invalid job: dirs[{i}].guest {guest!r} is the container's own (/, "
                f"{', '.join(ENGINE_MOUNTS)}): mount it elsewhere, such as /inputs"
            )
    return list(dirs or [])


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


class Handle:
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


def finish(
    handle: Handle,
    status: str,
    error: str | None,
    stdout: bytes = b"",
    stderr: bytes = b"",
    wall_ms: float = 0,
    cpu_ms: float = 0,
    exit_code: int | None = None,
) -> None:
    handle.state = "done"
    handle.outcome = protocol.outcome(
        status, error, stdout, stderr, int(wall_ms), int(cpu_ms), exit_code
    )
    handle.wake_r.close()
    handle._wake_w.close()


def unreachable(base_url: str, e: Exception) -> str:
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

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

A job's "dirs" are bind-mounted at their guest paths, read-only unless "write" is true. A job's
"gpus" (edge/executors/gpus.py) are given to its container by a device request for exactly
those GPUs, in the style the owner chose (`gpu`: "nvidia" for the NVIDIA Container Toolkit,
"cdi" for a CDI spec; docker_job._device_requests says which engine takes which).

The job dict, its handle and outcome are in docker_spec.py; the job's thread, which talks to
the engine, is in docker_job.py.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import docker
import requests

from edge.executors.docker_job import ContainerJob
from edge.executors.docker_spec import (
    JOB_LABEL,
    MIN_MEMORY_MB,
    NODE_LABEL,
    Handle,
    JobError,
    Outcome,
    Spec,
    finish,
    unreachable,
)

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_TIMEOUT_S",
    "GPU_STYLES",
    "JOB_LABEL",
    "MIN_MEMORY_MB",
    "NODE_LABEL",
    "DockerExecutor",
    "JobError",
    "Outcome",
]

DEFAULT_BASE_URL = "unix:///run/podman/podman.sock"
DEFAULT_TIMEOUT_S = 60.0
GPU_STYLES = ("nvidia", "cdi")


class DockerExecutor:
    """submit/poll/cancel/suspend/resume container jobs on a Docker-API engine."""

    engines = ("docker",)
    takes_files = True  # a job's "dirs" are bind mounts (docker_spec.py)

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
        gpu: str = "nvidia",
    ) -> None:
        if gpu not in GPU_STYLES:
            raise ValueError(f"gpu must be one of {', '.join(GPU_STYLES)}, not {gpu!r}")
        self.gpu = gpu  # how a GPU job's container asks for its GPUs (docker_job._device_requests)
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
        self.handles: list[Handle] = []
        self.closed = False
        self._version: str | None = None  # the engine's API version, once negotiated

    # -- the interface -------------------------------------------------------------------
    def submit(self, job: dict[str, Any]) -> Handle:
        if self.closed:
            raise RuntimeError("executor is closed")
        self.handles = [h for h in self.handles if h.outcome is None]
        handle = Handle(str(job.get("job_id") or "job"))
        try:
            spec = Spec(job, self.defaults)
            if spec.network and not self.allow_network:
                raise JobError(
                    "network not allowed: the job asks for network access and this node's "
                    "owner does not allow it (run the job without network, or on another node)"
                )
        except JobError as e:
            finish(handle, "failed", str(e))
            return handle
        handle.thread = threading.Thread(
            target=ContainerJob(self, handle, spec).run, name=f"docker-{spec.job_id}", daemon=True
        )
        self.handles.append(handle)
        handle.thread.start()
        return handle

    def poll(self, handle: Handle) -> Outcome | None:
        if handle.outcome is not None and handle in self.handles:
            self.handles.remove(handle)
        return handle.outcome

    def cancel(self, handle: Handle) -> None:
        """Kill the job's container; poll() then returns status "cancelled"."""
        if handle.outcome is None:
            handle.want_cancel = True
            handle.wake()

    def job_pids(self) -> list[int]:
        """Host pids of running containers' first processes (their children are found by
        the idle monitor), so their CPU counts as this node's, not the owner's."""
        return [h.pid for h in self.handles if h.pid and h.outcome is None]

    def suspend(self, handle: Handle) -> None:
        """Freeze the job's processes (container pause); its timeout clock stops too."""
        if handle.outcome is None:
            handle.want_paused = True
            handle.wake()

    def resume(self, handle: Handle) -> None:
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
            raise JobError(unreachable(self.base_url, e)) from None
        finally:
            api.close()

    # -- the job's thread ----------------------------------------------------------------
    def _api(self) -> Any:
        try:
            api = docker.APIClient(
                base_url=self.base_url, version=self._version or "auto", timeout=self.api_timeout_s
            )
        except docker.errors.DockerException as e:
            raise JobError(unreachable(self.base_url, e)) from None
        self._version = api.api_version
        return api

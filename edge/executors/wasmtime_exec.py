"""The wasmtime executor, for full machines: the same jobs, interface and outcomes as the wasm3
executor, with wasmtime's Cranelift JIT instead of an interpreter (fib(30): ~13 ms against
~70 ms in wasm3). The node's owner chooses it in the node's preferences; it needs the optional
dependency (`pip install 'deparrow[full]'`), and says so when it is missing.

Everything on the node's side is the wasm3 executor's: a queue, reusable worker processes
SIGKILLed at the job's wall-clock timeout, SIGSTOP/SIGCONT for suspend/resume, recycling after
`jobs_per_worker` jobs, output files the node reads even after a kill, the same frames on the
same pipes. Only the worker differs (`wasmtime_worker.py`), so this module subclasses
`Wasm3Executor` and starts a different worker program. Workers are reused rather than fresh
per job because a wasmtime worker takes ~100 ms to start (Python plus wasmtime's bindings)
and a small job runs in about a millisecond; a reused worker also keeps compiled modules.
Nothing here imports wasmtime: only the workers load it.
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Any

from edge.core import jobfiles
from edge.executors.wasm3 import Wasm3Executor, _Handle
from edge.executors.workerproc import _PKG_ROOT, WorkerProcess

WORKER_MODULE = "edge.executors.wasmtime_worker"
MAX_TIMEOUT_S = 7 * 86400
MAX_MEMORY_MB = 1024 * 1024  # as edge/core/jobs.py allows; a wasm32 memory stops at 4 GiB anyway


class WasmtimeUnavailable(RuntimeError):
    """The optional wasmtime package is not installed on this node."""


def available() -> bool:
    """Whether the wasmtime package is installed (found without being imported)."""
    try:
        return importlib.util.find_spec("wasmtime") is not None
    except (ImportError, ValueError):
        return False


_worker_argv: tuple[list[str], list[str]] | None = None


def _worker_command() -> tuple[list[str], list[str]]:
    """Interpreter flags and PYTHONPATH entries for a worker: `-S` with explicit paths to edge
    and to wasmtime, so a worker does not pay for site and an editable install's finder."""
    global _worker_argv
    if _worker_argv is None:
        paths, flags = [_PKG_ROOT], []
        spec = importlib.util.find_spec("wasmtime")
        if spec is not None and spec.origin and os.path.isfile(spec.origin):
            # wasmtime is a package: its parent folder goes on the path
            paths.append(os.path.dirname(os.path.dirname(spec.origin)))
            flags = ["-S"]
        _worker_argv = (flags, paths)
    return _worker_argv


class WasmtimeWorker(WorkerProcess):
    """A worker process running `wasmtime_worker.py`; pipes, output files, kill and reap are
    `WorkerProcess`'s. (Its __init__ is the parent's with another program: the parent names
    the wasm3 worker and has no parameter for it.)"""

    def __init__(self) -> None:
        super().__init__(WORKER_MODULE, _worker_command(), pin_mmap=False)


def check_job(job: Any) -> str | None:
    """What is wrong with a job dict, or None. The node checks assignments already
    (edge/core/jobs.py); this guards direct callers (`edge-run`, tests, other executors' code)."""
    if not isinstance(job, dict):
        return "a job must be a dict"
    if not isinstance(job.get("module"), (bytes, bytearray)):
        return "module must be bytes (the .wasm file's contents)"
    entry = job.get("entrypoint") or "_start"
    if not isinstance(entry, str):
        return "entrypoint must be a string"
    args = job.get("args") or []
    if not isinstance(args, list) or not all(isinstance(a, str) and "\0" not in a for a in args):
        return "args must be a list of strings (without NUL characters)"
    env = job.get("env") or {}
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and k and "=" not in k and "\0" not in k + v
        for k, v in env.items()
    ):
        return "env must map names (without '=') to strings"
    if not isinstance(job.get("stdin") or b"", (bytes, bytearray)):
        return "stdin must be bytes"
    gas = job.get("gas")
    if gas is not None and (
        isinstance(gas, bool) or not isinstance(gas, int) or not 0 < gas < 1 << 63
    ):
        return "gas must be a positive whole number"
    for key, top in (("timeout_s", MAX_TIMEOUT_S), ("memory_mb", MAX_MEMORY_MB)):
        value = job.get(key)
        if value is None:
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or not 0 < value <= top
        ):
            return f"{key} must be a number above 0 and at most {top}"
    return jobfiles.check_dirs(job.get("dirs"))


class WasmtimeExecutor(Wasm3Executor):
    """submit/poll/cancel/suspend/resume jobs on up to `workers` wasmtime worker processes."""

    engines = ("wasm",)
    takes_files = True  # a job's "dirs" are its WASI preopens

    def __init__(
        self,
        workers: int = 1,
        jobs_per_worker: int = 200,
        memory_mb_default: int = 64,
        stdout_cap: int = 1 << 20,
        stderr_cap: int = 64 << 10,
    ) -> None:
        if not available():
            raise WasmtimeUnavailable(
                "the wasmtime engine is not installed on this node: install it with "
                "`pip install 'deparrow[full]'`, or choose the wasm3 engine in the node's "
                "preferences"
            )
        # A wasmtime worker leaks nothing per job (unlike wasm3), so it is recycled less often.
        super().__init__(workers, jobs_per_worker, memory_mb_default, stdout_cap, stderr_cap)

    def submit(self, job: dict[str, Any]) -> _Handle:
        problem = check_job(job)
        if problem is None:
            return super().submit(job)  # type: ignore[no-any-return]
        if self.closed:
            raise RuntimeError("executor is closed")
        handle = _Handle(job if isinstance(job, dict) else {})
        self._finish(handle, "failed", "invalid job: " + problem, b"", b"", 0, 0)
        return handle

    def _worker_fields(self, job: dict[str, Any]) -> dict[str, Any]:
        return {"dirs": list(job.get("dirs") or [])}

    def _new_worker(self) -> WorkerProcess:
        return WasmtimeWorker()

"""The node owner's preferences (`edge-run --config FILE`): checked key by key, and turned
into the executors the node offers. docs/edge.md lists the keys. CPython nodes only."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

PREFERENCE_KEYS = ("idle", "always_run", "wasm_engine", "docker", "native", "files", "max_jobs")
MAX_SLOTS = 256  # jobs at once on one node, at most (the protocol's bound)


def check_preferences(prefs: dict[str, Any]) -> None:
    """ValueError naming the first bad key of the preferences (docs/edge.md lists them)."""
    from edge.idle import Preferences

    for key in prefs:
        if key not in PREFERENCE_KEYS:
            raise ValueError(f"{key!r} is not a preference; known: {', '.join(PREFERENCE_KEYS)}")
    Preferences.from_dict(prefs.get("idle"), where="idle")
    if not isinstance(prefs.get("always_run", False), bool):
        raise ValueError("always_run must be true or false")
    jobs = prefs.get("max_jobs")
    if jobs is not None and (
        isinstance(jobs, bool) or not isinstance(jobs, int) or not 1 <= jobs <= MAX_SLOTS
    ):
        raise ValueError(
            f"max_jobs must be a whole number from 1 to {MAX_SLOTS} or null, got {jobs!r}"
        )
    if prefs.get("wasm_engine", "wasm3") not in ("wasm3", "wasmtime", "wasm3-run"):
        raise ValueError('wasm_engine must be "wasm3", "wasmtime" or "wasm3-run"')
    for section, allowed in (
        ("docker", ("enabled", "url", "allow_network", "gpu")),
        ("native", ("enabled", "allow_network", "allow_unsandboxed")),
    ):
        value = prefs.get(section, {})
        if not isinstance(value, dict):
            raise ValueError(f'{section} must be an object like {{"enabled": true}}')
        for key, item in value.items():
            if key not in allowed:
                raise ValueError(
                    f"{section}.{key} is not a preference; known: {', '.join(allowed)}"
                )
            if key not in ("url", "gpu") and not isinstance(item, bool):
                raise ValueError(f"{section}.{key} must be true or false")
        if "url" in value and not isinstance(value["url"], str):
            raise ValueError(f"{section}.url must be a string like unix:///run/podman/podman.sock")
        if value.get("gpu", "nvidia") not in ("nvidia", "cdi"):
            raise ValueError(
                f'{section}.gpu must be "nvidia" (the NVIDIA Container Toolkit) or "cdi" (a CDI '
                "spec, as Podman needs)"
            )
    check_files(prefs.get("files", {}))


FILE_KEYS = ("enabled", "max_input_bytes", "max_output_bytes", "max_output_files")


def check_files(value: Any) -> None:
    """The "files" section: whether file jobs run here, and the caps on them."""
    from edge.core import jobfiles

    if not isinstance(value, dict):
        raise ValueError('files must be an object like {"max_output_bytes": 1048576}')
    for key in value:
        if key not in FILE_KEYS:
            raise ValueError(f"files.{key} is not a preference; known: {', '.join(FILE_KEYS)}")
    if not isinstance(value.get("enabled", True), bool):
        raise ValueError("files.enabled must be true or false")
    jobfiles.limits(value)  # ValueError naming a bad cap


def slots(prefs: dict[str, Any], usable_cores: int) -> int:
    """How many jobs the node runs at once: the owner's `max_jobs`, else one per usable core
    (the idle preferences' max_cores). Each job still gets only the CPU it asked for."""
    jobs = prefs.get("max_jobs")
    return max(1, min(MAX_SLOTS, int(jobs) if jobs else usable_cores))


def build_executors(config: dict[str, Any], warn: Callable[[str], None]) -> Any:
    """The node's executors from its preferences: wasm always, docker and native when the
    owner turned them on. A docker engine that does not answer is left out with a warning.
    config["slots"]: jobs at once, so the wasm executors keep that many workers."""
    from edge.executors.router import ExecutorRouter

    prefs = config.get("preferences") or {}
    workers = int(config.get("slots") or 1)
    executors: dict[str, Any] = {}
    if prefs.get("wasm_engine") == "wasmtime":
        try:
            from edge.executors.wasmtime_exec import WasmtimeExecutor

            executors["wasm"] = WasmtimeExecutor(workers=workers)
        except (ImportError, RuntimeError) as e:  # WasmtimeUnavailable: not installed here
            warn(f"wasmtime unavailable ({e}); using wasm3")
    if prefs.get("wasm_engine") == "wasm3-run":  # the runner MicroPython nodes use
        from edge.executors.wasm3_cli import Wasm3CliExecutor

        try:
            from edge.node_config import default_data_dir

            workdir = Path(str(config.get("data_dir") or default_data_dir())) / "jobs"
            workdir.mkdir(parents=True, exist_ok=True)
            executors["wasm"] = Wasm3CliExecutor(str(workdir))
        except (OSError, RuntimeError) as e:  # not built: tools/build-wasm3-runner.sh
            warn(f"wasm3-run unavailable ({e}); using wasm3")
    for_files: dict[str, Any] = {}
    if "wasm" not in executors:
        from edge.executors.deferred import Deferred

        # made at the first wasm job: the node goes online without the executor's modules
        executors["wasm"] = Deferred(lambda: _wasm3(workers), ("wasm",))
        # pywasm3's WASI has no files; wasm3-run's (edge/native, in C) has: file jobs go
        # there, the others stay on the warm worker (0.9 ms a small job against ~5 ms for
        # a runner process; docs/jobs.md)
        runner = _file_runner(config, warn)
        if runner is not None:
            for_files["wasm"] = runner
    docker = prefs.get("docker") or {}
    if docker.get("enabled"):
        ex = _docker_executor(docker, str(config["node_id"]), warn)
        if ex is not None:
            executors["docker"] = ex
    native = prefs.get("native") or {}
    if native.get("enabled"):
        from edge.executors.native import NativeDisabled, NativeExecutor, SandboxUnavailable

        try:
            executors["native"] = NativeExecutor(
                enabled=True,
                allow_network=bool(native.get("allow_network")),
                allow_unsandboxed=bool(native.get("allow_unsandboxed")),
                max_jobs=workers,  # as many at once as the node's slots
            )
        except (NativeDisabled, SandboxUnavailable) as e:
            warn(f"native jobs off: {e}")
    return ExecutorRouter(executors, for_files)


def _wasm3(workers: int) -> Any:
    from edge.executors.wasm3 import Wasm3Executor

    return Wasm3Executor(workers=workers)


def _file_runner(config: dict[str, Any], warn: Callable[[str], None]) -> Any:
    """wasm3-run for the wasm jobs with files, or None (with a warning) where it is not built
    or the owner turned file jobs off."""
    files = (config.get("preferences") or {}).get("files") or {}
    if files.get("enabled") is False:
        return None
    from edge.executors.wasm3_cli import Wasm3CliExecutor
    from edge.node_config import default_data_dir

    try:
        workdir = Path(str(config.get("data_dir") or default_data_dir())) / "jobs"
        workdir.mkdir(parents=True, exist_ok=True)
        return Wasm3CliExecutor(str(workdir))
    except (OSError, RuntimeError) as e:  # RunnerMissing: tools/build-wasm3-runner.sh
        warn(
            f"no file jobs on wasm3: {e} (build it with `make edge-native`, or set"
            ' "wasm_engine": "wasmtime" with deparrow[full])'
        )
        return None


def _docker_executor(docker: dict[str, Any], node_id: str, warn: Callable[[str], None]) -> Any:
    """The docker executor, or None (with a warning saying why) when the Docker SDK is not
    installed (it comes with deparrow[full]) or the engine does not answer."""
    try:
        from edge.executors.docker import DockerExecutor, JobError
    except ImportError as e:
        warn(
            f"docker jobs off: the Docker SDK is not installed ({e}); pip install 'deparrow[full]'"
        )
        return None
    ex = DockerExecutor(docker.get("url"), allow_network=bool(docker.get("allow_network")),
                        node=node_id, gpu=docker.get("gpu", "nvidia"))  # fmt: skip
    try:
        ex.remove_leftovers()  # also checks that the engine answers
        return ex
    except JobError as e:
        ex.close()
        warn(f"docker jobs off: {e}")
        return None

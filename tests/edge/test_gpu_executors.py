"""GPU jobs on the docker and native executors, on a machine without a GPU.

docker: the container create call a GPU job makes carries a device request for exactly its
GPUs, in the owner's style, and the real engine (Podman's Docker API, started as in
test_docker_executor.py) runs the job with NVIDIA_VISIBLE_DEVICES naming them. Podman drops a
device request of driver "nvidia" (docker_job._device_requests says which engine takes what),
so that job runs here, without a GPU, and shows what it was told.

native: real bubblewrap binds the device files of exactly the job's GPUs; a folder of stand-in
files plays the host's /dev (NativeExecutor's dev_dir). tools/gpu-check.sh is the same path on
a machine with a real GPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.executors.docker import DockerExecutor
from edge.executors.docker_job import container_config
from edge.executors.docker_spec import JobError, Spec
from edge.executors.native import NativeExecutor
from edge.preferences import build_executors, check_preferences
from tests.edge.test_docker_executor import BASE_URL, api, node, sh  # noqa: F401

GPU0 = {"index": 0, "uuid": "GPU-test"}
SHOW_DOCKER = 'echo "$NVIDIA_VISIBLE_DEVICES ${CUDA_VISIBLE_DEVICES-unset}"'
SHOW_VARS = 'echo "${CUDA_VISIBLE_DEVICES-unset} ${NVIDIA_VISIBLE_DEVICES-unset}"'


def spec_defaults() -> dict[str, Any]:
    return {"timeout_s": 10, "memory_mb": 64, "cpu": 1, "pids": 64}


# -- docker ---------------------------------------------------------------------------------
def test_docker_gpu_job_asks_the_engine_for_exactly_its_gpus(
    api: Any,  # noqa: F811 (the podman fixtures)
    node: str,  # noqa: F811
) -> None:
    gpus = [GPU0, {"index": 2, "uuid": None}]  # no UUID known: the index names it
    spec = Spec(sh("true", gpus=gpus, env={"NVIDIA_VISIBLE_DEVICES": "all"}), spec_defaults())
    config = container_config(api, spec, node, "nvidia", stdin=False)
    assert config["HostConfig"]["DeviceRequests"] == [
        {"Driver": "nvidia", "Count": 0, "DeviceIDs": ["GPU-test", "2"],
         "Capabilities": [["gpu"]], "Options": {}}
    ]  # fmt: skip
    # the node's value, not the job's; no CUDA_VISIBLE_DEVICES (host numbers, wrong in there)
    assert [e for e in config["Env"] if "VISIBLE_DEVICES" in e] == [
        "NVIDIA_VISIBLE_DEVICES=GPU-test,2"
    ]
    config = container_config(api, spec, node, "cdi", stdin=False)
    assert config["HostConfig"]["DeviceRequests"] == [
        {"Driver": "cdi", "Count": 0, "DeviceIDs": ["nvidia.com/gpu=GPU-test", "nvidia.com/gpu=2"],
         "Capabilities": [["cdi"]], "Options": {}}
    ]  # fmt: skip
    assert "NVIDIA_VISIBLE_DEVICES=GPU-test,2" in config["Env"]
    # no GPUs: no request, and no GPU for a toolkit that would give one to every container
    plain = Spec(sh("true", env={"NVIDIA_VISIBLE_DEVICES": "all"}), spec_defaults())
    config = container_config(api, plain, node, "cdi", stdin=False)
    assert "DeviceRequests" not in config["HostConfig"]
    assert [e for e in config["Env"] if "VISIBLE_DEVICES" in e] == ["NVIDIA_VISIBLE_DEVICES=void"]


def test_docker_gpu_job_runs_with_its_gpus_named(node: str) -> None:  # noqa: F811
    with DockerExecutor(base_url=BASE_URL, node=node, gpu="nvidia") as ex:
        out = ex.run(sh(SHOW_DOCKER, gpus=[GPU0], env={"NVIDIA_VISIBLE_DEVICES": "all"}))
        assert (out["status"], out["stdout"]) == ("completed", b"GPU-test unset\n"), out
        # a job without GPUs cannot name any for itself
        out = ex.run(sh(SHOW_DOCKER, env={"NVIDIA_VISIBLE_DEVICES": "all"}))
        assert (out["status"], out["stdout"]) == ("completed", b"void unset\n"), out


@pytest.mark.parametrize(
    ("gpus", "words"),
    [
        ({"index": 0}, "gpus must be a list of at most 64 GPUs"),
        ([0], "gpus[0] must be an object like"),
        ([{"uuid": "GPU-a"}], "gpus[0].index must be a whole number from 0 to 1023"),
        ([{"index": True}], "gpus[0].index must be a whole number"),
        ([{"index": -1}], "gpus[0].index must be a whole number"),
        ([{"index": 0, "uuid": "GPU-a,GPU-b"}], "gpus[0].uuid must be null or a GPU's UUID"),
        ([{"index": 0, "uuid": 7}], "gpus[0].uuid must be null or a GPU's UUID"),
        ([GPU0, {"index": 0, "uuid": "GPU-b"}], "gpus[1]: GPU 0 is given twice"),
    ],
)
def test_invalid_gpus_fail_the_job(gpus: Any, words: str) -> None:
    with pytest.raises(JobError) as e:
        Spec(sh("true", gpus=gpus), spec_defaults())
    assert str(e.value).startswith("invalid job: " + words), e.value
    ex = native_executor()
    out = ex.poll(ex.submit({"job_id": "n", "command": ["true"], "gpus": gpus}))
    assert out is not None and out["status"] == "failed", out
    assert out["error"].startswith("invalid job: " + words), out["error"]


def test_the_owner_chooses_the_docker_gpu_style(node: str) -> None:  # noqa: F811
    check_preferences({"docker": {"enabled": True, "gpu": "cdi"}})
    check_preferences({"docker": {"enabled": True, "gpu": "nvidia"}})
    for bad in ("amd", True, None):
        with pytest.raises(ValueError) as e:
            check_preferences({"docker": {"enabled": True, "gpu": bad}})
        assert str(e.value).startswith('docker.gpu must be "nvidia" (the NVIDIA Container'), e
    with pytest.raises(ValueError, match=r"native\.gpu is not a preference"):
        check_preferences({"native": {"gpu": "cdi"}})
    with pytest.raises(ValueError, match=r"gpu must be one of nvidia, cdi, not 'amd'"):
        DockerExecutor(base_url=BASE_URL, node=node, gpu="amd")
    config = {"node_id": node, "preferences": {"docker": {"enabled": True, "url": BASE_URL,
                                                          "gpu": "cdi"}}}  # fmt: skip
    warnings: list[str] = []
    with build_executors(config, warn=warnings.append) as router:
        assert "docker" in router.by_engine, warnings
        assert router.by_engine["docker"].gpu == "cdi"


# -- native ---------------------------------------------------------------------------------
_NATIVE: list[NativeExecutor] = []


def native_executor(**options: Any) -> NativeExecutor:
    if not shutil.which("bwrap"):
        pytest.fail("bwrap not installed: run tools/install-bubblewrap.sh (Debian: bubblewrap)")
    ex = NativeExecutor(enabled=True, **options)
    _NATIVE.append(ex)
    return ex


@pytest.fixture(autouse=True)
def _close_native() -> Iterator[None]:
    yield
    while _NATIVE:
        _NATIVE.pop().close()


@pytest.fixture
def dev_dir() -> Iterator[Path]:
    """A stand-in for the host's /dev: two GPUs' device files and the driver's control node,
    as regular files, in a folder the jobs' user (nobody) can pass through, for bwrap; and
    beside it, gpus/, a stand-in for the driver's /proc/driver/nvidia/gpus (empty)."""
    base = Path(tempfile.mkdtemp(prefix="deparrow-dev-"))
    try:
        base.chmod(0o755)
        for name in ("nvidia0", "nvidia1", "nvidiactl"):
            (base / name).write_text(f"stand-in {name}\n")
            (base / name).chmod(0o644)
        (base / "gpus").mkdir()
        yield base
    finally:
        shutil.rmtree(base)


def gpu_executor(dev_dir: Path) -> NativeExecutor:
    return native_executor(dev_dir=str(dev_dir), gpu_info_dir=str(dev_dir / "gpus"))


def native_job(script: str, **extra: Any) -> dict[str, Any]:
    return {"job_id": "n", "command": ["sh", "-c", script], "timeout_s": 10, **extra}


SHOW_NATIVE = SHOW_VARS + "; ls /dev | grep nvidia; cat /dev/nvidia0; ls /sys | grep -c . ; true"


def test_native_gpu_job_gets_exactly_its_gpus_devices(
    dev_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the node's own environment names GPUs: no job may inherit that
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", "all")
    ex = gpu_executor(dev_dir)
    out = ex.run(native_job(SHOW_NATIVE, gpus=[GPU0], env={"CUDA_VISIBLE_DEVICES": "1"}))
    assert out["status"] == "completed", out
    lines = out["stdout"].decode().splitlines()
    # GPU 0's file and the control node, and not GPU 1's; the host's file behind it; sysfs
    assert lines[:4] == ["GPU-test GPU-test", "nvidia0", "nvidiactl", "stand-in nvidia0"], out
    assert int(lines[4]) > 0, out
    # by index where the node knows no UUID
    out = ex.run(native_job("echo $CUDA_VISIBLE_DEVICES $CUDA_DEVICE_ORDER; ls /dev/nvidia1",
                            gpus=[{"index": 1}]))  # fmt: skip
    assert out["stdout"] == b"1 PCI_BUS_ID\n/dev/nvidia1\n", out
    # a job without GPUs: neither variable (not the node's, not its own), no device, no sysfs
    out = ex.run(native_job(SHOW_NATIVE, env={"CUDA_VISIBLE_DEVICES": "0"}))
    assert out["status"] == "completed", out
    assert out["stdout"] == b"unset unset\n0\n", out


def test_a_native_gpu_jobs_memory_cap_is_its_data_not_its_address_space(dev_dir: Path) -> None:
    """CUDA reserves terabytes of address space: a GPU job is capped by RLIMIT_DATA instead."""
    ex = gpu_executor(dev_dir)
    show = "grep -E 'Max (address space|data size)' /proc/self/limits | tr -s ' '"
    capped = str(64 * 1024 * 1024)
    out = ex.run(native_job(show, gpus=[GPU0], memory_mb=64))
    assert out["status"] == "completed", out
    assert [line.strip() for line in out["stdout"].decode().splitlines()] == [
        f"Max data size {capped} {capped} bytes",
        "Max address space unlimited unlimited bytes",
    ], out
    out = ex.run(native_job(show, memory_mb=64))  # without a GPU: the address space, as before
    assert out["stdout"].decode().splitlines()[1].startswith("Max address space " + capped), out


def test_native_gpu_device_file_by_the_drivers_minor_number(dev_dir: Path) -> None:
    """NVML's index (PCI order) and the device file's minor number (the driver's order) may
    differ: the driver's page of the GPU with the job's UUID says which file is its."""
    page = dev_dir / "gpus" / "0000:41:00.0"
    page.mkdir()
    (page / "information").write_text(
        "Model: \t\t NVIDIA H100\nIRQ:   \t\t 180\nGPU UUID: \t GPU-test\n"
        "Bus Location: \t 0000:41:00.0\nDevice Minor: \t 1\n"
    )
    ex = gpu_executor(dev_dir)
    out = ex.run(native_job("ls /dev | grep nvidia; cat /dev/nvidia1", gpus=[GPU0]))
    assert out["stdout"] == b"nvidia1\nnvidiactl\nstand-in nvidia1\n", out


def test_native_gpu_without_its_device_file_is_the_nodes_error(dev_dir: Path) -> None:
    ex = gpu_executor(dev_dir)
    out = ex.run(native_job("true", gpus=[{"index": 3, "uuid": "GPU-gone"}]))
    assert (out["status"], out["exit_code"]) == ("failed", None), out
    assert out["error"] == f"executor error: GPU 3 has no device file {dev_dir}/nvidia3"
    assert ex.run(native_job("echo next"))["stdout"] == b"next\n"  # the next job starts


def test_unsandboxed_native_gpu_job_gets_the_variables(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without bwrap
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with NativeExecutor(enabled=True, allow_unsandboxed=True) as bare:
        assert bare.bwrap is None
        out = bare.run(native_job(SHOW_VARS, gpus=[GPU0, {"index": 1, "uuid": "GPU-b"}]))
        assert out["stdout"] == b"GPU-test,GPU-b GPU-test,GPU-b\n", out
        out = bare.run(native_job(SHOW_VARS))
        assert out["stdout"] == b"unset unset\n", out


def test_gpu_check_script_says_skip_without_a_gpu(tmp_path: Path) -> None:
    """tools/gpu-check.sh where NVML finds no GPU (an nvidia-smi that says so, as the real one
    does on a machine without one) and, on a machine without NVIDIA's tools, where there is no
    nvidia-smi: exit 2 and the SKIP line, before it starts anything."""
    script = Path(__file__).resolve().parents[2] / "tools" / "gpu-check.sh"
    assert os.access(script, os.X_OK), f"{script} is not executable"
    (tmp_path / "nvidia-smi").write_text("#!/bin/sh\necho 'No devices were found'\nexit 6\n")
    (tmp_path / "nvidia-smi").chmod(0o755)
    paths = [f"{tmp_path}:{os.environ['PATH']}"]
    if shutil.which("nvidia-smi") is None:
        paths.append(os.environ["PATH"])
    for path in paths:
        env = {**os.environ, "PATH": path}
        done = subprocess.run([str(script)], capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == 2, done
        assert done.stdout.splitlines()[-1] == "gpu-check: SKIP no GPU", done.stdout

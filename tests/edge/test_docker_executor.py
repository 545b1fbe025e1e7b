"""The Docker executor against a real engine: Podman's Docker-compatible service, started (and
the test image built) by tools/install-podman.sh when nothing answers on its socket.

Every test checks afterwards that the containers it made are gone.
"""

from __future__ import annotations

import functools
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import psutil
import pytest

from edge.executors.docker import (
    DEFAULT_BASE_URL,
    JOB_LABEL,
    NODE_LABEL,
    DockerExecutor,
    JobError,
)

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "tools" / "install-podman.sh"
BASE_URL = os.environ.get("DOCKER_HOST") or DEFAULT_BASE_URL
IMAGE = "localhost/deparrow/busybox:latest"  # built by tools/install-podman.sh

# On a fresh machine the first test's setup installs Podman (apt-get), which can take minutes.
pytestmark = pytest.mark.timeout(600)


def _ready(api: Any) -> bool:
    try:
        return bool(api.ping()) and bool(api.images(name=IMAGE))
    except Exception:
        return False


@pytest.fixture(scope="session")
def api() -> Iterator[Any]:
    """A client of the engine, which answers and has the test image (installed if not)."""
    client = docker.APIClient(base_url=BASE_URL, version="auto") if _can_connect() else None
    if client is None or not _ready(client):
        done = subprocess.run([str(INSTALL)], capture_output=True, text=True, timeout=580)
        if done.returncode:
            pytest.fail(
                f"{INSTALL.name} failed (exit {done.returncode}); the Docker executor tests run "
                f"against a real Podman service and are never skipped:\n{done.stderr[-2000:]}"
            )
        client = docker.APIClient(base_url=BASE_URL, version="auto")
        if not _ready(client):
            pytest.fail(f"{INSTALL.name} ran, yet {BASE_URL} has no answer or no {IMAGE}")
    yield client
    client.close()


def _can_connect() -> bool:
    try:
        docker.APIClient(base_url=BASE_URL, version="auto").close()
        return True
    except docker.errors.DockerException:
        return False


@pytest.fixture
def node(api: Any) -> Iterator[str]:
    """A node label of this test's own; no container of it may be left at the end."""
    name = "test-" + uuid.uuid4().hex[:12]
    yield name
    left = api.containers(all=True, filters={"label": f"{NODE_LABEL}={name}"})
    for c in left:
        api.remove_container(c["Id"], force=True)
    assert not left, f"containers left behind: {[c['Names'] for c in left]}"


@pytest.fixture
def executor(node: str) -> Iterator[DockerExecutor]:
    with DockerExecutor(base_url=BASE_URL, node=node) as ex:
        yield ex


def job(*command: str, **extra: Any) -> dict[str, Any]:
    spec = {"job_id": "j-" + uuid.uuid4().hex[:8], "image": IMAGE, "command": list(command)}
    return spec | extra


def sh(script: str, **extra: Any) -> dict[str, Any]:
    return job("sh", "-c", script, **extra)


def wait_for(check: Callable[[], Any], timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not true within {timeout_s} s: {check}")


def containers(api: Any, node: str) -> list[dict[str, Any]]:
    return list(api.containers(all=True, filters={"label": f"{NODE_LABEL}={node}"}))


# -- what a job gets back ------------------------------------------------------------------
def test_hello(executor: DockerExecutor) -> None:
    out = executor.run(job("echo", "hello"))
    assert out["status"] == "completed", out
    assert (out["exit_code"], out["stdout"], out["stderr"]) == (0, b"hello\n", b"")
    assert out["error"] is None
    assert out["returns"] is None
    assert set(out) == {"status", "exit_code", "stdout", "stderr", "returns", "error", "wall_ms",
                        "cpu_ms"}  # fmt: skip
    assert out["wall_ms"] >= 0 and out["cpu_ms"] >= 0


def test_nonzero_exit_is_completed_with_its_code(executor: DockerExecutor) -> None:
    # as the wasm3 executor does with proc_exit(3): the job ran; its code says how it went
    out = executor.run(sh("echo partial; echo 'bad input' >&2; exit 3"))
    assert (out["status"], out["exit_code"], out["error"]) == ("completed", 3, None)
    assert (out["stdout"], out["stderr"]) == (b"partial\n", b"bad input\n")


def test_env_and_stdin(executor: DockerExecutor) -> None:
    stdin = b"line one\n" + bytes(range(256)) * 1024  # binary, more than a pipe holds
    out = executor.run(
        sh('echo "$GREETING, $WHO"; wc -c', env={"GREETING": "hi there", "WHO": "a=b"}, stdin=stdin)
    )
    assert out["status"] == "completed", out
    assert out["stdout"] == b"hi there, a=b\n" + f"{len(stdin)}\n".encode()


def test_no_stdin_reads_eof(executor: DockerExecutor) -> None:
    out = executor.run(sh("cat; echo end"))
    assert (out["status"], out["stdout"]) == ("completed", b"end\n")


def test_entrypoint(executor: DockerExecutor) -> None:
    out = executor.run(job("-c", "echo via entrypoint", entrypoint=["/bin/sh"]))
    assert out["stdout"] == b"via entrypoint\n", out


def test_huge_output_is_capped(node: str) -> None:
    with DockerExecutor(base_url=BASE_URL, node=node, stdout_cap=100_000, stderr_cap=1000) as ex:
        out = ex.run(sh("yes 0123456789 | head -c 5000000; yes e | head -c 50000 >&2"))
    assert out["status"] == "completed", out
    assert len(out["stdout"]) == 100_000 and out["stdout"].startswith(b"0123456789\n")
    assert out["stderr"] == b"e\n" * 500 + (
        b"[deparrow: stdout truncated at 100000 bytes]\n"
        b"[deparrow: stderr truncated at 1000 bytes]\n"
    )


# -- limits ---------------------------------------------------------------------------------
def test_limits_are_applied_to_the_container(executor: DockerExecutor, api: Any, node: str) -> None:
    handle = executor.submit(sh("sleep 30", memory_mb=48, cpu=0.5, pids=40, timeout_s=60))
    [c] = wait_for(lambda: containers(api, node))
    info = api.inspect_container(c["Id"])
    executor.cancel(handle)
    host = info["HostConfig"]
    assert host["Memory"] == 48 << 20 and host["MemorySwap"] == 48 << 20
    assert host["NanoCpus"] == 500_000_000
    assert host["PidsLimit"] == 40
    assert host["NetworkMode"] == "none"
    assert info["Config"]["Labels"][JOB_LABEL] == handle.job_id
    wait_for(lambda: executor.poll(handle))


def test_timeout_kills_the_container(executor: DockerExecutor) -> None:
    out = executor.run(sh("echo started; sleep 60", timeout_s=1))
    assert out["status"] == "failed"
    assert out["error"] == "timeout: job exceeded its 1s limit"
    assert out["stdout"] == b"started\n"  # what it wrote before is kept


def test_memory_limit(executor: DockerExecutor) -> None:
    dd = ("dd", "if=/dev/zero", "of=/dev/null", "count=1")
    fits = executor.run(job(*dd, "bs=8M", memory_mb=32))
    assert (fits["status"], fits["exit_code"]) == ("completed", 0), fits
    out = executor.run(job(*dd, "bs=100M", memory_mb=32))
    assert out["status"] == "failed"
    assert out["error"] == "memory limit: job exceeded 32 MiB"


def test_fork_bomb_is_contained(executor: DockerExecutor, api: Any, node: str) -> None:
    bomb = "bomb() { bomb | bomb & }; bomb; sleep 30"
    handle = executor.submit(sh(bomb, pids=32, cpu=0.5, timeout_s=4))
    peak = 0
    while executor.poll(handle) is None:
        for c in containers(api, node):
            try:
                stats = api.stats(c["Id"], stream=False, one_shot=True)
                peak = max(peak, int(stats["pids_stats"].get("current") or 0))
            except (docker.errors.APIError, ValueError):  # it has just ended
                pass
        time.sleep(0.1)
    out = executor.poll(handle)
    assert out is not None and out["status"] == "failed", out
    assert out["error"] == "timeout: job exceeded its 4s limit"
    assert 0 < peak <= 32
    assert b"can't fork" in out["stderr"]


def test_fork_failure_ends_a_job_that_needs_more_pids(executor: DockerExecutor) -> None:
    out = executor.run(sh("for i in $(seq 60); do sleep 30 & done; echo all started", pids=16))
    assert out["status"] == "completed" and out["exit_code"] != 0, out
    assert b"all started" not in out["stdout"]
    assert b"can't fork" in out["stderr"]


# -- network --------------------------------------------------------------------------------
def test_no_network_unless_asked(node: str) -> None:
    with DockerExecutor(base_url=BASE_URL, node=node, allow_network=True) as ex:
        out = ex.run(job("ls", "/sys/class/net"))
        assert out["stdout"].split() == [b"lo"], out
        asked = ex.run(job("ls", "/sys/class/net", network=True))
    assert asked["status"] == "completed", asked
    assert b"lo" in asked["stdout"].split() and len(asked["stdout"].split()) > 1


def test_network_refused_unless_the_owner_allows(executor: DockerExecutor) -> None:
    out = executor.run(job("ls", "/sys/class/net", network=True))
    assert out["status"] == "failed" and out["exit_code"] is None
    assert out["error"].startswith("network not allowed: the job asks for network access")


# -- control: cancel, suspend, resume -------------------------------------------------------
def test_cancel(executor: DockerExecutor, api: Any, node: str) -> None:
    handle = executor.submit(sh("echo up; sleep 60"))
    assert executor.poll(handle) is None
    wait_for(lambda: handle.state == "running")
    executor.cancel(handle)
    out = wait_for(lambda: executor.poll(handle))
    assert (out["status"], out["error"]) == ("cancelled", None)
    assert containers(api, node) == []


def test_cancel_before_the_container_starts(executor: DockerExecutor) -> None:
    handle = executor.submit(sh("sleep 60"))
    executor.cancel(handle)
    out = wait_for(lambda: executor.poll(handle))
    assert out["status"] == "cancelled"


def test_suspend_and_resume(executor: DockerExecutor, api: Any, node: str) -> None:
    # The job needs ~1 s of running; it is paused for longer than its whole timeout, which
    # must not count: it finishes as if never paused.
    handle = executor.submit(sh("echo one; sleep 1; echo two", timeout_s=4))
    wait_for(lambda: handle.state == "running")
    # Its process is ours, not the owner's: the idle monitor is told so.
    [pid] = executor.job_pids()
    assert psutil.Process(pid).name() in ("sh", "busybox")
    executor.suspend(handle)
    wait_for(lambda: handle.state == "paused")
    [c] = containers(api, node)
    assert api.inspect_container(c["Id"])["State"]["Status"] == "paused"
    time.sleep(4.5)
    assert executor.poll(handle) is None
    executor.resume(handle)
    wait_for(lambda: handle.state != "paused")
    out = wait_for(lambda: executor.poll(handle))
    assert (out["status"], out["exit_code"], out["stdout"]) == ("completed", 0, b"one\ntwo\n"), out
    assert out["wall_ms"] < 4000  # the paused time is not the job's time


def test_cancel_while_suspended(executor: DockerExecutor) -> None:
    handle = executor.submit(sh("sleep 60"))
    executor.suspend(handle)
    wait_for(lambda: handle.state == "paused")
    executor.cancel(handle)
    out = wait_for(lambda: executor.poll(handle))
    assert out["status"] == "cancelled"


def test_jobs_run_side_by_side(executor: DockerExecutor) -> None:
    handles = [executor.submit(sh(f"sleep 1; echo {i}")) for i in range(3)]
    outs = [wait_for(functools.partial(executor.poll, h), 60) for h in handles]
    assert [o["stdout"] for o in outs] == [b"0\n", b"1\n", b"2\n"]


def test_close_cancels_running_jobs(api: Any, node: str) -> None:
    ex = DockerExecutor(base_url=BASE_URL, node=node)
    handle = ex.submit(sh("sleep 60"))
    wait_for(lambda: handle.state == "running")
    ex.close()
    assert handle.outcome is not None and handle.outcome["status"] == "cancelled"
    with pytest.raises(RuntimeError, match="executor is closed"):
        ex.submit(sh("true"))


# -- files ------------------------------------------------------------------------------------
def job_dirs(tmp_path: Path) -> tuple[Path, Path, list[dict[str, Any]]]:
    """A read-only /inputs holding words.txt and a writable /outputs, as jobfiles.prepare
    lays them out (out/ mode 0777: the container's user need not be root)."""
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    outputs.mkdir()
    outputs.chmod(0o777)
    (inputs / "words.txt").write_text("parrot\n")
    dirs = [
        {"host": str(inputs), "guest": "/inputs", "write": False},
        {"host": str(outputs), "guest": "/outputs", "write": True},
    ]
    return inputs, outputs, dirs


def test_dirs_read_inputs_and_write_outputs(executor: DockerExecutor, tmp_path: Path) -> None:
    inputs, outputs, dirs = job_dirs(tmp_path)
    script = "tr a-z A-Z < /inputs/words.txt > /outputs/result.txt && echo done"
    out = executor.run(sh(script, dirs=dirs))
    assert (out["status"], out["exit_code"], out["stdout"]) == ("completed", 0, b"done\n"), out
    assert (outputs / "result.txt").read_text() == "PARROT\n"  # the host sees what it wrote
    assert sorted(p.name for p in inputs.iterdir()) == ["words.txt"]


def test_dirs_read_only_unless_write(executor: DockerExecutor, tmp_path: Path) -> None:
    inputs, _, dirs = job_dirs(tmp_path)
    out = executor.run(sh("echo x > /inputs/new.txt || exit 9; echo wrote", dirs=dirs))
    assert (out["status"], out["exit_code"], out["stdout"]) == ("completed", 9, b""), out
    assert b"Read-only file system" in out["stderr"], out
    out = executor.run(sh("rm /inputs/words.txt", dirs=dirs))
    assert out["exit_code"] != 0, out
    assert sorted(p.name for p in inputs.iterdir()) == ["words.txt"]
    assert (inputs / "words.txt").read_text() == "parrot\n"


def test_dirs_missing_host_directory_is_the_nodes_error(
    executor: DockerExecutor, api: Any, node: str, tmp_path: Path
) -> None:
    gone = tmp_path / "gone"
    out = executor.run(sh("true", dirs=[{"host": str(gone), "guest": "/inputs"}]))
    assert (out["status"], out["exit_code"]) == ("failed", None), out
    assert out["error"] == f"executor error: cannot open the job's directory {gone}"
    assert not gone.exists()  # not made by the engine either
    assert containers(api, node) == []


@pytest.mark.parametrize(
    ("dirs", "error"),
    [
        ("/data", "invalid job: dirs must be a list of at most 32 directories"),
        ([{"host": "rel", "guest": "/in"}], "invalid job: dirs[0].host must be an absolute path"),
        ([{"host": "/tmp", "guest": "/a/../b"}], "invalid job: dirs[0].guest must be an absolute"),
        ([{"host": "/tmp", "guest": "/in", "write": "yes"}], "invalid job: dirs[0].write must be"),
        ([{"host": "/tmp", "guest": "/"}], "invalid job: dirs[0].guest '/' is the container's own"),
        ([{"host": "/tmp", "guest": "/proc/x"}], "invalid job: dirs[0].guest '/proc/x' is the"),
    ],
)
def test_dirs_invalid(executor: DockerExecutor, dirs: Any, error: str) -> None:
    handle = executor.submit(sh("true", dirs=dirs))
    out = executor.poll(handle)  # decided at once, before any container
    assert out is not None and out["status"] == "failed", out
    assert out["error"].startswith(error), out["error"]


# -- errors a user can act on -----------------------------------------------------------------
def test_missing_image(executor: DockerExecutor) -> None:
    out = executor.run({"job_id": "x", "image": "localhost/deparrow/no-such-image:1"})
    assert out["status"] == "failed"
    assert out["error"].startswith("image not found: localhost/deparrow/no-such-image:1")


def test_engine_unreachable(tmp_path: Path) -> None:
    url = f"unix://{tmp_path}/no-engine.sock"
    with DockerExecutor(base_url=url) as ex:
        out = ex.run(job("true"))
    assert out["status"] == "failed"
    assert out["error"].startswith(f"docker engine unreachable at {url}: No such file or directory")
    with pytest.raises(JobError, match=r"docker engine unreachable at .*: No such file"):
        DockerExecutor(base_url=url).remove_leftovers()


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"image": ""}, "invalid job: image must be a non-empty string"),
        ({"command": "echo hi"}, "invalid job: command must be a list of strings"),
        ({"env": {"A": 1}}, "invalid job: env must map names (without '=') to strings"),
        ({"stdin": "text"}, "invalid job: stdin must be bytes"),
        ({"timeout_s": 0}, "invalid job: timeout_s must be a number between 0 and 604800"),
        ({"memory_mb": 2}, "invalid job: memory_mb must be at least 6"),
        ({"cpu": "2"}, "invalid job: cpu must be a number between 0 and 1024"),
        ({"pids": True}, "invalid job: pids must be a number between 0 and 4194304"),
        ({"network": "yes"}, "invalid job: network must be true or false"),
    ],
)
def test_invalid_job(executor: DockerExecutor, change: dict[str, Any], error: str) -> None:
    out = executor.run(job("true") | change)
    assert (out["status"], out["error"]) == ("failed", error)


def test_remove_leftovers(api: Any, node: str) -> None:
    c = api.create_container(IMAGE, command=["sleep", "60"], labels={NODE_LABEL: node})
    api.start(c["Id"])
    other = api.create_container(IMAGE, command=["true"], labels={NODE_LABEL: node + "-other"})
    try:
        assert DockerExecutor(base_url=BASE_URL, node=node).remove_leftovers() == 1
        assert containers(api, node) == []
        assert containers(api, node + "-other") != []  # another node's are not touched
    finally:
        api.remove_container(other["Id"], force=True)

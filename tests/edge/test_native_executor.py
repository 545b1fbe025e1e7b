"""The native executor against real bubblewrap, real rlimits and real processes.

bwrap comes from tools/install-bubblewrap.sh (Debian package bubblewrap); without it these
tests fail and say so. The node runs as root here, so jobs run as nobody, as on a server.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.executors.native import (
    NOBODY,
    NativeDisabled,
    NativeExecutor,
    SandboxUnavailable,
)

OUTCOME_KEYS = {"status", "exit_code", "stdout", "stderr", "returns", "error", "wall_ms", "cpu_ms"}


@pytest.fixture(scope="module")
def ex() -> Iterator[NativeExecutor]:
    if not shutil.which("bwrap"):
        pytest.fail("bwrap not installed: run tools/install-bubblewrap.sh (Debian: bubblewrap)")
    with NativeExecutor(enabled=True, max_processes=16) as executor:
        yield executor


def job(*command: str, **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"job_id": "n", "command": list(command), "timeout_s": 10}
    spec.update(extra)
    return spec


def sh(script: str, **extra: Any) -> dict[str, Any]:
    return job("sh", "-c", script, **extra)


def live_processes_of(uid: int) -> list[int]:
    """Processes (not zombies) whose real user is `uid`."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            status = Path(f"/proc/{name}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields["Uid"].split()[0] == str(uid) and not fields["State"].strip().startswith("Z"):
            found.append(int(name))
    return found


def settle(uid: int, before: list[int], limit_s: float = 5) -> list[int]:
    """The job's processes still alive after a moment (killing a pid namespace takes one)."""
    end = time.monotonic() + limit_s
    while True:
        left = [p for p in live_processes_of(uid) if p not in before]
        if not left or time.monotonic() > end:
            return left
        time.sleep(0.05)


def wait(ex: NativeExecutor, handle: Any, limit_s: float = 30) -> dict[str, Any]:
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        outcome = ex.poll(handle)
        if outcome is not None:
            return outcome
        time.sleep(0.01)
    raise AssertionError(f"no outcome within {limit_s}s")


def stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except OSError:
        return False


def test_off_unless_the_owner_enables_it() -> None:
    for enabled in (False, "yes", 1, None):
        with pytest.raises(NativeDisabled) as e:
            NativeExecutor(enabled=enabled)  # type: ignore[arg-type]
        assert str(e.value) == "native executor is off; enable it in the node's preferences"
    with pytest.raises(NativeDisabled):
        NativeExecutor()


def test_no_bubblewrap_means_no_start_unless_allowed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without bwrap
    with pytest.raises(SandboxUnavailable) as e:
        NativeExecutor(enabled=True)
    assert "bubblewrap" in str(e.value) and "allow_unsandboxed" in str(e.value)
    # the owner's explicit choice: rlimits, another user and a private folder, nothing more
    with NativeExecutor(enabled=True, allow_unsandboxed=True) as bare:
        out = bare.run(sh("id -u; pwd; echo data > here; cat here"))
    assert out["status"] == "completed" and out["exit_code"] == 0, out
    uid, cwd, data = out["stdout"].decode().split()
    assert uid == str(NOBODY) and cwd.startswith("/tmp/deparrow-native-") and data == "data"
    assert not os.path.exists(cwd)  # removed after the job


def test_a_bwrap_that_cannot_sandbox_is_refused() -> None:
    # a stand-in for a bwrap on a kernel without user namespaces; in a folder the jobs' user
    # can reach, since the probe runs as that user
    folder = tempfile.mkdtemp()
    try:
        os.chmod(folder, 0o755)
        fake = Path(folder) / "bwrap"
        fake.write_text(
            "#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n"
        )
        fake.chmod(0o755)
        with pytest.raises(SandboxUnavailable) as e:
            NativeExecutor(enabled=True, bwrap=str(fake))
        assert "cannot create a sandbox here: bwrap: No permissions" in str(e.value)
    finally:
        shutil.rmtree(folder)


def test_runs_a_command_with_output_and_exit_code(ex: NativeExecutor) -> None:
    out = ex.run(job("echo", "hello", "world"))
    assert set(out) == OUTCOME_KEYS
    assert out["status"] == "completed" and out["exit_code"] == 0 and out["error"] is None
    assert out["stdout"] == b"hello world\n" and out["stderr"] == b"" and out["returns"] is None
    out = ex.run(sh("echo out; echo err >&2; exit 7"))
    assert (out["status"], out["exit_code"]) == ("completed", 7)
    assert out["stdout"] == b"out\n" and out["stderr"] == b"err\n"
    out = ex.run(sh("kill -SEGV $$"))
    assert (out["status"], out["exit_code"]) == ("completed", 128 + 11)


def test_env_is_the_jobs_own(ex: NativeExecutor, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE_SECRET", "must-not-leak")
    out = ex.run(job("env", env={"WHO": "parrot", "PATH": "/usr/bin:/bin"}))
    env = dict(line.split("=", 1) for line in out["stdout"].decode().splitlines())
    assert env["WHO"] == "parrot" and env["PATH"] == "/usr/bin:/bin" and env["HOME"] == "/tmp"
    assert "NODE_SECRET" not in env


def test_stdin_is_the_jobs_input(ex: NativeExecutor) -> None:
    assert ex.run(job("cat", stdin=b"hello stdin"))["stdout"] == b"hello stdin"
    big = os.urandom(3 << 20)
    out = ex.run(job("sha256sum", stdin=big))
    import hashlib

    assert out["stdout"].split()[0].decode() == hashlib.sha256(big).hexdigest()
    assert ex.run(job("cat"))["stdout"] == b""  # no input: empty, not the node's stdin


def test_timeout_kills_the_whole_job(ex: NativeExecutor) -> None:
    before = live_processes_of(NOBODY)
    t0 = time.monotonic()
    handle = ex.submit(sh("sleep 60 & sleep 60 & sleep 60", timeout_s=1))
    out = wait(ex, handle)
    assert out["status"] == "failed" and out["error"] == "timeout: job exceeded its 1s limit"
    assert time.monotonic() - t0 >= 1.0 and out["wall_ms"] >= 1000
    assert out["exit_code"] is None
    assert settle(NOBODY, before) == []  # the background sleeps died with it
    assert ex.run(job("true"))["exit_code"] == 0


def test_memory_cap(ex: NativeExecutor) -> None:
    big = ex.run(job("python3", "-c", "b = bytearray(256 << 20); print('got it')", memory_mb=64))
    assert big["status"] == "completed" and big["exit_code"] == 1, big
    assert b"MemoryError" in big["stderr"] and big["stdout"] == b""
    small = ex.run(job("python3", "-c", "b = bytearray(8 << 20); print('got it')", memory_mb=64))
    assert small["exit_code"] == 0 and small["stdout"] == b"got it\n", small
    # /tmp is memory too (tmpfs): it holds at most the job's memory, and so does one file
    script = "head -c 20000000 /dev/zero > /tmp/a; head -c 20000000 /dev/zero > /tmp/b; echo $?"
    out = ex.run(sh(script, memory_mb=32))
    assert out["stdout"] == b"1\n" and b"No space left on device" in out["stderr"], out
    out = ex.run(sh("head -c 40000000 /dev/zero > /tmp/a; echo $?", memory_mb=32))
    assert out["stdout"] == b"153\n" and b"File size limit exceeded" in out["stderr"], out


def test_no_network_inside_the_sandbox(ex: NativeExecutor) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    accepted: list[bool] = []

    def accept() -> None:
        server.settimeout(10)
        try:
            conn, _ = server.accept()
            accepted.append(True)
            conn.close()
        except OSError:
            pass

    t = threading.Thread(target=accept)
    t.start()
    try:
        out = ex.run(sh("tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '"))
        assert out["stdout"] == b"lo\n", out  # a loopback of its own, nothing else
        code = f"import socket; socket.create_connection(('127.0.0.1', {port}), 2)"
        out = ex.run(job("python3", "-c", code))
        assert out["exit_code"] == 1 and b"ConnectionRefusedError" in out["stderr"], out
        # a job that asks for network on a node that does not allow it is refused, with why
        out = ex.run(job("true", network=True))
        assert out["status"] == "failed" and out["error"].startswith("network not allowed: ")
        # where the owner allows it, the same connection reaches the host's server
        with NativeExecutor(enabled=True, allow_network=True) as net:
            out = net.run(job("python3", "-c", code, network=True))
        assert out["exit_code"] == 0, out
        t.join(10)
        assert accepted == [True]
    finally:
        server.close()
        t.join(10)


def test_cannot_write_outside_its_tmp(ex: NativeExecutor, tmp_path: Path) -> None:
    marker = tmp_path / "host-file"
    marker.write_text("host")
    script = (
        "for f in /usr/deparrow-test /etc/deparrow-test /deparrow-test /dev/shm/x; do "
        "  echo x > $f 2>/dev/null && echo wrote $f; done; "
        f"test -e {marker} && echo sees-host-tmp; test -e /root && echo sees-root; "
        "test -e /work && echo sees-work; echo ok > /tmp/mine && cat /tmp/mine"
    )
    out = ex.run(sh(script))
    assert out["stdout"] == b"ok\n", out
    assert not os.path.exists("/usr/deparrow-test") and not os.path.exists("/deparrow-test")
    # and what it wrote in its /tmp is gone with it
    assert ex.run(sh("ls /tmp"))["stdout"] == b""


def test_fork_bomb_is_contained(ex: NativeExecutor) -> None:
    before = live_processes_of(NOBODY)
    counter = (
        "import os, time\n"
        "n = 0\n"
        "try:\n"
        "    while n < 500:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(30); os._exit(0)\n"
        "        n += 1\n"
        "    print('forked', n)\n"
        "except OSError as e:\n"
        "    print('fork failed after', n, e.strerror)\n"
    )
    out = ex.run(job("python3", "-c", counter, timeout_s=20))
    words = out["stdout"].decode().split()
    assert words[:3] == ["fork", "failed", "after"], out
    # 16 processes allowed; the user's other processes (zombies of earlier sandboxes the
    # host's init has yet to reap) may leave a little more room, never hundreds
    assert int(words[3]) < 40, out
    assert settle(NOBODY, before) == []
    # a real fork bomb: it runs into the limit until its timeout, and all of it dies
    bomb = ex.run(sh("f() { f | f & }; f; sleep 60", timeout_s=2))
    assert bomb["status"] in ("failed", "completed"), bomb
    assert settle(NOBODY, before) == []
    assert ex.run(job("true"))["exit_code"] == 0


def test_output_is_capped(ex: NativeExecutor) -> None:
    out = ex.run(job("head", "-c", "5000000", "/dev/zero"))
    assert out["status"] == "completed" and out["exit_code"] == 0  # it ran to its end
    assert out["stdout"] == bytes(1 << 20)
    assert out["stderr"] == b"[deparrow: stdout truncated at 1048576 bytes]\n"
    out = ex.run(sh("head -c 200000 /dev/zero | tr '\\0' e >&2"))
    assert out["stderr"] == b"e" * (64 << 10) + b"[deparrow: stderr truncated at 65536 bytes]\n"


def below(root: int) -> list[int]:
    """Every process below `root` (the sandbox's init, the job's shell, its sleep)."""
    children: dict[int, list[int]] = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def test_suspend_and_resume_stop_the_clock(ex: NativeExecutor) -> None:
    handle = ex.submit(sh("sleep 0.5; echo done", timeout_s=2))
    time.sleep(0.2)
    assert handle.pid is not None
    tree = [handle.pid, *below(handle.pid)]
    assert len(tree) >= 3  # bwrap, the sandbox's init, the shell (and maybe its sleep)
    assert ex.suspend(handle)
    end = time.monotonic() + 5
    while not all(map(stopped, tree)) and time.monotonic() < end:
        time.sleep(0.01)
    assert all(map(stopped, tree))
    time.sleep(2.5)  # longer than its timeout: stopped time does not count
    assert ex.poll(handle) is None
    assert ex.resume(handle)
    out = wait(ex, handle)
    assert out["status"] == "completed" and out["stdout"] == b"done\n", out
    assert out["wall_ms"] < 2500, out  # its running time, not the 2.5 s pause


def test_cancel_running_and_queued(ex: NativeExecutor) -> None:
    before = live_processes_of(NOBODY)
    running = ex.submit(job("sleep", "60"))
    queued = ex.submit(job("echo", "never"))  # one job at a time: it waits
    time.sleep(0.2)
    assert ex.poll(running) is None and ex.poll(queued) is None
    ex.cancel(queued)
    assert (ex.poll(queued) or {}).get("status") == "cancelled"
    t0 = time.monotonic()
    ex.cancel(running)  # returns once the job is gone
    assert (ex.poll(running) or {}).get("status") == "cancelled"
    assert time.monotonic() - t0 < 5
    assert settle(NOBODY, before) == []
    ex.cancel(running)  # a second cancel changes nothing
    assert (ex.poll(running) or {}).get("status") == "cancelled"
    # a suspended job is cancelled as well (its stopped bwrap is woken to exit)
    paused = ex.submit(sh("sleep 60 & sleep 60"))
    time.sleep(0.2)
    ex.suspend(paused)
    ex.cancel(paused)
    assert (ex.poll(paused) or {}).get("status") == "cancelled"
    assert settle(NOBODY, before) == []
    assert ex.run(job("echo", "next"))["stdout"] == b"next\n"


# -- files ------------------------------------------------------------------------------------
@pytest.fixture
def files() -> Iterator[tuple[Path, Path, list[dict[str, Any]]]]:
    """in/ (read-only /inputs, holding words.txt) and out/ (writable /outputs), laid out as
    jobfiles.prepare does: in a folder the jobs' user can pass through, out/ mode 0777."""
    base = Path(tempfile.mkdtemp(prefix="deparrow-dirs-"))
    try:
        base.chmod(0o711)
        (base / "in").mkdir(mode=0o755)
        (base / "out").mkdir()
        (base / "out").chmod(0o777)
        (base / "in" / "words.txt").write_text("parrot\n")
        dirs = [
            {"host": str(base / "in"), "guest": "/inputs", "write": False},
            {"host": str(base / "out"), "guest": "/outputs", "write": True},
        ]
        yield base / "in", base / "out", dirs
    finally:
        shutil.rmtree(base)


def test_dirs_read_inputs_and_write_outputs(
    ex: NativeExecutor, files: tuple[Path, Path, list[dict[str, Any]]]
) -> None:
    inputs, outputs, dirs = files
    assert ex.takes_files is True
    # /outputs stays writable once bwrap has remounted its root read-only
    script = "tr a-z A-Z < /inputs/words.txt > /outputs/result.txt && echo done"
    out = ex.run(sh(script, dirs=dirs))
    assert (out["status"], out["exit_code"], out["stdout"]) == ("completed", 0, b"done\n"), out
    result = outputs / "result.txt"
    assert result.read_text() == "PARROT\n"  # the host sees what the job wrote
    assert result.stat().st_uid == NOBODY  # written as the jobs' user
    assert sorted(p.name for p in inputs.iterdir()) == ["words.txt"]


def test_dirs_read_only_unless_write(
    ex: NativeExecutor, files: tuple[Path, Path, list[dict[str, Any]]]
) -> None:
    inputs, _, dirs = files
    out = ex.run(sh("echo x > /inputs/new.txt || exit 9; echo wrote", dirs=dirs))
    assert (out["status"], out["exit_code"], out["stdout"]) == ("completed", 9, b""), out
    assert b"Read-only file system" in out["stderr"], out
    # nor anything else: the root stays read-only with the job's directories in it
    out = ex.run(sh("rm /inputs/words.txt || touch /new.txt || exit 7", dirs=dirs))
    assert out["exit_code"] == 7, out
    assert sorted(p.name for p in inputs.iterdir()) == ["words.txt"]
    assert (inputs / "words.txt").read_text() == "parrot\n"


def test_dirs_the_node_cannot_give_are_its_error(ex: NativeExecutor, tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    out = ex.run(job("true", dirs=[{"host": str(gone), "guest": "/inputs"}]))
    assert (out["status"], out["exit_code"]) == ("failed", None), out
    assert out["error"] == f"executor error: cannot open the job's directory {gone}"
    # pytest's tmp_path is under a folder of mode 0700: bwrap, as nobody, could not mount it
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o777)
    out = ex.run(job("true", dirs=[{"host": str(closed), "guest": "/outputs", "write": True}]))
    assert out["status"] == "failed", out
    assert out["error"].startswith(f"executor error: cannot open the job's directory {closed}: ")
    assert f"closed to the jobs' user (uid {NOBODY})" in out["error"]
    assert ex.run(job("echo", "next"))["stdout"] == b"next\n"  # the next job starts


@pytest.mark.parametrize(
    "dirs, words",
    [
        ("/data", "invalid job: dirs must be a list of at most 32 directories"),
        ([{"host": "rel", "guest": "/in"}], "invalid job: dirs[0].host must be an absolute path"),
        ([{"host": "/tmp", "guest": "in"}], "invalid job: dirs[0].guest must be an absolute"),
        ([{"host": "/tmp", "guest": "/in", "write": 1}], "invalid job: dirs[0].write must be"),
        ([{"host": "/tmp", "guest": "/"}], "invalid job: dirs[0].guest '/' is the sandbox's own"),
        ([{"host": "/tmp", "guest": "/usr/x"}], "invalid job: dirs[0].guest '/usr/x' is the"),
    ],
)
def test_dirs_invalid(ex: NativeExecutor, dirs: Any, words: str) -> None:
    out = ex.poll(ex.submit(job("true", dirs=dirs)))  # decided at once
    assert out is not None and out["status"] == "failed", out
    assert out["error"].startswith(words), out["error"]


def test_dirs_refused_without_a_sandbox(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without bwrap
    with NativeExecutor(enabled=True, allow_unsandboxed=True) as bare:
        assert bare.takes_files is False
        out = bare.poll(bare.submit(job("true", dirs=[{"host": "/srv", "guest": "/inputs"}])))
        assert out is not None and out["status"] == "failed", out
        assert out["error"].startswith("invalid job: dirs need the bubblewrap sandbox"), out
        assert bare.run(job("true", dirs=[]))["exit_code"] == 0  # none asked: it runs


@pytest.mark.parametrize(
    "extra, words",
    [
        ({"command": []}, "invalid job: command must be a non-empty list of strings"),
        ({"command": "echo hi"}, "invalid job: command must be a non-empty list of strings"),
        ({"command": ["echo", 1]}, "invalid job: command must be a non-empty list of strings"),
        ({"command": ["no-such-program-here"]}, "invalid job: command not found: "),
        # the test's own interpreter lives in a venv, a folder the sandbox does not show
        ({"command": [sys.executable, "-V"]}, "invalid job: "),
        ({"env": {"A=B": "c"}}, "invalid job: env must map names"),
        ({"env": {"A": 1}}, "invalid job: env must map names"),
        ({"stdin": "text"}, "invalid job: stdin must be bytes"),
        ({"timeout_s": 0}, "invalid job: timeout_s must be a number"),
        ({"timeout_s": float("inf")}, "invalid job: timeout_s must be a number"),
        ({"memory_mb": 4}, "invalid job: memory_mb must be from 16"),
        ({"memory_mb": "64"}, "invalid job: memory_mb must be a number"),
        ({"network": "yes"}, "invalid job: network must be true or false"),
        ({"pids": True}, "invalid job: pids must be a positive integer"),
    ],
)
def test_invalid_jobs_fail_with_the_reason(
    ex: NativeExecutor, extra: dict[str, Any], words: str
) -> None:
    spec = job("true")
    spec.update(extra)
    out = ex.poll(ex.submit(spec))  # decided at once, before anything runs
    assert out is not None and out["status"] == "failed", out
    assert out["error"].startswith(words), out["error"]
    if extra.get("command") and extra["command"][0] == sys.executable:
        assert "outside the sandbox" in out["error"]

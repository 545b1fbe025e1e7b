"""Shared fixtures: real brokers on free loopback ports, a real hub process, real nodes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hub.broker import ChildBroker, free_port
from hub.client import Client, HubError

ROOT = Path(__file__).resolve().parent.parent


def require_mosquitto() -> None:
    if shutil.which("mosquitto") is None:
        pytest.fail(
            "mosquitto is not installed: run `make test` (or `apt-get install mosquitto`); "
            "the MQTT tests run against the real broker and are never skipped"
        )


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[str]:
    require_mosquitto()
    broker = ChildBroker("mosquitto", "127.0.0.1", free_port(), tmp_path / "mosquitto")
    broker.start()
    yield broker.url
    broker.stop()


@pytest.fixture
def embedded_broker(tmp_path: Path) -> Iterator[str]:
    broker = ChildBroker("embedded", "127.0.0.1", free_port(), tmp_path / "amqtt")
    broker.start()
    yield broker.url
    broker.stop()


@pytest.fixture(params=["mosquitto", "embedded"])
def broker_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Every MQTT test runs against real Mosquitto and against the embedded broker."""
    if request.param == "mosquitto":
        require_mosquitto()
    broker = ChildBroker(request.param, "127.0.0.1", free_port(), tmp_path / request.param)
    broker.start()
    yield broker.url
    broker.stop()


class Proc:
    """A child process with its output in a file, stopped by PID."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self.fh = open(log, "ab")  # noqa: SIM115
        self.p = subprocess.Popen(
            cmd,
            stdout=self.fh,
            stderr=self.fh,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        self.fh.close()
        return self.p.returncode

    def kill(self) -> None:
        self.p.kill()
        self.p.wait(5)
        self.fh.close()


def wait_until(what: str, check, timeout_s: float = 30.0, procs: tuple[Proc, ...] = ()):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        for p in procs:
            if p.p.poll() is not None:
                raise AssertionError(f"process exited early ({p.p.returncode}):\n{p.output()}")
        try:
            last = check()
            if last:
                return last
        except HubError as e:
            last = e
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


class HubProc:
    def __init__(self, url: str, data_dir: Path, proc: Proc) -> None:
        self.url = url
        self.data_dir = data_dir
        self.proc = proc
        self.admin = Client(url, (data_dir / "admin-token").read_text().strip())

    def user(self, name: str) -> tuple[dict, Client]:  # type: ignore[type-arg]
        u = self.admin.create_user(name)
        return u, Client(self.url, u["token"])


def start_hub(
    tmp_path: Path, mqtt_url: str | None = None, broker: str = "auto", extra: tuple[str, ...] = ()
) -> HubProc:
    port = free_port()
    data = tmp_path / "hub"
    cmd = [
        sys.executable,
        "-m",
        "hub.cli",
        "hub",
        "--port",
        str(port),
        "--data-dir",
        str(data),
        "--heartbeat",
        "0.5",
        *extra,
    ]
    cmd += ["--mqtt", mqtt_url] if mqtt_url else ["--broker", broker, "--broker-port", "0"]
    proc = Proc(cmd, tmp_path / "hub.log")
    url = f"http://127.0.0.1:{port}"
    probe = Client(url)
    wait_until(
        "the hub to answer",
        lambda: (data / "admin-token").exists() and probe.status()["broker"]["connected"],
        30,
        (proc,),
    )
    return HubProc(url, data, proc)


@pytest.fixture
def hub(tmp_path: Path, broker_url: str) -> Iterator[HubProc]:
    h = start_hub(tmp_path, mqtt_url=broker_url)
    yield h
    h.proc.stop()


def start_node(hub: HubProc, owner: Client, tmp_path: Path, name: str = "node") -> Proc:
    token = owner.enrollment_token()["token"]
    proc = Proc(
        [
            sys.executable,
            "-m",
            "edge.cli",
            "--hub",
            hub.url,
            "--token",
            token,
            "--name",
            name,
            "--data-dir",
            str(tmp_path / name),
            "-v",
        ],
        tmp_path / f"{name}.log",
    )
    wait_until(
        f"{name} online",
        lambda: any(n["name"] == name and n["state"] == "idle" for n in owner.nodes()),
        30,
        (proc,),
    )
    return proc

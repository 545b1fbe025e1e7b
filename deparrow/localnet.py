"""A whole network on one machine: a hub process and edge-run node processes, started and
stopped by PID. The demo, the benchmarks and the tests all build on it."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from deparrow.client import Client, HubError

T = TypeVar("T")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _stop_with_us() -> Callable[[], None]:
    """A preexec_fn: the child gets SIGTERM when this process dies, even by SIGKILL, so a
    crashed demo or test never leaves a hub or node behind (Linux PR_SET_PDEATHSIG; else
    nothing). The hub's broker does the same for its broker (hub/mqtt/broker.py)."""
    us = os.getpid()

    def arm() -> None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
        if os.getppid() != us:  # we died before the signal was armed
            os._exit(1)

    return arm


class Proc:
    """A child process with its output in a log file."""

    def __init__(
        self, name: str, cmd: list[str], log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.p = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                start_new_session=True,
                preexec_fn=_stop_with_us(),
            )

    def alive(self) -> bool:
        return self.p.poll() is None

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, n: int = 15) -> str:
        return "\n".join(self.output().splitlines()[-n:])

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after 10 s; returns the exit code."""
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        return int(self.p.returncode)

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, as in a crash or power loss."""
        self.p.kill()
        self.p.wait(5)


def wait_for(
    what: str, check: Callable[[], T], timeout_s: float = 30.0, procs: Sequence[Proc] = ()
) -> T:
    """Poll check() until it returns something true; fail early when a process dies."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited early ({p.p.returncode}):\n{p.tail()}")
        try:
            value = check()
            if value:
                return value
            last = value
        except HubError as e:
            last = e
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout_s:g}s waiting for {what} (last: {last!r})")


class LocalHub:
    """`deparrow hub` as a child process on a free port, with its admin client."""

    def __init__(
        self,
        data_dir: Path,
        *,
        mqtt_url: str | None = None,
        broker: str = "auto",
        heartbeat_s: float = 1.0,
        extra: Sequence[str] = (),
        log_path: Path | None = None,
        tls: bool = False,
        ca: str | None = None,
    ) -> None:
        """tls: serve HTTPS and MQTT over TLS (on a free port) with a CA the hub makes; the
        clients here trust that CA (self.ca), and nodes pin it as `deparrow node token` says.
        With --tls-cert and --tls-key in extra, ca is the CA file that issued them."""
        self.data_dir = data_dir
        self.port = free_port()
        self.tls = tls
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.ca = ca or (str(data_dir / "tls" / "ca.pem") if tls else None)
        cmd = [
            sys.executable, "-m", "deparrow.cli", "hub", "--port", str(self.port),
            "--data-dir", str(data_dir), "--heartbeat", str(heartbeat_s), *extra,
        ]  # fmt: skip
        cmd += ["--mqtt", mqtt_url] if mqtt_url else ["--broker", broker, "--broker-port", "0"]
        if tls:
            cmd += ["--tls", "--tls-mqtt-port", "0"]
        data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = Proc("hub", cmd, log_path or data_dir.parent / f"{data_dir.name}.log")
        token_path = data_dir / "admin-token"

        def up() -> bool:
            # A new client each time: the CA file appears when the hub has started.
            probe = Client(self.url, ca=self.ca)
            return token_path.exists() and bool(probe.status()["broker"]["connected"])

        wait_for("the hub to answer", up, 60, [self.proc])
        self.admin = Client(self.url, token_path.read_text().strip(), ca=self.ca)

    def user(self, name: str) -> tuple[dict[str, Any], Client]:
        """A new user (with the welcome grant) and a client acting as them."""
        u = self.admin.create_user(name)
        return u, Client(self.url, u["token"], ca=self.ca)

    def start_node(
        self, owner: Client, data_dir: Path, name: str, wait_s: float = 60, verbose: bool = True
    ) -> Proc:
        """Enroll and start an edge-run node for owner; returns once it is idle. Over TLS it
        pins the hub's CA by the fingerprint the enrollment token comes with."""
        grant = owner.enrollment_token()
        token, pin = grant["token"], grant.get("ca")
        cmd = [
            sys.executable, "-m", "edge.cli", "--hub", self.url, "--token", token,
            *(["--ca", pin] if pin else []),
            "--name", name, "--data-dir", str(data_dir), *(["-v"] if verbose else []),
            # A local network shares this machine with its own hub and tests: the nodes run
            # whatever the owner does, and several nodes cannot all have the page on 8080.
            "--always-run", "--dashboard-port", "0",
        ]  # fmt: skip
        proc = Proc(name, cmd, data_dir.parent / f"{name}.log")
        wait_for(
            f"node {name} to come online",
            lambda: any(n["name"] == name and n["state"] == "idle" for n in owner.nodes()),
            wait_s,
            [proc, self.proc],
        )
        return proc

    def stop(self) -> int:
        return self.proc.stop()

"""A broker cluster on one machine: three (or n) Mosquitto servers on free loopback ports,
started and stopped by PID, for tests and benches of several hub replicas.

The servers do not pass messages to each other (docs/broker-cluster.md says why): nodes and
agents connect to any one of them, and every hub replica connects to all of them, subscribing
in one MQTT share group, so each message reaches one replica. Each server has two listeners:

- `urls`: the nodes' and agents' one. A login's client id is its user name there, whatever it
  sends (`use_username_as_clientid`), so no login can take over another's session.
- `hub_urls`: the hub replicas' one. Several replicas share the hub's login and each needs a
  session of its own, so the client id they send is kept. In production it listens on the
  hubs' private network only (deploy/broker/).

With auth, all servers read one password file and one ACL file in `auth_dir` (Mosquitto's
formats; the hub renders them from its store with hub.mqtt.logins.AuthFiles), and `reload()`
has every running server read them again.

    cluster = LocalBrokerCluster(tmp / "brokers").start()
    hub_url = cluster.hub_url_list()      # mqtt://127.0.0.1:P1,mqtt://127.0.0.1:P2,...
    cluster.kill(0)                       # SIGKILL one server, as a crash would
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import threading
import time
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

from deparrow.localnet import Proc, free_port


class BrokerMissing(RuntimeError):
    pass


def _wait_listening(proc: Proc, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited at start:\n{proc.tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"{proc.name} did not listen on 127.0.0.1:{port} within {timeout_s:g}s")


class LocalBrokerCluster:
    """n Mosquitto servers of our own on loopback; auth=True: only the logins in auth_dir."""

    def __init__(self, workdir: Path, n: int = 3, *, auth: bool = False) -> None:
        if n < 1:
            raise ValueError(f"a cluster needs at least one server, not {n}")
        self.workdir = workdir
        self.auth = auth
        self.auth_dir = workdir / "auth"
        self.ports = [free_port() for _ in range(n)]
        self.hub_ports = [free_port() for _ in range(n)]
        self.procs: list[Proc | None] = [None] * n
        self._follower: threading.Thread | None = None
        self._following = threading.Event()

    @property
    def urls(self) -> list[str]:
        """Where nodes and agents connect: one URL per server."""
        return [f"mqtt://127.0.0.1:{p}" for p in self.ports]

    @property
    def hub_urls(self) -> list[str]:
        """Where hub replicas connect: one URL per server."""
        return [f"mqtt://127.0.0.1:{p}" for p in self.hub_ports]

    def hub_url_list(self, username: str | None = None, password: str | None = None) -> str:
        """`deparrow hub --mqtt`'s value: every server's hub listener, with the login if any."""
        login = ""
        if username is not None:
            login = quote(username, safe="") + ":" + quote(password or "", safe="") + "@"
        return ",".join(f"mqtt://{login}127.0.0.1:{p}" for p in self.hub_ports)

    def _conf(self, i: int) -> str:
        """Server i's configuration: as deploy/broker/mosquitto-*.conf, on loopback ports."""
        lines = [
            f"# server {i} of a local DEparrow broker cluster (deparrow/brokercluster.py)",
            f"listener {self.ports[i]} 127.0.0.1",
            "use_username_as_clientid true",
            f"listener {self.hub_ports[i]} 127.0.0.1",
        ]
        if self.auth:
            lines += [
                "allow_anonymous false",
                f"password_file {self.auth_dir / 'passwd'}",
                f"acl_file {self.auth_dir / 'acl'}",
            ]
        else:
            lines.append("allow_anonymous true")
        lines += [
            "persistence false",
            # Run as whoever runs us: a root-started mosquitto switches to its own user.
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            "max_packet_size 67108864",  # as the hub's own broker: a file job's messages
            "set_tcp_nodelay true",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
        ]
        return "\n".join(lines) + "\n"

    def start(self) -> LocalBrokerCluster:
        """Start every server that is not running (a killed one comes back on its ports)."""
        exe = shutil.which("mosquitto")
        if exe is None:
            raise BrokerMissing("mosquitto is not on PATH: apt-get install mosquitto")
        if self.auth and not (self.auth_dir / "passwd").exists():
            raise RuntimeError(f"write the logins into {self.auth_dir} before starting")
        self.workdir.mkdir(parents=True, exist_ok=True)
        for i in range(len(self.ports)):
            self._start_one(exe, i)
        return self

    def _start_one(self, exe: str, i: int) -> None:
        running = self.procs[i]
        if running is not None and running.alive():
            return
        conf = self.workdir / f"server{i}.conf"
        conf.write_text(self._conf(i))
        proc = Proc(f"broker{i}", [exe, "-c", str(conf)], self.workdir / f"server{i}.log")
        self.procs[i] = proc
        for port in (self.ports[i], self.hub_ports[i]):
            _wait_listening(proc, port, 15.0)

    def alive(self, i: int) -> bool:
        proc = self.procs[i]
        return proc is not None and proc.alive()

    def kill(self, i: int) -> None:
        """SIGKILL server i: no goodbye to its clients, no last wills, as in a crash."""
        proc = self.procs[i]
        if proc is not None and proc.alive():
            proc.kill()

    def reload(self) -> None:
        """Every running server reads the password and ACL files again (SIGHUP); the logins
        that are gone lose their connections."""
        for proc in self.procs:
            if proc is not None and proc.alive():
                proc.p.send_signal(signal.SIGHUP)

    def follow_logins(self, poll_s: float = 0.05) -> None:
        """Reload the servers whenever the login files change, as deploy/broker's
        deparrow-broker-logins.path unit does for a real cluster (the hub writes the files:
        `deparrow hub --mqtt-auth-dir`)."""
        if self._follower is not None:
            return
        self._following.clear()

        def stamp() -> tuple[int, ...]:
            files = (self.auth_dir / "passwd", self.auth_dir / "acl")
            return tuple(f.stat().st_mtime_ns if f.exists() else 0 for f in files)

        def follow() -> None:
            seen = stamp()
            while not self._following.wait(poll_s):
                now = stamp()
                if now != seen:
                    seen = now
                    self.reload()

        self._follower = threading.Thread(target=follow, name="broker-logins", daemon=True)
        self._follower.start()

    def stop(self) -> None:
        if self._follower is not None:
            self._following.set()
            self._follower.join(5)
            self._follower = None
        for proc in self.procs:
            if proc is not None:
                proc.stop()

    def __enter__(self) -> LocalBrokerCluster:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

"""The hub's own MQTT broker when no --mqtt URL is given.

Mosquitto (a child process with a generated config) when `mosquitto` is on PATH; otherwise
amqtt, an embedded Python broker, also in a child process so a broker fault cannot take the
hub's event loop with it. Either way `pip install` alone is enough for a first run.

With `auth=True` (the hub's own broker) nobody logs in anonymously: the hub writes a password
file and an ACL file (hub/mqtt/logins.py renders them) and sends the broker SIGHUP whenever they
change, as nodes enroll and leave. Mosquitto reloads both on SIGHUP and drops the connections of
logins that are gone; the embedded broker reads the same two files through plugins below and
does the same. A broker given with --mqtt is the operator's: the hub does not manage its logins.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from hub.mqtt.logins import (
    Account,
    Action,
    AuthFileError,
    Policy,
    render_acl_file,
    render_password_file,
)
from hub.mqtt.logins import write_atomic as _write_atomic

log = logging.getLogger(__name__)


def die_with_parent(sig: int) -> Callable[[], None]:
    """A preexec_fn: the child gets sig when this process dies, even by SIGKILL, so a crash
    never leaves an orphan broker or node behind (Linux prctl PR_SET_PDEATHSIG; else no-op)."""
    parent = os.getpid()

    def arm() -> None:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, sig)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return arm


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the broker exited at start with code {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"the broker did not listen on {host}:{port} within {timeout_s:g}s")


def _mqtt_string(s: str) -> bytes:
    data = s.encode()
    return struct.pack("!H", len(data)) + data


def mqtt_login(host: str, port: int, username: str, password: str, timeout_s: float) -> int:
    """One MQTT 3.1.1 CONNECT with these credentials (clean session, no will, a client id of
    its own, so nobody's session is touched); returns the CONNACK code, 0 when accepted.
    OSError when the broker cannot be reached or does not answer like one."""
    client_id = "deparrow-hub-probe-" + os.urandom(4).hex()
    body = _mqtt_string("MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 10)  # user+pw, clean
    body += _mqtt_string(client_id) + _mqtt_string(username) + _mqtt_string(password)
    length, n = b"", len(body)
    while True:
        n, digit = divmod(n, 128)
        length += bytes([digit | (0x80 if n else 0)])
        if not n:
            break
    with socket.create_connection((host, port), timeout=timeout_s) as s:
        s.settimeout(timeout_s)
        s.sendall(b"\x10" + length + body)
        answer = b""
        while len(answer) < 4:
            chunk = s.recv(4 - len(answer))
            if not chunk:
                break  # a broker may hang up on a refused login without a CONNACK
            answer += chunk
        if len(answer) < 4:
            return 5  # "not authorized": the broker hung up on the login
        if answer[0] != 0x20 or answer[1] != 2:
            raise OSError(f"{host}:{port} did not answer the MQTT login with a CONNACK")
        if answer[3] == 0:
            s.sendall(b"\xe0\x00")  # DISCONNECT
        return answer[3]


class ChildBroker:
    """A broker process the hub owns: started, waited for, stopped by PID.

    auth=False: anonymous logins, no ACL (the test fixtures' plain broker). auth=True: only the
    logins written with write_auth(), each limited to its topics; write them before start().
    """

    def __init__(self, kind: str, host: str, port: int, workdir: Path, auth: bool = False) -> None:
        self.kind = kind
        self.host = host
        self.port = port
        self.workdir = workdir
        self.auth = auth
        self.proc: subprocess.Popen[bytes] | None = None
        self._written: tuple[str, str] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def password_file(self) -> Path:
        return self.workdir / "passwd"

    @property
    def acl_file(self) -> Path:
        return self.workdir / "acl"

    def write_auth(self, accounts: Iterable[Account]) -> bool:
        """Write these logins and their ACLs, and have a running broker reload them (SIGHUP).
        Both files are replaced whole; nothing happens when they did not change. Returns
        whether they changed."""
        if not self.auth:
            raise RuntimeError("this broker was started without auth: it has no logins to write")
        accounts = list(accounts)
        texts = (render_password_file(accounts), render_acl_file(accounts))
        if texts == self._written:
            return False
        self.workdir.mkdir(parents=True, exist_ok=True)
        # The ACL first: between the two replacements a new login has no topics yet, rather
        # than a removed login keeping its topics.
        _write_atomic(self.acl_file, texts[1])
        _write_atomic(self.password_file, texts[0])
        self._written = texts
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)
        return True

    def wait_accepts(self, username: str, password: str, timeout_s: float = 10.0) -> bool:
        """Block until the broker accepts this login (a reload is under way after a SIGHUP);
        False if it still refuses after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if mqtt_login(self.host, self.port, username, password, 2.0) == 0:
                    return True
            except OSError as e:
                log.debug("login probe as %s: %s", username, e)
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.auth and self._written is None:
            raise RuntimeError("write_auth() the broker's logins before starting it")
        with socket.socket() as probe:
            try:
                probe.bind((self.host, self.port))
            except OSError:
                raise RuntimeError(
                    f"cannot start a broker on {self.host}:{self.port}: the port is in use "
                    f"(a system Mosquitto?). Use it with --mqtt mqtt://{self.host}:{self.port}, "
                    "or let the hub pick a free port with --broker-port 0"
                ) from None
        logfile = open(self.workdir / f"{self.kind}.log", "ab")  # noqa: SIM115 - child owns it
        if self.kind == "mosquitto":
            exe = shutil.which("mosquitto")
            if exe is None:
                raise RuntimeError("mosquitto is not on PATH (apt-get install mosquitto)")
            conf = self.workdir / "mosquitto.conf"
            access = (
                f"allow_anonymous false\npassword_file {self.password_file}\n"
                f"acl_file {self.acl_file}\n"
                if self.auth
                else "allow_anonymous true\n"
            )
            conf.write_text(
                "# generated by the DEparrow hub; rewritten at every start\n"
                f"listener {self.port} {self.host}\n"
                f"{access}"
                "persistence false\n"
                # Run as whoever runs the hub: a root-started mosquitto would otherwise switch
                # to its own user, which also drops the die-with-the-hub signal.
                f"user {pwd.getpwuid(os.getuid()).pw_name}\n"
                # a file job's assignment and result carry its files (docs/jobs.md's limits)
                "max_packet_size 67108864\n"
                "set_tcp_nodelay true\n"
                "log_dest stderr\n"
                "log_type error\nlog_type warning\nlog_type notice\n"
            )
            cmd = [exe, "-c", str(conf)]
        else:
            cmd = [sys.executable, "-m", "hub.mqtt.broker", self.host, str(self.port)]
            if self.auth:
                cmd += [str(self.password_file), str(self.acl_file)]
        self.proc = subprocess.Popen(
            cmd,
            stdout=logfile,
            stderr=logfile,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGTERM),
        )
        logfile.close()
        wait_port(self.host, self.port, 15.0, self.proc)
        log.info("started %s broker on %s (pid %d)", self.kind, self.url, self.proc.pid)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def choose(kind: str) -> str:
    if kind == "auto":
        return "mosquitto" if shutil.which("mosquitto") else "embedded"
    if kind not in ("mosquitto", "embedded"):
        raise ValueError(f"broker must be auto, mosquitto or embedded, not {kind!r}")
    return kind


_ACTIONS: dict[str, Action] = {"publish": "publish", "subscribe": "subscribe", "receive": "receive"}


class _EmbeddedRules:
    """The embedded broker's copy of the rules, shared by its two plugins; reload() on SIGHUP."""

    def __init__(self, password_file: Path, acl_file: Path) -> None:
        self.password_file = password_file
        self.acl_file = acl_file
        self.policy = Policy.load(password_file, acl_file)
        # client id -> the login that owns its persistent session: amqtt would hand a kept
        # session (and the messages queued in it) to whoever connects with its client id.
        self.session_owner: dict[str, str] = {}

    def reload(self) -> bool:
        try:
            self.policy = Policy.load(self.password_file, self.acl_file)
        except (OSError, AuthFileError) as e:  # keep the rules we have
            log.error("broker logins not reloaded: %s", e)
            return False
        return True


def _install_plugins(rules: _EmbeddedRules) -> dict[str, dict[str, Any]]:
    """amqtt plugins enforcing rules; returns the broker's `plugins` config for them.

    amqtt loads plugins by dotted path, so the classes are put on this module; they are made
    here, not at import, because amqtt takes a third of a second to import and the hub
    imports this module for ChildBroker alone."""
    from amqtt.contexts import Action as AmqttAction
    from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
    from amqtt.session import Session

    class EmbeddedAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]  # amqtt is untyped
        async def authenticate(self, *, session: Session) -> bool | None:
            user, client_id = session.username, session.client_id
            if not rules.policy.authenticate(user, session.password):
                log.info("refused login %r (client %r)", user, client_id)
                return False
            if session.will_flag and not rules.policy.allowed(
                user, "publish", session.will_topic or ""
            ):
                log.info("refused %s: its last will is on %r", user, session.will_topic)
                return False
            if not session.clean_session and client_id:
                owner = rules.session_owner.setdefault(client_id, str(user))
                if owner != user:
                    log.info("refused %s: session %r belongs to %s", user, client_id, owner)
                    return False
            return True

    class EmbeddedTopicPlugin(BaseTopicPlugin):  # type: ignore[misc]
        async def topic_filtering(
            self,
            *,
            session: Session | None = None,
            topic: str | None = None,
            action: AmqttAction | None = None,
        ) -> bool | None:
            kind = _ACTIONS.get(str(action))
            if session is None or not topic or kind is None:
                return False
            return rules.policy.allowed(session.username, kind, topic)

    module = sys.modules[__name__]
    module.EmbeddedAuthPlugin = EmbeddedAuthPlugin  # type: ignore[attr-defined]
    module.EmbeddedTopicPlugin = EmbeddedTopicPlugin  # type: ignore[attr-defined]
    return {f"{__name__}.EmbeddedAuthPlugin": {}, f"{__name__}.EmbeddedTopicPlugin": {}}


async def _drop_gone_logins(broker: Any, rules: _EmbeddedRules) -> None:
    """After a reload, as Mosquitto does: close the connections of logins that are gone."""
    for session, handler in list(broker.sessions.values()):
        if session.username in rules.policy.users or not session.transitions.is_connected():
            continue
        log.info("closing the connection of %s: its login is gone", session.username)
        await handler.handle_connection_closed()


async def _run_embedded(host: str, port: int, auth_files: tuple[Path, Path] | None) -> None:
    from amqtt.broker import Broker

    rules = _EmbeddedRules(*auth_files) if auth_files else None
    plugins: dict[str, dict[str, Any]] = (
        _install_plugins(rules)
        if rules is not None
        else {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}
    )
    broker = Broker(
        {"listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}}, "plugins": plugins}
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks: set[asyncio.Task[None]] = set()

    def reload() -> None:
        if rules is not None and rules.reload():
            task = loop.create_task(_drop_gone_logins(broker, rules))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    # Before listening: once the hub sees the port open it may send SIGHUP at any time.
    loop.add_signal_handler(signal.SIGHUP, reload)
    await broker.start()
    await stop.wait()
    await broker.shutdown()


def _main(argv: list[str]) -> None:
    """python -m hub.mqtt.broker HOST PORT [PASSWORD_FILE ACL_FILE]"""
    if len(argv) not in (2, 4):
        raise SystemExit("usage: python -m hub.mqtt.broker HOST PORT [PASSWORD_FILE ACL_FILE]")
    files = (Path(argv[2]), Path(argv[3])) if len(argv) == 4 else None
    asyncio.run(_run_embedded(argv[0], int(argv[1]), files))


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("DEPARROW_BROKER_LOG", "WARNING"))
    _main(sys.argv[1:])

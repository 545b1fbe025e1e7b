"""The hub's own MQTT broker when no --mqtt URL is given.

Mosquitto (a child process with a generated config) when `mosquitto` is on PATH; otherwise
amqtt, an embedded Python broker, also in a child process so a broker fault cannot take the
hub's event loop with it. Either way `pip install` alone is enough for a first run.

With `auth=True` (the hub's own broker) nobody logs in anonymously: the hub writes a password
file and an ACL file (hub/mqtt/logins.py renders them) and sends the broker SIGHUP whenever they
change, as nodes enroll and leave. Mosquitto reloads both on SIGHUP and drops the connections of
logins that are gone; the embedded broker reads the same two files through plugins below and
does the same. A broker given with --mqtt is the operator's: the hub does not manage its logins.

Every login connects under its own name as client id, whatever client id it sends (Mosquitto's
`use_username_as_clientid`; the embedded broker rewrites the CONNECT the same way), so no login
can take over, or be refused in the place of, another's session. With a certificate the broker
serves nodes and agents over TLS on the configured host, and plain MQTT on 127.0.0.1 only, for
the hub's own connection.
"""

from __future__ import annotations

import asyncio
import contextlib
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

from hub.mqtt.logins import Account, Action, AuthFileError, AuthFiles, Policy

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
    with socket.socket(_family(host)) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def port_free(host: str, port: int) -> bool:
    """Whether a listener could bind host:port now. With SO_REUSEADDR, as every broker binds
    its listener: the connections a crashed hub's broker left in TIME_WAIT do not count, a
    socket listening there does."""
    with socket.socket(_family(host)) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
        return True


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
    """One MQTT 3.1.1 CONNECT with these credentials (clean session, no will); returns the
    CONNACK code, 0 when accepted. OSError when the broker cannot be reached or does not answer
    like one. The hub's own broker takes the login's name as client id: an accepted probe
    replaces a connection that login already has, so probe only logins not in use (a node
    being enrolled, a new agent)."""
    client_id = username
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
    With tls_cert and tls_key (PEM files: the certificate chain, the key) nodes and agents
    connect over TLS on host:tls_port, and the plain listener moves to 127.0.0.1:port, for the
    hub's own connection (`url`).
    """

    def __init__(
        self,
        kind: str,
        host: str,
        port: int,
        workdir: Path,
        auth: bool = False,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        tls_port: int = 8883,
    ) -> None:
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("TLS takes both a certificate (tls_cert) and its key (tls_key)")
        self.kind = kind
        self.host = host
        self.port = port
        self.workdir = workdir
        self.auth = auth
        self.tls_cert = tls_cert
        self.tls_key = tls_key
        self.tls_port: int | None = tls_port if tls_cert is not None else None
        self.proc: subprocess.Popen[bytes] | None = None
        self._files = AuthFiles(workdir)

    @property
    def plain_host(self) -> str:
        """Where the plain listener is: loopback when nodes and agents have the TLS one."""
        return "127.0.0.1" if self.tls_port is not None else self.host

    @property
    def url(self) -> str:
        """The plain listener: the hub's own connection (everyone's, without TLS)."""
        return f"mqtt://{_url_host(self.plain_host)}:{self.port}"

    @property
    def tls_url(self) -> str | None:
        """The TLS listener, for nodes and agents; None without TLS."""
        if self.tls_port is None:
            return None
        return f"mqtts://{_url_host(self.host)}:{self.tls_port}"

    def _listeners(self) -> list[tuple[str, int]]:
        out = [(self.plain_host, self.port)]
        if self.tls_port is not None:
            out.append((self.host, self.tls_port))
        return out

    @property
    def password_file(self) -> Path:
        return self._files.password_file

    @property
    def acl_file(self) -> Path:
        return self._files.acl_file

    def write_auth(self, accounts: Iterable[Account]) -> bool:
        """Write these logins and their ACLs, and have a running broker reload them (SIGHUP).
        Both files are replaced whole; nothing happens when they did not change. Returns
        whether they changed."""
        if not self.auth:
            raise RuntimeError("this broker was started without auth: it has no logins to write")
        if not self._files.write(accounts):
            return False
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)
        return True

    def wait_accepts(self, username: str, password: str, timeout_s: float = 10.0) -> bool:
        """Block until the broker accepts this login (a reload is under way after a SIGHUP);
        False if it still refuses after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if mqtt_login(self.plain_host, self.port, username, password, 2.0) == 0:
                    return True
            except OSError as e:
                log.debug("login probe as %s: %s", username, e)
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.auth and self._files.written is None:
            raise RuntimeError("write_auth() the broker's logins before starting it")
        if self.tls_port == 0:
            self.tls_port = free_port(self.host)
        self._wait_ports_free(5.0)
        logfile = open(self.workdir / f"{self.kind}.log", "ab")  # noqa: SIM115 - child owns it
        if self.kind == "mosquitto":
            exe = shutil.which("mosquitto")
            if exe is None:
                raise RuntimeError("mosquitto is not on PATH (apt-get install mosquitto)")
            conf = self.workdir / "mosquitto.conf"
            conf.write_text(self._mosquitto_conf())
            cmd = [exe, "-c", str(conf)]
        else:
            cmd = [sys.executable, "-m", "hub.mqtt.broker", self.plain_host, str(self.port)]
            if self.auth:
                cmd += ["--auth", str(self.password_file), str(self.acl_file)]
            if self.tls_port is not None:
                cmd += ["--tls", self.host, str(self.tls_port), str(self.tls_cert)]
                cmd += [str(self.tls_key)]
        self.proc = subprocess.Popen(
            cmd,
            stdout=logfile,
            stderr=logfile,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGTERM),
        )
        logfile.close()
        for host, port in self._listeners():
            wait_port({"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host), port, 15.0, self.proc)
        where = " and ".join(u for u in (self.url, self.tls_url) if u is not None)
        log.info("started %s broker on %s (pid %d)", self.kind, where, self.proc.pid)

    def _wait_ports_free(self, timeout_s: float) -> None:
        """A hub restarted after a crash finds its broker's port held for a moment by the old
        broker, which is still exiting (it got SIGTERM when the hub died): wait for that."""
        deadline = time.monotonic() + timeout_s
        for host, port in self._listeners():
            while not port_free(host, port):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"cannot start a broker on {host}:{port}: the port is in use (a system "
                        f"Mosquitto?). Use it with --mqtt mqtt://{_url_host(host)}:{port}, or let "
                        "the hub pick a free port with --broker-port 0"
                    )
                time.sleep(0.05)

    def _mosquitto_conf(self) -> str:
        # A login's client id is its name, whatever it sends, so nobody can take over (and so
        # cut off) another login's connection by presenting its client id. A listener option.
        own_id = ["use_username_as_clientid true"] if self.auth else []
        lines = [
            "# generated by the DEparrow hub; rewritten at every start",
            f"listener {self.port} {self.plain_host}",
            *own_id,
        ]
        if self.tls_port is not None:
            lines += [
                f"listener {self.tls_port} {self.host}",
                f"certfile {self.tls_cert}",
                f"keyfile {self.tls_key}",
                *own_id,
            ]
        if self.auth:
            lines += [
                "allow_anonymous false",
                f"password_file {self.password_file}",
                f"acl_file {self.acl_file}",
            ]
        else:
            lines.append("allow_anonymous true")
        lines += [
            "persistence false",
            # Run as whoever runs the hub: a root-started mosquitto would otherwise switch
            # to its own user, which also drops the die-with-the-hub signal.
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            # a file job's assignment and result carry its files (docs/jobs.md's limits)
            "max_packet_size 67108864",
            "set_tcp_nodelay true",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
        ]
        return "\n".join(lines) + "\n"

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def choose(kind: str) -> str:
    if kind == "auto":
        return "mosquitto" if shutil.which("mosquitto") else "embedded"
    if kind not in ("mosquitto", "embedded"):
        raise ValueError(f"broker must be auto, mosquitto or embedded, not {kind!r}")
    return kind


_ACTIONS: dict[str, Action] = {"publish": "publish", "subscribe": "subscribe", "receive": "receive"}
# The largest CONNECT the embedded broker reads before it knows who sends it (a will is a
# node's `offline` status: small).
MAX_CONNECT_BYTES = 64 * 1024
CONNECT_TIMEOUT_S = 10.0


class _EmbeddedRules:
    """The embedded broker's copy of the rules, shared by its plugins; reload() on SIGHUP."""

    def __init__(self, password_file: Path, acl_file: Path) -> None:
        self.password_file = password_file
        self.acl_file = acl_file
        self.policy = Policy.load(password_file, acl_file)

    def reload(self) -> bool:
        try:
            self.policy = Policy.load(self.password_file, self.acl_file)
        except (OSError, AuthFileError) as e:  # keep the rules we have
            log.error("broker logins not reloaded: %s", e)
            return False
        return True

    def refusal(self, user: str | None, password: str | None, will_topic: str | None) -> str | None:
        """Why this CONNECT is refused, or None. will_topic: None without a will."""
        if not self.policy.authenticate(user, password):
            return f"refused login {user!r}"
        if will_topic is not None and not self.policy.allowed(user, "publish", will_topic):
            return f"refused {user}: its last will is on {will_topic!r}"
        return None


class _ConnectReplay:
    """An amqtt ReaderAdapter that gives the checked CONNECT first, then the connection's own
    bytes: amqtt reads the packet it would have read, and nothing else changes."""

    def __init__(self, connect: bytes, reader: Any) -> None:
        self._pending = connect
        self._reader = reader

    async def read(self, n: int = -1) -> bytes:
        if not self._pending:
            return bytes(await self._reader.read(n))
        if n < 0:
            data, self._pending = self._pending, b""
            return data + bytes(await self._reader.read(n))
        data, self._pending = self._pending[:n], self._pending[n:]
        if len(data) < n:
            data += bytes(await self._reader.read(n - len(data)))
        return data

    def feed_eof(self) -> None:
        self._reader.feed_eof()


async def _read_packet(reader: Any) -> bytes:
    """One whole MQTT packet, as bytes; ValueError when it is too long to be a CONNECT."""
    head = bytes(await reader.read(1))
    length, shift = 0, 0
    while True:
        byte = bytes(await reader.read(1))
        head += byte
        length |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            break
        shift += 7
        if shift > 21:
            raise ValueError("bad remaining length")
    if length > MAX_CONNECT_BYTES:
        raise ValueError(f"a {length}-byte CONNECT")
    return head + bytes(await reader.read(length))


def _embedded_broker(config: dict[str, Any], rules: _EmbeddedRules | None) -> Any:
    """An amqtt Broker for config; with rules, one that enforces them.

    amqtt acts on a CONNECT before it checks the password: with a clean session it drops the
    subscriptions of the session under that client id, otherwise it writes the newcomer's
    will and credentials into that session, and either way it takes over a live connection
    with that client id before it sends the refusal. And at every connect it offers each new
    client the retained messages of every topic filter that *anyone* holds. So the broker
    below reads the CONNECT itself first: a login that is refused gets its CONNACK before amqtt
    sees anything, and one that is accepted reaches amqtt with its own name as client id (as
    Mosquitto's use_username_as_clientid does); and it hands out retained messages only on the
    client's own subscriptions and only those its ACL lets it read.

    amqtt loads plugins by dotted path, so the plugin classes are put on this module; all is
    made here, not at import, because amqtt takes a third of a second to import and the hub
    imports this module for ChildBroker alone."""
    from amqtt.broker import Broker

    if rules is None:
        return Broker(config)
    checked = rules  # what the classes below enforce (reloaded in place on SIGHUP)

    from amqtt.adapters import BufferReader
    from amqtt.contexts import Action as AmqttAction
    from amqtt.errors import MQTTError
    from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
    from amqtt.mqtt.connect import ConnectPacket
    from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
    from amqtt.session import Session

    class EmbeddedAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]  # amqtt is untyped
        """The same check again, on the session amqtt made (the broker below did it first)."""

        async def authenticate(self, *, session: Session) -> bool | None:
            will = (session.will_topic or "") if session.will_flag else None
            why = checked.refusal(session.username, session.password, will)
            if why is None and session.client_id != session.username:
                why = f"client id {session.client_id!r} is not login {session.username!r}"
            if why is not None:
                log.info("%s", why)
            return why is None

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
            return checked.policy.allowed(session.username, kind, topic)

    class CheckingBroker(Broker):  # type: ignore[misc]
        async def _initialize_client_session(
            self, reader: Any, writer: Any, remote_address: str, remote_port: int
        ) -> Any:
            try:
                raw = await asyncio.wait_for(_read_packet(reader), CONNECT_TIMEOUT_S)
                connect = await ConnectPacket.from_stream(BufferReader(raw))
                payload, flags = connect.payload, connect.variable_header
                if payload is None or flags is None or connect.fixed_header.packet_type != 1:
                    raise ValueError("not a CONNECT")
            except Exception as e:  # whatever it was, it is not a CONNECT to act on
                with contextlib.suppress(OSError):
                    await writer.close()
                raise MQTTError(f"{remote_address}:{remote_port}: no CONNECT: {e!r}") from None
            user = payload.username if flags.username_flag else None
            will = (payload.will_topic or "") if flags.will_flag else None
            why = checked.refusal(user, payload.password if flags.password_flag else None, will)
            if why is not None or user is None:  # (a login without a name never passes)
                why = why or "refused a login without a user name"
                log.info("%s (client %r from %s)", why, payload.client_id, remote_address)
                with contextlib.suppress(OSError):  # it may have hung up already
                    await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
                    await writer.close()
                raise MQTTError(why)
            payload.client_id, payload.client_id_is_random = user, False
            await self._close_earlier_connection(user)
            earlier = self._sessions.get(user, (None, None))[0]
            if earlier is not None and earlier.clean_session and not flags.clean_session_flag:
                # A clean session ended at its disconnect (MQTT 3.1.1): amqtt would otherwise
                # hand this persistent connection that session, clean flag and all, and its
                # session monitor would drop it (subscriptions, queued messages) within 1 s.
                await self._delete_session(user)
            return await super()._initialize_client_session(
                _ConnectReplay(connect.to_bytes(), reader), writer, remote_address, remote_port
            )

        async def _close_earlier_connection(self, client_id: str) -> None:
            """One connection per login, as on Mosquitto: a login that connects again closes
            its earlier connection (whose will is published). amqtt would, on a clean session,
            drop the earlier session's subscriptions and leave its connection open, deaf."""
            session, handler = self._sessions.get(client_id, (None, None))
            if session is None or handler is None or not session.transitions.is_connected():
                return
            log.info("%s connects again: its earlier connection is closed", client_id)
            await handler.handle_connection_closed()
            deadline = time.monotonic() + 2.0
            while session.transitions.is_connected() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)  # its own task ends it (will, disconnect events)

        async def _publish_retained_messages_for_subscription(
            self, subscription: tuple[str, int], session: Session
        ) -> None:
            topic_filter, qos = subscription
            mine = self._subscriptions.get(topic_filter, ())
            handler = self._get_handler(session)
            if handler is None or not any(s.client_id == session.client_id for s, _ in mine):
                return  # a filter someone else holds
            sends = [
                asyncio.ensure_future(
                    handler.mqtt_publish(
                        topic, retained.data, min(qos, retained.qos or qos), retain=True
                    )
                )
                for topic, retained in list(self._retained_messages.items())
                if self._matches(topic, topic_filter)
                and checked.policy.allowed(session.username, "receive", topic)
            ]
            if sends:
                await asyncio.wait(sends)

    for hook in ("_initialize_client_session", "_publish_retained_messages_for_subscription"):
        if not callable(getattr(Broker, hook, None)):  # fail closed on an amqtt that changed
            raise RuntimeError(
                f"this amqtt has no Broker.{hook}: the embedded broker cannot "
                "enforce the hub's logins; install amqtt 0.12 or use Mosquitto"
            )
    module = sys.modules[__name__]
    module.EmbeddedAuthPlugin = EmbeddedAuthPlugin  # type: ignore[attr-defined]
    module.EmbeddedTopicPlugin = EmbeddedTopicPlugin  # type: ignore[attr-defined]
    config["plugins"] = {
        f"{__name__}.EmbeddedAuthPlugin": {},
        f"{__name__}.EmbeddedTopicPlugin": {},
    }
    return CheckingBroker(config)


async def _drop_gone_logins(broker: Any, rules: _EmbeddedRules) -> None:
    """After a reload, as Mosquitto does: close the connections of logins that are gone."""
    for session, handler in list(broker.sessions.values()):
        if session.username in rules.policy.users or not session.transitions.is_connected():
            continue
        log.info("closing the connection of %s: its login is gone", session.username)
        await handler.handle_connection_closed()


def _bind(host: str, port: int) -> str:
    return f"{_url_host(host)}:{port}"


async def _run_embedded(
    host: str,
    port: int,
    auth_files: tuple[Path, Path] | None,
    tls: tuple[str, int, Path, Path] | None = None,
) -> None:
    rules = _EmbeddedRules(*auth_files) if auth_files else None
    listeners: dict[str, dict[str, Any]] = {"default": {"type": "tcp", "bind": _bind(host, port)}}
    if tls is not None:
        tls_host, tls_port, cert, key = tls
        listeners["tls"] = {
            "type": "tcp",
            "bind": _bind(tls_host, tls_port),
            "ssl": True,
            "certfile": str(cert),
            "keyfile": str(key),
        }
    config: dict[str, Any] = {
        "listeners": listeners,
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    broker = _embedded_broker(config, rules)
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
    """python -m hub.mqtt.broker HOST PORT [--auth PASSWORD_FILE ACL_FILE]
    [--tls TLS_HOST TLS_PORT CERT_FILE KEY_FILE]"""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m hub.mqtt.broker")
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--auth", nargs=2, metavar=("PASSWORD_FILE", "ACL_FILE"))
    parser.add_argument("--tls", nargs=4, metavar=("HOST", "PORT", "CERT_FILE", "KEY_FILE"))
    args = parser.parse_args(argv)
    files = (Path(args.auth[0]), Path(args.auth[1])) if args.auth else None
    tls = None
    if args.tls:
        tls = (args.tls[0], int(args.tls[1]), Path(args.tls[2]), Path(args.tls[3]))
    asyncio.run(_run_embedded(args.host, args.port, files, tls))


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("DEPARROW_BROKER_LOG", "WARNING"))
    _main(sys.argv[1:])

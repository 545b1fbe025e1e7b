"""Broker logins and ACLs on the hub's own broker, real Mosquitto and the embedded amqtt: each
node and agent logs in as itself and reaches only its own topics; nobody logs in anonymously.

Absence is shown without sleeping: a forged message is published first and a genuine one after
it on the same connection, so once the genuine one has arrived the forged one would have too.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import queue
import shutil
import socket
import struct
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from deparrow.localnet import LocalHub
from edge.core import protocol
from hub.app import open_services
from hub.config import HubConfig
from hub.mqtt import logins
from hub.mqtt.bridge import parse_mqtt_url
from hub.mqtt.broker import ChildBroker, free_port, mqtt_login
from hub.store import passwords
from hub.store.db import Database
from tests.conftest import require_mosquitto, start_hub, wait_until

KINDS = ["mosquitto", "embedded"]
FIB = {
    "name": "fib",
    "engine": {"type": "wasm", "module": "example:fib", "entrypoint": "fib", "args": ["20"]},
    "timeout": 10,
}


class Peer:
    """One MQTT connection (paho), its CONNACK and everything it receives, in order."""

    def __init__(
        self,
        url: str,
        username: str | None,
        password: str | None = None,
        client_id: str = "",
        clean: bool = True,
        will: tuple[str, bytes] | None = None,
        tls_ca: Path | None = None,
    ) -> None:
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.seen: list[tuple[str, bytes]] = []
        self.rc: Any = None
        self.disconnects = 0  # connections lost after the CONNACK
        self._answered = threading.Event()
        self._suback: queue.Queue[list[Any]] = queue.Queue()
        self.c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id or "t-" + uuid.uuid4().hex[:10],
            clean_session=clean,
        )
        if username is not None:
            self.c.username_pw_set(username, password)
        if will is not None:
            self.c.will_set(will[0], will[1], qos=1, retain=True)
        if tls_ca is not None:
            self.c.tls_set(ca_certs=str(tls_ca))
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.on_subscribe = lambda _c, _u, _m, codes, _p: self._suback.put(list(codes))
        self.c.on_message = lambda _c, _u, m: self.inbox.put((m.topic, bytes(m.payload)))
        self.c.reconnect_delay_set(60, 60)  # a refused login is an answer, not to be retried
        parts = urlsplit(url)  # mqtt:// or, with tls_ca, mqtts://
        self.c.connect(parts.hostname or "127.0.0.1", parts.port or 1883, keepalive=30)
        self.c.loop_start()
        assert self._answered.wait(10), "the broker answered neither yes nor no"
        if not self.ok:
            self.c.loop_stop()

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        self.rc = rc
        self._answered.set()

    def _on_disconnect(self, *_a: Any) -> None:
        if self._answered.is_set():
            self.disconnects += 1
        self._answered.set()

    @property
    def ok(self) -> bool:
        return self.rc is not None and not self.rc.is_failure

    def subscribe(self, topic: str) -> bool:
        """True when granted, False when the broker refused the subscription."""
        self.c.subscribe(topic, qos=1)
        (code,) = self._suback.get(timeout=10)
        return not code.is_failure

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def wait_for(
        self, topic: str, payload: bytes, timeout_s: float = 10
    ) -> list[tuple[str, bytes]]:
        """Everything received up to and including (topic, payload)."""
        while (topic, payload) not in self.seen:
            self.seen.append(self.inbox.get(timeout=timeout_s))
        return self.seen[: self.seen.index((topic, payload)) + 1]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def raw_connect(
    url: str, user: str, password: str, client_id: str, will: tuple[str, bytes]
) -> socket.socket:
    """An MQTT 3.1.1 CONNECT with a retained QoS 1 last will, by hand, so the test can drop the
    TCP connection without a DISCONNECT (which is what makes a broker publish the will)."""

    def s(b: bytes) -> bytes:
        return struct.pack("!H", len(b)) + b

    flags = 0x80 | 0x40 | 0x20 | 0x08 | 0x04 | 0x02  # user, password, will retain, QoS 1, will
    body = s(b"MQTT") + bytes([4, flags]) + struct.pack("!H", 30)
    body += s(client_id.encode()) + s(will[0].encode()) + s(will[1])
    body += s(user.encode()) + s(password.encode())
    length, n = b"", len(body)
    while True:
        n, digit = divmod(n, 128)
        length += bytes([digit | (0x80 if n else 0)])
        if not n:
            break
    host, port = parse_mqtt_url(url)
    sock = socket.create_connection((host, port), timeout=10)
    sock.sendall(b"\x10" + length + body)
    return sock


def enroll(hub: LocalHub, owner: Any, name: str) -> dict[str, Any]:
    token = owner.enrollment_token()["token"]
    creds: dict[str, Any] = owner.request(
        "POST", "/api/v1/nodes/enroll", {"token": token, "name": name}, auth=False
    )
    return creds


@pytest.fixture(params=KINDS)
def own_hub(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LocalHub]:
    """A hub running its own broker: the one whose logins the hub keeps."""
    if request.param == "mosquitto":
        require_mosquitto()
    hub = start_hub(tmp_path, broker=request.param)
    assert hub.admin.status()["broker"]["kind"] == request.param
    yield hub
    hub.stop()


HUB = logins.HUB_USER
NODE_A, NODE_B, AGENT = "n_" + "a" * 16, "n_" + "b" * 16, "u_" + "c" * 16
OTHER = "u_" + "d" * 16  # no login of that name


class OwnBroker(NamedTuple):
    broker: ChildBroker
    url: str  # where nodes and agents connect: the TLS listener when there is one
    passwords: dict[str, str]


def start_broker(kind: str, workdir: Path, tls: tuple[Path, Path] | None = None) -> OwnBroker:
    """The hub's own broker with the logins the hub writes (itself, two nodes, an agent), and
    no hub: the test may log in as the hub without taking the hub's connection over."""
    if kind == "mosquitto":
        require_mosquitto()
    pw = {name: f"{name}-pw-{i}" * 2 for i, name in enumerate((HUB, NODE_A, NODE_B, AGENT))}
    hashed = {name: passwords.hash_password(p) for name, p in pw.items()}
    accounts = logins.accounts(
        logins.hub_account(hashed[HUB]),
        [(NODE_A, hashed[NODE_A]), (NODE_B, hashed[NODE_B])],
        [(AGENT, hashed[AGENT])],
    )
    if tls is None:
        broker = ChildBroker(kind, "127.0.0.1", free_port(), workdir, auth=True)
    else:
        # Nodes and agents on 127.0.0.2 (TLS), the hub's plain listener on 127.0.0.1: both
        # loopback, yet a socket bound to one does not answer on the other.
        broker = ChildBroker(
            kind, "127.0.0.2", free_port(), workdir, auth=True,
            tls_cert=tls[0], tls_key=tls[1], tls_port=free_port("127.0.0.2"),
        )  # fmt: skip
    broker.write_auth(accounts)
    broker.start()
    return OwnBroker(broker, broker.tls_url or broker.url, pw)


@pytest.fixture(params=KINDS)
def own(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OwnBroker]:
    b = start_broker(request.param, tmp_path / request.param)
    yield b
    b.broker.stop()


# --- the hub's own broker, through a real hub process ----------------------------------------
def test_nodes_and_agents_reach_only_their_own_topics(own_hub: LocalHub) -> None:
    """The hub's own login is the hub's alone (a second connection would replace the hub's),
    so this test watches what the hub does; test_a_login_reads_only_its_own_topics below
    watches the wire."""
    hub = own_hub
    url = hub.admin.status()["broker"]["url"]
    owner_user, owner = hub.user("owner")
    a, b = enroll(hub, owner, "a"), enroll(hub, owner, "b")  # enrolled while the hub runs
    a_id, b_id = a["node_id"], b["node_id"]

    # The hub's files and its own password are for its eyes only.
    for f in ("mqtt-password", "broker/passwd", "broker/acl"):
        assert (hub.data_dir / f).stat().st_mode & 0o777 == 0o600, f

    # Nobody without a login; no login with a wrong password or for someone else's name.
    assert not Peer(url, None).ok
    assert mqtt_login(*parse_mqtt_url(url), a_id, "wrong-password", 5) != 0
    assert mqtt_login(*parse_mqtt_url(url), b_id, a["mqtt"]["password"], 5) != 0
    assert mqtt_login(*parse_mqtt_url(url), "n_0000000000000000", "x" * 32, 5) != 0

    # A node enrolled a moment ago logs in at once, without a hub restart.
    node = Peer(url, a_id, a["mqtt"]["password"], client_id=a_id)
    assert node.ok, node.rc

    # Speaking as node b: refused. As itself: delivered to the hub.
    forged = protocol.encode(protocol.hello(b_id, ["wasm"], {"cpu": 64, "memory_mb": 1 << 20}, "x"))
    own = protocol.encode(protocol.hello(a_id, ["wasm"], {"cpu": 1, "memory_mb": 256}, "t"))
    node.publish(protocol.node_topic(b_id, protocol.HELLO), forged)
    node.publish(protocol.node_topic(a_id, protocol.HELLO), own)
    states = wait_until(
        "the hub to hear node a",
        lambda: (s := {n["id"]: n["state"] for n in owner.nodes()})[a_id] == "idle" and s,
    )
    assert states[b_id] == "offline"  # b's forged hello never reached the hub

    # An agent: its user id and API token. Its submit reaches the hub and its reply comes
    # back; a submit in another agent's name does not get through.
    agent_user, agent = hub.user("agent")
    agent_id, token = agent_user["id"], agent_user["token"]
    peer = Peer(url, agent_id, token, client_id=agent_id)
    assert peer.ok, peer.rc
    assert peer.subscribe(protocol.agent_topic(agent_id, protocol.REPLY))
    submit = {"v": 1, "request_id": "r1", "token": token, "spec": FIB}
    peer.publish(protocol.agent_topic(owner_user["id"], protocol.SUBMIT),
                 json.dumps({**submit, "request_id": "forged"}).encode())  # fmt: skip
    peer.publish(protocol.agent_topic(agent_id, protocol.SUBMIT), json.dumps(submit).encode())
    topic, payload = peer.inbox.get(timeout=10)
    reply = json.loads(payload)
    assert topic == protocol.agent_topic(agent_id, protocol.REPLY)
    assert reply["request_id"] == "r1" and reply["ok"], reply
    assert [j["id"] for j in agent.jobs()] == [reply["body"]["id"]]
    assert owner.jobs() == []  # nothing was submitted in the owner's name
    assert hub.admin.status()["broker"]["connected"]  # nobody took the hub's connection
    for p in (node, peer):
        p.close()


# --- the hub's own broker and its logins, without a hub ----------------------------------------
def test_a_login_reads_only_its_own_topics(own: OwnBroker) -> None:
    """Reading: a node its own assignments only, never another node's nor an agent's traffic
    (a submit carries the agent's API token). Mosquitto grants a wide subscription and leaves
    out what the login may not read; the embedded broker refuses it outright."""
    url, pw = own.url, own.passwords
    mosquitto = own.broker.kind == "mosquitto"
    node = Peer(url, NODE_A, pw[NODE_A], client_id=NODE_A)
    wide = node.subscribe("dp/v1/#")
    assert wide == mosquitto
    assert not node.subscribe(protocol.node_topic(NODE_B, protocol.ASSIGN)) or wide
    assert node.subscribe(protocol.node_topic(NODE_A, protocol.CANCEL))
    agent = Peer(url, AGENT, pw[AGENT], client_id=AGENT)
    assert agent.subscribe(protocol.agent_topic(AGENT, protocol.REPLY))
    assert not agent.subscribe(protocol.agent_topic(NODE_A, protocol.REPLY)) or wide
    assert not agent.subscribe(protocol.node_topic(NODE_A, protocol.CANCEL)) or wide

    # Only the hub may speak on everyone's topics; a forged message goes first, a genuine one
    # after it on the same connection.
    hub_side = Peer(url, HUB, pw[HUB], client_id=HUB)
    hub_side.publish(protocol.node_topic(NODE_B, protocol.CANCEL), b"for b")
    hub_side.publish(protocol.agent_topic(AGENT, protocol.REPLY), b"for the agent")
    hub_side.publish(protocol.node_topic(NODE_A, protocol.CANCEL), b"for a")
    got = node.wait_for(protocol.node_topic(NODE_A, protocol.CANCEL), b"for a")
    assert all(t.startswith(f"dp/v1/nodes/{NODE_A}/") for t, _ in got), got
    got = agent.wait_for(protocol.agent_topic(AGENT, protocol.REPLY), b"for the agent")
    assert got == [(protocol.agent_topic(AGENT, protocol.REPLY), b"for the agent")], got

    # A node or an agent speaking on another's topic: dropped, and the hub never sees it.
    observer = hub_side
    assert observer.subscribe("dp/v1/#")
    node.publish(protocol.node_topic(NODE_B, protocol.HELLO), b"forged hello")
    agent.publish(protocol.agent_topic(OTHER, protocol.SUBMIT), b"forged submit")
    agent.publish(protocol.agent_topic(AGENT, protocol.SUBMIT), b"own submit")
    node.publish(protocol.node_topic(NODE_A, protocol.HELLO), b"own hello")
    seen = observer.wait_for(protocol.agent_topic(AGENT, protocol.SUBMIT), b"own submit")
    seen += observer.wait_for(protocol.node_topic(NODE_A, protocol.HELLO), b"own hello")
    assert not [t for t, _ in seen if NODE_B in t or OTHER in t], seen
    for p in (node, agent, hub_side):
        p.close()


def test_a_forged_last_will_or_session_takeover_gets_nothing(own: OwnBroker) -> None:
    url, pw = own.url, own.passwords
    embedded = own.broker.kind == "embedded"
    a_pw = pw[NODE_A]
    observer = Peer(url, HUB, pw[HUB], client_id=HUB)
    assert observer.subscribe("dp/v1/nodes/#")

    # Node a registers a last will on b's status topic, then vanishes; then once more with a
    # will on its own topic. The broker publishes only the second.
    offline_b = protocol.encode(protocol.status(NODE_B, protocol.OFFLINE))
    offline_a = protocol.encode(protocol.status(NODE_A, protocol.OFFLINE))
    forger = raw_connect(
        url, NODE_A, a_pw, "will-1", (protocol.node_topic(NODE_B, "status"), offline_b)
    )
    answer = forger.recv(4)
    # The embedded broker refuses the login outright; Mosquitto accepts it and drops the will.
    assert answer[3:] == (b"\x05" if embedded else b"\x00"), answer
    forger.close()
    honest = raw_connect(
        url, NODE_A, a_pw, "will-2", (protocol.node_topic(NODE_A, "status"), offline_a)
    )
    assert honest.recv(4)[3:] == b"\x00"
    honest.close()
    got = observer.wait_for(protocol.node_topic(NODE_A, "status"), offline_a)
    assert (protocol.node_topic(NODE_B, "status"), offline_b) not in got, got

    # Node b keeps a persistent session; something is queued in it while b is away. Node a
    # connecting with b's client id gets a session of its own (its own name is its client
    # id, on both brokers), not b's nor what waits in it; b then finds its message there.
    b_session = Peer(url, NODE_B, pw[NODE_B], client_id=NODE_B, clean=False)
    assert b_session.subscribe(protocol.node_topic(NODE_B, protocol.ASSIGN))
    b_session.close()
    observer.publish(protocol.node_topic(NODE_B, protocol.ASSIGN), b"queued for b")
    thief = Peer(url, NODE_A, a_pw, client_id=NODE_B, clean=False)
    assert thief.ok, thief.rc
    assert thief.subscribe(protocol.node_topic(NODE_A, "diag"))
    thief.publish(protocol.node_topic(NODE_A, "diag"), b"round trip")
    got = thief.wait_for(protocol.node_topic(NODE_A, "diag"), b"round trip")
    assert got == [(protocol.node_topic(NODE_A, "diag"), b"round trip")], got
    thief.close()
    b_again = Peer(url, NODE_B, pw[NODE_B], client_id=NODE_B, clean=False)
    got = b_again.wait_for(protocol.node_topic(NODE_B, protocol.ASSIGN), b"queued for b")
    assert got == [(protocol.node_topic(NODE_B, protocol.ASSIGN), b"queued for b")], got
    for p in (observer, b_again):
        p.close()


def test_a_real_node_and_the_hub_use_their_logins(own_hub: LocalHub, tmp_path: Path) -> None:
    """edge-run connects with the credentials from node.json and runs a job end to end."""
    hub = own_hub
    _, owner = hub.user("owner")
    _, alice = hub.user("alice")
    node = hub.start_node(owner, tmp_path / "n1", "n1", wait_s=30)
    try:
        job = alice.submit(FIB)
        assert alice.wait(job["id"], 60)["state"] == "completed"
    finally:
        node.stop()
    config = json.loads((tmp_path / "n1" / "node.json").read_text())
    assert config["mqtt"]["username"] == config["node_id"] and config["mqtt"]["password"]


# --- the rules kept in sync with the store, in-process --------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_a_revoked_node_loses_its_login_and_its_connection(kind: str, tmp_path: Path) -> None:
    if kind == "mosquitto":
        require_mosquitto()
    services = open_services(HubConfig(data_dir=tmp_path / "hub"))
    password = logins.hub_password(services.config.data_dir)
    services.hub_login = logins.hub_account(passwords.hash_password(password))
    broker = ChildBroker(kind, "127.0.0.1", free_port(), tmp_path / "broker", auth=True)
    services.broker = broker
    try:
        assert services.sync_broker()  # first write
        assert not services.sync_broker()  # nothing changed: no rewrite, no reload
        broker.start()
        user_id, _, _ = services.create_user("owner", "user")
        token, _ = services.store.create_enrollment_token(user_id, 60)
        node_pw = "p" * 32
        node_id, _ = services.store.create_node(
            token=token, owner=user_id, name="n", engines=["wasm"], arch="", cpu=1,
            memory_mb=64, mqtt_password=node_pw,
        )  # fmt: skip
        assert services.sync_broker()
        assert broker.wait_accepts(node_id, node_pw)
        peer = Peer(broker.url, node_id, node_pw, client_id=node_id)
        assert peer.ok

        assert services.store.revoke_node(node_id)
        assert not services.store.revoke_node(node_id)  # once
        assert services.sync_broker()
        assert node_id not in (tmp_path / "broker" / "passwd").read_text()
        assert node_id not in (tmp_path / "broker" / "acl").read_text()
        # The broker drops its connection and refuses it from now on; the hub stays.
        wait_until("the broker to drop the revoked node", lambda: not peer.c.is_connected(), 10)
        assert mqtt_login(broker.host, broker.port, node_id, node_pw, 5) != 0
        assert mqtt_login(broker.host, broker.port, logins.HUB_USER, password, 5) == 0
        peer.c.loop_stop()
    finally:
        broker.stop()
        services.db.close()


def test_an_outside_broker_is_left_alone(tmp_path: Path) -> None:
    """--mqtt: the operator's broker; the hub writes no logins and sends it no signals."""
    services = open_services(HubConfig(data_dir=tmp_path / "hub"))
    services.broker = ChildBroker("embedded", "127.0.0.1", free_port(), tmp_path / "plain")
    try:
        assert not services.sync_broker()
        with pytest.raises(RuntimeError, match="without auth"):
            services.broker.write_auth([])
        assert not (tmp_path / "plain" / "passwd").exists()
    finally:
        services.db.close()


# --- the hashes and the matching rules ---------------------------------------------------------
def test_hashes_are_mosquitto_passwd_hashes(tmp_path: Path) -> None:
    require_mosquitto()
    exe = shutil.which("mosquitto_passwd")
    assert exe, "mosquitto_passwd comes with the mosquitto package"
    path = tmp_path / "passwd"
    subprocess.run([exe, "-b", "-c", str(path), "alice", "s3cret pass"], check=True, timeout=30)
    theirs = logins.parse_password_file(path.read_text())["alice"]
    assert passwords.verify_password("s3cret pass", theirs)
    assert not passwords.verify_password("s3cret pas", theirs)
    # Ours, byte for byte what PBKDF2-SHA512 gives for a known salt (the format Mosquitto reads;
    # that it accepts it is the login tests above).
    salt = bytes(range(12))
    ours = passwords.hash_password("pw", salt=salt)
    key = hashlib.pbkdf2_hmac("sha512", b"pw", salt, 101, 64)
    assert ours == f"$7$101${base64.b64encode(salt).decode()}${base64.b64encode(key).decode()}"
    assert passwords.verify_password("pw", ours) and not passwords.verify_password("", ours)
    for bad in ("", "$6$abc$def", "$7$x$y$z", "$7$101$!!$!!", "$7$101$$", ours + "$"):
        assert not passwords.verify_password("pw", bad), bad
    with pytest.raises(ValueError):
        passwords.hash_password("")


def test_topic_rules() -> None:
    m, w = logins.topic_matches, logins.filter_within
    assert m("dp/v1/nodes/n_1/#", "dp/v1/nodes/n_1/hello") and m(
        "dp/v1/nodes/n_1/#", "dp/v1/nodes/n_1"
    )
    assert not m("dp/v1/nodes/n_1/#", "dp/v1/nodes/n_12/hello")
    assert not m("dp/v1/nodes/n_1/#", "dp/v1/nodes/+/hello")  # not a topic
    assert m("a/+/c", "a/b/c") and not m("a/+/c", "a/b/c/d") and not m("#", "$SYS/x")
    assert w("dp/v1/nodes/n_1/+", "dp/v1/nodes/n_1/#") and w("dp/v1/nodes/n_1", "dp/v1/nodes/n_1/#")
    assert w("a/b", "a/+") and w("a/+", "a/+") and not w("a/#", "a/+")
    for wider in (
        "dp/v1/#",
        "dp/v1/nodes/+/assign",
        "#",
        "dp/v1/nodes/n_1/#/x",
        "+/v1/nodes/n_1/a",
    ):
        assert not w(wider, "dp/v1/nodes/n_1/#"), wider
    acct = logins.node_account("n_1", passwords.hash_password("x"))
    rules = logins.Policy(
        logins.parse_password_file(logins.render_password_file([acct])),
        logins.parse_acl_file(logins.render_acl_file([acct])),
    )
    assert rules.authenticate("n_1", "x") and not rules.authenticate("n_1", "y")
    assert not rules.authenticate(None, None) and not rules.authenticate("n_2", "x")
    for action in ("publish", "receive", "subscribe"):
        assert rules.allowed("n_1", action, "dp/v1/nodes/n_1/result")  # type: ignore[arg-type]
        assert not rules.allowed("n_1", action, "dp/v1/nodes/n_2/result")  # type: ignore[arg-type]
        assert not rules.allowed(None, action, "dp/v1/nodes/n_1/result")  # type: ignore[arg-type]
    # Names and filters that would break the line-based files are refused, not written.
    for name in ("a b", "a\nuser hub", "", "x:y", "#"):
        with pytest.raises(ValueError):
            logins.Account(name, acct.password_hash, ())
    with pytest.raises(ValueError):
        logins.Account("n_1", acct.password_hash, ("a/#/b",))
    with pytest.raises(logins.AuthFileError):
        logins.parse_acl_file("pattern readwrite %u/#\n")
    # A row that cannot be a login is left out, and the others still go in.
    hub = logins.hub_account(acct.password_hash)
    built = logins.accounts(
        hub, [("n_1", acct.password_hash), ("n_2", "damaged")], [("u 1", acct.password_hash)]
    )
    assert [a.username for a in built] == [logins.HUB_USER, "n_1"]


def test_the_hub_password_is_made_once_and_kept_private(tmp_path: Path) -> None:
    first = logins.hub_password(tmp_path)
    assert logins.hub_password(tmp_path) == first and len(first) >= 32
    assert (tmp_path / "mqtt-password").stat().st_mode & 0o777 == 0o600
    os.truncate(tmp_path / "mqtt-password", 0)
    with pytest.raises(logins.AuthFileError, match="delete it"):
        logins.hub_password(tmp_path)


def test_an_account_from_before_broker_logins_gets_one_at_its_next_sign_in(
    tmp_path: Path,
) -> None:
    """Users created before store migration 5 have no broker hash; showing the hub their
    token (as every CLI call does) gives them their MQTT login."""
    hub = start_hub(tmp_path, broker="mosquitto")
    try:
        user, client = hub.user("old-timer")
        with Database(hub.data_dir / "hub.sqlite") as db, db.transaction() as c:
            c.execute("UPDATE users SET broker_hash = NULL WHERE id = ?", (user["id"],))
        url = hub.admin.status()["broker"]["url"]
        wait_until(  # the hub's 10 s resync drops the login
            "the login to go",
            lambda: mqtt_login(*parse_mqtt_url(url), user["id"], user["token"], 5) != 0,
            30,
        )
        client.wallet()  # signs in: token -> JWT
        wait_until(
            "the login to work",
            lambda: mqtt_login(*parse_mqtt_url(url), user["id"], user["token"], 5) == 0,
            15,
        )
    finally:
        hub.stop()

"""The hub's own broker on a network it does not trust, on real Mosquitto and on the embedded
amqtt broker alike (issue 15): a login can take no other login's client id, a refused login
touches nobody's session, a retained message reaches only logins that may read it, a broker
restarts at once on its port, and nodes and agents reach it over TLS.

Each test stands up the broker the hub runs (ChildBroker, auth on, the logins the hub would
write) and speaks to it with ordinary MQTT clients: paho, raw CONNECT packets, mosquitto_sub.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import trustme

from edge.core import protocol
from hub.mqtt import logins
from hub.mqtt.broker import ChildBroker, mqtt_login
from hub.store import passwords
from tests.conftest import wait_until
from tests.hub.test_broker_acl import (
    AGENT,
    HUB,
    KINDS,
    NODE_A,
    NODE_B,
    OwnBroker,
    Peer,
    start_broker,
)


@pytest.fixture(params=KINDS)
def own(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OwnBroker]:
    b = start_broker(request.param, tmp_path / request.param)
    yield b
    b.broker.stop()


def raw_login(
    host: str, port: int, user: str | None, password: str | None, client_id: str, clean: bool
) -> int:
    """One MQTT 3.1.1 CONNECT as given; the CONNACK code (5 when the broker just hangs up)."""

    def s(b: bytes) -> bytes:
        return struct.pack("!H", len(b)) + b

    flags = (0x02 if clean else 0) | (0xC0 if user is not None else 0)
    body = s(b"MQTT") + bytes([4, flags]) + struct.pack("!H", 30) + s(client_id.encode())
    if user is not None:
        body += s(user.encode()) + s((password or "").encode())
    assert len(body) < 128
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(bytes([0x10, len(body)]) + body)
        answer = b""
        while len(answer) < 4:
            chunk = sock.recv(4 - len(answer))
            if not chunk:
                return 5
            answer += chunk
        if answer[3] == 0:
            sock.sendall(b"\xe0\x00")
        return answer[3]


def assign(node: str) -> str:
    return protocol.node_topic(node, protocol.ASSIGN)


def hello(node: str) -> str:
    return protocol.node_topic(node, protocol.HELLO)


def still_served(hub: Peer, node: Peer, node_id: str, tag: bytes) -> None:
    """Both connections are up and both directions still flow: the hub's messages reach the
    node's subscription, and the node's reach the hub's."""
    hub.publish(assign(node_id), b"to the node " + tag)
    node.wait_for(assign(node_id), b"to the node " + tag)
    node.publish(hello(node_id), b"to the hub " + tag)
    hub.wait_for(hello(node_id), b"to the hub " + tag)
    assert (hub.disconnects, node.disconnects) == (0, 0)


# --- finding 2: one client id, one login -------------------------------------------------------
def test_no_login_can_take_another_logins_client_id(own: OwnBroker) -> None:
    host, port = own.broker.host, own.broker.port
    hub = Peer(own.url, HUB, own.passwords[HUB], client_id=HUB)
    node = Peer(own.url, NODE_A, own.passwords[NODE_A], client_id=NODE_A)
    assert hub.subscribe(protocol.node_topic("+", protocol.HELLO))
    assert node.subscribe(assign(NODE_A))
    still_served(hub, node, NODE_A, b"before")

    # An agent and another node log in with their own passwords and the victim's client id:
    # the hub's (as the bridge uses it) and the node's (anyone whose job it ran knows it).
    for thief, victim in ((AGENT, NODE_A), (NODE_B, NODE_A), (AGENT, HUB), (NODE_B, HUB)):
        t = Peer(own.url, thief, own.passwords[thief], client_id=victim)
        assert t.ok, (thief, victim, t.rc)  # logged in, as itself: its own name is its id
        mine = protocol.node_topic(thief, "diag") if thief.startswith("n_") else None
        mine = mine or protocol.agent_topic(thief, "diag")
        assert t.subscribe(mine)
        t.publish(mine, b"mine")
        assert t.wait_for(mine, b"mine") == [(mine, b"mine")]
        t.close()
        still_served(hub, node, NODE_A, f"after {thief} as {victim}".encode())
    # The same with a bare CONNECT, persistent session asked for.
    for thief in (AGENT, NODE_B):
        for victim in (NODE_A, HUB):
            assert raw_login(host, port, thief, own.passwords[thief], victim, False) == 0
    still_served(hub, node, NODE_A, b"after the bare ones")
    # One connection per login: the node's own login connecting again (under whatever client
    # id) replaces its earlier connection, which is closed, not left open without its
    # subscriptions; its last will tells the hub.
    will = protocol.node_topic(NODE_A, protocol.STATUS)
    assert hub.subscribe(will)
    node.close()
    node = Peer(own.url, NODE_A, own.passwords[NODE_A], client_id=NODE_A, will=(will, b"gone"))
    assert node.subscribe(assign(NODE_A))
    again = Peer(own.url, NODE_A, own.passwords[NODE_A], client_id=NODE_A + "-diag")
    hub.wait_for(will, b"gone")
    wait_until("the earlier connection to close", lambda: node.disconnects == 1, 10)
    node.c.loop_stop()
    assert again.subscribe(assign(NODE_A))
    still_served(hub, again, NODE_A, b"reconnected")
    for p in (hub, again):
        p.close()


# --- finding 3: a refused login touches no session ----------------------------------------------
def test_a_refused_login_touches_no_session(own: OwnBroker) -> None:
    host, port = own.broker.host, own.broker.port
    hub = Peer(own.url, HUB, own.passwords[HUB], client_id=HUB)
    node = Peer(own.url, NODE_A, own.passwords[NODE_A], client_id=NODE_A)
    assert hub.subscribe(protocol.node_topic("+", protocol.HELLO))
    assert node.subscribe(assign(NODE_A))
    # Wrong passwords, another login's password, no login at all; clean and persistent; aimed
    # at the node's client id and at the hub's.
    for victim in (NODE_A, HUB):
        for user, password in (
            (victim, "wrong-password"),
            (NODE_B, "wrong-password"),
            (NODE_B, own.passwords[AGENT]),
            (None, None),
        ):
            for clean in (True, False):
                code = raw_login(host, port, user, password, victim, clean)
                assert code in (4, 5), (victim, user, clean, code)
    still_served(hub, node, NODE_A, b"after the refused logins")

    # A persistent session with a message queued in it while the node is away keeps both.
    node.close()
    keeper = Peer(own.url, NODE_B, own.passwords[NODE_B], client_id=NODE_B, clean=False)
    assert keeper.subscribe(assign(NODE_B))
    keeper.close()
    hub.publish(assign(NODE_B), b"queued for b")
    for clean in (True, False):
        assert raw_login(host, port, NODE_B, "wrong-password", NODE_B, clean) in (4, 5)
        assert raw_login(host, port, AGENT, "wrong-password", NODE_B, clean) in (4, 5)
    back = Peer(own.url, NODE_B, own.passwords[NODE_B], client_id=NODE_B, clean=False)
    assert back.ok, back.rc
    assert back.wait_for(assign(NODE_B), b"queued for b")[-1] == (assign(NODE_B), b"queued for b")
    for p in (hub, back):
        p.close()


def test_a_persistent_session_after_a_clean_one_keeps_what_is_queued(own: OwnBroker) -> None:
    """A login connects with a clean session, then (at once) with a persistent one that
    subscribes, and goes away: what is published for it meanwhile waits for it, past the
    embedded broker's session sweep (every second), as on Mosquitto (the agent recipe of
    docs/protocol.md does exactly this)."""
    hub = Peer(own.url, HUB, own.passwords[HUB], client_id=HUB)
    first = Peer(own.url, NODE_B, own.passwords[NODE_B], client_id=NODE_B, clean=True)
    first.close()
    keeper = Peer(own.url, NODE_B, own.passwords[NODE_B], client_id=NODE_B, clean=False)
    assert keeper.subscribe(assign(NODE_B))
    keeper.close()
    hub.publish(assign(NODE_B), b"kept for b")
    time.sleep(2.5)  # past amqtt's session monitor (it wakes every 1 s), not our own timing
    back = Peer(own.url, NODE_B, own.passwords[NODE_B], client_id=NODE_B, clean=False)
    assert back.wait_for(assign(NODE_B), b"kept for b")[-1] == (assign(NODE_B), b"kept for b")
    for p in (hub, back):
        p.close()


# --- finding 4: retained messages go only where the ACL lets them -------------------------------
def test_retained_messages_reach_only_logins_that_may_read_them(own: OwnBroker) -> None:
    hub = Peer(own.url, HUB, own.passwords[HUB], client_id=HUB)
    status = protocol.node_topic("+", protocol.STATUS)
    assert hub.subscribe(status)  # as the hub's bridge does: the broker now holds this filter
    for node_id in (NODE_A, NODE_B):  # each node's retained status, as its last will leaves it
        n = Peer(own.url, node_id, own.passwords[node_id], client_id=node_id)
        offline = protocol.encode(protocol.status(node_id, protocol.OFFLINE))
        n.publish(protocol.node_topic(node_id, protocol.STATUS), offline, retain=True)
        hub.wait_for(protocol.node_topic(node_id, protocol.STATUS), offline)
        n.close()

    # A new login: nothing at connect, nothing on subscriptions refused (or, on Mosquitto,
    # granted wide and filtered); then a message of its own shows nothing else came first.
    agent = Peer(own.url, AGENT, own.passwords[AGENT], client_id=AGENT)
    reply = protocol.agent_topic(AGENT, protocol.REPLY)
    assert agent.subscribe(reply)
    for other in (status, protocol.node_topic(NODE_A, protocol.STATUS), "dp/v1/#", "#"):
        agent.subscribe(other)
    node = Peer(own.url, NODE_B, own.passwords[NODE_B], client_id=NODE_B)
    assert node.subscribe(protocol.node_topic(NODE_B, "#"))
    node.subscribe(protocol.node_topic(NODE_A, protocol.STATUS))
    hub.publish(reply, b"yours")
    assert agent.wait_for(reply, b"yours") == [(reply, b"yours")]
    # What a login may read, it still gets retained: node b its own status, not a's.
    hub.publish(assign(NODE_B), b"yours too")
    got = node.wait_for(assign(NODE_B), b"yours too")
    assert {t for t, _ in got} == {protocol.node_topic(NODE_B, protocol.STATUS), assign(NODE_B)}
    # And the hub, subscribing afresh, gets every node's.
    hub.close()
    hub = Peer(own.url, HUB, own.passwords[HUB], client_id=HUB)
    assert hub.subscribe(status)
    for node_id in (NODE_A, NODE_B):
        offline = protocol.encode(protocol.status(node_id, protocol.OFFLINE))
        hub.wait_for(protocol.node_topic(node_id, protocol.STATUS), offline)
    for p in (hub, agent, node):
        p.close()


# --- finding 5: a broker restarts at once on its port -------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_a_broker_restarts_at_once_on_its_port(kind: str, tmp_path: Path) -> None:
    first = start_broker(kind, tmp_path / "first")
    peers = [
        Peer(first.url, name, first.passwords[name], client_id=name) for name in (NODE_A, AGENT)
    ]
    first.broker.stop()  # the broker closes their connections: TIME_WAIT on its port
    for p in peers:
        p.c.loop_stop()
    t = time.monotonic()
    again = ChildBroker(kind, "127.0.0.1", first.broker.port, tmp_path / "again", auth=True)
    again.write_auth([logins.hub_account(passwords.hash_password(first.passwords[HUB]))])
    try:
        again.start()
        assert mqtt_login(again.host, again.port, HUB, first.passwords[HUB], 5) == 0
        assert time.monotonic() - t < 5
    finally:
        again.stop()


# --- TLS listeners --------------------------------------------------------------------------
class Tls(NamedTuple):
    ca: Path
    cert: Path
    key: Path


@pytest.fixture
def tls_files(tmp_path: Path) -> Tls:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.2", "127.0.0.1", "localhost")
    files = Tls(tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem")
    ca.cert_pem.write_to_path(str(files.ca))
    server.private_key_pem.write_to_path(str(files.key))
    with files.cert.open("wb") as f:
        for blob in server.cert_chain_pems:
            f.write(blob.bytes())
    return files


@pytest.fixture(params=KINDS)
def tls_broker(
    request: pytest.FixtureRequest, tmp_path: Path, tls_files: Tls
) -> Iterator[OwnBroker]:
    b = start_broker(request.param, tmp_path / request.param, (tls_files.cert, tls_files.key))
    yield b
    b.broker.stop()


def test_nodes_and_agents_speak_tls_and_the_plain_listener_is_loopback_only(
    tls_broker: OwnBroker, tls_files: Tls
) -> None:
    broker, pw = tls_broker.broker, tls_broker.passwords
    assert broker.url == f"mqtt://127.0.0.1:{broker.port}"  # the hub's bridge
    hub = Peer(broker.url, HUB, pw[HUB], client_id=HUB)
    assert hub.subscribe(protocol.node_topic("+", protocol.HELLO))
    node = Peer(tls_broker.url, NODE_A, pw[NODE_A], client_id=NODE_A, tls_ca=tls_files.ca)
    assert node.ok, node.rc
    assert node.subscribe(assign(NODE_A))
    still_served(hub, node, NODE_A, b"over TLS")
    agent = Peer(tls_broker.url, AGENT, pw[AGENT], client_id=AGENT, tls_ca=tls_files.ca)
    reply = protocol.agent_topic(AGENT, protocol.REPLY)
    assert agent.subscribe(reply)
    hub.publish(reply, b"for the agent")
    agent.wait_for(reply, b"for the agent")
    # The logins hold on the TLS listener too.
    refused = Peer(tls_broker.url, NODE_A, "wrong-password", tls_ca=tls_files.ca)
    assert not refused.ok

    # No plain MQTT where nodes connect; no plain listener beyond loopback; the TLS one only
    # on its host.
    with contextlib.suppress(OSError):  # it hangs up on a plain CONNECT, or sends a TLS alert
        assert mqtt_login("127.0.0.2", broker.tls_port, NODE_A, pw[NODE_A], 5) != 0
    for host, port in (("127.0.0.2", broker.port), ("127.0.0.1", broker.tls_port)):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, port), timeout=5).close()
    # A client that does not trust the hub's CA does not get through.
    with (
        socket.create_connection(("127.0.0.2", broker.tls_port), timeout=5) as sock,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        ssl.create_default_context().wrap_socket(sock, server_hostname="127.0.0.2")
    for p in (hub, node, agent):
        p.close()


def test_mosquitto_sub_with_the_ca_reads_over_tls(tls_broker: OwnBroker, tls_files: Tls) -> None:
    broker, pw = tls_broker.broker, tls_broker.passwords
    exe = subprocess.run(["which", "mosquitto_sub"], capture_output=True, text=True).stdout.strip()
    assert exe, "mosquitto_sub comes with the mosquitto-clients package"
    hub = Peer(broker.url, HUB, pw[HUB], client_id=HUB)
    hub.publish(assign(NODE_A), b"kept for the node", retain=True)
    out = subprocess.run(
        [exe, "--cafile", str(tls_files.ca), "-h", "127.0.0.2", "-p", str(broker.tls_port),
         "-u", NODE_A, "-P", pw[NODE_A], "-i", NODE_A, "-t", assign(NODE_A), "-C", "1",
         "-W", "10", "-v"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{assign(NODE_A)} kept for the node"
    # Without the CA, mosquitto_sub refuses the hub's certificate.
    out = subprocess.run(
        [exe, "--capath", "/etc/ssl/certs", "-h", "127.0.0.2", "-p", str(broker.tls_port),
         "-u", NODE_A, "-P", pw[NODE_A], "-t", assign(NODE_A), "-C", "1", "-W", "5"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode != 0
    hub.close()

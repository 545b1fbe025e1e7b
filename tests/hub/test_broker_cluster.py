"""The broker cluster (docs/broker-cluster.md) against three real Mosquitto servers.

Nodes connect to any one server; every hub replica connects to all of them and subscribes in
one share group, so each message a node publishes reaches one replica. The logins are the
store's (a real store, real enrolled nodes and their $7$ hashes), rendered into the files all
servers read. Every wait is for a condition, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from deparrow.brokercluster import LocalBrokerCluster
from deparrow.localnet import wait_for
from deparrow.pgserver import LocalPostgres
from edge.core import protocol
from hub.api.services import Services
from hub.app import open_services
from hub.config import HubConfig
from hub.mqtt import logins
from hub.mqtt.bridge import QUEUE_WHILE_AWAY_S, Bridge, Receipts, parse_mqtt_urls
from hub.mqtt.link import subscriptions
from hub.store.passwords import hash_password
from tests.conftest import require_mosquitto

HUB_PASSWORD = "hub-secret-for-tests"
NODE_PASSWORD = "node-secret-for-tests"
GROUP = "hubs"
V2 = CallbackAPIVersion.VERSION2


def _host_port(url: str) -> tuple[str, int]:
    server = parse_mqtt_urls(url)[0]
    return server.host, server.port


# --- the store's logins, on the cluster ---------------------------------------------------------
def enroll(s: Services, owner: str) -> str:
    """A node enrolled as the API does it: its broker login is its id and NODE_PASSWORD."""
    token, _ = s.store.create_enrollment_token(owner, 60)
    node_id, _ = s.store.create_node(
        token=token, owner=owner, name="n", engines=["wasm"], arch="x", cpu=2, memory_mb=512,
        mqtt_password=NODE_PASSWORD,
    )  # fmt: skip
    return node_id


def sync_logins(s: Services, cluster: LocalBrokerCluster) -> bool:
    """What the hub does for a cluster: render the store's logins into the servers' files,
    and have the servers reload them when they changed."""
    hub = logins.hub_account(hash_password(HUB_PASSWORD, iterations=1000))
    nodes, users = s.store.broker_logins()
    changed = logins.AuthFiles(cluster.auth_dir).write(logins.accounts(hub, nodes, users))
    if changed:
        cluster.reload()
    return changed


@pytest.fixture
def services(tmp_path: Path) -> Services:
    return open_services(HubConfig(data_dir=tmp_path / "hub"))


@pytest.fixture
def owner(services: Services) -> str:
    user_id, _token, _grant = services.create_user("alice", "user")
    return user_id


@pytest.fixture
def nodes(services: Services, owner: str) -> list[str]:
    return [enroll(services, owner) for _ in range(3)]


@pytest.fixture
def cluster(tmp_path: Path, services: Services, nodes: list[str]) -> Iterator[LocalBrokerCluster]:
    require_mosquitto()
    c = LocalBrokerCluster(tmp_path / "brokers", 3, auth=True)
    sync_logins(services, c)
    c.start()
    yield c
    c.stop()


# --- MQTT clients as the hub and the nodes use them ---------------------------------------------
class Member:
    """One replica of the hub's share group, made of paho clients as the Bridge makes them:
    one per server, on the servers' hub listeners, subscribed as `$share/GROUP/...`."""

    def __init__(self, name: str, cluster: LocalBrokerCluster) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.subscribed: set[int] = set()
        self.clients = []
        for i, url in enumerate(cluster.hub_urls):
            c = mqtt.Client(V2, client_id=f"{name}-{i}", clean_session=True)
            c.username_pw_set(logins.HUB_USER, HUB_PASSWORD)
            c.on_connect = lambda c, _u, _f, rc, _p: c.subscribe(subscriptions(GROUP))
            c.on_subscribe = lambda _c, _u, _m, _rc, _p, i=i: self.subscribed.add(i)
            c.on_message = self._got
            c.connect(*_host_port(url))
            c.loop_start()
            self.clients.append(c)
        wait_for(f"{name} to subscribe on every server", lambda: len(self.subscribed) == 3, 10)

    def _got(self, _c: Any, _u: Any, m: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.got.append((m.topic, bytes(m.payload)))

    def payloads(self, kind: str) -> list[bytes]:
        with self.lock:
            return [p for t, p in self.got if t.endswith("/" + kind)]

    def close(self) -> None:
        for c in self.clients:
            c.disconnect()  # first: the loop's thread then ends at once
            c.loop_stop()


class NodeClient:
    """A node's connection: to one server of the list, moving to the next when it is lost
    (as the node's failover does; paho re-sends its unacknowledged QoS 1 messages there)."""

    def __init__(
        self, urls: list[str], node_id: str, password: str, at: int = 0, will: bool = False
    ) -> None:
        self.servers = [_host_port(u) for u in urls]
        self.node_id = node_id
        self.at = at
        self.connects = 0
        self.acked_by: dict[int, int] = {}  # message id -> the server that acknowledged it
        self.c = mqtt.Client(V2, client_id=node_id, clean_session=True)
        self.c.username_pw_set(node_id, password)
        self.c.max_inflight_messages_set(100)
        self.c.reconnect_delay_set(1, 1)
        if will:
            offline = protocol.encode(protocol.status(node_id, protocol.OFFLINE))
            self.c.will_set(protocol.node_topic(node_id, protocol.STATUS), offline, 1, True)
        self.c.on_connect = self._connected
        self.c.on_disconnect = self._lost
        self.c.on_publish = self._acked
        self.c.connect(*self.servers[at])
        self.c.loop_start()
        wait_for(f"node {node_id} to connect", lambda: self.connects > 0, 10)

    def _connected(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if not rc.is_failure:
            self.connects += 1

    def _acked(self, _c: Any, _u: Any, mid: int, _rc: Any, _p: Any) -> None:
        self.acked_by[mid] = self.at

    def _lost(self, c: mqtt.Client, _u: Any, _f: Any, _rc: Any, _p: Any) -> None:
        self.at = (self.at + 1) % len(self.servers)
        c.connect_async(*self.servers[self.at])  # paho's loop reconnects there

    def publish(self, kind: str, payload: bytes, qos: int = 1) -> mqtt.MQTTMessageInfo:
        return self.c.publish(protocol.node_topic(self.node_id, kind), payload, qos=qos)

    def close(self) -> None:
        self.c.on_disconnect = None
        self.c.disconnect()  # first: the loop's thread then ends at once
        self.c.loop_stop()


def seqs(payloads: list[bytes]) -> list[int]:
    return [int(json.loads(p)["seq"]) for p in payloads]


def event(seq: int) -> bytes:
    return json.dumps({"seq": seq}).encode()


# --- the tests ----------------------------------------------------------------------------------
def test_a_share_group_on_every_server_gets_each_message_once(
    cluster: LocalBrokerCluster, nodes: list[str]
) -> None:
    """Nodes on servers A, B and C publish; the group's two replicas are on every server; each
    message reaches exactly one of them, and both carry part of the traffic."""
    a, b = Member("hub-a", cluster), Member("hub-b", cluster)
    senders = [NodeClient(cluster.urls, n, NODE_PASSWORD, at=i) for i, n in enumerate(nodes)]
    n = 300
    receipts = [s.publish(protocol.EVENT, event(i * 1000 + k)) for k in range(n)
                for i, s in enumerate(senders)]  # fmt: skip
    for r in receipts:
        r.wait_for_publish(10)
    total = 3 * n
    wait_for("every message to reach the group",
             lambda: len(a.payloads("event")) + len(b.payloads("event")) >= total, 20)  # fmt: skip
    got_a, got_b = seqs(a.payloads("event")), seqs(b.payloads("event"))
    assert not set(got_a) & set(got_b), "a message reached both replicas"
    assert len(got_a) + len(got_b) == total == len(set(got_a) | set(got_b))
    assert got_a and got_b, "one replica carried all the traffic"
    for x in (a, b, *senders):
        x.close()


def test_a_node_publishes_only_on_its_own_topics_on_every_server(
    cluster: LocalBrokerCluster, nodes: list[str], services: Services, owner: str
) -> None:
    hub = Member("hub", cluster)
    mine, other = nodes[0], nodes[1]
    for i in range(3):
        node = NodeClient([cluster.urls[i]], mine, NODE_PASSWORD)
        forged = protocol.node_topic(other, protocol.EVENT)
        node.c.publish(forged, event(-1), qos=1).wait_for_publish(5)
        node.publish(protocol.EVENT, event(i)).wait_for_publish(5)
        # Published after the forged one on the same connection: once it is in, the forged
        # one would have been too.
        wait_for(f"the node's own event via server {i}",
                 lambda i=i: i in seqs(hub.payloads("event")), 10)  # fmt: skip
        assert _reads_only_its_own(node, other, hub.clients[i])
        node.close()
    assert -1 not in seqs(hub.payloads("event")), "a node published on another node's topic"
    assert all(t.startswith(protocol.node_topic(mine, "")) for t, _ in hub.got)

    for url in cluster.urls:
        assert _refused(url, mine, "wrong"), "a wrong password was accepted"

    # A node enrolled now logs in on every server once the hub has synced the logins.
    late = enroll(services, owner)
    assert _refused(cluster.urls[0], late, NODE_PASSWORD)
    assert sync_logins(services, cluster)
    for url in cluster.urls:
        wait_for("the servers to reload the logins",
                 lambda u=url: not _refused(u, late, NODE_PASSWORD), 10)  # fmt: skip
    hub.close()


def _reads_only_its_own(node: NodeClient, other: str, hub: mqtt.Client) -> bool:
    """The broker lets a node subscribe to another node's assignments (Mosquitto grants the
    filter) but delivers it nothing from there: the hub assigns to both, it gets its own."""
    got: list[str] = []
    node.c.on_message = lambda _c, _u, m: got.append(m.topic)
    for who in (other, node.node_id):
        node.c.subscribe(protocol.node_topic(who, protocol.ASSIGN), 1)
    # The subscriptions are in once the node's own (subscribed last) delivers.
    wait_for("the node's own assignment", lambda: _assign_until(hub, node.node_id, got), 10)
    return got == [protocol.node_topic(node.node_id, protocol.ASSIGN)] * len(got)


def _assign_until(hub: mqtt.Client, node_id: str, got: list[str]) -> bool:
    """Publish an assignment to node_id, and one to every other node before it; whether the
    node has got its own yet."""
    if got:
        return True
    hub.publish(protocol.node_topic("n_someone_else", protocol.ASSIGN), b"{}", qos=1)
    hub.publish(protocol.node_topic(node_id, protocol.ASSIGN), b"{}", qos=1)
    return False


def _refused(url: str, username: str, password: str) -> bool:
    """Whether the server refuses this login (its CONNACK)."""
    codes: list[Any] = []
    client = mqtt.Client(V2, client_id=username)
    client.username_pw_set(username, password)
    client.on_connect = lambda _c, _u, _f, rc, _p: codes.append(rc)
    client.connect(*_host_port(url))
    client.loop_start()
    try:
        wait_for("the CONNACK", lambda: codes, 5)
    finally:
        client.disconnect()
        client.loop_stop()
    return bool(codes[0].is_failure)


def test_a_last_will_reaches_the_hub_through_the_server_the_node_was_on(
    cluster: LocalBrokerCluster, nodes: list[str]
) -> None:
    hub = Member("hub", cluster)
    node = NodeClient(cluster.urls, nodes[0], NODE_PASSWORD, at=2, will=True)
    node.c.on_disconnect = None
    node.c.loop_stop()
    sock = node.c.socket()
    assert sock is not None
    sock.close()  # gone without a DISCONNECT, as a node that loses power
    status = wait_for("the node's will", lambda: hub.payloads("status"), 15)
    assert json.loads(status[0]) == protocol.status(nodes[0], protocol.OFFLINE)
    hub.close()


def test_killing_a_server_mid_stream_loses_only_what_it_had_acknowledged(
    cluster: LocalBrokerCluster, nodes: list[str]
) -> None:
    """A node streams 2000 QoS 1 events to server A as fast as it can; A is killed (SIGKILL)
    while the group is a few hundred behind; the node moves to B and goes on. Every message
    A had not acknowledged is sent again to B and reaches the group, and so does everything
    after it. What A had acknowledged but not yet delivered dies with it: QoS 1 is hop by hop
    and Mosquitto keeps no replica (docs/broker-cluster.md, "What a server's crash loses").
    The figure is printed: 0 to 184 of 2000 (median 4.5) in 20 runs here, the burst queued
    behind the kill."""
    a, b = Member("hub-a", cluster), Member("hub-b", cluster)
    node = NodeClient(cluster.urls, nodes[0], NODE_PASSWORD, at=0)
    n, stop_at = 2000, 600
    mids = []
    for k in range(n):
        # paho keeps what it could not send (the server was gone) and sends it once connected
        mids.append(node.publish(protocol.EVENT, event(k)).mid)
        if k == stop_at:
            wait_for("half of it to arrive", lambda: len(_events(a, b)) >= stop_at // 2, 10)
            cluster.kill(0)
    wait_for("the node to move to another server", lambda: node.connects >= 2, 15)
    wait_for("every message to be acknowledged", lambda: len(node.acked_by) == n, 20)
    safe = {k for k, mid in enumerate(mids) if node.acked_by[mid] != 0}
    wait_for("what server A had not acknowledged", lambda: safe <= set(_events(a, b)), 20)
    got = Counter(_events(a, b))
    lost = set(range(n)) - set(got)
    repeated = sum(c - 1 for c in got.values())
    print(f"killed server 0 at message {stop_at} of {n}: {n - len(safe)} acknowledged by it,"
          f" {len(safe)} re-sent to or sent after server 1; lost {len(lost)},"
          f" repeated {repeated}")  # fmt: skip
    assert all(node.acked_by[mids[k]] == 0 for k in lost)
    assert node.at == 1 and not cluster.alive(0)
    for x in (a, b, node):
        x.close()


def _events(*members: Member) -> list[int]:
    return [k for m in members for k in seqs(m.payloads("event"))]


class CountingBridge(Bridge):
    """The real Bridge, noting each node message it handles (its sequence number)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handled: list[int] = []

    def handle(self, topic: str, payload: bytes | bytearray) -> str:
        if topic.endswith("/" + protocol.HEARTBEAT):
            self.handled.append(int(json.loads(payload)["seq"]))
        return super().handle(topic, payload)


@pytest.fixture(scope="module")
def postgres() -> Iterator[LocalPostgres]:
    with LocalPostgres() as pg:
        yield pg


async def test_two_hub_bridges_on_one_store_split_a_nodes_messages(
    tmp_path: Path, postgres: LocalPostgres
) -> None:
    """Two hubs' real Bridges, one PostgreSQL store, one share group on the three servers:
    a node's heartbeats (through servers A, B and C in turn) are each handled by one of them."""
    require_mosquitto()
    url = postgres.create_database("cluster_bridges")
    replicas = [open_services(HubConfig(data_dir=tmp_path / f"hub{i}", db_url=url))
                for i in range(2)]  # fmt: skip
    owner, _token, _grant = replicas[0].create_user("alice", "user")
    node_id = enroll(replicas[0], owner)
    cluster = LocalBrokerCluster(tmp_path / "brokers", 3, auth=True)
    sync_logins(replicas[0], cluster)
    cluster.start()
    hub_url = cluster.hub_url_list(logins.HUB_USER, HUB_PASSWORD)
    bridges = [CountingBridge(hub_url, s.store, s.jobs, s.scheduler, share_group=GROUP)
               for s in replicas]  # fmt: skip
    try:
        for bridge in bridges:
            await bridge.start()
        n = 300
        # The node in a thread of its own: the bridges go on reading meanwhile, on this loop.
        await asyncio.to_thread(_beat_through_each_server, cluster, node_id, n)
        await _until(lambda: sum(len(b.handled) for b in bridges) >= 3 * n)
        first, second = bridges[0].handled, bridges[1].handled
        assert not set(first) & set(second), "a heartbeat was handled by both hubs"
        assert sorted(first + second) == list(range(3 * n))
        assert first and second, "one hub handled everything"
        print(f"hub 1 handled {len(first)}, hub 2 {len(second)} of {3 * n} heartbeats")
    finally:
        for bridge in bridges:
            await bridge.stop()
        cluster.stop()
        for s in replicas:
            s.db.close()


def _beat_through_each_server(cluster: LocalBrokerCluster, node_id: str, n: int) -> None:
    """The node's hello and n heartbeats through server A, then B, then C (QoS 1, numbered
    0 to 3n-1 in their seq)."""
    offer = {"cpu": 2, "memory_mb": 512, "gpu": 0, "load": 0}
    hello = protocol.encode(protocol.hello(node_id, ["wasm"], offer, "t"))
    for at in range(3):
        node = NodeClient([cluster.urls[at]], node_id, NODE_PASSWORD)
        node.publish(protocol.HELLO, hello).wait_for_publish(5)
        receipts = []
        for k in range(at * n, (at + 1) * n):
            beat = protocol.heartbeat(node_id, k, protocol.IDLE, offer, [])
            receipts.append(node.publish(protocol.HEARTBEAT, protocol.encode(beat)))
        for r in receipts:
            r.wait_for_publish(10)
        node.close()


async def _until(check: Any, timeout_s: float = 20.0) -> None:
    """wait_for on the event loop: the bridges run on it, so it must not be blocked."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s")
        await asyncio.sleep(0.02)


async def test_a_bridge_keeps_the_servers_it_has_and_joins_one_that_comes_back(
    tmp_path: Path, services: Services, nodes: list[str]
) -> None:
    """Server B is down when the hub starts: it starts on A and C and hears nodes there; B
    comes back and the hub joins it; A dies and the hub goes on with B and C; what it
    publishes reaches a node on C once."""
    require_mosquitto()
    cluster = LocalBrokerCluster(tmp_path / "brokers", 3, auth=True)
    sync_logins(services, cluster)
    cluster.start()
    cluster.kill(1)
    hub_url = cluster.hub_url_list(logins.HUB_USER, HUB_PASSWORD)
    bridge = CountingBridge(hub_url, services.store, services.jobs, services.scheduler)
    try:
        await bridge.start()  # once one server has accepted it
        await _until(lambda: [link.connected for link in bridge.links] == [True, False, True])
        await _beat_through(cluster, nodes[0], at=2, seq=0)
        await _until(lambda: bridge.handled == [0])

        cluster.start()  # B again, on its ports
        await _until(lambda: bridge.links[1].connected)
        await _beat_through(cluster, nodes[0], at=1, seq=1)
        await _until(lambda: bridge.handled == [0, 1])

        cluster.kill(0)
        await _until(lambda: not bridge.links[0].connected)
        assert bridge.connected
        await _beat_through(cluster, nodes[0], at=2, seq=2)
        await _until(lambda: bridge.handled == [0, 1, 2])

        # What the hub says goes out on every server it is on: the node on C gets it, once.
        node = await asyncio.to_thread(NodeClient, [cluster.urls[2]], nodes[0], NODE_PASSWORD)
        got: list[int] = []
        acked: list[Any] = []
        node.c.on_message = lambda _c, _u, m: got.append(json.loads(m.payload)["n"])
        node.c.on_subscribe = lambda _c, _u, _m, rcs, _p: acked.extend(rcs)
        node.c.subscribe(protocol.node_topic(nodes[0], protocol.CANCEL), 1)
        await _until(lambda: acked)
        receipts = [bridge._send(protocol.node_topic(nodes[0], protocol.CANCEL), {"n": n})
                    for n in (1, 2)]  # fmt: skip
        # On B and C, and queued for A: lost only just now, it may be a blip (QUEUE_WHILE_AWAY_S)
        assert all(isinstance(r, Receipts) and len(r.receipts) == 3 for r in receipts)
        await _until(lambda: all(r.is_published() for r in receipts) and 2 in got)
        assert got == [1, 2]
        # A away for longer is down, not a blip: nothing more is queued for it.
        away_since = bridge.links[0].away_since
        assert away_since is not None
        bridge.links[0].away_since = away_since - QUEUE_WHILE_AWAY_S
        later = bridge._send(protocol.node_topic(nodes[0], protocol.CANCEL), {"n": 3})
        assert isinstance(later, Receipts) and len(later.receipts) == 2
        await _until(lambda: got == [1, 2, 3])
        await asyncio.to_thread(node.close)
    finally:
        await bridge.stop()
        cluster.stop()


async def _beat_through(cluster: LocalBrokerCluster, node_id: str, at: int, seq: int) -> None:
    """One heartbeat (QoS 1) from the node through server `at`."""

    def beat() -> None:
        offer = {"cpu": 2, "memory_mb": 512, "gpu": 0, "load": 0}
        node = NodeClient([cluster.urls[at]], node_id, NODE_PASSWORD)
        msg = protocol.encode(protocol.heartbeat(node_id, seq, protocol.IDLE, offer, []))
        node.publish(protocol.HEARTBEAT, msg).wait_for_publish(5)
        node.close()

    await asyncio.to_thread(beat)


def test_the_mqtt_url_list_names_every_server_and_its_login() -> None:
    servers = parse_mqtt_urls("mqtt://deparrow-hub:p%40ss@10.0.0.1:1884, mqtt://10.0.0.2")
    assert [(s.host, s.port, s.username, s.password) for s in servers] == [
        ("10.0.0.1", 1884, "deparrow-hub", "p@ss"),
        ("10.0.0.2", 1883, None, None),
    ]
    for bad in ("mqtt://a:1,http://b:2", "mqtt://a:1,mqtt://a:1", "mqtt://a:1,", "mqtt://a:x"):
        with pytest.raises(ValueError):
            parse_mqtt_urls(bad)

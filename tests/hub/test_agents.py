"""The agent registry and paid service calls: the real app factory, a real SQLite file, and the
hub's own Mosquitto (or its embedded broker, where a test asks) with its logins and ACLs;
serving agents are ordinary paho clients."""

from __future__ import annotations

import asyncio
import json
import queue
import re
import time
import uuid
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge.core import protocol
from hub.agents.registry import Agents
from hub.agents.types import CallView, Invoke, Response
from hub.api.services import SERVICES
from hub.app import create_app
from hub.config import HubConfig
from hub.ledger.ledger import Ledger
from hub.mqtt import bridge
from hub.mqtt.bridge import parse_mqtt_url
from hub.store.db import open_database
from hub.store.rows import Store
from tests.conftest import ROOT, require_mosquitto, wait_until
from tests.hub.conftest import db_url, login, new_user

pytestmark = pytest.mark.both_stores

FIB_IN = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}},
          "required": ["n"], "additionalProperties": False}  # fmt: skip
FIB_OUT = {"type": "object", "properties": {"fib": {"type": "integer"}}, "required": ["fib"]}


def fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Peer:
    """An agent on the broker: its own login, its own topics; answers calls with `answer`."""

    def __init__(
        self, url: str, agent_id: str, token: str, answer: Callable[[dict[str, Any]], Any] | None
    ) -> None:
        self.id, self.token, self.answer = agent_id, token, answer
        self.inbox: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self.c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             client_id=f"{agent_id}-{uuid.uuid4().hex[:6]}")  # fmt: skip
        self.c.username_pw_set(agent_id, token)
        self.c.on_message = self._message
        host, port = parse_mqtt_url(url)
        self.c.connect(host, port)
        self.c.loop_start()
        wait_until("the agent's login", self.c.is_connected, 10)
        subs = [(protocol.agent_topic(agent_id, k), 1) for k in protocol.AGENT_IN]
        self.c.subscribe(subs)
        time.sleep(0.2)  # the SUBACK: calls sent before it would be missed

    def _message(self, _c: Any, _u: Any, m: mqtt.MQTTMessage) -> None:
        msg = json.loads(m.payload)
        self.inbox.put((m.topic, msg))
        if m.topic.endswith("/call") and self.answer is not None:
            out = self.answer(msg)
            if out is not None:
                self.respond(msg["call_id"], *out)

    def respond(self, call_id: str, ok: bool, value: Any, topic_agent: str | None = None) -> None:
        msg = protocol.response(call_id, self.token, ok, value if ok else None,
                                None if ok else str(value))  # fmt: skip
        topic = protocol.agent_topic(topic_agent or self.id, protocol.RESPONSE)
        self.c.publish(topic, json.dumps(msg), qos=1)  # no wait: paho's thread calls this too

    def publish(self, kind: str, msg: dict[str, Any]) -> None:
        self.c.publish(protocol.agent_topic(self.id, kind), json.dumps(msg), qos=1)

    async def next(self, kind: str, timeout_s: float = 10) -> dict[str, Any]:
        """The next message of this kind (polled: the hub runs on this test's loop)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                topic, msg = self.inbox.get_nowait()
            except queue.Empty:
                assert time.monotonic() < deadline, f"no {kind} message for {self.id}"
                await asyncio.sleep(0.02)
                continue
            if topic.endswith("/" + kind):
                return msg

    def stop(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def drain(peer: Peer) -> list[tuple[str, dict[str, Any]]]:
    """Every message the agent has received and not yet read."""
    out = []
    while not peer.inbox.empty():
        out.append(peer.inbox.get_nowait())
    return out


async def eventually(what: str, check: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def fib_answer(call: dict[str, Any]) -> tuple[bool, Any]:
    return True, {"fib": fib(call["input"]["n"])}


@pytest.fixture
async def api(
    aiohttp_client: Any, tmp_path: Path, request: pytest.FixtureRequest, store: str | Path
) -> Any:
    """The hub with its own broker: Mosquitto, or another kind a test names (indirect); on
    each store."""
    broker = getattr(request, "param", "mosquitto")
    if broker == "mosquitto":
        require_mosquitto()
    config = HubConfig(data_dir=tmp_path / "hub", db_url=db_url(store), broker=broker,
                       broker_port=0, welcome_grant_credits=10,
                       heartbeat_interval_s=0.5)  # fmt: skip
    app = create_app(config)
    client = await aiohttp_client(app)
    client.services = app[SERVICES]
    return client


async def new_agent(
    api: Any, owner: dict[str, str], name: str, fund: str = "2"
) -> tuple[str, str, dict[str, str]]:
    r = await api.post("/api/v1/agents", json={"name": name, "fund": fund}, headers=owner)
    assert r.status == 201, await r.text()
    body = await r.json()
    assert body["balance"] == fund
    return body["id"], body["token"], await login(api, body["token"])


async def register(api: Any, auth: dict[str, str], **extra: Any) -> dict[str, Any]:
    body = {"name": "fib", "description": "Fibonacci numbers, exactly", "tags": ["math", "wasm"],
            "price": "0.25", "input_schema": FIB_IN, "output_schema": FIB_OUT, **extra}  # fmt: skip
    r = await api.post("/api/v1/agents/services", json=body, headers=auth)
    assert r.status in (200, 201), await r.text()
    return dict(await r.json())


async def balance(api: Any, auth: dict[str, str]) -> Decimal:
    w = await (await api.get("/api/v1/wallet", headers=auth)).json()
    return Decimal(w["balance"])


def audit_ok(api: Any) -> None:
    audit = api.services.ledger.audit()
    assert audit.balanced, audit


async def call(
    api: Any, auth: dict[str, str], service_id: str, inp: Any, key: str | None = None, **kw: Any
) -> tuple[int, dict[str, Any]]:
    r = await api.post(
        f"/api/v1/agents/services/{service_id}/call",
        json={"input": inp, **kw},
        headers={**auth, "Idempotency-Key": key or uuid.uuid4().hex},
    )
    return r.status, dict(await r.json())


def broker_url(api: Any) -> str:
    return str(api.services.mqtt_url)


# --- the registry -----------------------------------------------------------------------------
async def test_register_search_and_list_services(api: Any) -> None:
    _, alice = await new_user(api, "alice")
    seller_id, _, seller = await new_agent(api, alice, "seller")
    other_id, _, other = await new_agent(api, alice, "other", fund="0")
    assert await balance(api, alice) == Decimal(8)  # 10 granted, 2 to the seller, no grant

    svc = await register(api, seller)
    assert svc["agent"] == seller_id and svc["price"] == "0.25" and svc["tags"] == ["math", "wasm"]
    assert svc["input_schema"] == FIB_IN and svc["id"].startswith("s_")
    again = await register(api, seller, price="0.3")  # same name: an update, same id
    assert again["id"] == svc["id"] and again["price"] == "0.3"
    text = {"type": "string"}
    await register(api, other, name="sha256", description="Hash text", tags=["crypto"],
                   price="1", input_schema=text, output_schema=text)  # fmt: skip

    async def names(query: str) -> list[str]:
        r = await api.get("/api/v1/agents/services" + query, headers=alice)
        assert r.status == 200
        return [s["name"] for s in (await r.json())["services"]]

    assert await names("") == ["fib", "sha256"]  # cheapest first
    assert await names("?q=FIBONACCI") == ["fib"]
    assert await names("?q=hash%20text") == ["sha256"]
    assert await names("?tag=crypto") == ["sha256"]
    assert await names("?tag=math&q=exactly") == ["fib"]
    assert await names("?q=nothing-like-this") == []
    r = await api.get(f"/api/v1/agents/services/{svc['id']}", headers=alice)
    assert (await r.json())["name"] == "fib"

    agents = (await (await api.get("/api/v1/agents", headers=alice)).json())["agents"]
    assert {a["name"]: a["services"] for a in agents} == {"seller": 1, "other": 1}
    assert {a["state"] for a in agents} == {"idle"}
    # An agent sees itself, not its siblings.
    mine = (await (await api.get("/api/v1/agents", headers=other)).json())["agents"]
    assert [a["id"] for a in mine] == [other_id]
    assert (await api.get(f"/api/v1/agents/{seller_id}", headers=other)).status == 404

    doc = await (await api.get("/api/v1/openapi.json")).json()
    assert "/api/v1/agents/services/{service_id}/call" in doc["paths"]
    assert "CallView" in doc["components"]["schemas"]

    r = await api.delete(f"/api/v1/agents/services/{svc['id']}", headers=seller)
    assert r.status == 200
    assert await names("") == ["sha256"]


async def test_who_may_register_and_what_is_refused(api: Any) -> None:
    _, alice = await new_user(api, "alice")
    seller_id, _, seller = await new_agent(api, alice, "seller")
    other_id, _, other = await new_agent(api, alice, "other")
    body = {"name": "fib", "price": "1", "input_schema": FIB_IN, "output_schema": FIB_OUT}
    r = await api.post("/api/v1/agents/services", json=body, headers=alice)
    assert r.status == 403
    assert "only agents register services" in (await r.json())["error"]
    r = await api.post("/api/v1/agents/services", json={**body, "agent": seller_id}, headers=other)
    assert r.status == 403
    assert f"only agent {seller_id} itself may register" in (await r.json())["error"]
    r = await api.post("/api/v1/agents/services", json=body)
    assert r.status == 401 and "Authorization" in (await r.json())["error"]
    bad_schema = {**body, "input_schema": {"type": "no-such-type"}}
    r = await api.post("/api/v1/agents/services", json=bad_schema, headers=seller)
    assert r.status == 400
    err = await r.json()
    assert err["field"] == "input_schema" and "not a valid JSON Schema" in err["error"]
    r = await api.post("/api/v1/agents/services", json={**body, "price": "0.0000001"},
                       headers=seller)  # fmt: skip
    assert r.status == 400 and "6 decimals" in (await r.json())["error"]
    r = await api.post("/api/v1/agents", json={"name": "rich", "fund": "1000"}, headers=alice)
    assert r.status == 402 and (await r.json())["shortfall"]
    assert other_id != seller_id
    audit_ok(api)


# --- calls ------------------------------------------------------------------------------------
async def test_a_call_pays_the_agent_once_and_a_retry_is_the_same_call(api: Any) -> None:
    _, alice = await new_user(api, "alice")
    seller_id, seller_token, seller = await new_agent(api, alice, "seller", fund="0")
    buyer_id, _, buyer = await new_agent(api, alice, "buyer", fund="2")
    svc = await register(api, seller)
    peer = Peer(broker_url(api), seller_id, seller_token, fib_answer)
    try:
        status, c = await call(api, buyer, svc["id"], {"n": 30}, key="k1")
        assert status == 201, c
        assert c["state"] == "completed" and c["output"] == {"fib": 832040}
        assert c["price"] == c["paid"] == "0.25" and c["caller"] == buyer_id
        assert c["agent"] == seller_id and c["finished"] >= c["created"]
        assert await balance(api, buyer) == Decimal("1.75")
        assert await balance(api, seller) == Decimal("0.25")
        # The same key again: the same call, nothing charged a second time.
        status, again = await call(api, buyer, svc["id"], {"n": 30}, key="k1")
        assert status == 200 and again["id"] == c["id"] and again["state"] == "completed"
        status, other = await call(api, buyer, svc["id"], {"n": 31}, key="k1")
        assert status == 409 and "idempotency key" in other["error"]
        assert await balance(api, buyer) == Decimal("1.75")
        assert await balance(api, seller) == Decimal("0.25")
        # Input that breaks the schema: refused before anything is held.
        status, bad = await call(api, buyer, svc["id"], {"n": "thirty"})
        assert status == 400 and bad["field"] == "input"
        assert "input schema" in bad["error"] and "$.n" in bad["error"]
        assert await balance(api, buyer) == Decimal("1.75")
        # The agent got the call once, with the price it earns.
        first = await peer.next("call")
        assert first["call_id"] == c["id"] and first["price"] == "0.25"
        assert first["input"] == {"n": 30} and first["caller"] == buyer_id
        # A duplicate of the agent's answer moves nothing.
        peer.respond(c["id"], True, {"fib": 832040})
        await asyncio.sleep(0.3)  # time for the hub to (not) act on it
        assert await balance(api, seller) == Decimal("0.25")
        # Both sides see it; the owner too; a stranger does not.
        for who in (buyer, seller, alice):
            r = await api.get(f"/api/v1/agents/calls/{c['id']}", headers=who)
            assert r.status == 200 and (await r.json())["state"] == "completed"
        _, mallory = await new_user(api, "mallory")
        assert (await api.get(f"/api/v1/agents/calls/{c['id']}", headers=mallory)).status == 404
        calls = await (await api.get(f"/api/v1/agents/{seller_id}/calls", headers=seller)).json()
        assert [x["id"] for x in calls["calls"]] == [c["id"]]
        view = await (await api.get(f"/api/v1/agents/{seller_id}", headers=alice)).json()
        assert view["calls"] == {"served": 1, "made": 0, "earned": "0.25", "spent": "0"}
        # Not enough credits: 402 with the shortfall, nothing held.
        expensive = await register(api, seller, name="dear", price="5")
        status, poor = await call(api, buyer, expensive["id"], {"n": 1})
        assert status == 402 and poor["shortfall"] == "3.25"
        audit_ok(api)
    finally:
        peer.stop()


async def test_a_call_the_agent_never_answers_times_out_and_refunds(api: Any) -> None:
    _, alice = await new_user(api, "alice")
    seller_id, seller_token, seller = await new_agent(api, alice, "seller", fund="0")
    _, _, buyer = await new_agent(api, alice, "buyer", fund="2")
    svc = await register(api, seller)
    peer = Peer(broker_url(api), seller_id, seller_token, None)  # hears calls, never answers
    try:
        started = time.monotonic()
        status, c = await call(api, buyer, svc["id"], {"n": 5}, timeout_s=1)
        assert 0.9 < time.monotonic() - started < 5
        assert status == 201 and c["state"] == "timeout" and c["paid"] == "0"
        assert "did not answer within 1s" in c["error"]
        assert await balance(api, buyer) == Decimal(2)
        # The answer comes late: ignored, the agent earns nothing.
        late = await peer.next("call")
        peer.respond(late["call_id"], True, {"fib": 5})
        await asyncio.sleep(0.3)  # time for the hub to (not) act on it
        assert await balance(api, seller) == 0
        r = await api.get(f"/api/v1/agents/calls/{c['id']}", headers=buyer)
        assert (await r.json())["state"] == "timeout"
        # Without waiting (wait=0): the tick expires it, with no request open.
        r = await api.post(
            f"/api/v1/agents/services/{svc['id']}/call?wait=0",
            json={"input": {"n": 6}, "timeout_s": 0.5},
            headers={**buyer, "Idempotency-Key": "nowait"},
        )
        pending = await r.json()
        assert r.status == 202 and pending["state"] == "pending"
        wallet = await (await api.get("/api/v1/wallet", headers=buyer)).json()
        assert wallet["held"] == "0.25"

        def expired() -> bool:
            row = api.services.agents.call_row(pending["id"])
            return bool(row["state"] == "timeout")

        await eventually("the tick to expire the call", expired, 10)
        assert await balance(api, buyer) == Decimal(2)
        audit_ok(api)
    finally:
        peer.stop()


async def test_an_error_or_a_bad_output_refunds(api: Any) -> None:
    _, alice = await new_user(api, "alice")
    seller_id, seller_token, seller = await new_agent(api, alice, "seller", fund="0")
    _, _, buyer = await new_agent(api, alice, "buyer", fund="2")
    svc = await register(api, seller)

    def answer(c: dict[str, Any]) -> tuple[bool, Any]:
        n = c["input"]["n"]
        if n == 13:
            return False, "unlucky number"
        return True, {"fib": "not a number"}

    peer = Peer(broker_url(api), seller_id, seller_token, answer)
    try:
        _, c = await call(api, buyer, svc["id"], {"n": 13})
        assert c["state"] == "failed"
        assert c["error"] == "the agent answered with an error: unlucky number"
        _, c = await call(api, buyer, svc["id"], {"n": 12})
        assert c["state"] == "failed" and "does not match the output schema" in c["error"]
        assert "$.fib" in c["error"]
        assert await balance(api, buyer) == Decimal(2)
        assert await balance(api, seller) == 0
        audit_ok(api)
    finally:
        peer.stop()


@pytest.mark.parametrize("api", ["mosquitto", "embedded"], indirect=True)
async def test_a_reply_from_another_agent_moves_nothing(
    api: Any, caplog: pytest.LogCaptureFixture
) -> None:
    _, alice = await new_user(api, "alice")
    seller_id, seller_token, seller = await new_agent(api, alice, "seller", fund="0")
    thief_id, thief_token, thief = await new_agent(api, alice, "thief", fund="0")
    _, _, buyer = await new_agent(api, alice, "buyer", fund="2")
    svc = await register(api, seller)
    seller_peer = Peer(broker_url(api), seller_id, seller_token, None)
    thief_peer = Peer(broker_url(api), thief_id, thief_token, None)
    # Each agent also reads its own response topic, on its one connection (a login has one):
    # what the broker lets through there reaches its owner as well as the hub.
    for peer in (seller_peer, thief_peer):
        peer.c.subscribe(protocol.agent_topic(peer.id, protocol.RESPONSE), qos=1)
    await asyncio.sleep(0.2)  # the SUBACKs

    def hub_ignored() -> list[str]:  # what reached the hub's agent handler and was ignored
        return [r.getMessage() for r in caplog.records if r.name == "hub.agents.calls"
                and r.getMessage().startswith("ignored message from agent")]  # fmt: skip

    try:
        r = await api.post(
            f"/api/v1/agents/services/{svc['id']}/call?wait=0",
            json={"input": {"n": 10}, "timeout_s": 2},
            headers={**buyer, "Idempotency-Key": "x"},
        )
        c = await r.json()
        await seller_peer.next("call")
        # The thief answers on the seller's topic: the broker drops it (the thief's login may
        # not publish there) ...
        thief_peer.respond(c["id"], True, {"fib": 55}, topic_agent=seller_id)
        # ... and on its own topic: the hub ignores it (the call is not the thief's). Both go
        # out on one connection, in order: once the hub has the second, it would have the first.
        thief_peer.respond(c["id"], True, {"fib": 55})
        ignored = f"ignored message from agent {thief_id}: response to call {c['id']} from agent"
        await eventually("the hub to ignore the thief's answer",
                         lambda: any(m.startswith(ignored) for m in hub_ignored()), 5)  # fmt: skip
        await eventually("the thief's answer back on its own topic",
                         lambda: not thief_peer.inbox.empty(), 5)  # fmt: skip
        await asyncio.sleep(0.2)
        row = api.services.agents.call_row(c["id"])
        assert row["state"] == "pending"
        # The hub got the thief's answer on the thief's own topic, and nothing on the seller's.
        assert hub_ignored() == [
            f"{ignored} {thief_id}, but that call went to {seller_id}; nothing moved"
        ]
        assert drain(seller_peer) == []  # nor did the seller: the broker dropped it
        # The thief never even sees the seller's calls; it reads back its own answer only.
        seen = [topic for topic, _ in drain(thief_peer)]
        assert seen == [protocol.agent_topic(thief_id, protocol.RESPONSE)]
        r = await api.get(f"/api/v1/agents/calls/{c['id']}?wait=5", headers=buyer)
        done = await r.json()
        assert done["state"] == "timeout"
        assert await balance(api, thief) == 0 and await balance(api, seller) == 0
        assert await balance(api, buyer) == Decimal(2)
        audit_ok(api)
    finally:
        seller_peer.stop()
        thief_peer.stop()


async def test_calls_over_mqtt_and_nobody_spends_another_wallet(api: Any) -> None:
    _, alice = await new_user(api, "alice")
    seller_id, seller_token, seller = await new_agent(api, alice, "seller", fund="0")
    buyer_id, buyer_token, buyer = await new_agent(api, alice, "buyer", fund="1")
    svc = await register(api, seller)
    seller_peer = Peer(broker_url(api), seller_id, seller_token, fib_answer)
    buyer_peer = Peer(broker_url(api), buyer_id, buyer_token, None)

    def invoke(request_id: str, token: str, inp: Any, service_id: str = svc["id"]) -> None:
        buyer_peer.publish(protocol.INVOKE, protocol.invoke(request_id, token, service_id, inp))

    try:
        invoke("r1", buyer_token, {"n": 20})
        reply = await buyer_peer.next("reply")
        assert reply["request_id"] == "r1" and reply["ok"] is True
        assert reply["body"]["output"] == {"fib": 6765} and reply["body"]["paid"] == "0.25"
        # A retried invoke: the same call, answered again, charged once.
        invoke("r1", buyer_token, {"n": 20})
        again = await buyer_peer.next("reply")
        assert again["body"]["id"] == reply["body"]["id"]
        assert await balance(api, buyer) == Decimal("0.75")
        # The seller's token on the buyer's topic: refused, nothing held from either wallet.
        invoke("r2", seller_token, {"n": 2})
        refused = await buyer_peer.next("reply")
        assert refused["ok"] is False and refused["body"]["status"] == 401
        assert refused["body"]["error"] == "token does not belong to this agent"
        # Unknown service, bad input, too poor: the reasons a REST caller would get.
        invoke("r3", buyer_token, {"n": 2}, "s_nope")
        assert (await buyer_peer.next("reply"))["body"]["status"] == 404
        invoke("r4", buyer_token, {})
        bad = (await buyer_peer.next("reply"))["body"]
        assert bad["status"] == 400 and bad["field"] == "input"
        assert await balance(api, buyer) == Decimal("0.75")
        assert await balance(api, seller) == Decimal("0.25")
        # REST without credentials, or with a node's way in: refused with the reason.
        r = await api.post(f"/api/v1/agents/services/{svc['id']}/call", json={"input": {"n": 1}})
        assert r.status == 401 and "Authorization" in (await r.json())["error"]
        r = await api.post(f"/api/v1/agents/services/{svc['id']}/call", json={"input": {"n": 1}},
                           headers=buyer)  # fmt: skip
        assert r.status == 400 and (await r.json())["field"] == "Idempotency-Key"
        # An agent cannot pay itself.
        status, own = await call(api, seller, svc["id"], {"n": 1})
        assert status == 400 and "its own service" in own["error"]
        audit_ok(api)
    finally:
        seller_peer.stop()
        buyer_peer.stop()


def test_pending_calls_expire_when_the_hub_starts_again(store: str | Path) -> None:
    """The deadline is in the database: a hub that was down past it refunds at its start."""
    target = store  # the name is reused below for the Store
    db = open_database(target)
    ledger = Ledger(db)
    ledger.ensure_mint()
    store = Store(db)
    agents = Agents(db, store, ledger)
    owner, _ = store.create_user("owner", "user")
    ledger.open_account("wallet:" + owner, "wallet", owner)
    ledger.grant("g", "wallet:" + owner, 5_000_000, "grant")
    seller, _ = agents.create_agent(owner, "seller")
    buyer, _ = agents.create_agent(owner, "buyer", fund=3_000_000)
    view, _ = agents.register(seller, name="fib", description="", tags=[], price="1",
                              input_schema=FIB_IN, output_schema=FIB_OUT, timeout_s=5)  # fmt: skip
    sent: list[tuple[str, dict[str, Any]]] = []
    agents.attach(lambda topic, msg: sent.append((topic, msg)))
    call_row, new = agents.start_call(buyer, view.id, {"n": 3}, None, "k")
    assert new and ledger.balance("wallet:" + buyer) == 2_000_000
    db.close()

    db = open_database(target)  # the hub starts again, later
    ledger, store = Ledger(db), Store(db)
    agents = Agents(db, store, ledger)
    agents.attach(lambda topic, msg: sent.append((topic, msg)))
    assert agents.tick(now=time.time() + 1) == 0  # not due yet: still pending
    assert agents.resend_pending() == 1 and sent[-1][0].endswith(f"{seller}/call")
    assert agents.tick(now=time.time() + 6) == 1
    row = agents.call_row(call_row["id"])
    assert row["state"] == "timeout" and re.search(r"within 5s", row["error"])
    assert ledger.balance("wallet:" + buyer) == 3_000_000
    assert agents.tick(now=time.time() + 60) == 0  # once
    assert ledger.audit().balanced
    db.close()


def test_the_protocol_doc_has_the_call_topics_and_examples_the_code_reads() -> None:
    text = (ROOT / "docs" / "protocol.md").read_text()
    table = text.split("<!-- agent-call-topics -->", 1)[1].strip().split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = cells
    kinds = (protocol.INVOKE, protocol.CALL, protocol.RESPONSE, protocol.NOTICE)
    expected = {protocol.agent_topic("<agent_id>", k): k for k in kinds}
    assert set(rows) == set(expected)
    assert set(kinds) <= set(protocol.AGENT_OUT + protocol.AGENT_IN)
    for topic, kind in expected.items():
        _, _, qos, retain, limit = rows[topic]
        assert (qos, retain) == ("1", "no"), topic
        assert limit == str(bridge.SIZE_LIMITS.get(kind, "—")), topic
        assert f"### `{kind}`" in text, kind
    found = re.findall(r"<!-- example: ([\w-]+) -->\s*```json\n(.*?)```", text, re.S)
    ex = {name: json.loads(body) for name, body in found}
    invoke = msgspec.json.decode(json.dumps(ex["invoke"]), type=Invoke)
    assert set(ex["invoke"]) == set(protocol.invoke("r", "t", "s", {}, 1))
    assert invoke.input == {"n": 20}
    msgspec.json.decode(json.dumps(ex["response"]), type=Response)
    assert set(ex["response"]) == set(protocol.response("c", "t", True, {}))
    assert set(ex["call"]) == set(protocol.call("c", "s", "n", "u", {}, "1", 0))
    assert set(ex["notice"]) == set(protocol.notice("a", "stopped", "m", "j"))
    reply = ex["invoke-reply"]
    assert set(reply) == set(protocol.reply("r", True, {}))
    msgspec.convert(reply["body"], type=CallView)
    assert set(reply["body"]) == set(CallView.__struct_fields__)

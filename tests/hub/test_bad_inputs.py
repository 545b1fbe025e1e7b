"""No input gets a 500 (issue 15, findings 6 and 7): each malformed or hostile input gets a
4xx with a JSON `error` naming the problem over REST, an error reply over MQTT where the
sender has a reply topic, and nothing stored changes.

The real app factory, a real SQLite file and a real Mosquitto; agents are ordinary paho
clients. Requests whose bytes an HTTP client would not send (headers that are not UTF-8) go
over a raw socket.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from edge.core import protocol
from hub.api import openapi
from hub.ledger.money import credits_to_micro
from hub.mqtt import wire
from tests.conftest import ROOT
from tests.hub.conftest import login
from tests.hub.test_supervision import Agent, Hub, eventually

FIB = {
    "name": "fib",
    "engine": {"type": "wasm", "module": "example:fib", "entrypoint": "fib", "args": ["20"]},
    "timeout": 10,
}
DEEP = b"[" * 100_000 + b"]" * 100_000  # 100,000 arrays, one inside the other
JSON = {"Content-Type": "application/json"}


def deep(n: int) -> Any:
    v: Any = 1
    for _ in range(n):
        v = [v]
    return v


def stored(hub: Hub) -> dict[str, Any]:
    """What the hub's database holds, as a test compares it: the rows of every table by
    count, and every account's balance."""
    db = hub.services.db
    tables = [r[0] for r in db.query(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
    )]  # fmt: skip
    return {
        "rows": {t: db.query_one(f"SELECT COUNT(*) FROM {t}")[0] for t in tables},  # type: ignore[index]
        "balances": {r["id"]: r["balance"] for r in db.query("SELECT id, balance FROM accounts")},
    }


async def refused(r: Any, status: int, *words: str) -> dict[str, Any]:
    """The response is `status` with a JSON error that says each of `words`."""
    text = await r.text()
    assert r.status == status, text
    assert r.content_type == "application/json", text
    body: dict[str, Any] = json.loads(text)
    for w in words:
        assert w in body["error"], (w, body)
    return body


class Setup:
    """A hub, a user (alice) with the welcome grant, a selling agent with a service, and a
    buying agent on MQTT."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    async def start(self) -> None:
        hub = self.hub
        self.alice_id, _, self.alice = await hub.user("alice")
        self.bob_id, _, self.bob = await hub.user("bob")
        self.seller_id, self.seller = await self.new_agent("seller", "0")
        self.buyer_id, buyer = await self.new_agent("buyer", "2")
        self.buyer = buyer
        body = {"name": "echo", "price": "0.5"}  # any input, any output
        r = await hub.api.post("/api/v1/agents/services", json=body, headers=self.seller)
        assert r.status == 201, await r.text()
        self.service = (await r.json())["id"]
        self.agent = Agent(hub.services.mqtt_url, self.buyer_id, self.buyer_token)
        hub.peers.append(self.agent)

    async def new_agent(self, name: str, fund: str) -> tuple[str, dict[str, str]]:
        r = await self.hub.api.post("/api/v1/agents", json={"name": name, "fund": fund},
                                    headers=self.alice)  # fmt: skip
        assert r.status == 201, await r.text()
        body = await r.json()
        if name == "buyer":
            self.buyer_token = body["token"]
        return body["id"], await login(self.hub.api, body["token"])

    def publish_raw(self, kind: str, payload: bytes) -> None:
        topic = protocol.agent_topic(self.agent.id, kind)
        self.agent.c.publish(topic, payload, qos=1).wait_for_publish(5)

    def message(self, kind: str, request_id: str, **fields: Any) -> dict[str, Any]:
        if kind == protocol.SUBMIT:
            msg: dict[str, Any] = protocol.submit(request_id, self.buyer_token, FIB)
        else:
            msg = protocol.invoke(request_id, self.buyer_token, self.service, {"n": 1})
        msg.update(fields)
        return msg


@pytest.fixture
async def setup(api: Any) -> AsyncIterator[Setup]:
    hub = Hub(api)
    s = Setup(hub)
    await s.start()
    yield s
    for peer in hub.peers:
        peer.stop()


async def raw_request(api: Any, head: bytes, body: bytes = b"") -> tuple[int, dict[str, str], Any]:
    """One request over a socket of its own, bytes as given: (status, headers, JSON body)."""
    reader, writer = await asyncio.open_connection(api.server.host, api.server.port)
    writer.write(head + b"Host: hub\r\nConnection: close\r\n"
                 + b"Content-Length: %d\r\n\r\n" % len(body) + body)  # fmt: skip
    await writer.drain()
    data = await reader.read()
    writer.close()
    head_text, _, payload = data.partition(b"\r\n\r\n")
    lines = head_text.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(payload)


# --- finding 6: inputs that got a 500 ---------------------------------------------------------
async def test_an_empty_or_foreign_inline_module_is_refused_over_rest(setup: Setup) -> None:
    hub = setup.hub
    before = stored(hub)
    for module, words in [
        ("base64:", ("engine.module", "empty")),
        ("base64:aGVsbG8=", ("engine.module", "not a WebAssembly module")),
    ]:
        spec = {**FIB, "engine": {**FIB["engine"], "module": module}}  # type: ignore[dict-item]
        r = await hub.api.post("/api/v1/jobs", json=spec, headers=setup.alice)
        body = await refused(r, 400, *words)
        assert body["field"] == "engine.module"
    assert stored(hub) == before  # no job, no hold, no blob


async def test_an_empty_inline_module_is_refused_over_mqtt(setup: Setup) -> None:
    hub, agent = setup.hub, setup.agent
    before = stored(hub)
    spec = {**FIB, "engine": {**FIB["engine"], "module": "base64:"}}  # type: ignore[dict-item]
    agent.publish(agent.topic, protocol.submit("empty", setup.buyer_token, spec))
    reply = await agent.reply("empty")
    assert reply["ok"] is False
    assert reply["body"]["status"] == 400 and reply["body"]["field"] == "engine.module"
    assert "empty" in reply["body"]["error"]
    assert stored(hub) == before


async def test_empty_stdin_and_an_empty_input_file_are_inputs_like_others(setup: Setup) -> None:
    """Checked, not refused: an empty file is a file a job may read, and empty stdin is no
    input; both are queued and stored as the empty blob."""
    hub = setup.hub
    for extra in ({"input": "base64:"}, {"inputs": [{"path": "empty.txt", "ref": "base64:"}]}):
        r = await hub.api.post("/api/v1/jobs", json={**FIB, **extra}, headers=setup.alice)
        assert r.status == 201, await r.text()
        job = hub.services.store.job((await r.json())["id"])
        assert job is not None and job["state"] == "queued"
    empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"  # sha256(b"")
    assert hub.services.store.blob(empty) == b""


async def test_numeric_query_parameters_take_plain_bounded_whole_numbers(setup: Setup) -> None:
    hub = setup.hub
    r = await hub.api.post("/api/v1/wallet/transfer", json={"to": setup.bob_id, "amount": "1"},
                           headers={**setup.alice, "Idempotency-Key": "k"})  # fmt: skip
    assert r.status == 201, await r.text()
    before = stored(hub)
    for query, field in [
        ("before=999999999999999999999999999999", "before"),  # OverflowError in SQLite
        ("before=9223372036854775808", "before"),
        ("before=0", "before"),
        ("before=-1", "before"),
        ("before=%EF%BC%91%EF%BC%92", "before"),  # fullwidth "12": int() took it
        ("before=1e3", "before"),
        ("before=+5", "before"),
        ("limit=1_0", "limit"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=%205", "limit"),
        ("limit=999999999999999999999999999999", "limit"),
        ("format=xml", "format"),
    ]:
        r = await hub.api.get("/api/v1/wallet/history?" + query, headers=setup.alice)
        body = await refused(r, 400, field)
        assert body["field"] == field, query
    for query, field in [("limit=999999999999999999999999999999", "limit"),
                         ("limit=501", "limit"), ("all=2", "all")]:  # fmt: skip
        r = await hub.api.get("/api/v1/jobs?" + query, headers=setup.alice)
        assert (await refused(r, 400, field))["field"] == field, query
    # The bounds themselves are fine.
    ok = "limit=1000&before=9223372036854775807"
    r = await hub.api.get("/api/v1/wallet/history?" + ok, headers=setup.alice)
    # the welcome grant, the buyer agent funded, the transfer
    assert r.status == 200 and len((await r.json())["items"]) == 3
    r = await hub.api.get("/api/v1/jobs?limit=500&all=0", headers=setup.alice)
    assert r.status == 200
    assert stored(hub) == before


async def test_a_header_that_is_not_ascii_or_not_utf8_is_refused(setup: Setup) -> None:
    hub = setup.hub
    before = stored(hub)
    node = "n_0123456789abcdef"
    for path, header, status, words in [
        (b"/api/v1/wallet", b"Authorization: Bearer \xff\xfe", 401, ("ASCII",)),  # was a 500
        (b"/api/v1/wallet", b"Authorization: \xff\xfe", 401, ("ASCII",)),
        (b"/api/v1/wallet", "Authorization: Bearer été".encode(), 401, ("ASCII",)),
        (b"/api/v1/nodes/" + node.encode(), b"Authorization: Basic \xff\xfe", 401, ("ASCII",)),
        (b"/api/v1/nodes/" + node.encode(), "Authorization: Basic é".encode(), 401, ("ASCII",)),
        (b"/api/v1/status", b"X-Anything: \xe9t\xe9", 400, ("X-Anything", "UTF-8")),
    ]:
        status_got, _, body = await raw_request(hub.api, b"GET " + path + b" HTTP/1.1\r\n"
                                                + header + b"\r\n")  # fmt: skip
        assert status_got == status, (header, body)
        assert all(w in body["error"] for w in words), body
    # A transfer whose Idempotency-Key is Latin-1 bytes (a lone surrogate once decoded, which
    # SQLite cannot store): refused, nothing moved.
    body_bytes = json.dumps({"to": setup.bob_id, "amount": "1"}).encode()
    head = (b"POST /api/v1/wallet/transfer HTTP/1.1\r\nContent-Type: application/json\r\n"
            b"Authorization: " + setup.alice["Authorization"].encode() + b"\r\n"
            b"Idempotency-Key: cl\xe9\r\n")  # fmt: skip
    status_got, _, body = await raw_request(hub.api, head, body_bytes)
    assert status_got == 400 and body["field"] == "Idempotency-Key", body
    # UTF-8 that is not ASCII is text like any other: a key in any script works.
    r = await hub.api.post("/api/v1/wallet/transfer", json={"to": setup.bob_id, "amount": "1"},
                           headers={**setup.alice, "Idempotency-Key": "clé"})  # fmt: skip
    assert r.status == 201, await r.text()
    before["balances"] = stored(hub)["balances"]  # the one transfer that was asked for
    assert stored(hub)["rows"]["entries"] == before["rows"]["entries"] + 1


async def test_a_deep_service_call_input_is_refused_over_rest_and_mqtt(setup: Setup) -> None:
    hub = setup.hub
    before = stored(hub)
    url = f"/api/v1/agents/services/{setup.service}/call?wait=0"
    r = await hub.api.post(url, data=b'{"input": ' + DEEP + b"}",
                           headers={**setup.buyer, **JSON, "Idempotency-Key": "deep"})  # fmt: skip
    await refused(r, 400, "request body", "nests deeper than 64 levels")
    # Deep, yet shallow enough for the decoder: refused by the service call itself.
    status, body = 0, {}
    for inp in (deep(65), {"a": deep(64)}):
        r = await hub.api.post(url, json={"input": inp}, headers={**setup.buyer,
                               "Idempotency-Key": uuid.uuid4().hex})  # fmt: skip
        status, body = r.status, await r.json()
        assert status == 400, body
    assert "nests deeper" in body["error"] or "request body" in body["error"]
    # Over MQTT: the hub's reply, with the request_id it could read.
    token, service = setup.buyer_token.encode(), setup.service.encode()
    payload = (b'{"v":1,"request_id":"deep","token":"' + token + b'","service":"' + service
               + b'","input":' + DEEP + b"}")  # fmt: skip
    setup.publish_raw(protocol.INVOKE, payload)
    reply = await setup.agent.reply("deep")
    assert reply["ok"] is False and reply["body"]["status"] == 400
    assert "invoke nests deeper than 64 levels" in reply["body"]["error"]
    # A submit the same.
    payload = (b'{"v":1,"request_id":"deep-job","token":"' + token
               + b'","spec":{"name":"x","engine":' + DEEP + b"}}")  # fmt: skip
    setup.publish_raw(protocol.SUBMIT, payload)
    reply = await setup.agent.reply("deep-job")
    assert reply["ok"] is False and reply["body"]["status"] == 400
    assert "submit nests deeper" in reply["body"]["error"]
    assert stored(hub) == before


async def test_a_deep_body_is_refused_on_every_json_endpoint(setup: Setup) -> None:
    hub = setup.hub
    before = stored(hub)
    paths = openapi.document()["paths"]
    posted = [
        p.replace("{service_id}", setup.service)
        for p, ops in paths.items()
        if "application/json" in ops.get("post", {}).get("requestBody", {}).get("content", {})
    ]
    assert len(posted) >= 9, posted
    admin = await login(hub.api, hub.services.admin_token)  # creating users takes an admin
    for path in posted:
        headers = {**admin, **JSON, "Idempotency-Key": uuid.uuid4().hex}
        r = await hub.api.post(path, data=DEEP, headers=headers)
        await refused(r, 400, "nests deeper than 64 levels")
        r = await hub.api.post(path, data=b'{"a": ' + DEEP + b"}", headers=headers)
        await refused(r, 400, "nests deeper than 64 levels")
    assert stored(hub) == before


async def test_a_body_that_is_not_what_content_encoding_says_is_refused(setup: Setup) -> None:
    hub = setup.hub
    before = stored(hub)
    for encoding in ("gzip", "deflate"):
        headers = {**setup.alice, **JSON, "Content-Encoding": encoding}
        r = await hub.api.post("/api/v1/jobs", data=json.dumps(FIB).encode(), headers=headers)
        await refused(r, 400, "request body cannot be read", encoding)
    # The next request is served as usual (on a fresh connection).
    r = await hub.api.get("/api/v1/wallet", headers=setup.alice)
    assert r.status == 200
    assert stored(hub) == before
    # A body that is gzip is read as JSON, as before.
    r = await hub.api.post("/api/v1/jobs", data=gzip.compress(json.dumps(FIB).encode()),
                           headers={**setup.alice, **JSON, "Content-Encoding": "gzip"})  # fmt: skip
    assert r.status == 201, await r.text()


# --- finding 7 --------------------------------------------------------------------------------
async def test_a_transfer_key_replayed_with_another_memo_is_a_conflict(setup: Setup) -> None:
    hub = setup.hub
    send = {"to": setup.bob_id, "amount": "1.5", "memo": "rent"}
    headers = {**setup.alice, "Idempotency-Key": "pay-1"}
    r = await hub.api.post("/api/v1/wallet/transfer", json=send, headers=headers)
    assert r.status == 201, await r.text()
    first = await r.json()
    before = stored(hub)
    for memo in ("food", ""):
        r = await hub.api.post("/api/v1/wallet/transfer", json={**send, "memo": memo},
                               headers=headers)  # fmt: skip
        await refused(r, 409, "memo", "Idempotency-Key")
    r = await hub.api.post("/api/v1/wallet/transfer", json=send, headers=headers)
    assert r.status == 200 and (await r.json()) == {**first, "replayed": True}
    assert stored(hub) == before


# "\u0661" ARABIC-INDIC DIGIT ONE and "\uff11" FULLWIDTH DIGIT ONE: Decimal() reads both as 1.
@pytest.mark.parametrize("amount", ["1_0", "+1", " 0.5 ", "0.5 ", "\u0661", "\uff11", "1e3", "NaN"])
async def test_an_amount_is_a_plain_ascii_decimal(setup: Setup, amount: str) -> None:
    hub = setup.hub
    before = stored(hub)
    r = await hub.api.post("/api/v1/wallet/transfer", json={"to": setup.bob_id, "amount": amount},
                           headers={**setup.alice, "Idempotency-Key": "k"})  # fmt: skip
    body = await refused(r, 400, "not a number of credits", "plain decimal")
    assert body["field"] == "amount"
    r = await hub.api.post("/api/v1/agents", json={"name": "a", "fund": amount},
                           headers=setup.alice)  # fmt: skip
    await refused(r, 400, "not a number of credits")
    assert stored(hub) == before


async def test_a_key_twice_in_a_body_is_refused_naming_it(setup: Setup) -> None:
    hub = setup.hub
    before = stored(hub)
    body = b'{"to": "%s", "amount": "1", "to": "%s"}' % (setup.bob_id.encode(),
                                                      setup.seller_id.encode())  # fmt: skip
    r = await hub.api.post("/api/v1/wallet/transfer", data=body,
                           headers={**setup.alice, **JSON, "Idempotency-Key": "dup"})  # fmt: skip
    await refused(r, 400, "request body has the key 'to' twice")
    # Spelled another way, the same key.
    body = b'{"name": "a", "engine": {"type": "wasm", "module": "example:fib", "\\u0074ype": "x"}}'
    r = await hub.api.post("/api/v1/jobs", data=body, headers={**setup.alice, **JSON})
    await refused(r, 400, "the key 'type' twice")
    # The same key in two objects is two keys.
    r = await hub.api.post("/api/v1/jobs", json={**FIB, "type": "batch"}, headers=setup.alice)
    assert r.status == 201, await r.text()
    before = stored(hub)
    # Over MQTT: a reply naming it.
    payload = json.dumps(setup.message(protocol.SUBMIT, "dup")).encode()
    setup.publish_raw(protocol.SUBMIT, payload[:-1] + b', "token": "dpt_someone_else"}')
    reply = await setup.agent.reply("dup")
    assert reply["ok"] is False and reply["body"]["status"] == 400
    assert "the key 'token' twice" in reply["body"]["error"]
    assert stored(hub) == before


def test_json_problem_counts_brackets_and_keys_outside_strings() -> None:
    assert wire.json_problem(json.dumps(deep(64)).encode()) is None
    assert "nests deeper than 64" in str(wire.json_problem(json.dumps(deep(65)).encode()))
    assert wire.json_problem(json.dumps({"a": "[" * 100 + '"a":'}).encode()) is None
    assert wire.json_problem(b'[{"a": 1}, {"a": 1}, {"b": {"a": 1}}]') is None
    assert "'a' twice" in str(wire.json_problem(b'[{"a": 1, "b": {"c": 2}, "a": 3}]'))
    assert "'\\\\' twice" in str(wire.json_problem(b'{"\\\\": 1, "\\u005c": 2}'))
    assert wire.top_level_string(b'{"x": {"request_id": "no"}, "request_id" : "yes"}',
                                 "request_id") == "yes"  # fmt: skip


async def test_the_openapi_document_defines_every_schema_it_references(setup: Setup) -> None:
    r = await setup.hub.api.get("/api/v1/openapi.json")
    doc = await r.json()
    refs = set(re.findall(r'"#/components/schemas/(\w+)"', json.dumps(doc)))
    assert {"TransferRequest", "TransferResponse"} <= refs
    assert refs <= set(doc["components"]["schemas"]), refs - set(doc["components"]["schemas"])
    # It says what the handlers take, so a value it allows is not refused (schemathesis).
    keys = [p["schema"] for ops in doc["paths"].values() for op in ops.values()
            for p in op.get("parameters", []) if p["name"] == "Idempotency-Key"]  # fmt: skip
    assert len(keys) == 3 and all(k["minLength"] == 1 and k["maxLength"] == 128 for k in keys)
    pattern = doc["components"]["schemas"]["TransferRequest"]["properties"]["amount"]["pattern"]
    for amount in ["1", "0.5", ".5", "0.000001", "2.500000000", "999999999999"]:
        assert re.fullmatch(pattern, amount) and credits_to_micro(amount) > 0, amount
    for amount in ["0", "0.0", "-1", "0.0000001", "1e3", "+1", " 1", "1_0", "\uff11"]:
        assert not re.fullmatch(pattern, amount), amount
    history = {p["name"]: p["schema"] for p in doc["paths"]["/api/v1/wallet/history"]["get"]
               ["parameters"]}  # fmt: skip
    assert history["before"] == {"type": "integer", "minimum": 1, "maximum": 2**63 - 1}


async def test_a_405_says_which_methods_are_allowed(setup: Setup) -> None:
    hub = setup.hub
    for method, path, allow in [
        ("PUT", "/api/v1/wallet/transfer", "POST"),
        ("GET", "/api/v1/wallet/transfer", "POST"),
        ("DELETE", "/api/v1/jobs", "GET, HEAD, POST"),
        ("GET", "/api/v1/nodes/enroll", "POST"),  # not a node named "enroll"
    ]:
        r = await hub.api.request(method, path, headers=setup.alice)
        await refused(r, 405, method, "not allowed")
        assert r.headers.get("Allow") == allow, (path, r.headers)


async def test_a_submit_or_invoke_in_another_protocol_version_is_refused(setup: Setup) -> None:
    hub, agent = setup.hub, setup.agent
    before = stored(hub)
    for kind in (protocol.SUBMIT, protocol.INVOKE):
        request_id = "v2-" + kind
        setup.publish_raw(kind, json.dumps(setup.message(kind, request_id, v=2)).encode())
        reply = await agent.reply(request_id)
        assert reply["ok"] is False, reply
        body = reply["body"]
        assert body["status"] == 400 and body["field"] == "v"
        assert "protocol version 2 is not supported" in body["error"]
    assert stored(hub) == before


async def test_a_request_id_reused_for_another_spec_is_a_conflict(setup: Setup) -> None:
    hub, agent = setup.hub, setup.agent
    agent.publish(agent.topic, protocol.submit("same", setup.buyer_token, FIB))
    first = await agent.reply("same")
    assert first["ok"] is True, first
    await eventually("the reply's job", lambda: hub.services.store.job(first["body"]["id"]))
    before = stored(hub)
    other = {**FIB, "timeout": 11}
    agent.publish(agent.topic, protocol.submit("same", setup.buyer_token, other))
    reply = await agent.reply("same")
    assert reply["ok"] is False and reply["body"]["status"] == 409, reply
    assert "different job" in reply["body"]["error"]
    assert stored(hub) == before
    # ...and docs/protocol.md says so, in the submit's table of statuses.
    doc = (ROOT / "docs" / "protocol.md").read_text()
    assert "whatever spec it carries" not in doc
    assert re.search(r"\| 409 \| .*request_id.* another spec", doc), "409 is not listed"

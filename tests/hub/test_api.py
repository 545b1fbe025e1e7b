"""The REST API against the real app factory, a real SQLite file and a real Mosquitto."""

from __future__ import annotations

from typing import Any

import pytest

from tests.hub.conftest import login, new_user

FIB = {
    "engine": {"type": "wasm", "module": "example:fib", "entrypoint": "fib", "args": ["20"]},
    "timeout": 10,
}


async def test_token_exchange_and_bad_credentials(api: Any) -> None:
    r = await api.post("/api/v1/auth/token", json={"token": "dpt_not-a-real-token"})
    assert r.status == 401
    assert "unknown API token" in (await r.json())["error"]
    r = await api.get("/api/v1/wallet")
    assert r.status == 401
    assert "Authorization" in (await r.json())["error"]
    r = await api.get("/api/v1/wallet", headers={"Authorization": "Bearer forged.jwt.value"})
    assert r.status == 401
    assert "invalid token" in (await r.json())["error"]


async def test_welcome_grant_and_wallet(api: Any) -> None:
    _, auth = await new_user(api)
    r = await api.get("/api/v1/wallet", headers=auth)
    body = await r.json()
    assert body["balance"] == "10" and body["held"] == "0"


async def test_submit_prices_on_server_and_holds(api: Any) -> None:
    _, auth = await new_user(api)
    spec = {**FIB, "price": 0}  # a client-supplied price is refused, never used
    r = await api.post("/api/v1/jobs", json=spec, headers=auth)
    assert r.status == 400
    assert "unknown field `price`" in (await r.json())["error"]
    r = await api.post("/api/v1/jobs", json=FIB, headers=auth)
    assert r.status == 201, await r.text()
    job = await r.json()
    # 1 CPU for 10 s at 10 credits/hour = 27,777 µc, rounded down.
    assert job["hold"] == "0.027777"
    w = await (await api.get("/api/v1/wallet", headers=auth)).json()
    assert w["held"] == "0.027777" and w["balance"] == "9.972223"
    r = await api.get(f"/api/v1/jobs/{job['id']}", headers=auth)
    view = await r.json()
    assert view["state"] == "queued" and view["reason"] == "no node is online"
    assert api.services.ledger.audit().balanced


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"engine": {"type": "wasm"}}, "engine"),
        ({"engine": {"type": "cobol", "module": "example:fib"}}, "engine.type"),
        ({"engine": {"type": "docker", "module": "example:fib"}}, "engine"),
        ({"engine": {"type": "docker"}}, "engine.image"),
        ({"engine": {"type": "docker", "image": "Bad Image!"}}, "engine.image"),
        ({"engine": {"type": "native", "command": []}}, "engine.command"),
        ({**FIB, "timeout": 0}, "timeout"),
        ({**FIB, "timeout": "ten"}, "timeout"),
        ({**FIB, "resources": {"cpu": -1}}, "resources.cpu"),
        ({**FIB, "priority": "urgent"}, "priority"),
        ({**FIB, "engine": {**FIB["engine"], "module": "http://x"}}, "engine.module"),
        ({**FIB, "engine": {**FIB["engine"], "module": "example:nope"}}, "engine.module"),
        ({**FIB, "engine": {**FIB["engine"], "module": "sha256:" + "0" * 64}}, "engine.module"),
        ({**FIB, "engine": {**FIB["engine"], "env": {"1BAD": "x"}}}, "engine.env"),
        ({**FIB, "timeout": 10**9}, "timeout"),
    ],
)
async def test_invalid_spec_is_400_naming_the_field(api: Any, spec: dict, field: str) -> None:
    _, auth = await new_user(api)
    r = await api.post("/api/v1/jobs", json=spec, headers=auth)
    assert r.status == 400, await r.text()
    body = await r.json()
    assert body.get("field") and body["field"].startswith(field), body
    assert (await (await api.get("/api/v1/jobs", headers=auth)).json())["jobs"] == []


async def test_not_json_is_400(api: Any) -> None:
    _, auth = await new_user(api)
    r = await api.post("/api/v1/jobs", data=b"{nope", headers=auth)
    assert r.status == 400
    assert "not valid JSON" in (await r.json())["error"]


async def test_insufficient_credits_is_402_and_nothing_changes(api: Any) -> None:
    _, auth = await new_user(api)
    before = await (await api.get("/api/v1/wallet", headers=auth)).json()
    # 10 CPUs for a day = 2400 credits; the wallet has 10.
    r = await api.post(
        "/api/v1/jobs", json={**FIB, "timeout": 86400, "resources": {"cpu": 10}}, headers=auth
    )
    assert r.status == 402
    body = await r.json()
    assert body["shortfall"] == "2390"
    assert "short by 2390" in body["error"]
    after = await (await api.get("/api/v1/wallet", headers=auth)).json()
    assert after == before
    assert (await (await api.get("/api/v1/jobs", headers=auth)).json())["jobs"] == []
    assert api.services.ledger.audit().balanced


async def test_idempotent_submit_and_repeated_cancel(api: Any) -> None:
    _, auth = await new_user(api)
    headers = {**auth, "Idempotency-Key": "k-1"}
    first = await (await api.post("/api/v1/jobs", json=FIB, headers=headers)).json()
    again = await (await api.post("/api/v1/jobs", json=FIB, headers=headers)).json()
    assert first["id"] == again["id"]
    w = await (await api.get("/api/v1/wallet", headers=auth)).json()
    assert w["held"] == "0.027777"  # held once
    for _ in range(3):
        r = await api.post(f"/api/v1/jobs/{first['id']}/cancel", headers=auth)
        assert r.status == 200
        assert (await r.json())["state"] == "cancelled"
    w = await (await api.get("/api/v1/wallet", headers=auth)).json()
    assert w == {**w, "balance": "10", "held": "0"}  # refunded exactly once
    assert api.services.ledger.audit().balanced


async def test_other_users_cannot_read_or_cancel(api: Any) -> None:
    _, alice = await new_user(api, "alice")
    _, bob = await new_user(api, "bob")
    job = await (await api.post("/api/v1/jobs", json=FIB, headers=alice)).json()
    # Someone else's job looks exactly like a missing one.
    assert (await api.get(f"/api/v1/jobs/{job['id']}", headers=bob)).status == 404
    assert (await api.post(f"/api/v1/jobs/{job['id']}/cancel", headers=bob)).status == 404
    assert (await api.get(f"/api/v1/jobs/{job['id']}", headers=alice)).status == 200
    assert (await api.get("/api/v1/jobs/j_missing", headers=bob)).status == 404
    assert (await api.post("/api/v1/users", json={"name": "x"}, headers=bob)).status == 403


async def test_enrollment_token_is_single_use(api: Any) -> None:
    _, auth = await new_user(api)
    t = await (await api.post("/api/v1/enrollment-tokens", headers=auth)).json()
    assert t["command"].startswith("edge-run --hub http://")
    r = await api.post("/api/v1/nodes/enroll", json={"token": t["token"], "name": "n1"})
    assert r.status == 201, await r.text()
    node = await r.json()
    assert node["mqtt"]["username"] == node["node_id"]
    assert node["mqtt"]["url"].startswith("mqtt://127.0.0.1:")
    r = await api.post("/api/v1/nodes/enroll", json={"token": t["token"], "name": "n2"})
    assert r.status == 401
    assert "already used" in (await r.json())["error"]
    r = await api.post("/api/v1/nodes/enroll", json={"token": "dpe_unknown-token"})
    assert r.status == 401
    nodes = await (await api.get("/api/v1/nodes", headers=auth)).json()
    assert [n["name"] for n in nodes["nodes"]] == ["n1"]


async def test_upload_blob_and_submit_by_hash(api: Any) -> None:
    from wasm_jobs import path

    _, auth = await new_user(api)
    data = path("fib.wasm").read_bytes()
    r = await api.post("/api/v1/blobs", data=data, headers=auth)
    assert r.status == 201
    ref = (await r.json())["ref"]
    spec = {**FIB, "engine": {**FIB["engine"], "module": ref}}
    assert (await api.post("/api/v1/jobs", json=spec, headers=auth)).status == 201
    assert (await api.post("/api/v1/blobs", data=b"", headers=auth)).status == 400


async def test_a_blob_that_is_not_webassembly_is_refused_as_a_module(api: Any) -> None:
    _, auth = await new_user(api)
    for data in (b"\0as", b"#!/bin/sh\necho hi\n"):  # shorter than the magic; another file
        r = await api.post("/api/v1/blobs", data=data, headers=auth)
        spec = {**FIB, "engine": {**FIB["engine"], "module": (await r.json())["ref"]}}
        r = await api.post("/api/v1/jobs", json=spec, headers=auth)
        body = await r.json()
        assert r.status == 400 and body["field"] == "engine.module", body
        assert "not a WebAssembly module" in body["error"]
    spec = {**FIB, "engine": {**FIB["engine"], "module": "sha256:" + "0" * 64}}
    body = await (await api.post("/api/v1/jobs", json=spec, headers=auth)).json()
    assert "no uploaded blob" in body["error"]
    assert await (await api.get("/api/v1/jobs", headers=auth)).json() == {"jobs": []}


async def test_openapi_and_page(api: Any) -> None:
    doc = await (await api.get("/api/v1/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    assert "/api/v1/jobs" in doc["paths"] and "JobSpec" in doc["components"]["schemas"]
    for path in doc["paths"]:
        assert any(r.resource.canonical == path for r in api.app.router.routes()), path
    # The dashboard asks who you are first (its pages are tested in tests/web/).
    r = await api.get("/", allow_redirects=False)
    assert r.status == 303 and r.headers["Location"].startswith("/signin")


async def test_audit_is_admin_only(api: Any) -> None:
    _, auth = await new_user(api)
    assert (await api.get("/api/v1/ledger/audit", headers=auth)).status == 403
    admin = await login(api, api.services.admin_token)
    audit = await (await api.get("/api/v1/ledger/audit", headers=admin)).json()
    assert audit["balanced"] is True and audit["total"] == "0"


async def test_transfer_history_and_csv(api: Any) -> None:
    alice_id, alice = await new_user(api, "alice")
    bob_id, bob = await new_user(api, "bob")
    key = {**alice, "Idempotency-Key": "t-1"}
    r = await api.post("/api/v1/wallet/transfer", json={"to": bob_id, "amount": "2.5"}, headers=key)
    assert r.status == 201, await r.text()
    assert (await r.json())["balance"] == "7.5"
    # The same request retried: same answer, moved once.
    r = await api.post("/api/v1/wallet/transfer", json={"to": bob_id, "amount": "2.5"}, headers=key)
    assert r.status == 200 and (await r.json())["replayed"] is True
    # The same key for something else: refused.
    r = await api.post("/api/v1/wallet/transfer", json={"to": bob_id, "amount": "3"}, headers=key)
    assert r.status == 409
    bob_w = await (await api.get("/api/v1/wallet", headers=bob)).json()
    assert bob_w["balance"] == "12.5"
    hist = await (await api.get("/api/v1/wallet/history", headers=bob)).json()
    assert [i["amount"] for i in hist["items"]] == ["2.5", "10"]
    assert hist["items"][0]["reason"] == f"transfer to {bob_id}"
    assert hist["items"][0]["counterparties"] == [f"wallet:{alice_id}"]
    r = await api.get("/api/v1/wallet/history?format=csv", headers=bob)
    assert r.content_type == "text/csv"
    lines = (await r.text()).splitlines()
    assert lines[0].startswith("entry,time_utc,reason,amount,balance_after")
    assert lines[1].split(",")[3:5] == ["2.5", "12.5"]


@pytest.mark.parametrize(
    ("body", "headers", "status", "needle"),
    [
        ({"to": "BOB", "amount": "-1"}, {"Idempotency-Key": "k"}, 400, "more than 0"),
        ({"to": "BOB", "amount": "0"}, {"Idempotency-Key": "k"}, 400, "more than 0"),
        ({"to": "BOB", "amount": "0.0000001"}, {"Idempotency-Key": "k"}, 400, "6 decimals"),
        ({"to": "BOB", "amount": "1" + "0" * 30}, {"Idempotency-Key": "k"}, 400, "over the limit"),
        ({"to": "BOB", "amount": "ten"}, {"Idempotency-Key": "k"}, 400, "not a number"),
        ({"to": "BOB", "amount": 5}, {"Idempotency-Key": "k"}, 400, "Expected `str`"),
        ({"to": "BOB", "amount": "11"}, {"Idempotency-Key": "k"}, 402, "short by 1"),
        ({"to": "u_nobody", "amount": "1"}, {"Idempotency-Key": "k"}, 404, "no user"),
        ({"to": "ME", "amount": "1"}, {"Idempotency-Key": "k"}, 400, "yourself"),
        ({"to": "BOB", "amount": "1"}, {}, 400, "Idempotency-Key"),
    ],
)
async def test_bad_transfers_are_refused_and_change_nothing(
    api: Any, body: dict, headers: dict, status: int, needle: str
) -> None:
    me, auth = await new_user(api, "alice")
    bob, _ = await new_user(api, "bob")
    body = {k: (bob if v == "BOB" else me if v == "ME" else v) for k, v in body.items()}
    before = api.services.ledger.audit()
    r = await api.post("/api/v1/wallet/transfer", json=body, headers={**auth, **headers})
    assert r.status == status, await r.text()
    assert needle in (await r.json())["error"]
    after = api.services.ledger.audit()
    assert after.entries == before.entries and after.balanced


async def test_500_concurrent_transfers_balance(api: Any) -> None:
    import asyncio

    users = [await new_user(api, f"u{i}") for i in range(5)]
    ids = [u for u, _ in users]

    async def send(n: int) -> int:
        src_id, auth = users[n % 5]
        dst = ids[(n + 1 + n // 5) % 5]
        if dst == src_id:
            dst = ids[(n + 2) % 5]
        r = await api.post(
            "/api/v1/wallet/transfer",
            json={"to": dst, "amount": "0.01"},
            headers={**auth, "Idempotency-Key": f"c-{n}"},
        )
        return int(r.status)

    statuses = await asyncio.gather(*(send(n) for n in range(500)))
    assert statuses.count(201) == 500
    audit = api.services.ledger.audit()
    assert audit.balanced and audit.total == 0
    total = 0
    for _, auth in users:
        total += int(
            (await (await api.get("/api/v1/wallet", headers=auth)).json())["balance_micro"]
        )
    assert total == 5 * 10_000_000  # transfers only move credits between these wallets


async def test_not_wasm_is_refused_at_submission(api: Any) -> None:
    _, auth = await new_user(api)
    spec = {**FIB, "engine": {**FIB["engine"], "module": "base64:aGVsbG8="}}  # "hello"
    r = await api.post("/api/v1/jobs", json=spec, headers=auth)
    assert r.status == 400
    body = await r.json()
    assert body["field"] == "engine.module" and "not a WebAssembly module" in body["error"]


async def test_reused_submit_key_for_another_job_is_409(api: Any) -> None:
    _, auth = await new_user(api)
    headers = {**auth, "Idempotency-Key": "same"}
    assert (await api.post("/api/v1/jobs", json=FIB, headers=headers)).status == 201
    other = {**FIB, "timeout": 11}
    r = await api.post("/api/v1/jobs", json=other, headers=headers)
    assert r.status == 409 and "different job" in (await r.json())["error"]


async def test_unknown_api_paths_answer_json(api: Any) -> None:
    r = await api.get("/api/v1/nope")
    assert r.status == 404 and "no such endpoint" in (await r.json())["error"]
    r = await api.delete("/api/v1/wallet")
    assert r.status == 405 and "not allowed" in (await r.json())["error"]
    _, auth = await new_user(api)
    r = await api.get("/api/v1/jobs?state=bogus", headers=auth)
    assert r.status == 400 and "queued" in (await r.json())["error"]

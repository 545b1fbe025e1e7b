"""The REST API against the real app factory, a real SQLite file and a real Mosquitto."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hub.app import SERVICES, create_app
from hub.config import HubConfig

FIB = {
    "engine": {"type": "wasm", "module": "example:fib", "entrypoint": "fib", "args": ["20"]},
    "timeout": 10,
}


@pytest.fixture
async def api(aiohttp_client: Any, tmp_path: Path, mosquitto: str) -> Any:
    config = HubConfig(data_dir=tmp_path / "hub", mqtt_url=mosquitto, welcome_grant_credits=10)
    app = create_app(config)
    client = await aiohttp_client(app)
    client.services = app[SERVICES]
    return client


async def login(api: Any, token: str) -> dict[str, str]:
    r = await api.post("/api/v1/auth/token", json={"token": token})
    assert r.status == 200, await r.text()
    return {"Authorization": "Bearer " + (await r.json())["jwt"]}


async def new_user(api: Any, name: str = "alice") -> tuple[str, dict[str, str]]:
    admin = await login(api, api.services.admin_token)
    r = await api.post("/api/v1/users", json={"name": name}, headers=admin)
    assert r.status == 201, await r.text()
    body = await r.json()
    return body["id"], await login(api, body["token"])


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
        ({"engine": {"type": "docker", "module": "example:fib"}}, "engine.type"),
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
    assert (await api.get(f"/api/v1/jobs/{job['id']}", headers=bob)).status == 403
    assert (await api.post(f"/api/v1/jobs/{job['id']}/cancel", headers=bob)).status == 403
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


async def test_openapi_and_page(api: Any) -> None:
    doc = await (await api.get("/api/v1/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    assert "/api/v1/jobs" in doc["paths"] and "JobSpec" in doc["components"]["schemas"]
    for path in doc["paths"]:
        assert any(r.resource.canonical == path for r in api.app.router.routes()), path
    _, auth = await new_user(api)
    job = await (
        await api.post("/api/v1/jobs", json={**FIB, "name": "fib-20"}, headers=auth)
    ).json()
    page = await (await api.get("/")).text()
    assert "DEparrow hub" in page and "fib-20" in page and job["id"] in page
    assert "wallet:" in page and "balanced" in page


async def test_audit_is_admin_only(api: Any) -> None:
    _, auth = await new_user(api)
    assert (await api.get("/api/v1/ledger/audit", headers=auth)).status == 403
    admin = await login(api, api.services.admin_token)
    audit = await (await api.get("/api/v1/ledger/audit", headers=admin)).json()
    assert audit["balanced"] is True and audit["total"] == "0"

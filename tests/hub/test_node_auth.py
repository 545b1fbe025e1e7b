"""Nodes as identities: a node signs in with its own credentials and may read only its own
record; its owner (or an admin) can remove it, which requeues its jobs and silences it.
The real app factory, a real SQLite file, a real Mosquitto."""

from __future__ import annotations

from typing import Any

from edge.core import protocol
from hub.market.jobs import wallet_of
from tests.hub.conftest import new_user

LOOP = {
    "engine": {"type": "wasm", "module": "example:fib", "entrypoint": "fib", "args": ["20"]},
    "timeout": 10,
}


async def enroll(api: Any, auth: dict[str, str], name: str) -> dict[str, Any]:
    t = await (await api.post("/api/v1/enrollment-tokens", headers=auth)).json()
    r = await api.post("/api/v1/nodes/enroll", json={"token": t["token"], "name": name})
    assert r.status == 201, await r.text()
    creds: dict[str, Any] = await r.json()
    return creds


async def node_login(api: Any, creds: dict[str, Any]) -> dict[str, str]:
    r = await api.post(
        "/api/v1/auth/node-token",
        json={"node_id": creds["node_id"], "password": creds["mqtt"]["password"]},
    )
    assert r.status == 200, await r.text()
    body = await r.json()
    assert body["role"] == "node" and body["user"] == creds["node_id"]
    return {"Authorization": "Bearer " + body["jwt"]}


async def test_a_node_token_reads_its_own_record_and_nothing_else(api: Any) -> None:
    _, alice = await new_user(api, "alice")
    a, b = await enroll(api, alice, "a"), await enroll(api, alice, "b")
    node = await node_login(api, a)

    r = await api.get(f"/api/v1/nodes/{a['node_id']}", headers=node)
    assert r.status == 200 and (await r.json())["id"] == a["node_id"]

    r = await api.get(f"/api/v1/nodes/{b['node_id']}", headers=node)
    assert r.status == 403
    assert "only its own record" in (await r.json())["error"]
    # A node holds no wallet, owns no jobs, enrolls nothing, lists nobody.
    for method, path in [
        ("GET", "/api/v1/wallet"),
        ("POST", "/api/v1/jobs"),
        ("GET", "/api/v1/jobs"),
        ("GET", "/api/v1/nodes"),
        ("POST", "/api/v1/enrollment-tokens"),
        ("POST", "/api/v1/wallet/transfer"),
        ("DELETE", f"/api/v1/nodes/{a['node_id']}"),
    ]:
        r = await api.request(method, path, headers=node, json=LOOP)
        assert r.status == 403, (method, path, await r.text())
        assert "use a user's or agent's API token" in (await r.json())["error"]


async def test_node_sign_in_refuses_bad_credentials(api: Any) -> None:
    _, alice = await new_user(api, "alice")
    a = await enroll(api, alice, "a")
    for body in (
        {"node_id": a["node_id"], "password": "wrong"},
        {"node_id": "n_nobody", "password": a["mqtt"]["password"]},
    ):
        r = await api.post("/api/v1/auth/node-token", json=body)
        assert r.status == 401
        assert "node.json" in (await r.json())["error"]
    r = await api.post("/api/v1/auth/node-token", json={"node_id": a["node_id"]})
    assert r.status == 400 and "password" in (await r.json())["error"]


async def test_removing_a_node_requeues_its_job_and_silences_it(api: Any) -> None:
    s = api.services
    owner_id, owner = await new_user(api, "owner")
    _, mallory = await new_user(api, "mallory")
    _, submitter = await new_user(api, "submitter")
    creds = await enroll(api, owner, "n")
    node_id = creds["node_id"]
    node = s.store.node(node_id)
    hello = protocol.hello(node_id, ["wasm"], {"cpu": 1, "memory_mb": 256}, "t")
    assert s.bridge.handle(protocol.node_topic(node_id, protocol.HELLO), protocol.encode(hello))

    r = await api.post("/api/v1/jobs", json=LOOP, headers=submitter)
    job_id = (await r.json())["id"]
    s.bridge.dispatch()
    assert s.store.job(job_id)["node"] == node_id
    earned_before = s.ledger.balance(wallet_of(owner_id))

    # Someone else's node: not found, as if it did not exist.
    r = await api.delete(f"/api/v1/nodes/{node_id}", headers=mallory)
    assert r.status == 404 and s.store.node(node_id)["revoked_at"] is None

    r = await api.delete(f"/api/v1/nodes/{node_id}", headers=owner)
    assert r.status == 200, await r.text()
    body = await r.json()
    assert body["removed"] and body["requeued"] == 1
    job = s.store.job(job_id)
    assert job["state"] == "queued" and job["reason"] == "no node is online"
    r = await api.delete(f"/api/v1/nodes/{node_id}", headers=owner)
    assert r.status == 200 and (await r.json())["requeued"] == 0  # again: harmless

    # Gone from the owner's list; its credentials no longer sign in.
    nodes = (await (await api.get("/api/v1/nodes", headers=owner)).json())["nodes"]
    assert node_id not in [n["id"] for n in nodes]
    r = await api.post(
        "/api/v1/auth/node-token",
        json={"node_id": node_id, "password": creds["mqtt"]["password"]},
    )
    assert r.status == 401 and "removed" in (await r.json())["error"]

    # A late result from the removed node is dropped: nobody is paid for it.
    late = protocol.result(node_id, node["secret"], job_id, 1, {
        "status": "completed", "exit_code": 0, "stdout": b"", "returns": [6765], "error": None,
        "wall_ms": 10, "cpu_ms": 10})  # fmt: skip
    topic = protocol.node_topic(node_id, protocol.RESULT)
    assert s.bridge.handle(topic, protocol.encode(late)).startswith("dropped")
    assert s.store.job(job_id)["state"] == "queued"
    assert s.ledger.balance(wallet_of(owner_id)) == earned_before
    assert s.ledger.audit().balanced

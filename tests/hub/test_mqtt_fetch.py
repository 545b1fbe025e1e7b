"""An agent's job over MQTT whose inputs are https:// URLs: the hub fetches them off the
bridge's batch (a real local HTTPS server with a throwaway CA, the real app, a real
Mosquitto), then admits the job with the fetched bytes as its input files; a URL it may not
fetch is answered on the agent's reply topic with the reason."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web

from edge.core import protocol
from hub.api.services import SERVICES
from hub.app import create_app
from hub.config import HubConfig
from hub.market.jobs import wallet_of
from tests.hub.test_mqtt_results import Finals, Hub, enroll, submit

DATA = b"fetched over TLS\n" * 10


async def https_server(aiohttp_server: Any, ca: trustme.CA) -> Any:
    app = web.Application()

    async def data(_: web.Request) -> web.Response:
        return web.Response(body=DATA)

    app.router.add_get("/data.txt", data)
    cert = ca.issue_cert("127.0.0.1", "localhost")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    return await aiohttp_server(app, ssl=context, host="127.0.0.1")


@pytest.fixture
async def hub(aiohttp_client: Any, tmp_path: Path, mosquitto: str) -> AsyncIterator[Hub]:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    config = HubConfig(data_dir=tmp_path / "hub", mqtt_url=mosquitto, welcome_grant_credits=10,
                       fetch_allow_private=True, fetch_ca_file=str(ca_file))  # fmt: skip
    app = create_app(config)
    client = await aiohttp_client(app)
    client.services = app[SERVICES]
    client.ca = ca
    h = Hub(client)
    yield h
    for peer in h.peers:
        peer.stop()


async def test_an_agents_https_inputs_are_fetched_then_the_job_runs(
    hub: Hub, aiohttp_server: Any
) -> None:
    server = await https_server(aiohttp_server, hub.api.ca)
    _, _, owner = await hub.user("owner")
    node = await enroll(hub, owner)  # a node that takes file jobs
    node.send(protocol.HELLO, protocol.hello(
        node.id, ["wasm"], {"cpu": 2, "memory_mb": 512}, "t",
        files={"engines": ["wasm"], "max_input_bytes": 1 << 20, "max_output_bytes": 1 << 20,
               "max_output_files": 8}))  # fmt: skip
    agent = await hub.agent()
    finals = Finals(agent)
    url = f"https://127.0.0.1:{server.port}/data.txt"
    spec = {"engine": {"type": "wasm", "module": "example:wordfreq"}, "timeout": 10,
            "inputs": [{"path": "remote.txt", "ref": url}], "outputs": True}  # fmt: skip
    job_id = await finals.accepted(submit(agent, spec))
    assign = await node.next(protocol.ASSIGN)
    assert assign["job_id"] == job_id
    (given,) = assign["files"]["inputs"]
    assert given["path"] == "remote.txt" and given["sha256"] == hashlib.sha256(DATA).hexdigest()
    stored = hub.services.store.job(job_id)
    assert stored is not None and url not in stored["spec"]  # kept by its sha256 reference


async def test_a_url_the_hub_may_not_fetch_is_answered_with_the_reason(
    hub: Hub, aiohttp_server: Any
) -> None:
    agent = await hub.agent()
    finals = Finals(agent)
    balance = hub.services.ledger.balance(wallet_of(agent.id))
    spec = {"engine": {"type": "wasm", "module": "example:wordfreq"}, "timeout": 10,
            "inputs": [{"path": "x", "ref": "https://127.0.0.1:1/x"}]}  # fmt: skip
    request_id = submit(agent, spec)
    deadline = time.monotonic() + 15
    while not (got := [m for m in finals.drained() if m.get("request_id") == request_id]):
        assert time.monotonic() < deadline, "no answer"
        await asyncio.sleep(0.02)
    (answer,) = got
    assert answer["ok"] is False and answer["body"]["field"] == "inputs[0].ref"
    assert answer["body"]["error"].startswith("inputs[0].ref: https://127.0.0.1:1/x: could not")
    assert hub.services.ledger.balance(wallet_of(agent.id)) == balance  # nothing held

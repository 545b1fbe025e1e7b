"""Two hub replicas (two apps) on one real PostgreSQL database and one real Mosquitto: what
one writes the other serves, a JWT signed by one is good at the other, one of them leads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deparrow.pgserver import LocalPostgres
from hub.api.services import SERVICES
from hub.app import create_app
from hub.config import HubConfig
from tests.hub.conftest import login
from tests.hub.test_leader import until


async def replica(aiohttp_client: Any, data_dir: Path, url: str, mqtt: str) -> Any:
    config = HubConfig(data_dir=data_dir, db_url=url, mqtt_url=mqtt, welcome_grant_credits=10)
    app = create_app(config)
    client = await aiohttp_client(app)
    client.services = app[SERVICES]
    return client


async def test_replicas_share_users_tokens_and_one_leader(
    aiohttp_client: Any, tmp_path: Path, mosquitto: str, postgres_server: LocalPostgres
) -> None:
    url = postgres_server.create_database("replicas")
    a = await replica(aiohttp_client, tmp_path / "a", url, mosquitto)
    b = await replica(aiohttp_client, tmp_path / "b", url, mosquitto)
    # One admin for the store: made by the first replica, whose data directory has its token.
    assert a.services.admin_token and b.services.admin_token is None
    admin = await login(a, a.services.admin_token)
    r = await a.post("/api/v1/users", json={"name": "alice"}, headers=admin)
    assert r.status == 201, await r.text()
    alice = await r.json()
    # Signed in at a, served at b: the JWT key is the store's, not each data directory's.
    at_a = await login(a, alice["token"])
    r = await b.get("/api/v1/wallet", headers=at_a)
    assert r.status == 200, await r.text()
    assert (await r.json())["balance"] == "10"
    assert a.services.config.jwt_secret == b.services.config.jwt_secret
    assert not (tmp_path / "a" / "jwt-secret").exists()
    await until(lambda: a.services.leadership.leading != b.services.leadership.leading)

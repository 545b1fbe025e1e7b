"""The REST API against the real app factory, a real SQLite file and a real Mosquitto: the
`api` client fixture and the sign-in helpers the hub's API tests share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hub.api.services import SERVICES
from hub.app import create_app
from hub.config import HubConfig


@pytest.fixture
async def api(aiohttp_client: Any, tmp_path: Path, mosquitto: str, store: str | Path) -> Any:
    """The app on a SQLite file, or (in modules marked both_stores) also on PostgreSQL."""
    config = HubConfig(
        data_dir=tmp_path / "hub", db_url=db_url(store), mqtt_url=mosquitto,
        welcome_grant_credits=10,
    )  # fmt: skip
    app = create_app(config)
    client = await aiohttp_client(app)
    client.services = app[SERVICES]
    return client


def db_url(store: str | Path) -> str | None:
    """HubConfig's db_url for the `store` fixture's value (None: the SQLite file in data_dir)."""
    return store if isinstance(store, str) else None


async def login(api: Any, token: str) -> dict[str, str]:
    """The Authorization header for an API token (exchanged for a JWT)."""
    r = await api.post("/api/v1/auth/token", json={"token": token})
    assert r.status == 200, await r.text()
    return {"Authorization": "Bearer " + (await r.json())["jwt"]}


async def new_user(api: Any, name: str = "alice") -> tuple[str, dict[str, str]]:
    """A user created by the admin: (id, their Authorization header)."""
    admin = await login(api, api.services.admin_token)
    r = await api.post("/api/v1/users", json={"name": name}, headers=admin)
    assert r.status == 201, await r.text()
    body = await r.json()
    return body["id"], await login(api, body["token"])

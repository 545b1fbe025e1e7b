"""Rate limits on the REST API (hub/api/limits.py), the middleware in a real aiohttp server
with its clock driven by the test: logins per address, requests per token (or per address
without one), 429 with Retry-After, loopback exempt unless configured. The hub's own app with
its configured limits: tests/hub/test_api.py."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from hub.api import limits


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def app(clock: Clock, exempt_loopback: bool = False) -> web.Application:
    async def ok(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    a = web.Application(
        middlewares=[
            limits.middleware(limits.Rate(2, 4), limits.Rate(0.5, 2), exempt_loopback, clock)
        ]
    )
    a.router.add_get("/api/v1/wallet", ok)
    a.router.add_post("/api/v1/auth/token", ok)
    return a


async def statuses(client: Any, n: int, method: str, path: str, **kw: Any) -> list[int]:
    out = []
    for _ in range(n):
        r = await client.request(method, path, **kw)
        out.append(r.status)
    return out


async def test_logins_are_limited_per_address_and_come_back_with_time(aiohttp_client: Any) -> None:
    clock = Clock()
    client = await aiohttp_client(app(clock))
    assert await statuses(client, 3, "POST", "/api/v1/auth/token") == [200, 200, 429]
    r = await client.post("/api/v1/auth/token")
    assert r.status == 429 and r.headers["Retry-After"] == "2"
    body = await r.json()
    assert body["error"] == (
        "too many requests: the hub takes 0.5 logins a second from one address (bursts of 2);"
        " try again in 2 s"
    )
    clock.now += 2  # one login's worth of time: one more, not two
    assert await statuses(client, 2, "POST", "/api/v1/auth/token") == [200, 429]
    # other requests have buckets of their own
    assert await statuses(client, 1, "GET", "/api/v1/wallet") == [200]


async def test_requests_are_limited_per_token_and_tokens_do_not_share(aiohttp_client: Any) -> None:
    clock = Clock()
    client = await aiohttp_client(app(clock))
    alice = {"Authorization": "Bearer a"}
    bob = {"Authorization": "Bearer b"}
    assert await statuses(client, 5, "GET", "/api/v1/wallet", headers=alice) == [200] * 4 + [429]
    assert await statuses(client, 4, "GET", "/api/v1/wallet", headers=bob) == [200] * 4
    clock.now += 1  # 2 a second
    assert await statuses(client, 3, "GET", "/api/v1/wallet", headers=alice) == [200, 200, 429]
    # without a token, the address is the caller
    assert await statuses(client, 5, "GET", "/api/v1/wallet") == [200] * 4 + [429]


async def test_loopback_is_exempt_unless_configured(aiohttp_client: Any) -> None:
    client = await aiohttp_client(app(Clock(), exempt_loopback=True))
    assert await statuses(client, 10, "POST", "/api/v1/auth/token") == [200] * 10


def test_buckets_forget_the_least_recently_seen_past_the_cap(monkeypatch: Any) -> None:
    monkeypatch.setattr(limits, "MAX_BUCKETS", 3)
    clock = Clock()
    b = limits.Buckets(limits.Rate(1, 1), clock)
    for key in "abcd":
        assert b.take(key) == 0.0
    assert b.take("d") == 1.0  # d is remembered: empty
    assert b.take("a") == 0.0  # a was forgotten: a full bucket again


async def test_the_hubs_app_limits_logins_as_configured(
    aiohttp_client: Any, tmp_path: Any, mosquitto: str
) -> None:
    from hub.app import create_app
    from hub.config import HubConfig

    config = HubConfig(data_dir=tmp_path / "hub", mqtt_url=mosquitto, rate_logins_per_s=0.001,
                       rate_logins_burst=3, rate_limit_loopback=True)  # fmt: skip
    client = await aiohttp_client(create_app(config))
    got = await statuses(client, 4, "POST", "/api/v1/auth/token", json={"token": "dpt_x"})
    assert got == [401, 401, 401, 429]
    r = await client.post("/api/v1/auth/token", json={"token": "dpt_x"})
    assert r.status == 429 and "logins a second from one address" in (await r.json())["error"]
    # loopback is exempt by default: the same hub without rate_limit_loopback
    other = HubConfig(data_dir=tmp_path / "hub2", mqtt_url=mosquitto, rate_logins_per_s=0.001,
                      rate_logins_burst=3)  # fmt: skip
    client2 = await aiohttp_client(create_app(other))
    got = await statuses(client2, 5, "POST", "/api/v1/auth/token", json={"token": "dpt_x"})
    assert got == [401] * 5

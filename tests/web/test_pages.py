"""The dashboard's pages over HTTP against the real app factory, a real SQLite file and a real
Mosquitto: who may see what, the session cookie, the forms' answers, history and charts."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from hub.api.services import SERVICES
from hub.app import create_app
from hub.config import HubConfig
from hub.ledger import economy
from hub.ledger.money import MICRO, format_micro
from hub.market.jobs import wallet_of
from hub.web import queries

FIB = {
    "engine": {"type": "wasm", "module": "example:fib", "entrypoint": "fib", "args": ["20"]},
    "timeout": 10,
}


@pytest.fixture
async def hub(aiohttp_client: Any, tmp_path: Path, mosquitto: str) -> Any:
    config = HubConfig(data_dir=tmp_path / "hub", mqtt_url=mosquitto, welcome_grant_credits=10)
    app = create_app(config)
    client = await aiohttp_client(app)
    client.services = app[SERVICES]
    return client


def user(hub: Any, name: str) -> tuple[str, str]:
    user_id, token, _ = hub.services.create_user(name, "user")
    return user_id, token


async def sign_in(hub: Any, token: str) -> None:
    hub.session.cookie_jar.clear()
    r = await hub.post("/signin", data={"token": token, "next": "/"}, allow_redirects=False)
    assert r.status == 303, await r.text()


async def api_submit(hub: Any, token: str, spec: dict[str, Any]) -> str:
    jwt = (await (await hub.post("/api/v1/auth/token", json={"token": token})).json())["jwt"]
    r = await hub.post("/api/v1/jobs", json=spec, headers={"Authorization": "Bearer " + jwt})
    assert r.status == 201, await r.text()
    return str((await r.json())["id"])


async def test_pages_ask_to_sign_in_and_the_cookie_is_kept_from_scripts(hub: Any) -> None:
    r = await hub.get("/jobs?state=failed", allow_redirects=False)
    where = urlsplit(r.headers["Location"])
    assert r.status == 303 and where.path == "/signin"
    assert parse_qs(where.query)["next"] == ["/jobs?state=failed"]  # back here afterwards
    r = await hub.post("/signin", data={"token": "dpt_nope"})
    assert r.status == 401 and "does not know that token" in await r.text()
    r = await hub.post("/signin", data={"token": ""})
    assert r.status == 401 and "Paste your API token" in await r.text()
    _, token = user(hub, "alice")
    r = await hub.post(
        "/signin", data={"token": token, "next": "//evil.example/"}, allow_redirects=False
    )
    assert r.status == 303 and r.headers["Location"] == "/"  # never off to another site
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    page = await (await hub.get("/")).text()
    assert "Hello, alice" in page
    r = await hub.post("/signout", allow_redirects=False)
    assert r.status == 303
    assert (await hub.get("/wallet", allow_redirects=False)).status == 303
    hub.session.cookie_jar.update_cookies({"dp_session": "forged.jwt.value"})
    r = await hub.get("/wallet", allow_redirects=False)
    assert r.status == 303 and "expired=1" in r.headers["Location"]


async def test_everyone_sees_their_own_and_the_admin_sees_all(hub: Any) -> None:
    alice_id, alice = user(hub, "alice")
    _, bob = user(hub, "bob")
    job = await api_submit(hub, alice, {**FIB, "name": "alices-job"})
    await sign_in(hub, bob)
    assert (await hub.get(f"/jobs/{job}")).status == 404
    assert (await hub.post(f"/jobs/{job}/cancel", allow_redirects=False)).status == 404
    assert (await hub.get(f"/jobs/{job}/output")).status == 404
    assert "alices-job" not in await (await hub.get("/jobs")).text()
    await sign_in(hub, alice)
    page = await (await hub.get(f"/jobs/{job}")).text()
    assert "alices-job" in page and "queued" in page and "0.027777" in page  # 10 s hold
    await sign_in(hub, hub.services.admin_token)
    listing = await (await hub.get("/jobs")).text()
    assert "alices-job" in listing and "alice" in listing
    assert "alices-job" not in await (await hub.get("/jobs?scope=mine")).text()
    r = await hub.post(f"/jobs/{job}/cancel", allow_redirects=False)
    assert r.status == 303
    assert hub.services.store.job(job)["state"] == "cancelled"
    assert hub.services.ledger.balance(wallet_of(alice_id)) == 10 * MICRO  # refunded


async def test_jobs_page_pages_and_filters(hub: Any) -> None:
    _, token = user(hub, "carol")
    ids = [await api_submit(hub, token, {**FIB, "name": f"job-{i}"}) for i in range(30)]
    await sign_in(hub, token)
    first = await (await hub.get("/jobs")).text()
    assert ids[-1] in first and ids[0] not in first  # newest first, 25 a page
    older = re.search(r'href="\?([^"]*before=[^"]*)"', first)
    assert older is not None
    second = await (await hub.get("/jobs?" + older.group(1).replace("&amp;", "&"))).text()
    assert ids[0] in second and ids[-1] not in second
    assert "job-7" in await (await hub.get("/jobs?q=job-7")).text()
    assert "No jobs match" in await (await hub.get("/jobs?state=failed")).text()


async def test_a_verified_job_is_listed_once_not_per_replica(hub: Any) -> None:
    owner, token = user(hub, "dave")
    job_id = await api_submit(hub, token, {**FIB, "verify": {"replicas": 3}})
    db = hub.services.db
    assert len(hub.services.store.replicas(job_id)) == 3  # three rows of their own...
    page = queries.job_page(db, owner=owner)
    assert [r["id"] for r in page.rows] == [job_id]  # ...one job on the page
    assert sum(queries.job_counts(db, owner).values()) == 1
    assert sum(sum(v) for v in queries.jobs_per_hour(db, owner)["series"].values()) == 1
    await sign_in(hub, token)
    page_html = await (await hub.get(f"/jobs/{job_id}")).text()
    assert 'id="verification"' in page_html and "3 replicas, 2 must agree" in page_html
    assert (
        all(f"#{n}" in page_html for n in (1, 2, 3))
        and "{" not in page_html.split("Verification")[1][:400]
    )


async def test_submit_form_shows_the_price_then_submits_once(hub: Any) -> None:
    user_id, token = user(hub, "dave")
    await sign_in(hub, token)
    form = {"source": "example", "example": "fib", "entrypoint": "fib", "args": "20",
            "priority": "high", "timeout": "30", "key": "k1", "step": "review"}  # fmt: skip
    page = await (await hub.post("/jobs", data=form)).text()
    price = format_micro(economy.max_price(1000, 30, "high"))
    assert f'<b id="price">{price}</b>' in page and "Confirm and submit" in page
    assert hub.services.store.jobs(owner=user_id) == []  # nothing submitted by a review
    for _ in range(2):  # a double click submits once
        r = await hub.post("/jobs", data={**form, "step": "confirm"}, allow_redirects=False)
        assert r.status == 303 and r.headers["Location"].startswith("/jobs/j_")
    assert len(hub.services.store.jobs(owner=user_id)) == 1
    bad = {**form, "timeout": "soon", "args": '"open'}
    r = await hub.post("/jobs", data=bad)
    text = await r.text()
    assert r.status == 400 and "not a whole number of seconds" in text and "No closing" in text
    r = await hub.post("/jobs", data={**form, "timeout": "86400"})
    assert r.status == 400 and "Too few credits" in await r.text()


async def test_transfer_form_reviews_then_moves_credits_once(hub: Any) -> None:
    erin_id, erin = user(hub, "erin")
    frank_id, _ = user(hub, "frank")
    await sign_in(hub, erin)
    r = await hub.post("/wallet/transfer", data={"to": frank_id, "amount": "abc"})
    assert r.status == 400 and "is not an amount of credits" in await r.text()
    r = await hub.post("/wallet/transfer", data={"to": "nobody", "amount": "1"})
    assert r.status == 400 and "No user or agent" in await r.text()
    r = await hub.post("/wallet/transfer", data={"to": "frank", "amount": "11"})
    assert r.status == 400 and "Too few credits" in await r.text()
    form = {"to": "frank", "amount": "2.5", "key": "t1", "step": "review"}
    page = await (await hub.post("/wallet/transfer", data=form)).text()
    assert "2.5</b> credits to <b>frank" in page
    assert hub.services.ledger.balance(wallet_of(frank_id)) == 10 * MICRO
    for _ in range(2):
        r = await hub.post("/wallet/transfer", data={**form, "step": "confirm"},
                           allow_redirects=False)  # fmt: skip
        assert r.status == 303
    assert hub.services.ledger.balance(wallet_of(frank_id)) == 12_500_000
    assert hub.services.ledger.balance(wallet_of(erin_id)) == 7_500_000
    text = await (await hub.get("/wallet/history.csv")).text()
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0][:4] == ["entry", "time_utc", "reason", "amount"]
    assert [r[3] for r in rows[1:]] == ["-2.5", "10"]


async def test_history_pages_agree_with_the_ledger(hub: Any) -> None:
    a_id, _ = user(hub, "gina")
    b_id, _ = user(hub, "hank")
    ledger, db = hub.services.ledger, hub.services.db
    wa, wb = wallet_of(a_id), wallet_of(b_id)
    for i in range(60):
        src, dst = (wa, wb) if i % 3 else (wb, wa)
        ledger.transfer(f"t{i}", src, dst, (i + 1) * 1000, f"transfer {i}")
    before = None
    for _ in range(4):
        mine = queries.history_page(db, wa, ledger.balance(wa), 25, before)
        theirs = ledger.history(wa, limit=25, before_entry_id=before)
        assert mine == [
            queries.HistoryRow(r.entry_id, r.created_at, r.reason, r.amount, r.balance_after,
                               r.counterparties, r.memo)
            for r in theirs
        ]  # fmt: skip
        if len(mine) < 25:
            break
        before = mine[-1].entry_id


async def test_wallet_chart_counts_what_was_earned_and_spent(hub: Any) -> None:
    user_id, token = user(hub, "ivy")
    other_id, _ = user(hub, "jack")
    job = await api_submit(hub, token, FIB)
    await sign_in(hub, token)
    day = await (await hub.get("/wallet/chart.json")).json()
    assert day["earned"][-1] == 10 * MICRO  # the welcome grant
    assert day["spent"][-1] == 27_777  # the hold counts as spent until it comes back
    await hub.post(f"/jobs/{job}/cancel")
    ledger = hub.services.ledger
    ledger.transfer("x", wallet_of(user_id), wallet_of(other_id), MICRO, "a gift")
    day = await (await hub.get("/wallet/chart.json")).json()
    assert day["spent"][-1] == MICRO  # the refunded hold nets to nothing; the gift counts
    assert day["earned"][-1] == 10 * MICRO
    assert len(day["t"]) == 14 and day["t"][-1] % 86400 == 0


async def test_page_parameters_out_of_range_show_the_default_page(hub: Any) -> None:
    """A cursor or a count no link would carry (past SQLite's integers, not ASCII digits)
    shows the page as it is by default, never a 500."""
    _, token = user(hub, "kim")
    await sign_in(hub, token)
    for value in ("9" * 30, "\uff11\uff12", "-3", "1e3", ""):  # fullwidth digits too
        r = await hub.get("/wallet", params={"before": value})
        assert r.status == 200 and "welcome grant" in await r.text(), value
        r = await hub.get("/wallet/chart.json", params={"days": value})
        assert r.status == 200 and len((await r.json())["t"]) == 14, value


async def test_live_stream_carries_only_what_the_identity_may_see(hub: Any) -> None:
    _, alice = user(hub, "kim")
    _, bob = user(hub, "lee")
    assert (await hub.get("/live")).status == 401
    await sign_in(hub, bob)
    stream = await hub.get("/live")
    assert stream.headers["Content-Type"].startswith("text/event-stream")
    theirs = await api_submit(hub, alice, {**FIB, "name": "kims"})
    mine = await api_submit(hub, bob, {**FIB, "name": "lees"})
    events: list[tuple[str, dict[str, Any]]] = []
    kind = ""
    loop = asyncio.get_running_loop()
    end = loop.time() + 5
    while loop.time() < end and not any(d.get("id") == mine for _, d in events):
        line = (await asyncio.wait_for(stream.content.readline(), 5)).decode().strip()
        if line.startswith("event: "):
            kind = line[len("event: ") :]
        elif line.startswith("data: "):
            events.append((kind, json.loads(line[len("data: ") :])))
    stream.close()
    kinds = [k for k, _ in events]
    assert kinds[0] == "hello" and "wallet" in kinds
    assert ("job", mine) in [(k, d.get("id")) for k, d in events]
    assert theirs not in [d.get("id") for _, d in events]  # someone else's job: never sent
    wallet = next(d for k, d in events if k == "wallet")
    assert wallet["balance"] in ("10", "9.972223")  # before or after the hold of 0.027777


async def test_agent_console_pages(hub: Any) -> None:
    _, token = user(hub, "max")
    await sign_in(hub, token)
    page = await (await hub.get("/agents")).text()
    assert "No agents of yours yet" in page and "No services yet" in page
    assert (await hub.get("/agents/console/s_0000000000000000")).status == 404
    assert (await hub.get("/agents/u_0000000000000000")).status == 404
    other_id, _ = user(hub, "nia")
    assert (await hub.get(f"/agents/{other_id}")).status == 404  # a user, not an agent


async def test_the_console_refuses_input_too_deep_or_with_a_key_twice(hub: Any) -> None:
    """The form comes back with the reason, never a 500, and nothing is held."""
    owner_id, token = user(hub, "ola")
    agent_id, _ = hub.services.agents.create_agent(owner_id, "echo", fund=0)
    service, _ = hub.services.agents.register(
        agent_id, name="echo", description="echoes", tags=[], price="0.01",
        input_schema={}, output_schema={},
    )  # fmt: skip
    await sign_in(hub, token)
    before = hub.services.ledger.balance(wallet_of(owner_id))
    url = f"/agents/console/{service.id}"
    r = await hub.post(url, data={"input": "[" * 100_000 + "]" * 100_000})
    assert r.status == 400 and "nests deeper than 64 levels" in await r.text()
    r = await hub.post(url, data={"input": '{"a": 1, "a": 2}'})
    assert r.status == 400 and "twice" in await r.text()
    assert hub.services.ledger.balance(wallet_of(owner_id)) == before

"""Money you can read (issue 19): the wallet page, its CSV and the chart in a real Chromium
against a real hub process, a real edge-run node and a real agent.

bob runs a job on alice's node, sends alice credits and calls a service of alice's agent;
each of them then reads their wallet: a finished job is one line with its cost, a transfer
names the other side from where each stands, a service call leads to the agent (not to a job
page that does not exist), the welcome grant is a grant and not node work, and amounts are
rounded with the exact value on hover.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from deparrow.agent import Agent
from hub.ledger.money import MICRO, credits_to_micro, format_micro
from hub.web.filters import credits
from tests.web.conftest import Net, shot, signed_in

CHROMIUM = "/usr/bin/chromium"

FIB = {
    "engine": {"type": "wasm", "module": "example:fib", "entrypoint": "fib", "args": ["20"]},
    "timeout": 10,
}


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    n = Net(tmp_path_factory.mktemp("money"))
    n.nodes.append(n.hub.start_node(n.alice_client, n.tmp / "alice-box", "alice-box"))
    yield n
    n.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make test` (tools/install-system-deps.sh)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def history_csv(page: Page) -> list[dict[str, str]]:
    """The CSV statement as the Export button downloads it (the page's own session)."""
    r = page.request.get("/wallet/history.csv")
    assert r.ok, r.text()
    return list(csv.DictReader(io.StringIO(r.text())))


def title(page: Page, selector: str) -> str:
    """The exact amount an element shows rounded (its title: "0.002777 credits")."""
    text = page.locator(selector).get_attribute("title") or ""
    return text.removesuffix(" credits")


def test_a_finished_job_is_one_line_with_its_cost(browser: Browser, net: Net) -> None:
    job = net.bob_client.submit(FIB)
    done = net.bob_client.wait(job["id"], timeout_s=60)
    assert done["state"] == "completed", done
    cost = credits_to_micro(done["cost"])
    assert 0 < cost < 10_000  # one started second: 0.002777, which a linear 2-decimal view loses
    ctx, page = signed_in(browser, net, net.bob["token"])
    page.goto("/wallet")
    rows = page.locator("#history tbody tr", has_text=job["id"])
    expect(rows).to_have_count(1)  # not a hold and a refund: one line
    row = rows.first
    assert row.get_attribute("data-category") == "compute"
    expect(row).to_contain_text("job completed")
    expect(row).to_contain_text(f"cost {credits(cost)}")
    expect(row.locator("a", has_text=job["id"])).to_have_attribute("href", f"/jobs/{job['id']}")
    amount = row.locator("td.num .money").first
    expect(amount).to_have_text(credits(-cost))  # -0.00278: three significant digits
    expect(amount).to_have_attribute("title", f"{format_micro(-cost)} credits")  # exact
    balance = row.locator("td.num .money").nth(1)
    expect(balance).to_have_attribute("title", f"{format_micro(100 * MICRO - cost)} credits")
    assert "." not in balance.inner_text() or len(balance.inner_text().split(".")[1]) <= 2
    shot(page, "money-job-line")
    # The CSV has the same single line, exact.
    [line] = [r for r in history_csv(page) if job["id"] in r["reason"]]
    assert line["amount"] == format_micro(-cost) and line["category"] == "compute"
    assert Decimal(line["held"]) - Decimal(line["came_back"]) == Decimal(done["cost"])
    ctx.close()


def test_a_transfer_names_the_other_side(browser: Browser, net: Net) -> None:
    net.bob_client.transfer(net.alice["id"], "2.5", "money-gift", "for the node")
    ctx, page = signed_in(browser, net, net.alice["token"])
    page.goto("/wallet")
    newest = page.locator("#history tbody tr").first
    expect(newest).to_contain_text("transfer from bob")
    expect(newest).not_to_contain_text("transfer to")
    assert newest.get_attribute("data-category") == "received"
    expect(newest.locator(".money").first).to_have_text("+2.50")
    shot(page, "money-transfer-in")
    [line] = [r for r in history_csv(page) if r["category"] == "received"]
    assert line["reason"] == "transfer from bob" and line["amount"] == "2.5"
    ctx.close()
    ctx, page = signed_in(browser, net, net.bob["token"])
    page.goto("/wallet")
    newest = page.locator("#history tbody tr").first
    expect(newest).to_contain_text("transfer to alice")
    assert newest.get_attribute("data-category") == "sent"
    ctx.close()


def test_an_agent_call_leads_to_the_agent_not_a_job(browser: Browser, net: Net) -> None:
    seller = Agent.create(net.hub.url, net.alice["token"], "echoer", fund="0.1")
    service = seller.register_service(
        "echo", lambda inp: inp, price="0.01",
        input_schema={"type": "object"}, output_schema={"type": "object"},
    )  # fmt: skip
    seller.start()
    try:
        result = Agent(net.hub.url, net.bob["token"]).call(service, {"x": 1})
    finally:
        seller.stop()
    ctx, page = signed_in(browser, net, net.bob["token"])
    page.goto("/wallet")
    row = page.locator("#history tbody tr", has_text=result.id)
    expect(row).to_have_count(1)
    assert row.get_attribute("data-category") == "calls"
    expect(row).to_contain_text("service call")
    # Spent in full, nothing came back: the line leads to the service's console.
    link = row.locator("a", has_text=result.id)
    expect(link).to_have_attribute("href", f"/agents/console/{service.id}")
    assert page.locator("a[href^='/jobs/c_']").count() == 0
    link.click()
    expect(page.locator("main")).to_contain_text("echo")  # a page that exists
    assert "404" not in page.title() and "not found" not in page.title().lower()
    shot(page, "money-call-line")
    ctx.close()


def test_the_welcome_grant_is_a_grant_not_node_work(browser: Browser, net: Net) -> None:
    ctx, page = signed_in(browser, net, net.alice["token"])
    page.goto("/wallet")
    r = page.request.get("/wallet/chart.json")
    day = r.json()
    split = {k: v[-1] for k, v in day["earned_by"].items()}
    assert split["grant"] == 100 * MICRO
    assert split["received"] == credits_to_micro("2.5")
    assert 0 < split["work"] < MICRO  # bob's job on alice's node: 0.002777
    assert sum(split.values()) == day["earned"][-1]
    grant = page.locator("#history tbody tr", has_text="welcome grant")
    assert grant.get_attribute("data-category") == "grant"
    expect(grant).to_contain_text("earned: grant")
    work = page.locator("#history tbody tr[data-category=work]")
    expect(work).to_have_count(1)
    # The chart draws each kind of money as its own series, on a scale where 0.003 shows.
    expect(page.locator("#wallet-chart[data-ready='1']")).to_be_attached()
    labels = page.evaluate("dpCharts.wallet.plot.series.map(s => s.label)")
    assert {"node work", "grants", "received"} <= set(labels), labels
    assert page.evaluate("dpCharts.wallet.plot.scales.y.distr") == 3  # logarithmic
    assert re.search(r"node work", page.locator("#wallet-chart").inner_text())
    shot(page, "money-wallet-split")
    ctx.close()


def test_a_node_page_shows_what_it_earned_by_kind_and_lately(browser: Browser, net: Net) -> None:
    [node] = net.alice_client.nodes()
    earned = credits_to_micro(node["earned"])
    assert earned > 0  # bob's job
    ctx, page = signed_in(browser, net, net.alice["token"])
    page.goto(f"/nodes/{node['id']}")
    box = page.locator("#node-earned")
    expect(box.locator(".stat-value .money")).to_have_attribute(
        "title", f"{format_micro(earned)} credits"
    )
    expect(box.locator(".stat-value .money")).to_have_text(credits(earned))
    # Work and uptime add up to it (uptime pays once a proved minute is due; bob's job was
    # work), and all of it came in the last day and week.
    work = credits_to_micro(title(page, "#earned-work .money"))
    uptime = credits_to_micro(title(page, "#earned-uptime .money"))
    assert work > 0 and work + uptime == earned
    expect(page.locator("#earned-day .money")).to_have_text(credits(earned))
    expect(page.locator("#earned-week .money")).to_have_text(credits(earned))
    expect(page.locator("#earned-average .money")).to_have_attribute(
        "title", f"{format_micro(earned // 7)} credits"
    )
    shot(page, "money-node")
    ctx.close()

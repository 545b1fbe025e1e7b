"""The browser tests' shared pieces: a real hub (with its own Mosquitto) per test module, Debian's
Chromium driven by Playwright, signing in, and screenshots into artifacts/screenshots/."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from deparrow import localnet
from tests.conftest import ROOT, require_mosquitto

CHROMIUM = "/usr/bin/chromium"
SHOTS = ROOT / "artifacts" / "screenshots"
LIVE_MS = 30_000  # how long a live update may take to show (a job runs in well under this)


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


class Net:
    def __init__(self, tmp: Path) -> None:
        require_mosquitto()
        self.tmp = tmp
        self.hub = localnet.LocalHub(tmp / "hub", heartbeat_s=0.5, log_path=tmp / "hub.log")
        self.alice, self.alice_client = self.hub.user("alice")
        self.bob, self.bob_client = self.hub.user("bob")
        self.nodes: list[localnet.Proc] = []

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
        self.hub.stop()


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    n = Net(tmp_path_factory.mktemp("web"))
    yield n
    n.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"{CHROMIUM} is missing: run `make test` (tools/install-system-deps.sh installs "
            "Debian's chromium); the dashboard is tested in a real browser, never skipped"
        )
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def signed_in(browser: Browser, net: Net, token: str) -> tuple[BrowserContext, Page]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 860}, base_url=net.hub.url)
    page = ctx.new_page()
    page.goto("/signin")
    page.fill("#token", token)
    page.click("button[type=submit]")
    expect(page.locator("header .user")).to_be_visible()
    return ctx, page


def mark(page: Page) -> None:
    """Tag the document: a page that still has the tag later was updated, not reloaded."""
    page.evaluate("window.__notReloaded = true")


def not_reloaded(page: Page) -> bool:
    return bool(page.evaluate("window.__notReloaded === true"))

"""The dashboard in a real browser: Debian's Chromium driven by Playwright, against a real hub
process (with its own Mosquitto) and real edge-run nodes. Screenshots of every page go to
artifacts/screenshots/.

The tests share one hub and run in order, like a person's first session: Bob signs in,
Alice adds a node from the Nodes page, Bob runs a job from the Jobs page and watches it
and his wallet change live, then the forms are given bad input. Last, a node with two slots and a
GPU (a simulated one: the GPU is its hello's claim) shows them, and a job on it.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from playwright.sync_api import Browser, expect

from deparrow import localnet
from deparrow.client import Client
from edge.core import protocol
from hub.ledger.money import MICRO, credits_to_micro, format_micro
from hub.mqtt.bridge import parse_mqtt_url
from hub.web.filters import credits
from tests.conftest import ROOT
from tests.web.conftest import LIVE_MS, Net, mark, not_reloaded, shot, signed_in


def test_sign_in(browser: Browser, net: Net) -> None:
    ctx = browser.new_context(viewport={"width": 1280, "height": 860}, base_url=net.hub.url)
    page = ctx.new_page()
    page.goto("/wallet")  # not signed in: to the sign-in page, and back here afterwards
    expect(page).to_have_url(re.compile(r"/signin\?next=(%2F|/)wallet"))
    shot(page, "signin")
    page.fill("#token", "dpe_this-is-an-enrollment-token")
    page.click("button[type=submit]")
    expect(page.locator("#token-error")).to_contain_text("API tokens start with dpt_")
    page.fill("#token", "dpt_nobody-has-this-token")
    page.click("button[type=submit]")
    expect(page.locator("#token-error")).to_contain_text("does not know that token")
    shot(page, "signin-error")
    page.fill("#token", net.bob["token"])
    page.click("button[type=submit]")
    expect(page).to_have_url(re.compile(r"/wallet$"))
    expect(page.locator("header .user")).to_contain_text("bob")
    cookie = next(c for c in ctx.cookies() if c["name"] == "dp_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == ""  # scripts never see the session
    page.click("text=Sign out")
    expect(page.locator(".notice")).to_contain_text("signed out")
    page.goto("/jobs")
    expect(page).to_have_url(re.compile(r"/signin"))
    ctx.close()


def test_enroll_a_node_and_watch_it_appear(browser: Browser, net: Net) -> None:
    ctx, page = signed_in(browser, net, net.alice["token"])
    page.goto("/nodes")
    expect(page.locator(".empty")).to_contain_text("Add a node")
    shot(page, "nodes-empty")
    page.click("#new-token")
    command = page.locator("#enroll-command").inner_text().strip()
    assert re.fullmatch(rf"edge-run --hub {re.escape(net.hub.url)} --token dpe_\S+", command)
    mark(page)
    shot(page, "nodes-enroll")
    args = shlex.split(command)[1:]
    node = localnet.Proc(
        "browser-node",
        [sys.executable, "-m", "edge.cli", *args, "--name", "alice-laptop",
         "--data-dir", str(net.tmp / "alice-laptop"), "--always-run", "--dashboard-port", "0"],
        net.tmp / "alice-laptop.log",
    )  # fmt: skip
    net.nodes.append(node)
    row = page.locator("#nodes-table tr", has_text="alice-laptop")
    expect(row).to_be_visible(timeout=LIVE_MS)
    expect(row.locator(".pill")).to_have_text("idle", timeout=LIVE_MS)
    assert not_reloaded(page), "the node should appear without reloading the page"
    assert node.alive(), node.tail()
    shot(page, "nodes")
    row.locator("a").first.click()
    expect(page.locator("h1")).to_contain_text("alice-laptop")
    expect(page.locator("#beats tbody tr").first).to_be_visible(timeout=LIVE_MS)
    page.wait_for_timeout(1500)  # a few more beats on the chart
    shot(page, "node")
    ctx.close()


def test_submit_a_job_and_watch_it_complete_live(browser: Browser, net: Net) -> None:
    ctx, wallet = signed_in(browser, net, net.bob["token"])
    wallet.goto("/wallet")
    balance = wallet.locator("#balance [data-bind=balance]")
    expect(balance).to_have_text("100")
    expect(balance).to_have_attribute("title", "100 credits")
    expect(wallet.locator("#wallet-chart[data-ready='1']")).to_be_attached()
    spent_before = wallet.evaluate("dpCharts.wallet.plot.data[2].at(-1)")
    assert spent_before == 0
    mark(wallet)

    page = ctx.new_page()
    page.goto("/jobs")
    expect(page.locator(".empty")).to_contain_text("No jobs yet")
    page.click("#open-submit")
    page.select_option("#example", "fib")
    expect(page.locator("#args")).to_have_value("25")
    page.fill("#args", "20")
    page.click("#review-submit")
    price = page.locator("#price")
    expect(price).to_have_text("0.166666")  # 60 s at 10 credits/CPU-hour, before confirming
    shot(page, "jobs-submit-review")
    page.click("#confirm-submit")
    expect(page).to_have_url(re.compile(r"/jobs/j_[0-9a-f]+\?submitted=1"))
    mark(page)
    state = page.locator(".stats [data-job-state]")
    expect(state).to_have_text("completed", timeout=LIVE_MS)
    expect(page.locator("#returns")).to_have_text("6765", timeout=LIVE_MS)  # fib(20)
    assert not_reloaded(page), "the job page should follow the job without a reload"
    shot(page, "job")

    # Meanwhile the wallet page, untouched, shows the new balance and the day's spending.
    expect(balance).not_to_have_attribute("title", "100 credits", timeout=LIVE_MS)
    wallet.wait_for_function("dpCharts.wallet.plot.data[2].at(-1) > 0", timeout=LIVE_MS)
    assert not_reloaded(wallet)
    job = net.bob_client.job(page.url.split("/jobs/")[1].split("?")[0])
    after = 100 * MICRO - credits_to_micro(job["cost"])
    # Rounded as the money filter rounds; the exact balance on hover, set by the live update.
    expect(balance).to_have_attribute("title", f"{format_micro(after)} credits", timeout=LIVE_MS)
    expect(balance).to_have_text(credits(after))
    expect(wallet.locator("#history")).to_contain_text("job completed", timeout=LIVE_MS)
    shot(wallet, "wallet")

    page.goto("/jobs")
    expect(page.locator("#jobs-table")).to_contain_text("completed")
    shot(page, "jobs")
    page.goto("/")
    expect(page.locator("#recent-jobs, [data-region=recent]")).to_contain_text("fib")
    page.wait_for_timeout(300)
    shot(page, "dashboard")
    ctx.close()


def test_bad_input_shows_a_message_next_to_the_field(browser: Browser, net: Net) -> None:
    ctx, page = signed_in(browser, net, net.bob["token"])
    page.goto("/wallet")

    def transfer(to: str, amount: str) -> None:
        page.fill("#to", to)
        page.fill("#amount", amount)
        page.click("#review-transfer")

    transfer(net.alice["id"], "lots")
    expect(page.locator("#amount-error")).to_contain_text("not an amount of credits")
    expect(page.locator("#amount")).to_have_class(re.compile("bad"))
    shot(page, "wallet-error")
    transfer(net.alice["id"], "1000000")
    expect(page.locator("#amount-error")).to_contain_text("Too few credits")
    transfer("u_0000000000000000", "1")
    expect(page.locator("#to-error")).to_contain_text("No user or agent")
    # Right: a review naming the recipient, then the transfer.
    transfer("alice", "2.5")
    expect(page.locator("#transfer-review")).to_contain_text("2.5 credits to alice")
    page.click("#confirm-transfer")
    expect(page.locator("#sent")).to_be_visible()
    newest = page.locator("#history tbody tr").first
    expect(newest).to_contain_text("transfer to alice")  # the recipient by name (b6e4a3a)

    page.goto("/jobs#submit")
    page.check("input[name=source][value=upload]")
    not_wasm = net.tmp / "hello.c"
    not_wasm.write_text("int main(void) { return 0; }\n")
    page.set_input_files("#file", str(not_wasm))
    page.click("#review-submit")
    expect(page.locator("#module-error")).to_contain_text("hello.c is not a WebAssembly module")
    page.set_input_files("#file", str(ROOT / "wasm-jobs" / "fib.wasm"))
    page.fill("#entrypoint", "fib")
    page.fill("#args", "10")
    page.fill("#timeout", "soon")
    page.click("#review-submit")
    expect(page.locator("#timeout-error")).to_contain_text("not a whole number of seconds")
    expect(page.locator("#module-error")).to_have_count(0)
    page.fill("#timeout", "86400")
    page.select_option("#priority", "high")
    page.click("#review-submit")
    expect(page.locator("#timeout-error")).to_contain_text("Too few credits")
    shot(page, "jobs-submit-error")
    ctx.close()


def test_call_an_agent_service_from_the_console(browser: Browser, net: Net) -> None:
    from deparrow import Agent

    seller = Agent.create(net.hub.url, net.alice["token"], "shouty", fund="1")
    seller.register_service(
        "shout",
        lambda inp: {"text": inp["text"].upper() + "!"},
        price="0.5",
        description="Says your text louder.",
        tags=["text", "demo"],
        input_schema={"type": "object", "properties": {"text": {"type": "string"}},
                      "required": ["text"]},
        output_schema={"type": "object", "properties": {"text": {"type": "string"}}},
    )  # fmt: skip
    seller.start()
    try:
        ctx, page = signed_in(browser, net, net.bob["token"])
        page.goto("/agents")
        expect(page.locator(".empty").first).to_contain_text("No agents of yours yet")
        row = page.locator("#services-table tr", has_text="shout")
        expect(row).to_contain_text("shouty")
        shot(page, "agents")
        badge = page.locator("header [data-bind=balance]")
        before = badge.get_attribute("title") or ""  # the exact balance; the text is rounded
        row.locator("text=Call").click()
        expect(page.locator("h1")).to_contain_text("shout")
        page.fill("#input", "hello")
        page.click("#send")
        expect(page.locator("#input-error")).to_contain_text("That is not JSON")
        page.fill("#input", '{"words": 3}')
        page.click("#send")
        expect(page.locator("#input-error")).to_contain_text("does not match the input schema")
        page.fill("#input", '{"text": "hello agents"}')
        page.click("#send")
        reply = page.locator(".msg.agent").last
        expect(reply).to_contain_text("HELLO AGENTS!")
        expect(reply).to_contain_text("paid 0.5 credits")
        after = badge.get_attribute("title") or ""
        assert before.endswith(" credits") and after.endswith(" credits")
        paid = credits_to_micro(before.split()[0]) - credits_to_micro(after.split()[0])
        assert paid == MICRO // 2
        shot(page, "agent-console")
        ctx.close()

        ctx, page = signed_in(browser, net, net.alice["token"])
        page.goto("/agents")
        agent_row = page.locator("#agents-table tr", has_text="shouty")
        expect(agent_row).to_contain_text("1.5")  # funded with 1, earned 0.5
        agent_row.locator("a").first.click()
        expect(page.locator("#calls")).to_contain_text("served for")
        shot(page, "agent")
        ctx.close()
    finally:
        seller.close()


def test_admin_sees_the_whole_network(browser: Browser, net: Net) -> None:
    ctx, page = signed_in(browser, net, net.hub.admin.token or "")
    page.goto("/nodes")
    expect(page.locator("#nodes-table")).to_contain_text("alice")  # the owner column
    page.goto("/jobs")
    expect(page.locator("#jobs-table")).to_contain_text("bob")
    page.goto("/")
    expect(page.locator("h1")).to_have_text("The network")
    expect(page.locator("#books")).to_contain_text("ledger balanced")
    shot(page, "dashboard-admin")
    ctx.close()


L4 = {"index": 0, "name": "NVIDIA L4", "uuid": "GPU-5e1c1d0a-7f3e-4b7c-9d1e-2a6f0c9b8e41",
      "memory_mb": 23034}  # fmt: skip
GPU_OFFER = {"cpu": 4, "memory_mb": 8192, "gpu": 1, "load": 0.0}


class GpuNode:
    """A node with 2 slots and an NVIDIA L4, speaking edge/core/protocol.py over the hub's
    broker with its own login, as edge-run does. The GPU is its hello's claim: no GPU is
    needed. It keeps the jobs it is assigned (listed in its heartbeats) and runs none."""

    def __init__(self, owner: Client, name: str) -> None:
        token = owner.enrollment_token()["token"]
        machine = {"arch": "x86_64", "cpu": 4, "memory_mb": 16384, "engines": ["docker"]}
        creds = owner.request(
            "POST", "/api/v1/nodes/enroll", {"token": token, "name": name, **machine}, auth=False
        )
        self.id: str = creds["node_id"]
        self.jobs: list[str] = []
        self.c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=self.id)
        self.c.username_pw_set(self.id, creds["mqtt"]["password"])
        self.c.on_message = self._message
        subscribed = threading.Event()
        self.c.on_subscribe = lambda *_a: subscribed.set()
        self.c.connect(*parse_mqtt_url(creds["mqtt"]["url"]))
        self.c.loop_start()
        self.c.subscribe([(protocol.node_topic(self.id, k), 1) for k in protocol.NODE_IN])
        assert subscribed.wait(10), "the broker did not confirm the subscription"
        hello = protocol.hello(self.id, ["docker"], GPU_OFFER, "sim", slots=2, gpus=[L4])
        self.send(protocol.HELLO, hello, qos=1)
        self._stop = threading.Event()
        self._beats = threading.Thread(target=self._beat, daemon=True)
        self._beats.start()

    def send(self, kind: str, msg: dict[str, Any], qos: int = 0) -> None:
        self.c.publish(protocol.node_topic(self.id, kind), protocol.encode(msg), qos=qos)

    def _message(self, _c: Any, _u: Any, m: Any) -> None:
        job_id = json.loads(m.payload)["job_id"]
        if m.topic.endswith("/" + protocol.ASSIGN) and job_id not in self.jobs:
            self.jobs.append(job_id)
        elif m.topic.endswith("/" + protocol.CANCEL) and job_id in self.jobs:
            self.jobs.remove(job_id)

    def _beat(self) -> None:
        seq = 0
        while not self._stop.wait(0.25):
            seq += 1
            n = len(self.jobs)
            free = {"cpu": 4.0 - n, "memory_mb": 8192 - 64 * n, "gpu": max(0, 1 - n),
                    "slots": 2 - n}  # fmt: skip
            state = protocol.IDLE if n < 2 else protocol.BUSY
            beat = protocol.heartbeat(self.id, seq, state, GPU_OFFER, list(self.jobs), free=free)
            self.send(protocol.HEARTBEAT, beat)

    def stop(self) -> None:
        self._stop.set()
        self._beats.join(5)
        self.c.disconnect()
        self.c.loop_stop()


def test_a_node_shows_its_gpu_and_its_jobs_of_slots(browser: Browser, net: Net) -> None:
    box = GpuNode(net.alice_client, "gpu-box")
    ctx, page = signed_in(browser, net, net.alice["token"])
    try:
        page.goto("/nodes")
        row = page.locator("#nodes-table tr", has_text="gpu-box")
        expect(row).to_be_visible(timeout=LIVE_MS)
        expect(row.locator(f"[data-node-gpus='{box.id}']")).to_have_text(
            "1 GPU · NVIDIA L4 22.5 GB"
        )
        expect(row.locator(f"[data-node-jobs='{box.id}']")).to_have_text("0/2 jobs")
        mark(page)
        # A node without a GPU (edge-run on this machine) shows none; its slots are its own.
        laptop = page.locator("#nodes-table tr", has_text="alice-laptop")
        expect(laptop.locator("[data-node-gpus]")).to_have_count(0)
        expect(laptop.locator("[data-node-jobs]")).to_have_text(re.compile(r"^0/[1-9]\d* jobs$"))

        # Bob's GPU job can go only to the node with a GPU: one of its two slots.
        spec = {"name": "cuda", "resources": {"gpu": 1}, "timeout": 60,
                "engine": {"type": "docker", "image": "nvidia/cuda:12.4.1-base-ubuntu22.04",
                           "command": ["nvidia-smi"]}}  # fmt: skip
        job = net.bob_client.submit(spec)
        localnet.wait_for(
            "the GPU job on gpu-box", lambda: job["id"] in box.jobs, LIVE_MS / 1000, [net.hub.proc]
        )
        # live, from the node's heartbeats: no reload
        expect(row.locator(f"[data-node-jobs='{box.id}']")).to_have_text("1/2 jobs")
        assert not_reloaded(page), "the node's jobs should follow its heartbeats"
        shot(page, "nodes-gpu")

        row.locator("a").first.click()
        expect(page.locator("h1")).to_contain_text("gpu-box")
        expect(page.locator("#node-jobs")).to_have_text("1/2 jobs")
        gpu = page.locator("#gpus tbody tr")
        expect(gpu).to_have_count(1)
        expect(gpu).to_contain_text("NVIDIA L4")
        expect(gpu).to_contain_text("22.5 GB")
        expect(gpu).to_contain_text(L4["uuid"])
        shot(page, "node-gpu")
        net.bob_client.cancel(job["id"])
    finally:
        ctx.close()
        box.stop()

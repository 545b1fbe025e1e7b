"""The node's own page: a real hub, real Mosquitto, a real `edge-run` node running a real wasm
job, read over real HTTP."""

from __future__ import annotations

import http.client
import http.server
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deparrow.client import Client
from deparrow.localnet import LocalHub, Proc
from edge.dashboard import describe_state
from edge.earnings import Earnings, format_micro, rounded, to_micro
from hub.mqtt.broker import free_port
from tests.conftest import start_hub, wait_until

FIB = {
    "name": "fib",
    "engine": {"type": "wasm", "module": "example:fib", "entrypoint": "fib", "args": ["24"]},
    "timeout": 20,
}


@pytest.fixture
def hub(tmp_path: Path, mosquitto: str) -> Iterator[LocalHub]:
    h = start_hub(tmp_path, mqtt_url=mosquitto)
    yield h
    h.stop()


def start_node(hub: LocalHub, owner: Client, tmp_path: Path, *args: str) -> Proc:
    token = owner.enrollment_token()["token"]
    cmd = [sys.executable, "-m", "edge.cli", "--hub", hub.url, "--token", token,
           "--name", "n1", "--data-dir", str(tmp_path / "n1"), "-v", *args]  # fmt: skip
    proc = Proc("n1", cmd, tmp_path / "n1.log")
    wait_until(
        "the node to come online",
        lambda: any(n["state"] == "idle" for n in owner.nodes()),
        60,
        [proc, hub.proc],
    )
    port = args[args.index("--dashboard-port") + 1] if "--dashboard-port" in args else "0"
    if port != "0":  # the page starts after the hello: wait for its line too
        wait_until(
            "the node's page to start, or to say why not",
            lambda: "node page: " in proc.output() or "node page not started" in proc.output(),
            30,
            [proc],
        )
    return proc


def get(port: int, path: str, host: str | None = None) -> tuple[int, str, str]:
    """(status, content type, body) of a GET on the node's page."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host} if host else {})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read().decode()
    finally:
        conn.close()


def state(port: int) -> dict[str, Any]:
    code, ctype, body = get(port, "/api/state")
    assert code == 200 and ctype == "application/json"
    data: dict[str, Any] = json.loads(body)
    return data


def test_the_page_shows_the_node_and_follows_a_job(hub: LocalHub, tmp_path: Path) -> None:
    _, owner = hub.user("owner")
    _, alice = hub.user("alice")
    port = free_port()
    node = start_node(hub, owner, tmp_path, "--dashboard-port", str(port))
    try:
        node_id = owner.nodes()[0]["id"]
        assert f"node page: http://127.0.0.1:{port}/" in node.output()

        def credits_known() -> dict[str, Any] | None:
            s = state(port)
            return s if s["earnings"]["total"] is not None else None

        first = wait_until("the first reading of the credits", credits_known, 30, [node])
        assert first is not None
        assert first["node_id"] == node_id and first["owner"] == owner.nodes()[0]["owner"]
        assert first["state"] == "idle" and first["why"].startswith("waiting for a job")
        assert first["broker"]["connected"] is True
        assert first["jobs"] == {"completed": 0, "failed": 0, "recent": []}
        assert first["earnings"]["total"] == "0" and first["earnings"]["error"] is None

        job = alice.submit(FIB)
        assert alice.wait(job["id"], 60)["state"] == "completed"
        earned = owner.nodes()[0]["earned"]
        assert earned != "0"

        def job_shown() -> dict[str, Any] | None:
            s = state(port)
            return s if s["earnings"]["total"] == earned and s["jobs"]["completed"] == 1 else None

        after = wait_until("the page to show the job and its pay", job_shown, 30, [node])
        assert after is not None
        assert after["earnings"]["today"] == earned  # the node's first day
        recent = after["jobs"]["recent"]
        assert [(r["job_id"], r["state"], r["error"]) for r in recent] == [
            (job["id"], "completed", None)
        ]
        assert isinstance(recent[0]["wall_ms"], int) and recent[0]["wall_ms"] >= 0
        assert after["jobs"]["failed"] == 0 and after["state"] == "idle"

        code, ctype, page = get(port, "/")
        assert code == 200 and ctype.startswith("text/html")
        assert f"DEparrow node <code>{node_id}</code>" in page
        assert f"<code>{job['id']}</code></td><td>completed</td>" in page
        assert f"<b id='total'>{earned}</b> in total" in page
        # Its owner reads it by kind and lately, rounded, exact on hover (issue 19, item 5).
        pay = to_micro(earned)
        assert after["earnings"]["work_micro"] + after["earnings"]["uptime_micro"] == pay
        assert after["earnings"]["recent_micro"] == pay and after["earnings"]["recent_days"] == 1
        work = after["earnings"]["work_micro"]
        assert f"work <b id='work' title='{format_micro(work)} credits'>{rounded(work)}</b>" in page
        recent = f"<b id='recent' title='{earned} credits'>{rounded(pay)}</b>"
        assert recent + " in the last 1 day" in page
        assert "<span id='completed'>1</span> completed" in page
        identity = json.loads((tmp_path / "n1" / "node.json").read_text())
        for secret in (identity["node_secret"], identity["mqtt"]["password"]):
            assert secret not in page and secret not in json.dumps(after)
        assert get(port, "/fragment")[2].startswith("<p class='state idle'>")
        assert get(port, "/nope")[0] == 404
        # Only loopback names are answered on a loopback page (no DNS rebinding).
        assert get(port, "/api/state", host="attacker.example")[0] == 403
        assert get(port, "/api/state", host=f"localhost:{port}")[0] == 200
        # The day's starting point is kept for the next start.
        day = json.loads((tmp_path / "n1" / "earnings-day.json").read_text())
        today = time.strftime("%Y-%m-%d")
        assert day == {"day": today, "start_micro": 0, "days": {today: 0}}
    finally:
        assert node.stop() == 0
    with pytest.raises(OSError):  # the page went with the node
        get(port, "/api/state")


def test_a_taken_port_leaves_the_node_running_without_its_page(
    hub: LocalHub, tmp_path: Path
) -> None:
    _, owner = hub.user("owner")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        node = start_node(hub, owner, tmp_path, "--dashboard-port", str(port))
        try:
            assert node.alive()
            assert (
                f"warning: node page not started: 127.0.0.1:{port} is in use (by another node, "
                "or another program); the node runs without it. Pick a free port with "
                "--dashboard-port PORT (0 turns the page off)"
            ) in node.output()
            job = owner.submit(FIB)  # it still earns
            assert owner.wait(job["id"], 60)["state"] == "completed"
        finally:
            assert node.stop() == 0


def test_a_bad_preferences_file_is_refused_before_enrolling(hub: LocalHub, tmp_path: Path) -> None:
    import subprocess

    _, owner = hub.user("owner")
    token = owner.enrollment_token()["token"]
    cases = [
        ("not json {", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"turbo": 1}', "'turbo' is not a preference"),
        ('{"idle": {"cpu_cap_percent": 150}}', "idle.cpu_cap_percent must be a number from 1"),
        ('{"docker": {"enabled": "yes"}}', "docker.enabled must be true or false"),
        ('{"wasm_engine": "v8"}', "wasm_engine must be"),
    ]
    for text, message in cases:
        prefs = tmp_path / "prefs.json"
        prefs.write_text(text)
        out = subprocess.run(
            [sys.executable, "-m", "edge.cli", "--hub", hub.url, "--token", token,
             "--data-dir", str(tmp_path / "n1"), "--config", str(prefs)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 1 and message in out.stderr, out.stderr
    assert not (tmp_path / "n1" / "node.json").exists()
    missing = tmp_path / "missing.json"
    out = subprocess.run(
        [sys.executable, "-m", "edge.cli", "--config", str(missing)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 1 and f"cannot read {missing}" in out.stderr
    # The token was not spent: a good file enrolls and runs, page off.
    prefs = tmp_path / "prefs.json"
    prefs.write_text('{"idle": {"cpu_cap_percent": 50}, "always_run": true}')
    node = start_node(hub, owner, tmp_path, "--config", str(prefs), "--dashboard-port", "0")
    try:
        assert "node page" not in node.output()
    finally:
        node.stop()


def test_amounts_and_the_days_baseline(tmp_path: Path) -> None:
    assert to_micro("0.002777") == 2777 and to_micro("10") == 10_000_000
    assert format_micro(2_500_000) == "2.5" and format_micro(0) == "0"
    for bad in ("x", "-1", "0.0000001", "NaN", None):
        with pytest.raises(ValueError):
            to_micro(bad)
    e = Earnings("http://127.0.0.1:1", "n_1", "pw", tmp_path)
    today = time.strftime("%Y-%m-%d")
    (tmp_path / "earnings-day.json").write_text(json.dumps({"day": today, "start_micro": 500}))
    assert e._day_start(2000) == 500  # a restart keeps the day's starting point
    e2 = Earnings("http://127.0.0.1:1", "n_1", "pw", tmp_path)
    assert e2._day_start(100) == 100  # the total went down (the hub's books reset): start over
    (tmp_path / "earnings-day.json").write_text(json.dumps({"day": "2000-01-01", "start_micro": 1}))
    assert Earnings("http://127.0.0.1:1", "n_1", "pw", tmp_path)._day_start(7) == 7  # a new day
    e3 = Earnings(f"http://127.0.0.1:{free_port()}", "n_1", "pw", None)
    e3.fetch()  # nobody listens: shown on the page, never raised
    assert e3.view()["total"] is None and "cannot reach the hub" in e3.view()["error"]


def test_states_read_as_people_say_them() -> None:
    url = "mqtt://hub:1883"
    running = [{"job_id": "j_1", "since": 0.0}]
    assert describe_state("idle", None, True, [], url) == ("idle", "waiting for a job")
    assert describe_state("busy", None, True, running, url) == ("busy", "running j_1")
    # The idle gate's reason is why a node is paused (protocol state "suspended").
    assert describe_state("suspended", "keyboard used 3 s ago", True, running, url) == (
        "paused",
        "keyboard used 3 s ago",
    )
    assert describe_state("idle", None, False, [], url) == (
        "offline",
        "not connected to the broker at mqtt://hub:1883; reconnecting",
    )


def test_the_split_and_the_recent_average(tmp_path: Path) -> None:
    """Uptime's share from the paid seconds, the rest work; the recent average from the first
    total of each of the last days, kept across restarts in earnings-day.json."""
    assert rounded(2777) == "0.00278" and rounded(2_500_000) == "2.50" and rounded(0) == "0"
    assert rounded(100_000_000) == "100" and rounded(5) == "0.000005"

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"earned": "3", "uptime_s": 864, "state": "idle"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        day = 86400
        dates = [time.strftime("%Y-%m-%d", time.localtime(time.time() - k * day))
                 for k in (9, 2, 1)]  # fmt: skip
        (tmp_path / "earnings-day.json").write_text(json.dumps({
            "day": dates[-1], "start_micro": 2_000_000,
            "days": {dates[0]: 0, dates[1]: 1_000_000, dates[2]: 2_000_000}}))  # fmt: skip
        e = Earnings(f"http://127.0.0.1:{server.server_address[1]}", "n_1", "pw", tmp_path)
        e.fetch()
        v = e.view()
        assert v["error"] is None and v["total_micro"] == 3_000_000
        assert v["uptime_micro"] == 1_000_000  # 864 s at 100 credits a day
        assert v["work_micro"] == 2_000_000
        # The 9-day-old reading fell out of the last 7 days: 3 days seen, 2 credits in them.
        assert v["recent_micro"] == 2_000_000 and v["recent_days"] == 3
        assert v["per_day_micro"] == 666_666
        saved = json.loads((tmp_path / "earnings-day.json").read_text())
        assert sorted(saved["days"]) == sorted([*dates[1:], time.strftime("%Y-%m-%d")])
    finally:
        server.shutdown()

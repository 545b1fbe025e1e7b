"""`deparrow network diagnose`, `deparrow status --deep` and `edge-run diagnose` against a real
hub process, real Mosquitto brokers (one of them with a password file) and a real node."""

from __future__ import annotations

import base64
import json
import os
import pwd
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import pytest

from deparrow.localnet import LocalHub, Proc, wait_for
from edge.diagnose import FAIL, OK, HubAnswer, check_clock, server_time
from hub.mqtt.broker import ChildBroker, free_port, wait_port
from tests.conftest import require_mosquitto, start_hub, wait_until

NAMES = [
    "DNS",
    "hub HTTP",
    "hub's broker link",
    "clock",
    "HTTP round trip",
    "hub API token",
    "broker TCP",
    "MQTT login",
    "MQTT round trip",
]


def deparrow(hub: str, token: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "deparrow.cli", "--hub", hub]
    if token:
        cmd += ["--token", token]
    env = {k: v for k, v in os.environ.items() if k not in ("DEPARROW_TOKEN", "DEPARROW_HUB")}
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=60, env=env)


def edge_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge.cli", *args], capture_output=True, text=True, timeout=60
    )


def lines(out: str) -> dict[str, str]:
    """Check name (its first words, as in NAMES) -> its whole line."""
    found = {}
    for line in out.splitlines():
        body = line[6:]
        for name in NAMES:
            if body.startswith(name):
                found[name] = line
    return found


def status_of(line: str) -> str:
    return line.split()[0]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[ChildBroker]:
    """A Mosquitto this test may stop."""
    require_mosquitto()
    b = ChildBroker("mosquitto", "127.0.0.1", free_port(), tmp_path / "broker")
    b.start()
    yield b
    b.stop()


@pytest.fixture
def hub(tmp_path: Path, broker: ChildBroker) -> Iterator[LocalHub]:
    h = start_hub(tmp_path, mqtt_url=broker.url)
    yield h
    h.stop()


@pytest.fixture
def locked_broker(tmp_path: Path) -> Iterator[str]:
    """Mosquitto that lets in only alice/secret: the hub's own broker knows its users' logins,
    so refused credentials are tested here."""
    require_mosquitto()
    work = tmp_path / "locked"
    work.mkdir()
    passwd = work / "passwd"
    subprocess.run(
        [shutil.which("mosquitto_passwd") or "mosquitto_passwd", "-b", "-c", str(passwd),
         "alice", "secret"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    port = free_port()
    conf = work / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {passwd}\n"
        f"persistence false\nuser {pwd.getpwuid(os.getuid()).pw_name}\nlog_dest stderr\n"
    )
    proc = Proc("locked-mosquitto", ["mosquitto", "-c", str(conf)], work / "mosquitto.log")
    try:
        wait_port("127.0.0.1", port, 15, proc.p)
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        proc.stop()


def test_every_check_passes_against_a_real_hub(hub: LocalHub) -> None:
    token = hub.admin.token
    out = deparrow(hub.url, token, "network", "diagnose")
    assert out.returncode == 0, out.stdout + out.stderr
    found = lines(out.stdout)
    assert list(found) == NAMES, out.stdout
    assert all(status_of(line) == OK for line in found.values()), out.stdout
    assert "resolves" in found["DNS"] or "IP address" in found["DNS"]
    who = hub.admin.request("POST", "/api/v1/auth/token", {"token": token}, auth=False)["user"]
    assert f"dp/v1/agents/{who}/diag" in found["MQTT round trip"]  # a topic the user may use

    deep = deparrow(hub.url, token, "status", "--deep", "--json")
    assert deep.returncode == 0, deep.stdout + deep.stderr
    report = json.loads(deep.stdout)
    assert report["ok"] and report["hub_ok"]
    assert [c["status"] for c in report["checks"]] == [OK] * len(NAMES)
    assert all(c["hint"] is None for c in report["checks"])


def test_a_broker_that_is_down_or_elsewhere_fails_its_line_with_a_hint(
    hub: LocalHub, broker: ChildBroker
) -> None:
    token = hub.admin.token
    wrong = f"mqtt://127.0.0.1:{free_port()}"
    out = deparrow(hub.url, token, "network", "diagnose", "--mqtt", wrong)
    assert out.returncode == 1
    found = lines(out.stdout)
    assert status_of(found["hub HTTP"]) == OK and status_of(found["clock"]) == OK
    tcp = found["broker TCP"]
    assert tcp.startswith(f"{FAIL}  broker TCP {wrong[7:]}: connection refused — ")
    assert "is the hub's broker running?" in tcp and "--mqtt" in tcp
    assert status_of(found["MQTT login"]) == "skip"

    broker.stop()
    wait_until("the hub to notice", lambda: not hub.admin.status()["broker"]["connected"], 30)
    out = deparrow(hub.url, token, "status", "--deep")
    assert out.returncode == 1
    found = lines(out.stdout)
    assert status_of(found["hub's broker link"]) == FAIL
    assert "look at the hub's log" in found["hub's broker link"]
    assert found["broker TCP"].startswith(f"{FAIL}  broker TCP 127.0.0.1:{broker.port}: ")
    assert "connection refused — is the hub's broker running?" in found["broker TCP"]

    # The hub itself gone: its line fails and names --hub; the checks that need it say why not.
    hub.stop()
    out = deparrow(hub.url, token, "network", "diagnose")
    assert out.returncode == 1
    found = lines(out.stdout)
    assert found["hub HTTP"].startswith(f"{FAIL}  hub HTTP {hub.url}: connection refused")
    assert "check --hub" in found["hub HTTP"]
    assert status_of(found["clock"]) == "skip" and status_of(found["broker TCP"]) == "skip"


def test_refused_mqtt_login_is_reported(hub: LocalHub, locked_broker: str) -> None:
    token = hub.admin.token
    base = ["network", "diagnose", "--mqtt", locked_broker, "--mqtt-username", "alice"]
    bad = deparrow(hub.url, token, *base, "--mqtt-password", "wrong")
    assert bad.returncode == 1
    login = lines(bad.stdout)["MQTT login"]
    assert login.startswith(f"{FAIL}  MQTT login as alice: refused by the broker: Not authorized")
    assert login.endswith("— check --mqtt-username and --mqtt-password")
    assert status_of(lines(bad.stdout)["MQTT round trip"]) == "skip"

    good = deparrow(hub.url, token, *base, "--mqtt-password", "secret")
    assert good.returncode == 0, good.stdout
    assert status_of(lines(good.stdout)["MQTT round trip"]) == OK

    # Without --mqtt-username the login is the hub's own: the user's id and API token, which
    # this other broker does not know.
    as_user = deparrow(hub.url, token, "network", "diagnose", "--mqtt", locked_broker)
    assert as_user.returncode == 1
    assert lines(as_user.stdout)["MQTT login"].startswith(f"{FAIL}  MQTT login as u_")
    assert ": refused by the broker" in as_user.stdout


def test_bad_inputs_are_named(hub: LocalHub) -> None:
    bad_token = deparrow(hub.url, "dpt_nope", "network", "diagnose")
    assert bad_token.returncode == 1
    line = lines(bad_token.stdout)["hub API token"]
    assert line.startswith(f"{FAIL}  hub API token: unknown API token — check --token")
    no_dns = deparrow("http://no-such-host.invalid:8765", None, "network", "diagnose")
    assert no_dns.returncode == 1
    assert lines(no_dns.stdout)["DNS"].startswith(f"{FAIL}  DNS no-such-host.invalid: does not")
    for args, message in [
        (["--mqtt", "http://x:1"], "MQTT URL must look like mqtt://host:port"),
        (["--mqtt-password", "x"], "needs an MQTT user name"),
    ]:
        out = deparrow(hub.url, None, "network", "diagnose", *args)
        assert out.returncode == 2 and message in out.stderr, out.stderr
    not_a_hub = deparrow("ftp://example", None, "network", "diagnose")
    assert not_a_hub.returncode == 2 and "http://host:port" in not_a_hub.stderr
    # A broker address that is really the hub's HTTP port: TCP works, MQTT does not.
    http_port = hub.url.replace("http://", "mqtt://")
    out = deparrow(hub.url, None, "network", "diagnose", "--mqtt", http_port)
    login = lines(out.stdout)["MQTT login"]
    assert login.startswith(FAIL) and "an MQTT broker?" in login, out.stdout


def test_edge_run_diagnose_uses_node_json(
    hub: LocalHub, tmp_path: Path, locked_broker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEPARROW_DASHBOARD_PORT", "0")
    _, owner = hub.user("owner")
    node = hub.start_node(owner, tmp_path / "n1", "n1")
    try:
        out = edge_run("--data-dir", str(tmp_path / "n1"), "diagnose")
        assert out.returncode == 0, out.stdout + out.stderr
        node_id = owner.nodes()[0]["id"]
        assert f"ok    hub knows node {node_id}: state idle" in out.stdout
        # A login holds one connection: logging in as the running node would close its
        # connection, so the login is not tried beside it, and says why.
        login = next(x for x in out.stdout.splitlines() if "MQTT login as" in x)
        assert "the node is connected now (the hub has it idle)" in login, login
        assert not login.startswith(FAIL)
        # Diagnosing beside the running node did not take its broker session away.
        assert node.alive() and owner.nodes()[0]["state"] == "idle"
        assert "reconnected to the broker" not in node.output()
        job = owner.submit({"name": "fib", "engine": {"type": "wasm", "module": "example:fib",
                            "entrypoint": "fib", "args": ["20"]}, "timeout": 20})  # fmt: skip
        assert owner.wait(job["id"], 60)["state"] == "completed"

        # The same identity pointed at a broker that does not know it.
        config = json.loads((tmp_path / "n1" / "node.json").read_text())
        other = tmp_path / "elsewhere"
        other.mkdir()
        config["mqtt"]["url"] = locked_broker
        (other / "node.json").write_text(json.dumps(config))
        out = edge_run("diagnose", "--data-dir", str(other), "--json")
        assert out.returncode == 1
        report = json.loads(out.stdout)
        login = next(c for c in report["checks"] if c["name"].startswith("MQTT login"))
        assert login["status"] == FAIL and "Not authorized" in login["detail"]
        assert "re-enroll: remove " + str(other / "node.json") in login["hint"]

        # A password the hub does not know: the hub check fails and says to re-enroll.
        config["mqtt"]["password"] = "not-it"
        (other / "node.json").write_text(json.dumps(config))
        out = edge_run("diagnose", "--data-dir", str(other))
        assert out.returncode == 1
        line = next(x for x in out.stdout.splitlines() if "hub knows node" in x)
        assert line.startswith(FAIL) and "HTTP 401" in line and "re-enroll" in line
    finally:
        node.stop()
    # the node stopped: its login is tried, and works
    wait_for("the node offline", lambda: owner.nodes()[0]["state"] == "offline", 20, [])
    out = edge_run("--data-dir", str(tmp_path / "n1"), "diagnose")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"ok    MQTT login as {node_id}: accepted" in out.stdout
    assert f"dp/v1/nodes/{node_id}/diag" in out.stdout
    assert out.stderr.strip() == "all checks passed"
    empty = edge_run("diagnose", "--data-dir", str(tmp_path / "nobody"))
    assert empty.returncode == 1 and "not enrolled yet" in empty.stderr
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "node.json").write_text(
        json.dumps({"node_id": "n_1", "node_secret": "s", "mqtt": {"url": "nope"}, "hub": "x"})
    )
    broken = edge_run("diagnose", "--data-dir", str(tmp_path / "broken"))
    assert broken.returncode == 1 and "http://host:port" in broken.stderr


def _get(url: str, auth: str | None) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, headers={"Authorization": auth} if auth else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_node_endpoint_answers_the_node_and_its_owner_only(hub: LocalHub, tmp_path: Path) -> None:
    _, owner = hub.user("owner")
    _, mallory = hub.user("mallory")
    token = owner.enrollment_token()["token"]
    enrolled = owner.request(
        "POST", "/api/v1/nodes/enroll",
        {"token": token, "name": "n", "engines": ["wasm"], "arch": "x86_64", "cpu": 1,
         "memory_mb": 256},
        auth=False,
    )  # fmt: skip
    node_id, password = enrolled["node_id"], enrolled["mqtt"]["password"]
    url = f"{hub.url}/api/v1/nodes/{node_id}"

    def basic(user: str, pw: str) -> str:
        return "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()

    code, body = _get(url, basic(node_id, password))
    assert code == 200 and body["id"] == node_id and body["earned"] == "0"
    assert "secret" not in json.dumps(body)
    code, body = _get(url, basic(node_id, "wrong"))
    assert code == 401 and "MQTT password from node.json" in body["error"]
    code, body = _get(url, "Basic !!!")
    assert code == 401 and "base64" in body["error"]
    assert _get(url, "Bearer " + owner.jwt())[0] == 200
    assert _get(url, "Bearer " + hub.admin.jwt())[0] == 200
    code, body = _get(url, "Bearer " + mallory.jwt())
    assert code == 404 and body["error"] == f"no node {node_id}"
    assert _get(url, None)[0] == 401
    status = hub.admin.status()
    assert isinstance(status["time"], float) and status["broker"]["public_url"].startswith(
        "mqtt://"
    )


def test_clock_skew_is_measured_against_the_hub() -> None:
    # The hub's clock read between local times 1000.0 and 1000.2.
    ok = check_clock(1000.1, 0.0, 1000.0, 1000.2)
    assert ok.status == OK and ok.detail == "within 0.10 s of the hub's"
    behind = check_clock(1030.1, 0.0, 1000.0, 1000.2)
    assert behind.status == FAIL
    assert behind.detail == "this machine's clock is 30.0 s behind the hub's"
    assert "timedatectl set-ntp true" in (behind.hint or "")
    ahead = check_clock(990.0, 0.0, 1000.0, 1000.2, max_skew_s=5)
    assert ahead.status == FAIL and "ahead of" in ahead.detail
    # Whole-second Date headers get a second of slack before they fail anyone.
    assert check_clock(994.0, 1.0, 1000.0, 1000.2, max_skew_s=5).status == OK
    headers = Message()
    headers["Date"] = "Thu, 01 Jan 1970 00:16:40 GMT"  # 1000 s after the epoch
    answer = HubAnswer({"hub": "ok"}, headers, 1000.0, 1000.0, 1.0)
    assert server_time(answer) == (1000.0, 1.0)
    answer.status["time"] = 1000.25
    assert server_time(answer) == (1000.25, 0.0)

"""The deparrow CLI against a real hub process, as a person types it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import start_hub


def cli(hub_url: str, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deparrow.cli", "--hub", hub_url, "--token", token, *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_wallet_transfer_history_audit_and_status(tmp_path: Path, mosquitto: str) -> None:
    hub = start_hub(tmp_path, mqtt_url=mosquitto)
    try:
        admin = hub.admin.token or ""
        alice = json.loads(cli(hub.url, admin, "user", "create", "alice", "--json").stdout)
        bob = json.loads(cli(hub.url, admin, "user", "create", "bob", "--json").stdout)
        out = cli(hub.url, alice["token"], "wallet", "transfer", bob["id"], "1.25", "--key", "k1")
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == f"sent 1.25 credits to {bob['id']}; balance 98.75"
        again = cli(hub.url, alice["token"], "wallet", "transfer", bob["id"], "1.25", "--key", "k1")
        assert "already done" in again.stdout
        bad = cli(hub.url, alice["token"], "wallet", "transfer", bob["id"], "0")
        assert bad.returncode == 1 and bad.stderr.startswith("deparrow: amount must be more")
        assert cli(hub.url, bob["token"], "wallet").stdout.startswith("balance: 101.25 credits")
        hist = cli(hub.url, bob["token"], "wallet", "history")
        assert "1.25" in hist.stdout and "welcome grant" in hist.stdout
        csv = cli(hub.url, bob["token"], "wallet", "history", "--csv").stdout.splitlines()
        assert csv[0].startswith("entry,") and len(csv) == 3
        # Each side reads the transfer from where it stands, by name (issue 19).
        assert "transfer from alice" in hist.stdout and "transfer to" not in hist.stdout
        assert "transfer from alice" in csv[1] and ",received," in csv[1]
        sent = cli(hub.url, alice["token"], "wallet", "history").stdout
        assert "transfer to bob" in sent
        audit = cli(hub.url, admin, "ledger", "audit")
        assert audit.returncode == 0 and audit.stdout.strip().endswith("balanced"), audit.stdout
        assert cli(hub.url, alice["token"], "ledger", "audit").returncode == 1  # not an admin
        status = cli(hub.url, alice["token"], "status")
        assert status.returncode == 0
        # No node yet: said plainly, with what to do, not "nodes online: 0 of 0".
        assert [line.split()[0] for line in status.stdout.splitlines()] == [
            "ok",
            "ok",
            "note",
            "ok",
        ]
        assert "no node is enrolled yet: `deparrow node token`" in status.stdout
        assert "0 of 0" not in status.stdout
        nobody = cli(hub.url, "dpt_wrong", "wallet")
        assert nobody.returncode == 1 and "unknown API token" in nobody.stderr
    finally:
        hub.stop()


def test_node_list_shows_jobs_of_slots_and_gpus(tmp_path: Path, mosquitto: str) -> None:
    """Two nodes say hello over MQTT as edge-run does (edge/core/protocol.py): one with 2
    slots and an NVIDIA L4 (the hello's claim: no GPU is needed here), one as a board."""
    import paho.mqtt.publish as publish

    from deparrow.localnet import wait_for
    from edge.core import protocol
    from hub.mqtt.bridge import parse_mqtt_url

    l4 = {"index": 0, "name": "NVIDIA L4", "uuid": "GPU-5e1c1d0a", "memory_mb": 23034}
    hub = start_hub(tmp_path, mqtt_url=mosquitto)
    try:
        alice, client = hub.user("alice")
        ids = {}
        for name, engines, extra in [
            ("gpu-box", ["docker"], {"slots": 2, "gpus": [l4]}),
            ("board", ["wasm"], {}),
        ]:
            token = client.enrollment_token()["token"]
            creds = client.request(
                "POST", "/api/v1/nodes/enroll", {"token": token, "name": name}, auth=False
            )
            node_id = ids[name] = creds["node_id"]
            hello = protocol.hello(node_id, engines, {"cpu": 2, "memory_mb": 512}, "t", **extra)
            host, port = parse_mqtt_url(creds["mqtt"]["url"])
            login = {"username": node_id, "password": creds["mqtt"]["password"]}
            topic = protocol.node_topic(node_id, protocol.HELLO)
            publish.single(topic, protocol.encode(hello), qos=1, hostname=host, port=port,
                           client_id=node_id, auth=login)  # fmt: skip
        wait_for("both hellos", lambda: all(n["last_seen"] for n in client.nodes()), 30, [hub.proc])

        out = cli(hub.url, alice["token"], "node", "list")
        assert out.returncode == 0, out.stderr
        header, *rows = out.stdout.splitlines()
        assert header.split() == ["node", "state", "name", "jobs", "resources", "gpu", "earned"]
        lines = {line.split()[0]: line for line in rows}
        assert "gpu-box" in lines[ids["gpu-box"]] and " 0/2 " in lines[ids["gpu-box"]]
        assert " 1x NVIDIA L4 " in lines[ids["gpu-box"]]
        assert " 0/1 " in lines[ids["board"]]
        assert lines[ids["board"]].split()[-2] == "-"  # no GPU; then what it earned

        out = cli(hub.url, alice["token"], "node", "list", "--json")
        nodes = {n["name"]: n for n in json.loads(out.stdout)}
        assert nodes["gpu-box"]["gpus"] == [l4] and nodes["gpu-box"]["slots"] == 2
        assert nodes["gpu-box"]["jobs_running"] == 0
        assert nodes["board"]["gpus"] == [] and nodes["board"]["slots"] == 1
    finally:
        hub.stop()


def test_the_client_cli_imports_nothing_of_the_server() -> None:
    # `deparrow hub` imports the server when it runs; every other command works without it.
    code = (
        "import sys, deparrow.cli, deparrow.client, deparrow.localnet, deparrow.demo, "
        "deparrow.board, deparrow.diagnose\n"
        "print(sorted(m for m in sys.modules if m == 'hub' or m.startswith('hub.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_clients_copies_of_server_constants_agree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deparrow.cli.context import local_data_dir
    from deparrow.client import TERMINAL_STATES
    from hub.config import default_data_dir
    from hub.market.spec import TERMINAL_STATES as SERVER_TERMINAL_STATES

    assert TERMINAL_STATES == SERVER_TERMINAL_STATES
    for env in ({}, {"XDG_DATA_HOME": str(tmp_path)}, {"DEPARROW_DATA": str(tmp_path / "d")}):
        for name in ("XDG_DATA_HOME", "DEPARROW_DATA"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert local_data_dir() == default_data_dir(), env


def test_job_run_wait_says_why_it_is_queued_at_once(tmp_path: Path, mosquitto: str) -> None:
    """With no node online, `job run --wait` says so within seconds (the hub knows at once),
    not only "waiting…"; and `status` says that the node it has is not online."""
    import time

    hub = start_hub(tmp_path, mqtt_url=mosquitto)
    try:
        alice, client = hub.user("alice")
        cmd = [sys.executable, "-m", "deparrow.cli", "--hub", hub.url, "--token", alice["token"],
               "job", "run", "example:fib", "--invoke", "fib", "--wait", "--", "20"]  # fmt: skip
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        try:
            started = time.monotonic()
            lines = []
            assert proc.stderr is not None
            while time.monotonic() - started < 30:
                line = proc.stderr.readline()
                if not line:
                    break
                lines.append(line.rstrip())
                if line.startswith("queued:"):
                    break
            assert lines[-1] == "queued: no node is online", lines
            assert time.monotonic() - started < 15
        finally:
            proc.kill()
            proc.wait()

        # A node enrolled but not online: said as such.
        token = client.enrollment_token()["token"]
        client.request("POST", "/api/v1/nodes/enroll", {"token": token, "name": "n"}, auth=False)
        status = cli(hub.url, alice["token"], "status")
        assert status.returncode == 0, status.stderr
        assert "note  no node is online (1 enrolled, all offline)" in status.stdout
    finally:
        hub.stop()

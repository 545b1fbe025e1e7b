"""`deparrow demo --json`: the README's first command, as a user runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

import wasm_jobs
from deparrow.localnet import LocalHub


@pytest.mark.parametrize("path", ["system", "no-mosquitto"])
def test_demo_json_reports_every_job_completed_and_the_ledger_balanced(path: str) -> None:
    env = dict(os.environ)
    if path == "no-mosquitto":
        # A machine with nothing but Python: the hub must fall back to the embedded broker.
        env["PATH"] = os.path.dirname(sys.executable)
    out = subprocess.run(
        [sys.executable, "-m", "deparrow.cli", "demo", "--json"],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["broker"] == ("embedded" if path == "no-mosquitto" else "mosquitto")
    names = [name for name, _ in wasm_jobs.examples()]
    assert sorted(j["name"] for j in report["jobs"]) == sorted(names)
    for job in report["jobs"]:
        assert job["state"] == "completed" and job["correct"], job
        assert job["id"].startswith("j_") and job["cost"] is not None
    assert report["ledger_balanced"] is True
    assert sum(Decimal(v) for v in report["balances"].values()) == 0


def test_ledger_audit_passes_on_the_demo_books(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "deparrow.cli", "demo", "--json", "--keep"],
                         capture_output=True, text=True, timeout=240)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    data = Path(json.loads(out.stdout)["data_dir"])
    try:
        hub = LocalHub(data / "hub", log_path=tmp_path / "hub.log")  # the demo's books, reopened
        audit = subprocess.run(
            [sys.executable, "-m", "deparrow.cli", "--hub", hub.url, "--token",
             hub.admin.token or "",
             "ledger", "audit"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        hub.stop()
        assert audit.returncode == 0, audit.stdout + audit.stderr
        assert audit.stdout.strip().endswith("balanced")
    finally:
        shutil.rmtree(data, ignore_errors=True)

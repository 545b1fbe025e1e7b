"""A real node set to each wasm engine by its preferences runs a real job from the hub."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from deparrow.localnet import Proc, wait_for
from tests.conftest import HubProc


@pytest.mark.parametrize("engine", ["wasm3-run", "wasmtime"])
def test_a_node_runs_jobs_on_the_engine_its_owner_chose(
    hub: HubProc, tmp_path: Path, engine: str
) -> None:
    _, owner = hub.user("owner")
    _, alice = hub.user("alice")
    prefs = tmp_path / "prefs.json"
    prefs.write_text(json.dumps({"wasm_engine": engine}))
    token = owner.enrollment_token()["token"]
    cmd = [sys.executable, "-m", "edge.cli", "--hub", hub.url, "--token", token, "--name", "n",
           "--data-dir", str(tmp_path / "node"), "--config", str(prefs), "-v"]  # fmt: skip
    node = Proc("n", cmd, tmp_path / "node.log")
    try:
        wait_for("the node", lambda: any(n["state"] == "idle" for n in owner.nodes()), 60, [node])
        spec = {"engine": {"type": "wasm", "module": "example:fib", "entrypoint": "fib",
                           "args": ["20"]}, "timeout": 30}  # fmt: skip
        job = alice.wait(alice.submit(spec)["id"], timeout_s=60)
        assert job["state"] == "completed", (job, node.tail())
        assert job["result"]["returns"] == [6765]
        assert "unavailable" not in node.output()  # the chosen engine, not the fallback
    finally:
        node.stop()

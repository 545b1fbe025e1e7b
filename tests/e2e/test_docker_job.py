"""A docker job through the whole loop: REST submit -> MQTT -> a real edge-run node whose owner
turned docker on -> a container in Podman's Docker-API service -> signed result -> settlement."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from deparrow.localnet import Proc, wait_for
from tests.conftest import HubProc
from tests.edge.test_docker_executor import IMAGE, api  # noqa: F401  (the podman fixture)


def test_a_docker_job_runs_on_a_node_that_offers_docker(
    hub: HubProc,
    tmp_path: Path,
    api: Any,  # noqa: F811
) -> None:
    _, owner = hub.user("owner")
    _, alice = hub.user("alice")
    prefs = tmp_path / "prefs.json"
    prefs.write_text(json.dumps({"docker": {"enabled": True}}))
    token = owner.enrollment_token()["token"]
    cmd = [sys.executable, "-m", "edge.cli", "--hub", hub.url, "--token", token,
           "--name", "dockernode", "--data-dir", str(tmp_path / "node"),
           "--config", str(prefs), "-v"]  # fmt: skip
    node = Proc("dockernode", cmd, tmp_path / "node.log")
    try:
        wait_for(
            "the node to offer docker",
            lambda: any("docker" in n["engines"] and n["state"] == "idle" for n in owner.nodes()),
            60,
            [node],
        )
        spec = {
            "engine": {
                "type": "docker",
                "image": IMAGE,
                "command": ["sh", "-c", 'echo "hello from $WHO"; exit 3'],
                "env": {"WHO": "a container"},
            },
            "timeout": 60,
            "resources": {"memory_mb": 64},
        }
        job = alice.wait(alice.submit(spec)["id"], timeout_s=120)
        assert job["state"] == "completed", (job, node.tail())
        assert job["result"]["stdout"] == "hello from a container\n"
        assert job["result"]["exit_code"] == 3
        assert float(job["cost"]) > 0
        assert hub.admin.audit()["balanced"]
    finally:
        node.stop()

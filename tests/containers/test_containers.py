"""The container images (tools/containers/): built with podman from the local Debian base
(tools/containers/build-base.sh; cached, so after the first build this takes seconds), then a
hub container on its embedded defaults and a node container that enrolls with it, comes
online and completes a paid wasm job. Both use the host's network (free loopback ports), as
two machines on one LAN would see each other."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from deparrow.client import Client
from hub.mqtt.broker import free_port
from tests.conftest import Proc, wait_until

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "tools" / "containers" / "build.sh"


def podman() -> str:
    exe = shutil.which("podman")
    if exe is None:
        pytest.fail("podman is not installed: run `make test` (tools/install-podman.sh)")
    return exe


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    tags = {}
    for kind in ("hub", "node"):
        tag = f"localhost/deparrow/{kind}:test"
        done = subprocess.run([str(BUILD), kind, tag], capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"build.sh {kind} failed:\n{done.stderr[-3000:]}"
        tags[kind] = tag
    return tags


def run(image: str, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([podman(), "run", "--rm", image, *cmd], capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_images_carry_the_commands(images: dict[str, str]) -> None:
    hub = run(images["hub"], "deparrow", "--help")
    assert hub.returncode == 0 and "Usage: deparrow" in hub.stdout, hub.stderr
    node = run(images["node"], "edge-run", "--help")
    assert node.returncode == 0 and "Usage: edge-run" in node.stdout, node.stderr
    # no compiler in the images: pywasm3 was built in the wheel stage
    assert run(images["node"], "sh", "-c", "command -v gcc || echo none").stdout.strip() == "none"
    job = run(images["node"], "sh", "-c",
              "edge-run job /opt/deparrow/lib/python3*/site-packages/wasm_jobs/fib.wasm "
              "--invoke fib -- 20")  # fmt: skip
    assert job.returncode == 0 and job.stdout.strip() == "6765", job.stderr


@pytest.fixture
def containers(tmp_path: Path) -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for name in names:
        subprocess.run([podman(), "rm", "-f", "-t", "2", name], capture_output=True, timeout=60)


def test_a_node_container_joins_a_hub_container_and_earns(
    images: dict[str, str], tmp_path: Path, containers: list[str]
) -> None:
    port, mqtt_port = free_port(), free_port()
    hub_data = tmp_path / "hub"
    hub_data.mkdir()
    hub_name, node_name = f"dp-hub-{port}", f"dp-node-{port}"
    containers += [node_name, hub_name]
    hub = Proc([podman(), "run", "--rm", "--name", hub_name, "--network", "host",
                "-v", f"{hub_data}:/var/lib/deparrow", images["hub"],
                "deparrow", "hub", "--host", "127.0.0.1", "--port", str(port),
                "--broker-port", str(mqtt_port), "--data-dir", "/var/lib/deparrow",
                "--broker", "embedded", "--heartbeat", "0.5"],
               tmp_path / "hub.log")  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    probe = Client(url)

    def hub_up() -> bool:
        try:
            return bool(
                (hub_data / "admin-token").exists() and probe.status()["broker"]["connected"]
            )
        except Exception:
            return False

    wait_until("the hub container to answer", hub_up, 120, [hub])
    admin = Client(url, (hub_data / "admin-token").read_text().strip())
    owner = Client(url, admin.create_user("owner")["token"])
    alice = Client(url, admin.create_user("alice")["token"])
    token = owner.enrollment_token()["token"]
    node = Proc([podman(), "run", "--rm", "--name", node_name, "--network", "host",
                 "-e", f"DEPARROW_HUB={url}", "-e", f"DEPARROW_ENROLL_TOKEN={token}",
                 "-e", "DEPARROW_ALWAYS_RUN=1", images["node"],
                 "edge-run", "--data-dir", "/var/lib/deparrow-edge", "--name", "boxed",
                 "--dashboard-port", "0"],
                tmp_path / "node.log")  # fmt: skip
    online = wait_until(
        "the node container to come online",
        lambda: next((n for n in owner.nodes() if n["state"] == "idle"), None),
        120, [node, hub],
    )  # fmt: skip
    assert online["name"] == "boxed"
    job = alice.submit({"name": "fib", "timeout": 20, "engine": {
        "type": "wasm", "module": "example:fib", "entrypoint": "fib", "args": ["25"]}})  # fmt: skip
    done = alice.wait(job["id"], timeout_s=60)
    assert done["state"] == "completed", done
    assert done["result"]["returns"] == [75025] and done["node"] == online["id"]
    assert float(owner.nodes()[0]["earned"]) > 0
    assert admin.request("GET", "/api/v1/ledger/audit")["balanced"]

"""The emulated aarch64 board: the MicroPython node cross-built by firmware/build.sh (edge core
frozen in, dpwasm3 compiled in), in an initramfs with Debian's arm64 kernel, busybox-static and
the Buildroot tree's overlay (tools/build-board-image.py), boots under qemu-system-aarch64 -M
virt on an emulated Cortex-A53 with 256 MB. In one boot (TCG is slow): it enrolls with a real
hub on this machine from the kernel command line, saves its identity on its boot partition,
runs a Wasm job in the frozen node's engine (the image has no wasm3-run), and its owner is
paid. The qemu command is docs/install.md's."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from deparrow import board
from deparrow.client import Client
from deparrow.localnet import LocalHub, wait_for
from tests.conftest import ROOT
from tests.images.conftest import Guest, doc_qemu_args

ONLINE_S = 300  # kernel, modules, DHCP and MicroPython's enrollment, every instruction emulated
FIB = {
    "name": "fib-arm64",
    "engine": {"type": "wasm", "module": "example:fib", "entrypoint": "fib", "args": ["25"]},
    "timeout": 60,
}


def node_named(owner: Client, node_id: str) -> dict[str, Any] | None:
    return next((n for n in owner.nodes() if n["id"] == node_id and n["state"] == "idle"), None)


def earnings_page(port: int) -> dict[str, Any]:
    """The board's page: BusyBox httpd running the overlay's earnings CGI on MicroPython."""
    url = f"http://127.0.0.1:{port}/cgi-bin/earnings?json"
    with urllib.request.urlopen(url, timeout=30) as r:
        return dict(json.loads(r.read()))


# One job through firmware/wasm3_exec.py, the frozen executor over the compiled-in engine.
SELF_CHECK = """
import edge.core.session, edge.mp_main, dpwasm3, wasm3_exec
ex = wasm3_exec.Wasm3ModuleExecutor()
with open("wasm-jobs/fib.wasm", "rb") as f:
    m = f.read()
o = ex.run({"module": m, "entrypoint": "fib", "args": ["25"], "job_id": "j", "timeout_s": 30})
print(o["status"], o["returns"], dpwasm3.version())
"""


@pytest.mark.timeout(900)
def test_cross_built_node_runs_under_qemu_user(aarch64_image: Path) -> None:
    """The binary the image carries, alone, under qemu-aarch64-static with the cross
    toolchain's C library: the frozen node imports and runs a Wasm job in its engine."""
    manifest = json.loads((aarch64_image / "manifest.json").read_text())
    binary = manifest["micropython"]["source"]
    out = subprocess.run(
        ["qemu-aarch64-static", "-L", "/usr/aarch64-linux-gnu", binary, "-c", SELF_CHECK],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("completed [75025] dpwasm3"), out.stdout


@pytest.mark.timeout(1200)  # the cross build and image (first run only), then one emulated boot
def test_aarch64_board_enrolls_runs_a_wasm_job_and_earns(
    aarch64_image: Path, lan_hub: tuple[LocalHub, str], tmp_path: Path
) -> None:
    manifest = json.loads((aarch64_image / "manifest.json").read_text())
    hub, url = lan_hub
    _, owner = hub.user("arm-owner")
    token = owner.enrollment_token()["token"]
    boot = tmp_path / "boot.img"  # unprovisioned: the board saves its identity there
    shutil.copy(aarch64_image / "boot.img", boot)
    values = {"IMAGE": str(aarch64_image), "HUB": url, "TOKEN": token}
    args = doc_qemu_args("boot-aarch64", "qemu-system-aarch64", values)
    started = time.monotonic()
    guest = Guest(tmp_path / "console.log", args, tmp_path, 256, "qemu-system-aarch64")
    try:
        guest.wait_console("token from the kernel command line", ONLINE_S)
        online = guest.wait_console("is online; its page", ONLINE_S)
        node = wait_for("the board online", lambda: next(iter(owner.nodes()), None), 10)
        assert node["arch"] == "aarch64" and node["state"] == "idle", node
        guest.wait_console(f"identity {node['id']} saved on the boot partition", 60)

        _, bob = hub.user("arm-bob")
        job = bob.submit(FIB)
        done = bob.wait(job["id"], timeout_s=180)
        assert done["state"] == "completed", f"{done}\n{guest.console()}"
        assert done["result"]["returns"] == [75025]
        assert done["node"] == node["id"]
        paid = [
            item for item in owner.history()["items"]
            if job["id"] in item["reason"] and float(item["amount"]) > 0
        ]  # fmt: skip
        assert paid, owner.history()
        earned = wait_for("the board's earnings", lambda: node_named(owner, node["id"]), 10)
        assert float(earned["earned"]) > 0
        assert hub.admin.audit()["balanced"]
        page = earnings_page(guest.page_port)
        assert page["error"] is None, page
        assert page["node"]["id"] == node["id"] and float(page["node"]["earned"]) > 0
        print(
            f"aarch64 board ({manifest['kernel']['version']}, MicroPython node): online "
            f"{online:.1f}s after qemu started; fib(25) took {done['result'].get('wall_ms')} ms "
            f"in the guest; boot to paid {time.monotonic() - started:.1f}s"
        )
    except BaseException:
        print(guest.console(200))
        raise
    finally:
        guest.stop()
    saved = board.read_file(boot, "deparrow/node.json")
    assert saved is not None, "the enrolled identity is not on the board's boot partition"
    assert json.loads(saved)["node_id"] == node["id"]

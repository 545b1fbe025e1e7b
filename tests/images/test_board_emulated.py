"""The emulated boards, aarch64 and riscv64: the MicroPython node cross-built by
firmware/build.sh (edge core frozen in, dpwasm3 compiled in), in an initramfs with Debian's
kernel, busybox-static and the Buildroot tree's overlay (tools/build-board-image.py), boots
under qemu's virt machine with 256 MB (a Cortex-A53; an rv64 hart under OpenSBI). In one boot
per board (TCG is slow): it enrolls with a real hub on this machine from the kernel command
line, saves its identity on its boot partition, runs a Wasm job in the frozen node's engine
(the image has no wasm3-run), and its owner is paid. The qemu commands are docs/install.md's."""

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
from tests.images.conftest import Guest, board_image, doc_block, doc_qemu_args

ONLINE_S = 300  # kernel, modules, DHCP and MicroPython's enrollment, every instruction emulated
# The C library the node links against, for qemu-user: the cross toolchain's.
SYSROOT = {"aarch64": "/usr/aarch64-linux-gnu", "riscv64": "/usr/riscv64-linux-gnu"}
# One job through firmware/wasm3_exec.py, the frozen executor over the compiled-in engine.
SELF_CHECK = """
import edge.core.session, edge.mp_main, dpwasm3, wasm3_exec
ex = wasm3_exec.Wasm3ModuleExecutor()
with open("wasm-jobs/fib.wasm", "rb") as f:
    m = f.read()
o = ex.run({"module": m, "entrypoint": "fib", "args": ["25"], "job_id": "j", "timeout_s": 30})
print(o["status"], o["returns"], dpwasm3.version())
"""


@pytest.fixture(scope="module", params=["aarch64", "riscv64"])
def arch(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def node_named(owner: Client, node_id: str) -> dict[str, Any] | None:
    return next((n for n in owner.nodes() if n["id"] == node_id and n["state"] == "idle"), None)


def earnings_page(port: int) -> dict[str, Any]:
    """The board's page: BusyBox httpd running the overlay's earnings CGI on MicroPython."""
    url = f"http://127.0.0.1:{port}/cgi-bin/earnings?json"
    with urllib.request.urlopen(url, timeout=30) as r:
        return dict(json.loads(r.read()))


@pytest.mark.timeout(900)  # the cross build and image, on a first run
def test_cross_built_node_runs_under_qemu_user(arch: str) -> None:
    """The binary the image carries, alone, under qemu-ARCH-static with the cross toolchain's
    C library: the frozen node imports and runs a Wasm job in its engine."""
    manifest = json.loads((board_image(arch) / "manifest.json").read_text())
    binary = manifest["micropython"]["source"]
    out = subprocess.run(
        [f"qemu-{arch}-static", "-L", SYSROOT[arch], binary, "-c", SELF_CHECK],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("completed [75025] dpwasm3"), out.stdout


@pytest.mark.timeout(1200)  # the cross build and image (first run only), then one emulated boot
def test_board_enrolls_runs_a_wasm_job_and_earns(
    arch: str, lan_hub: tuple[LocalHub, str], tmp_path: Path
) -> None:
    image = board_image(arch)
    manifest = json.loads((image / "manifest.json").read_text())
    hub, url = lan_hub
    _, owner = hub.user(f"{arch}-owner")
    token = owner.enrollment_token()["token"]
    boot = tmp_path / "boot.img"  # unprovisioned: the board saves its identity there
    shutil.copy(image / "boot.img", boot)
    qemu = doc_block(f"boot-{arch}").split()[0]
    values = {"IMAGE": str(image), "HUB": url, "TOKEN": token}
    args = doc_qemu_args(f"boot-{arch}", qemu, values)
    started = time.monotonic()
    guest = Guest(tmp_path / "console.log", args, tmp_path, 256, qemu)
    try:
        guest.wait_console("token from the kernel command line", ONLINE_S)
        online = guest.wait_console("is online; its page", ONLINE_S)
        node = wait_for("the board online", lambda: next(iter(owner.nodes()), None), 10)
        assert node["arch"] == arch and node["state"] == "idle", node
        guest.wait_console(f"identity {node['id']} saved on the boot partition", 60)

        _, bob = hub.user(f"{arch}-bob")
        job = bob.submit(
            {
                "name": f"fib-{arch}",
                "engine": {
                    "type": "wasm", "module": "example:fib", "entrypoint": "fib", "args": ["25"]
                },
                "timeout": 60,
            }
        )  # fmt: skip
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
            f"{arch} board ({manifest['kernel']['version']}, MicroPython node): online "
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

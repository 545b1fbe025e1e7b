"""The boot test: the x86_64 test image (Debian kernel, busybox, CPython with the edge, and the
Buildroot tree's overlay and init scripts) boots under qemu, joins a real hub on this machine,
runs a Wasm job and earns its owner credits. Once as a disk a PC or cloud VM boots (SYSLINUX,
the identity written by `deparrow board provision`), once as kernel + initramfs enrolling
itself from the kernel command line. The commands are docs/install.md's."""

from __future__ import annotations

import json
import shlex
import shutil
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from deparrow import board
from deparrow.client import Client
from deparrow.localnet import LocalHub, wait_for
from tests.images.conftest import Guest, doc_block, run_doc

ONLINE_S = 150  # boot, DHCP, CPython start and enrollment on an emulated CPU, with margin
FIB = {
    "name": "fib",
    "engine": {"type": "wasm", "module": "example:fib", "entrypoint": "fib", "args": ["25"]},
    "timeout": 60,
}


def qemu_args_from_doc(name: str) -> list[str]:
    """The doc's qemu command line, minus what the test sets itself (the console is a file,
    the page port a free one); the test boots with exactly these arguments."""
    words = shlex.split(doc_block(name))
    assert words[0] == "qemu-system-x86_64", words
    out, skip = [], False
    for w in words[1:]:
        if skip:
            skip = False
            continue
        if w in ("-nic", "-m"):  # set by Guest: the forwarded port is a free one
            skip = True
            continue
        out.append(w)
    return out


def node_named(owner: Client, name: str) -> dict[str, Any] | None:
    return next((n for n in owner.nodes() if n["name"] == name and n["state"] == "idle"), None)


def run_job_and_check_pay(hub: LocalHub, owner: Client, node: dict[str, Any], guest: Guest) -> None:
    _, bob = hub.user(f"bob-{node['name']}")
    job = bob.submit(FIB)
    done = bob.wait(job["id"], timeout_s=90)
    assert done["state"] == "completed", f"{done}\n{guest.console()}"
    assert done["result"]["returns"] == [75025]
    assert done["node"] == node["id"]
    paid = [
        item for item in owner.history()["items"]
        if job["id"] in item["reason"] and float(item["amount"]) > 0
    ]  # fmt: skip
    assert paid, owner.history()
    assert float(wait_for("the node's earnings", lambda: node_named(owner, node["name"]), 10)[
        "earned"]) > 0  # fmt: skip
    assert hub.admin.audit()["balanced"]
    # the node's own page, served on the guest's port 80
    with urllib.request.urlopen(f"http://127.0.0.1:{guest.page_port}/api/state", timeout=10) as r:
        state = json.loads(r.read())
    assert state["node_id"] == node["id"]
    assert state["jobs"]["completed"] >= 1


@pytest.mark.timeout(600)  # the image build (first run) and an emulated boot
def test_provisioned_disk_boots_joins_and_earns(
    test_image: Path, lan_hub: tuple[LocalHub, str], tmp_path: Path
) -> None:
    hub, url = lan_hub
    _, owner = hub.user("pc-owner")
    shutil.copy(test_image / "disk.img", tmp_path / "disk.img")
    token = owner.enrollment_token()["token"]
    out = run_doc("provision-pc", tmp_path, {"HUB": url, "TOKEN": token})
    assert out.returncode == 0, out.stderr
    assert "written to partition 1 (DPBOOT)" in out.stdout, out.stdout
    guest = Guest(tmp_path / "console.log", qemu_args_from_doc("boot-pc-disk"), tmp_path)
    try:
        guest.wait_console("identity from the boot partition", ONLINE_S)
        node = wait_for("the provisioned node online", lambda: node_named(owner, "my-pc"), ONLINE_S)
        took = guest.wait_console("is online; its page", 30)
        print(f"disk image: node online {took:.1f}s after qemu started")
        run_job_and_check_pay(hub, owner, node, guest)
    except BaseException:
        print(guest.console(200))
        raise
    finally:
        guest.stop()


@pytest.mark.timeout(600)
def test_initramfs_enrolls_from_the_kernel_command_line(
    test_image: Path, lan_hub: tuple[LocalHub, str], tmp_path: Path
) -> None:
    hub, url = lan_hub
    _, owner = hub.user("vm-owner")
    token = owner.enrollment_token()["token"]
    disk = tmp_path / "disk.img"  # unprovisioned: the node saves its identity there
    shutil.copy(test_image / "disk.img", disk)
    args = qemu_args_from_doc("boot-pc-initramfs")
    img = str(test_image)
    args = [a.replace("$IMAGE", img).replace("$HUB", url).replace("$TOKEN", token) for a in args]
    guest = Guest(tmp_path / "console.log", args, tmp_path)
    try:
        guest.wait_console("token from the kernel command line", ONLINE_S)
        took = guest.wait_console("is online; its page", ONLINE_S)
        print(f"initramfs: node online {took:.1f}s after qemu started")
        node = wait_for("the node online", lambda: next(iter(owner.nodes()), None), 10)
        assert node["arch"] == "x86_64" and node["state"] == "idle", node
        guest.wait_console(f"identity {node['id']} saved on the boot partition", 30)
        run_job_and_check_pay(hub, owner, node, guest)
    except BaseException:
        print(guest.console(200))
        raise
    finally:
        guest.stop()
    saved = board.read_file(disk, "deparrow/node.json")
    assert saved is not None, "the enrolled identity is not on the disk's boot partition"
    assert json.loads(saved)["node_id"] == node["id"]

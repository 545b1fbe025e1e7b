"""`deparrow board flash` and `deparrow board provision` on image files and real (loop) block
devices, and a node started from a provisioned identity joining a real hub."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from deparrow import board
from tests.conftest import Proc, start_hub, wait_until
from tests.images.conftest import run_doc

MTOOLS_ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}


def deparrow(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deparrow.cli", *args], input=stdin, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def make_disk(
    path: Path, label: str = "DPBOOT", board_json: dict[str, object] | None = None
) -> int:
    """A small MBR disk image with one FAT partition at 1 MiB, as the images have; returns
    the partition's offset."""
    part = path.with_suffix(".part")
    subprocess.run(
        ["mkfs.vfat", "-C", "-n", label, str(part), str(16 * 1024)], check=True,
        capture_output=True,
    )  # fmt: skip
    subprocess.run(["mmd", "-i", str(part), "::/deparrow"], check=True, env=MTOOLS_ENV)
    if board_json is not None:
        src = path.with_suffix(".board.json")
        src.write_text(json.dumps(board_json))
        subprocess.run(
            ["mcopy", "-i", str(part), str(src), "::/deparrow/board.json"], check=True,
            env=MTOOLS_ENV,
        )  # fmt: skip
    mbr = bytearray(512)
    sectors = part.stat().st_size // 512
    mbr[446:462] = struct.pack("<B3sB3sII", 0x80, b"\0\0\0", 0x0E, b"\0\0\0", 2048, sectors)
    mbr[510:512] = b"\x55\xaa"
    with open(path, "wb") as f:
        f.write(bytes(mbr).ljust(2048 * 512, b"\0"))
        f.write(part.read_bytes())
    part.unlink()
    return 2048 * 512


def mtype(image: Path, offset: int, name: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["mtype", "-i", f"{image}@@{offset}", f"::/{name}"], capture_output=True, text=True,
        env=MTOOLS_ENV,
    )  # fmt: skip


# --- provision ---------------------------------------------------------------------------
def test_provision_writes_identity_and_wifi_and_the_node_joins(
    tmp_path: Path, mosquitto: str
) -> None:
    hub = start_hub(tmp_path, mqtt_url=mosquitto)
    try:
        _, owner = hub.user("owner")
        img = tmp_path / "sdcard.img"
        offset = make_disk(img, board_json={"board": "picoclaw", "arch": "riscv64",
                                            "cpu": 1, "memory_mb": 256})  # fmt: skip
        token = owner.enrollment_token()["token"]
        # docs/install.md's command, verbatim
        out = run_doc("provision-board", tmp_path, {"HUB": hub.url, "TOKEN": token})
        assert out.returncode == 0, out.stderr
        assert "written to partition 1 (DPBOOT)" in out.stdout
        assert "deparrow/node.json, deparrow/wifi.json" in out.stdout
        node_json = json.loads(mtype(img, offset, "deparrow/node.json").stdout)
        assert node_json["hub"] == hub.url and node_json["node_id"].startswith("n_")
        assert set(node_json) == {"hub", "node_id", "node_secret", "owner", "mqtt",
                                  "heartbeat_interval_s"}  # fmt: skip
        wifi = json.loads(mtype(img, offset, "deparrow/wifi.json").stdout)
        assert wifi == {"ssid": "MyWifi", "psk": "my passphrase"}
        # enrolled as the image's board says
        (node,) = owner.nodes()
        assert (node["name"], node["arch"], node["memory_mb"]) == ("nano-1", "riscv64", 256)
        # a node started from that identity alone joins the hub and comes online
        data = tmp_path / "board-data"
        data.mkdir()
        (data / "node.json").write_text(json.dumps(node_json))
        proc = Proc(
            [sys.executable, "-m", "edge.cli", "--data-dir", str(data), "--dashboard-port", "0"],
            tmp_path / "board-node.log",
        )
        try:
            wait_until(
                "the provisioned node online",
                lambda: owner.nodes()[0]["state"] == "idle" and owner.nodes()[0]["last_seen"],
                30, [proc],
            )  # fmt: skip
        finally:
            proc.stop()
        # provisioning again replaces the identity and says so
        again = deparrow(
            "board", "provision", str(img), "--hub", hub.url, "--token",
            owner.enrollment_token()["token"], "--json",
        )  # fmt: skip
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["replaced"] == node_json["node_id"]
    finally:
        hub.stop()


def test_provision_refuses_bad_input_before_spending_the_token(
    tmp_path: Path, mosquitto: str
) -> None:
    hub = start_hub(tmp_path, mqtt_url=mosquitto)
    try:
        _, owner = hub.user("owner")
        token = owner.enrollment_token()["token"]
        junk = tmp_path / "junk.img"
        junk.write_bytes(os.urandom(4096))
        out = deparrow("board", "provision", str(junk), "--hub", hub.url, "--token", token)
        assert out.returncode == 1
        assert "is not a disk image" in out.stderr
        img = tmp_path / "disk.img"
        make_disk(img)
        bad_wifi = deparrow("board", "provision", str(img), "--hub", hub.url, "--token", token,
                            "--wifi-ssid", "x", "--wifi-psk", "short")  # fmt: skip
        assert bad_wifi.returncode == 1 and "8 to 63 characters" in bad_wifi.stderr
        wrong = deparrow("board", "provision", str(img), "--hub", hub.url, "--token", "dpe_nope")
        assert wrong.returncode == 1 and "the hub refused enrollment (401)" in wrong.stderr
        assert board.read_file(img, "deparrow/node.json") is None
        # the token was not spent by the refusals above
        ok = deparrow("board", "provision", str(img), "--hub", hub.url, "--token", token)
        assert ok.returncode == 0, ok.stderr
    finally:
        hub.stop()


# --- flash -------------------------------------------------------------------------------
def test_flash_to_a_file_asks_first_and_writes_the_image(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    make_disk(img)
    target = tmp_path / "card.bin"
    target.write_bytes(b"precious")
    no = deparrow("board", "flash", str(img), str(target), stdin="n\n")
    assert no.returncode == 1 and "nothing written" in no.stderr
    assert f"target: {target} (a file)" in no.stderr
    assert target.read_bytes() == b"precious"
    yes = deparrow("board", "flash", str(img), str(target), stdin="y\n")
    assert yes.returncode == 0, yes.stderr
    assert "100%" in yes.stderr and "written, synced and read back" in yes.stderr
    assert target.read_bytes() == img.read_bytes()


@contextlib.contextmanager
def loop_device(backing: Path) -> Iterator[Path]:
    losetup = shutil.which("losetup") or "/sbin/losetup"
    args = [losetup, "--find", "--show", str(backing)]
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.fail(f"the flash tests need loop devices (root, losetup): {out.stderr.strip()}")
    dev = Path(out.stdout.strip())
    try:
        yield dev
    finally:
        subprocess.run([losetup, "--detach", str(dev)], capture_output=True)


def test_flash_to_block_devices_names_them_and_refuses_unsafe_ones(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    make_disk(img)
    size = img.stat().st_size
    big, small = tmp_path / "big.bin", tmp_path / "small.bin"
    for f, n in ((big, size + (4 << 20)), (small, size - (1 << 20))):
        with open(f, "wb") as fh:
            fh.truncate(n)
    with loop_device(big) as dev:
        ok = deparrow("board", "flash", str(img), str(dev), "--yes")
        assert ok.returncode == 0, ok.stderr
        assert f"target: {dev}: 21.0 MiB, loop device on {big}" in ok.stderr
        with open(dev, "rb") as f:
            assert f.read(size) == img.read_bytes()
    with loop_device(small) as dev:
        out = deparrow("board", "flash", str(img), str(dev), "--yes")
        assert out.returncode == 2
        assert f"{dev} is too small: 16.0 MiB for an image of 17.0 MiB" in out.stderr
    # a mounted disk (ext2: e2fsprogs is in every Debian, and every kernel mounts it)
    fs = tmp_path / "fs.bin"
    with open(fs, "wb") as fh:
        fh.truncate(32 << 20)
    mkfs = shutil.which("mkfs.ext2") or "/sbin/mkfs.ext2"
    subprocess.run([mkfs, "-q", "-F", str(fs)], check=True, capture_output=True)
    with loop_device(fs) as dev:
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        mounted = subprocess.run(["mount", str(dev), str(mnt)], capture_output=True)
        assert mounted.returncode == 0, mounted.stderr
        try:
            out = deparrow("board", "flash", str(img), str(dev), "--yes")
            assert out.returncode == 2
            assert f"is mounted ({dev} on {mnt}); unmount it first" in out.stderr
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    # the disk this system runs from, where there is one
    root = os.stat("/").st_dev
    disk = Path(f"/sys/dev/block/{os.major(root)}:{os.minor(root)}")
    if disk.exists():
        name = disk.resolve().parent.name if (disk / "partition").exists() else disk.resolve().name
        out = deparrow("board", "flash", str(img), f"/dev/{name}", "--yes")
        assert out.returncode == 2
        assert "holds the running system" in out.stderr or "is mounted" in out.stderr


def test_provision_finds_the_dpboot_partition_of_a_gpt_disk(tmp_path: Path, mosquitto: str) -> None:
    """A GPT disk (as UEFI images have) with an EFI system partition first: the identity goes
    to the partition labelled DPBOOT, found from the GPT entries."""
    parts = []
    for label in ("EFI", "DPBOOT"):
        p = tmp_path / f"{label}.part"
        subprocess.run(["mkfs.vfat", "-C", "-n", label, str(p), str(8 * 1024)], check=True,
                       capture_output=True)  # fmt: skip
        parts.append(p)
    esp = bytes.fromhex("28732ac11ff8d211ba4b00a0c93ec93b")  # EFI system (mixed-endian)
    basic = bytes.fromhex("a2a0d0ebe5b9334487c068b6b72699c7")  # Microsoft basic data
    entries = bytearray(128 * 128)
    lba = 2048
    starts = []
    for i, (p, kind) in enumerate(zip(parts, (esp, basic), strict=True)):
        n = p.stat().st_size // 512
        struct.pack_into("<16s16sQQ", entries, i * 128, kind, os.urandom(16), lba, lba + n - 1)
        starts.append(lba)
        lba += n
    header = bytearray(512)
    header[:8] = b"EFI PART"
    struct.pack_into("<QII", header, 72, 2, 128, 128)  # entries at LBA 2: 128 of 128 bytes
    mbr = bytearray(512)
    mbr[446:462] = struct.pack("<B3sB3sII", 0, b"\0\0\0", 0xEE, b"\0\0\0", 1, 0xFFFFFFFF)
    mbr[510:512] = b"\x55\xaa"
    img = tmp_path / "gpt.img"
    with open(img, "wb") as f:
        f.write(mbr + header + entries)
        for p, start in zip(parts, starts, strict=True):
            f.seek(start * 512)
            f.write(p.read_bytes())
    assert [p.label for p in board.partitions(img)] == ["EFI", "DPBOOT"]
    part = board.boot_partition(img)
    assert (part.index, part.label, part.offset) == (2, "DPBOOT", starts[1] * 512)
    hub = start_hub(tmp_path, mqtt_url=mosquitto)
    try:
        _, owner = hub.user("owner")
        token = owner.enrollment_token()["token"]
        out = deparrow("board", "provision", str(img), "--hub", hub.url, "--token", token)
        assert out.returncode == 0, out.stderr
        assert "written to partition 2 (DPBOOT)" in out.stdout
        node_json = json.loads(mtype(img, starts[1] * 512, "deparrow/node.json").stdout)
        assert node_json["node_id"] == owner.nodes()[0]["id"]
        assert mtype(img, starts[0] * 512, "deparrow/node.json").returncode != 0
    finally:
        hub.stop()

"""Boards and images: write an image to an SD card or USB stick, and provision an image (enroll
the board with a hub and put its identity on the image's FAT boot partition).

`deparrow board flash` and `deparrow board provision` are thin layers over this module. The
boot partition is found from the image's own partition table (MBR or GPT) and written with
mtools at that offset, so nothing is mounted. What goes there is the contract every DEparrow
image reads at boot (buildroot/board/common/rootfs-overlay/usr/sbin/deparrow-boot):
`deparrow/node.json` (the file `edge-run` writes at enrollment), `deparrow/wifi.json`, and the
image's own `deparrow/board.json` says which board it is for.

An https:// hub with its own CA (`deparrow hub --tls`, docs/tls.md) is pinned as `edge-run`
pins it: `--ca sha256:...` fetches the CA and keeps it only if it has that fingerprint (or
`--ca FILE` gives it); enrollment verifies the hub with it, and it goes on the image as
`deparrow/ca.pem`, which node.json names ("ca") at the path the booted board reads it from.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import stat
import struct
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.enroll import EnrollError, fetch_ca_pem, is_pin, pem_fingerprint, read_ca_pem
from edge.enroll import enroll as request_enrollment

SECTOR = 512
CHUNK = 4 * 1024 * 1024
FAT_MBR_TYPES = {0x01, 0x04, 0x06, 0x0B, 0x0C, 0x0E, 0xEF}
FAT_GPT_TYPES = {
    "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7",  # Microsoft basic data
    "c12a7328-f81f-11d2-ba4b-00a0c93ec93b",  # EFI system partition
}
BOOT_LABEL = "DPBOOT"
CA_FILE = "deparrow/ca.pem"
# Where the booted board reads the CA: deparrow-boot mounts the boot partition on /boot
# (DEPARROW_BOOT_MNT) and keeps it mounted while the node runs, and copies node.json, which
# names this path, beside the node's other files.
BOARD_CA_PATH = "/boot/" + CA_FILE
# What a board offers when its image does not say (deparrow/board.json) and no option does.
DEFAULT_BOARD = {"arch": "x86_64", "cpu": 1.0, "memory_mb": 256, "engines": ["wasm"]}


class BoardError(Exception):
    """Something about the image, the target or the hub that stops the command; the message
    says what and what to do."""


# --- partitions ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Partition:
    index: int  # 1-based, as the OS names it (sdb1); 0 for a partition-less FAT image
    offset: int  # bytes
    size: int  # bytes
    label: str

    def describe(self) -> str:
        where = f"partition {self.index}" if self.index else "the whole image"
        label = f" ({self.label})" if self.label else ""
        return f"{where}{label} at {self.offset} bytes, {human(self.size)}"


def _fat_label(boot: bytes) -> str | None:
    """The volume label of a FAT boot sector; None when the sector is not FAT."""
    if len(boot) < SECTOR or boot[510:512] != b"\x55\xaa":
        return None
    bytes_per_sector = struct.unpack_from("<H", boot, 11)[0]
    if bytes_per_sector not in (512, 1024, 2048, 4096) or boot[13] == 0:
        return None
    if boot[82:87] == b"FAT32":
        return boot[71:82].decode("ascii", "replace").strip()
    if boot[54:59] in (b"FAT12", b"FAT16", b"FAT  "):
        return boot[43:54].decode("ascii", "replace").strip()
    return None


def partitions(image: Path) -> list[Partition]:
    """The FAT partitions of a disk image (MBR or GPT), or the image itself when it is one
    FAT file system without a partition table."""
    with open(image, "rb") as f:
        mbr = f.read(SECTOR)

        def fat_at(index: int, offset: int, size: int) -> Partition | None:
            f.seek(offset)
            label = _fat_label(f.read(SECTOR))
            return None if label is None else Partition(index, offset, size, label)

        if len(mbr) < SECTOR or mbr[510:512] != b"\x55\xaa":
            raise BoardError(f"{image} is not a disk image: it has no boot sector signature")
        whole = _fat_label(mbr)
        if whole is not None:
            return [Partition(0, 0, image.stat().st_size, whole)]
        entries = [struct.unpack_from("<B3xB3xII", mbr, 446 + 16 * i) for i in range(4)]
        found: list[Partition] = []
        if any(kind == 0xEE for _, kind, _, _ in entries):
            f.seek(SECTOR)
            hdr = f.read(92)
            if hdr[:8] != b"EFI PART":
                raise BoardError(f"{image}: protective MBR but no GPT header")
            entries_lba, count, entry_size = struct.unpack_from("<QII", hdr, 72)
            f.seek(entries_lba * SECTOR)
            table = f.read(count * entry_size)
            for i in range(count):
                e = table[i * entry_size : (i + 1) * entry_size]
                type_guid = _guid(e[:16])
                first, last = struct.unpack_from("<QQ", e, 32)
                if type_guid in FAT_GPT_TYPES:
                    p = fat_at(i + 1, first * SECTOR, (last - first + 1) * SECTOR)
                    if p:
                        found.append(p)
            return found
        for i, (_, kind, start, sectors) in enumerate(entries):
            if kind in FAT_MBR_TYPES and sectors:
                p = fat_at(i + 1, start * SECTOR, sectors * SECTOR)
                if p:
                    found.append(p)
    return found


def _guid(raw: bytes) -> str:
    a, b, c = struct.unpack_from("<IHH", raw)
    return f"{a:08x}-{b:04x}-{c:04x}-{raw[8:10].hex()}-{raw[10:16].hex()}"


def boot_partition(image: Path) -> Partition:
    """The FAT partition the node reads at boot: the one labelled DPBOOT, else the first."""
    if not image.is_file():
        raise BoardError(f"{image}: no such image file")
    found = partitions(image)
    if not found:
        raise BoardError(
            f"{image} has no FAT partition: is it a DEparrow image? (the boot partition "
            "holds the kernel and deparrow/)"
        )
    return next((p for p in found if p.label.upper() == BOOT_LABEL), found[0])


# --- mtools --------------------------------------------------------------------------------
def _mtools(
    tool: str, image: Path, part: Partition, *args: str
) -> subprocess.CompletedProcess[str]:
    exe = shutil.which(tool)
    if exe is None:
        raise BoardError(f"{tool} is missing: install mtools (apt-get install mtools)")
    spec = f"{image}@@{part.offset}"
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "MTOOLS_NO_VFAT": "0"}
    return subprocess.run(
        [exe, "-i", spec, *args], capture_output=True, text=True, env=env, timeout=60
    )


def read_file(image: Path, name: str, part: Partition | None = None) -> str | None:
    """A file of the boot partition (e.g. "deparrow/node.json"), or None when it is absent."""
    part = part or boot_partition(image)
    out = _mtools("mtype", image, part, f"::/{name}")
    return out.stdout if out.returncode == 0 else None


def write_file(image: Path, name: str, data: bytes, part: Partition | None = None) -> None:
    part = part or boot_partition(image)
    folder = name.rsplit("/", 1)[0] if "/" in name else ""
    if folder and _mtools("mdir", image, part, f"::/{folder}").returncode != 0:
        made = _mtools("mmd", image, part, f"::/{folder}")
        if made.returncode != 0:
            raise BoardError(f"cannot create {folder}/ on {image}: {made.stderr.strip()}")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "file"
        src.write_bytes(data)
        out = _mtools("mcopy", image, part, "-o", str(src), f"::/{name}")
    if out.returncode != 0:
        raise BoardError(f"cannot write {name} on {image}: {out.stderr.strip()}")


def delete_file(image: Path, name: str, part: Partition | None = None) -> bool:
    part = part or boot_partition(image)
    return _mtools("mdel", image, part, f"::/{name}").returncode == 0


# --- provision -----------------------------------------------------------------------------
def board_profile(image: Path, part: Partition | None = None) -> dict[str, Any]:
    """What the image says about its board (deparrow/board.json), over the defaults."""
    text = read_file(image, "deparrow/board.json", part)
    if text is None:
        return dict(DEFAULT_BOARD)
    try:
        data = json.loads(text)
    except ValueError as e:
        raise BoardError(f"{image}: deparrow/board.json is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise BoardError(f"{image}: deparrow/board.json must hold a JSON object")
    return {**DEFAULT_BOARD, **data}


def check_wifi(ssid: str, psk: str | None) -> dict[str, str]:
    if not 1 <= len(ssid.encode()) <= 32:
        raise BoardError("--wifi-ssid must be 1 to 32 bytes")
    if psk is not None and not 8 <= len(psk) <= 63:
        raise BoardError("--wifi-psk must be 8 to 63 characters (leave it out for an open network)")
    if '"' in ssid + (psk or "") or any(ord(c) < 32 for c in ssid + (psk or "")):
        raise BoardError("--wifi-ssid and --wifi-psk cannot contain quotes or control characters")
    return {"ssid": ssid, "psk": psk or ""}


def hub_ca(hub: str, ca: str, timeout_s: float = 15.0) -> str:
    """The PEM of the CA the board will pin: fetched from the hub and kept only if it has the
    fingerprint ca names ("sha256:..."), or read from the file ca. BoardError otherwise."""
    if not hub.lower().startswith("https://"):
        raise BoardError(f"--ca is the CA of an https:// hub; {hub} is not one")
    if is_pin(ca):
        try:
            return fetch_ca_pem(hub, ca, timeout_s)
        except EnrollError as e:
            raise BoardError(str(e)) from None
    try:
        return read_ca_pem(ca)
    except EnrollError as e:
        raise BoardError(str(e)) from None


def enroll(
    hub: str,
    token: str,
    name: str,
    profile: dict[str, Any],
    timeout_s: float = 15.0,
    ca_pem: str | None = None,
) -> dict[str, Any]:
    """POST /api/v1/nodes/enroll as edge-run does; returns the node.json the board will use.
    ca_pem: the CA (PEM) an https:// hub is verified with; node.json then names the path the
    board finds it at (BOARD_CA_PATH). Without it, the system's CAs."""
    if not hub.startswith(("http://", "https://")):
        raise BoardError(f"--hub must be an http:// or https:// URL, not {hub!r}")
    if not token.startswith("dpe_"):
        raise BoardError("--token must be an enrollment token (dpe_...): 'deparrow node token'")
    body = {
        "token": token,
        "name": name,
        "engines": list(profile.get("engines") or ["wasm"]),
        "arch": str(profile["arch"]),
        "cpu": float(profile["cpu"]),
        "memory_mb": int(profile["memory_mb"]),
    }
    try:
        if ca_pem is None:
            return request_enrollment(hub, body, timeout_s)
        with tempfile.TemporaryDirectory() as tmp:
            ca_file = Path(tmp) / "ca.pem"
            ca_file.write_text(ca_pem)
            config = request_enrollment(hub, body, timeout_s, ca=str(ca_file))
    except EnrollError as e:
        raise BoardError(str(e)) from None
    config["ca"] = BOARD_CA_PATH
    return config


@dataclass(frozen=True)
class Provisioned:
    node_id: str
    owner: str
    partition: Partition
    files: list[str]
    replaced: str | None  # the node id that was on the image before, if any
    ca: str | None = None  # the fingerprint of the CA the board pins (deparrow/ca.pem)


def provision(
    image: Path,
    hub: str,
    token: str,
    name: str | None = None,
    wifi: dict[str, str] | None = None,
    arch: str | None = None,
    cpu: float | None = None,
    memory_mb: int | None = None,
    ca: str | None = None,
) -> Provisioned:
    """Enroll a board with the hub and write its identity onto the image's boot partition.
    ca: the hub's CA to pin (a PEM file or "sha256:..."), written on the image beside the
    identity."""
    part = boot_partition(image)  # before enrolling: a wrong file must not cost a token
    profile = board_profile(image, part)
    for key, value in (("arch", arch), ("cpu", cpu), ("memory_mb", memory_mb)):
        if value is not None:
            profile[key] = value
    old = read_file(image, "deparrow/node.json", part)
    replaced = None
    if old:
        try:
            replaced = str(json.loads(old).get("node_id"))
        except ValueError:
            replaced = "an unreadable identity"
    node_name = name or f"{profile.get('board') or 'board'}-{secrets.token_hex(2)}"
    ca_pem = hub_ca(hub, ca) if ca is not None else None  # a wrong pin costs no token either
    config = enroll(hub, token, node_name, profile, ca_pem=ca_pem)
    files = ["deparrow/node.json"]
    if ca_pem is not None:
        write_file(image, CA_FILE, ca_pem.encode(), part)  # before the identity that names it
        files.append(CA_FILE)
    else:
        delete_file(image, CA_FILE, part)  # a CA of an earlier provisioning pins nothing now
    write_file(image, "deparrow/node.json", (json.dumps(config, indent=2) + "\n").encode(), part)
    if wifi is not None:
        write_file(image, "deparrow/wifi.json", (json.dumps(wifi) + "\n").encode(), part)
        files.append("deparrow/wifi.json")
    delete_file(image, "deparrow/enroll.json", part)  # the identity supersedes a token
    fingerprint = pem_fingerprint(ca_pem) if ca_pem is not None else None
    return Provisioned(config["node_id"], config["owner"], part, files, replaced, fingerprint)


# --- flash ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    path: Path
    kind: str  # "block device" | "file"
    size: int | None  # bytes; None for a file (it grows)
    model: str
    removable: bool

    def describe(self) -> str:
        if self.kind == "file":
            return f"{self.path} (a file)"
        extra = f", {self.model}" if self.model else ""
        rem = ", removable" if self.removable else ""
        return f"{self.path}: {human(self.size or 0)}{extra}{rem}"


def human(n: int) -> str:
    size = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} bytes"  # pragma: no cover


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _mounted_devices(mountinfo: Path) -> dict[str, str]:
    """major:minor -> mount point, for every mounted file system."""
    out: dict[str, str] = {}
    for line in _read(mountinfo).splitlines():
        fields = line.split()
        if len(fields) > 4:
            out.setdefault(fields[2], fields[4])
    return out


def _swaps(swaps: Path) -> set[str]:
    names = set()
    for line in _read(swaps).splitlines()[1:]:
        if line.split():
            names.add(os.path.basename(line.split()[0]))
    return names


def inspect_target(
    target: Path, sys_root: Path = Path("/sys"), proc_root: Path = Path("/proc")
) -> Target:
    """Describe a flash target and refuse the unsafe ones: a partition instead of a disk, a
    mounted disk, a swap disk, the disk the running system lives on, a disk in use by the
    device mapper or RAID."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        if target.parent.is_dir() and not str(target).startswith("/dev/"):
            return Target(target, "file", None, "", False)
        raise BoardError(f"{target}: no such device or file") from None
    if stat.S_ISREG(st.st_mode):
        return Target(target, "file", None, "", False)
    if not stat.S_ISBLK(st.st_mode):
        raise BoardError(f"{target} is neither a block device nor a regular file")
    majmin = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    dev_dir = (sys_root / "dev" / "block" / majmin).resolve()
    if (dev_dir / "partition").exists():
        disk = dev_dir.parent.name
        raise BoardError(
            f"{target} is a partition; name the whole disk (/dev/{disk}): the image carries "
            "its own partition table"
        )
    name = dev_dir.name
    size = int(_read(dev_dir / "size") or 0) * SECTOR
    model = " ".join(
        v for v in (_read(dev_dir / "device" / "vendor"), _read(dev_dir / "device" / "model")) if v
    )
    if not model and _read(dev_dir / "loop" / "backing_file"):
        model = "loop device on " + _read(dev_dir / "loop" / "backing_file")
    removable = _read(dev_dir / "removable") == "1"
    # the disk and every partition of it
    devs = {majmin: name}
    for part_dir in dev_dir.iterdir() if dev_dir.is_dir() else []:
        if (part_dir / "partition").exists():
            devs[_read(part_dir / "dev")] = part_dir.name
    mounted = _mounted_devices(proc_root / "self" / "mountinfo")
    root_dev = os.stat("/").st_dev
    root_majmin = f"{os.major(root_dev)}:{os.minor(root_dev)}"
    if root_majmin in devs:
        raise BoardError(f"{target} holds the running system (/); refusing to overwrite it")
    for mm, part_name in devs.items():
        if mm in mounted:
            raise BoardError(
                f"{target} is mounted (/dev/{part_name} on {mounted[mm]}); unmount it first "
                f"(umount {mounted[mm]})"
            )
    swapping = _swaps(proc_root / "swaps") & set(devs.values())
    if swapping:
        raise BoardError(f"{target} is in use as swap (/dev/{sorted(swapping)[0]}); swapoff first")
    for part_name in devs.values():
        holders = sys_root / "class" / "block" / part_name / "holders"
        if holders.is_dir() and any(holders.iterdir()):
            raise BoardError(
                f"{target} is in use by {', '.join(p.name for p in holders.iterdir())} "
                "(LVM, RAID or encryption); refusing to overwrite it"
            )
    return Target(target, "block device", size, model, removable)


def check_fits(image: Path, target: Target) -> int:
    if not image.is_file():
        raise BoardError(f"{image}: no such image file")
    size = image.stat().st_size
    if size == 0:
        raise BoardError(f"{image} is empty")
    if target.size is not None and target.size < size:
        raise BoardError(
            f"{target.path} is too small: {human(target.size)} for an image of {human(size)}"
        )
    return size


def flash(
    image: Path,
    target: Target,
    progress: Callable[[int, int], None] | None = None,
    verify: bool = True,
) -> str:
    """Write the image to the target, fsync it, read it back; returns the image's sha256."""
    total = check_fits(image, target)
    flags = os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
    if target.kind == "file":
        flags |= os.O_CREAT | os.O_TRUNC
    else:
        flags |= os.O_EXCL  # Linux: EBUSY when the device is mounted after all
    try:
        fd = os.open(target.path, flags, 0o644)
    except OSError as e:
        raise BoardError(f"cannot open {target.path} for writing: {e.strerror}") from None
    digest = hashlib.sha256()
    done = 0
    try:
        with open(image, "rb") as src:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                view = memoryview(chunk)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                done += len(chunk)
                if progress:
                    progress(done, total)
        os.fsync(fd)
    except OSError as e:
        raise BoardError(
            f"writing {target.path} failed after {human(done)}: {e.strerror}"
        ) from None
    finally:
        os.close(fd)
    if verify:
        check = hashlib.sha256()
        with open(target.path, "rb") as back:
            left = total
            while left:
                chunk = back.read(min(CHUNK, left))
                if not chunk:
                    break
                check.update(chunk)
                left -= len(chunk)
        if check.hexdigest() != digest.hexdigest():
            raise BoardError(
                f"{target.path} does not read back what was written: the card or stick may be "
                "failing; try another"
            )
    return digest.hexdigest()

#!/usr/bin/env python3
"""Builds a DEparrow board image for an emulated aarch64 or riscv64 board from Debian parts,
with the Buildroot tree's overlay and init scripts and the MicroPython node.

    python tools/build-board-image.py --arch aarch64|riscv64 [--micropython FILE]
                                      [--cache DIR] [--kernel-deb FILE] [--json]

The board the issue calls "$10 boards": no CPython, the node is the `micropython` binary that
firmware/build.sh cross-builds from MicroPython's source (the edge core frozen in, the dpwasm3
wasm engine compiled in) and runs as `micropython -m edge.mp_main`. Around it, as
tools/build-test-image.py does for x86_64 (and with its code): Debian's kernel for the
architecture (linux-image-arm64's or linux-image-riscv64's, with the virtio, FAT and NLS
modules the overlay's deparrow-boot loads), busybox-static of that architecture as /bin/sh,
init and every small tool, the C library the binary links against (the cross toolchain's), and
the overlays buildroot/board/common/rootfs-overlay and buildroot/board/picoclaw/rootfs-overlay
(the small-board settings: one CPU, 128 MiB offered). The Debian packages are downloaded with
`apt-get download` (never installed: another architecture's busybox-static would replace this
machine's /bin/busybox); riscv64's come from Debian trixie (bookworm has none), through an apt
index of its own in the cache. Output, in a directory keyed by a hash of every input:

    vmlinuz       the kernel (qemu-system-ARCH -M virt -kernel)
    initrd.img    the root file system (gzip'd cpio), run from RAM
    boot.img      a FAT file system labelled DPBOOT with deparrow/board.json: attached as a
                  disk, it is the board's boot partition ('deparrow board provision' writes
                  its identity there, a node enrolled from the kernel command line saves it)
    manifest.json what went in

It prints the directory (or, with --json, the manifest). Without --micropython it runs
firmware/build.sh --unix --arch ARCH (cached there). Needs: arm64 added to dpkg and apt's index
(tools/install-image-deps.sh does both, and installs the rest), qemu-user-static (to list the
foreign busybox's applets), the cross compiler, mtools and dosfstools.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
BOARDS = ROOT / "buildroot" / "board"
FIRMWARE_BUILD = ROOT / "firmware" / "build.sh"


def _load_x86_builder() -> ModuleType:
    """tools/build-test-image.py: the Debian-parts code both images are made with."""
    path = Path(__file__).with_name("build-test-image.py")
    spec = importlib.util.spec_from_file_location("build_test_image", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


parts = _load_x86_builder()
BuildError = parts.BuildError


@dataclass(frozen=True)
class Arch:
    name: str  # uname -m, and the node's arch on the hub
    deb: str  # Debian's architecture
    triplet: str  # the cross toolchain's (aarch64-linux-gnu): CROSS_COMPILE and its sysroot
    qemu_user: str  # runs a binary of the architecture here
    console: str  # the kernel's serial console on qemu's virt machine
    board: dict[str, object]  # deparrow/board.json: what 'deparrow board provision' assumes
    # The Debian release the kernel and busybox come from when this machine's has none for
    # the architecture (bookworm has no riscv64; trixie, the next, does): its own apt index,
    # kept in the cache, this machine's apt sources untouched.
    suite: str | None = None


ARCHES = {
    "aarch64": Arch(
        name="aarch64", deb="arm64", triplet="aarch64-linux-gnu",
        qemu_user="qemu-aarch64-static", console="ttyAMA0",
        board={"board": "qemu-virt-aarch64", "arch": "aarch64", "cpu": 1, "memory_mb": 256,
               "engines": ["wasm"]},
    ),
    "riscv64": Arch(
        name="riscv64", deb="riscv64", triplet="riscv64-linux-gnu",
        qemu_user="qemu-riscv64-static", console="ttyS0",
        board={"board": "qemu-virt-riscv64", "arch": "riscv64", "cpu": 1, "memory_mb": 256,
               "engines": ["wasm"]},
        suite="trixie",
    ),
}  # fmt: skip
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
# The board's network card, disk, entropy and FAT (virtio on qemu's virt machine); Debian's
# arm64 kernel has them as modules, which deparrow-boot loads.
MODULES = (
    "virtio_pci", "virtio_mmio", "virtio_net", "virtio_blk", "virtio_rng",
    "vfat", "nls_cp437", "nls_ascii", "nls_iso8859_1", "nls_utf8",
)  # fmt: skip
OVERLAYS = (BOARDS / "common" / "rootfs-overlay", BOARDS / "picoclaw" / "rootfs-overlay")


def kernel_cmdline(arch: Arch) -> str:
    return f"console={arch.console} quiet"


# --- inputs ------------------------------------------------------------------------------
def apt_index(cache: Path, arch: Arch) -> tuple[str, ...]:
    """apt-get/apt-cache options for arch.suite's package index of arch, kept in
    cache/apt/SUITE-ARCH and fetched again when a week old; () for this machine's own index."""
    if arch.suite is None:
        return ()
    base = (cache / "apt" / f"{arch.suite}-{arch.deb}").resolve()
    opts = (
        f"-oDir::State={base}/state", f"-oDir::State::status={base}/state/status",
        f"-oDir::State::Lists={base}/lists", f"-oDir::Cache={base}/cache",
        f"-oDir::Etc::SourceList={base}/sources.list", f"-oDir::Etc::SourceParts={base}/none",
        f"-oDir::Etc::Preferences={base}/none", f"-oDir::Etc::PreferencesParts={base}/none",
        f"-oAPT::Architecture={arch.deb}", f"-oAPT::Architectures::={arch.deb}",
    )  # fmt: skip
    # apt dates the lists by the archive's own time, so this stamp says when we fetched them
    stamp = base / "fetched"
    fetched = stamp.exists() and any((base / "lists").glob("*_Packages*"))
    if fetched and time.time() - stamp.stat().st_mtime < 7 * 86400:  # trixie's kernel moves on
        return opts
    if not DEBIAN_KEYRING.exists():
        raise BuildError(f"{DEBIAN_KEYRING} is missing: apt-get install debian-archive-keyring")
    for d in ("state", "lists/partial", "cache/archives/partial"):
        (base / d).mkdir(parents=True, exist_ok=True)
    (base / "state" / "status").touch()
    (base / "sources.list").write_text(
        f"deb [arch={arch.deb} signed-by={DEBIAN_KEYRING}] {DEBIAN_MIRROR} {arch.suite} main\n"
    )
    print(f"build-board-image: fetching Debian {arch.suite}'s {arch.deb} package index",
          file=sys.stderr)  # fmt: skip
    got = subprocess.run(["apt-get", *opts, "update"], capture_output=True, text=True)
    if got.returncode == 0 and any((base / "lists").glob("*_Packages*")):
        stamp.touch()
    elif fetched:  # offline: the old index still names the debs, which may be cached
        print(f"build-board-image: keeping the old index: {got.stderr.strip()[-200:]}",
              file=sys.stderr)  # fmt: skip
    else:
        raise BuildError(
            f"apt-get update of Debian {arch.suite} ({arch.deb}) failed: "
            f"{got.stderr.strip()[-400:]}"
        )
    return opts


def micropython_binary(arch: Arch, given: Path | None) -> Path:
    """The node: --micropython, or firmware/build.sh's cross build for the architecture."""
    if given is not None:
        if not given.is_file():
            raise BuildError(f"--micropython {given}: no such file")
        return given
    if not FIRMWARE_BUILD.exists():
        raise BuildError(f"{FIRMWARE_BUILD} is missing; pass --micropython FILE")
    got = subprocess.run(
        [str(FIRMWARE_BUILD), "--unix", "--arch", arch.name],
        capture_output=True, text=True,
    )  # fmt: skip
    path = Path(got.stdout.strip().splitlines()[-1]) if got.stdout.strip() else None
    if got.returncode != 0 or path is None or not path.is_file():
        raise BuildError(
            f"firmware/build.sh --unix --arch {arch.name} failed: {got.stderr.strip()[-600:]}"
        )
    return path


def elf_needs(binary: Path) -> tuple[str | None, list[str]]:
    """(program interpreter, NEEDED libraries) of an ELF file of any architecture."""
    readelf = parts.need("readelf", "binutils")
    heads = subprocess.run([readelf, "-lW", str(binary)], capture_output=True, text=True).stdout
    m = re.search(r"Requesting program interpreter: (\S+?)\]", heads)
    dyn = subprocess.run([readelf, "-dW", str(binary)], capture_output=True, text=True).stdout
    return (m.group(1) if m else None), re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dyn)


def runtime_libs(arch: Arch, binary: Path) -> dict[str, Path]:
    """Image path -> file: the binary's loader and libraries (and theirs), from the cross
    toolchain's sysroot (libc6-ARCH-cross: the C library it was linked against)."""
    sysroot = Path("/usr") / arch.triplet / "lib"
    out: dict[str, Path] = {}
    todo = [binary]
    while todo:
        interp, needed = elf_needs(todo.pop())
        if interp and interp not in out:
            src = sysroot / Path(interp).name
            if not src.exists():
                raise BuildError(f"{src} is missing: apt-get install gcc-{arch.triplet}")
            out[interp] = src
        for name in needed:
            if f"/lib/{name}" in out:
                continue
            src = sysroot / name
            if not src.exists():
                raise BuildError(
                    f"{binary.name} needs {name}, which is not in {sysroot}: link it statically, "
                    f"or apt-get install gcc-{arch.triplet}"
                )
            out[f"/lib/{name}"] = src
            todo.append(src)
    return out


def inputs_key(arch: Arch, kernel: Path, busybox: Path, mp: Path, libs: dict[str, Path]) -> str:
    h = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        h.update(label.encode() + b"\0" + hashlib.sha256(data).digest())

    add("builder", Path(__file__).read_bytes())
    add("parts", Path(parts.__file__).read_bytes())
    add("arch", json.dumps(arch.__dict__, sort_keys=True).encode())
    for base in OVERLAYS:
        for p in sorted(base.rglob("*")):
            if p.is_file():
                add(f"{p.relative_to(ROOT)}:{p.stat().st_mode & 0o777:o}", p.read_bytes())
    for deb in (kernel, busybox):
        add("deb", deb.name.encode() + str(deb.stat().st_size).encode())
    add("micropython", parts.sha256_file(mp).encode())
    for dst, src in sorted(libs.items()):
        add(dst, parts.sha256_file(src).encode())
    return h.hexdigest()[:16]


# --- the image ---------------------------------------------------------------------------
def make_boot_fat(out: Path, arch: Arch) -> None:
    """The board's boot partition as a FAT image of its own (no partition table: qemu attaches
    it as a disk, 'deparrow board provision' and deparrow-boot both take that)."""
    mkfs = parts.need("mkfs.vfat", "dosfstools")
    mcopy = parts.need("mcopy", "mtools")
    mmd = parts.need("mmd", "mtools")
    subprocess.run(
        [mkfs, "-C", "-n", "DPBOOT", "-i", "44504250", str(out), str(8 * 1024)],
        check=True, capture_output=True,
    )  # fmt: skip
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    work = out.parent
    (work / "board.json").write_text(json.dumps(arch.board, indent=2) + "\n")
    (work / "README.txt").write_text(
        "DEparrow boot partition.\r\n\r\n"
        "deparrow/node.json    the node's identity ('deparrow board provision' writes it)\r\n"
        'deparrow/enroll.json  {"hub": URL, "token": "dpe_..."}: enroll at first boot\r\n'
    )
    subprocess.run([mmd, "-i", str(out), "::/deparrow"], check=True, env=env)
    for name in ("board.json", "README.txt"):
        subprocess.run(
            [mcopy, "-i", str(out), str(work / name), f"::/deparrow/{name}"], check=True, env=env
        )
        (work / name).unlink()


def build(arch: Arch, cache: Path, kernel: Path, mp: Path) -> Path:
    busybox_deb = parts.package_deb(cache, "busybox-static", arch.deb, apt_index(cache, arch))
    libs = runtime_libs(arch, mp)
    key = inputs_key(arch, kernel, busybox_deb, mp, libs)
    final = cache / f"{arch.name}-{key}"
    if (final / "manifest.json").exists():
        return final
    qemu_user = parts.need(arch.qemu_user, "qemu-user-static")
    started = time.monotonic()
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{arch.name}-{key}.", dir=cache))
    try:
        tree, bb = work / "kernel", work / "busybox"
        subprocess.run(["dpkg-deb", "-x", str(kernel), str(tree)], check=True)
        subprocess.run(["dpkg-deb", "-x", str(busybox_deb), str(bb)], check=True)
        # vmlinuz (arm64: a gzip'd Image) or vmlinux (riscv64: an Image with an EFI stub)
        vmlinuz = next((tree / "boot").glob("vmlinu[xz]-*"))
        root = work / "root"
        parts.add_skeleton(root)
        # /bin/busybox, or /usr/bin/busybox in releases with a merged /usr (trixie)
        busybox = next(p for p in (bb / "bin" / "busybox", bb / "usr" / "bin" / "busybox")
                       if p.exists())  # fmt: skip
        parts.add_busybox(root, busybox, (qemu_user,))
        parts.copy(mp, root / "usr" / "bin" / "micropython")
        (root / "usr" / "bin" / "micropython").chmod(0o755)
        for dst, src in libs.items():
            parts.copy(src, root / dst.lstrip("/"))
        kver = parts.add_modules(root, tree, MODULES)
        for overlay in OVERLAYS:
            parts.add_overlay(root, overlay)
        (root / "etc" / "os-release").write_text(
            f'NAME="DEparrow board image"\nID=deparrow\nPRETTY_NAME="DEparrow {arch.name} '
            'board (Debian parts, the Buildroot overlay, the MicroPython node)"\n'
        )
        out = work / "out"
        out.mkdir()
        shutil.copy2(vmlinuz, out / "vmlinuz")
        archive = parts.cpio(root, [("dev/console", stat.S_IFCHR | 0o600, 5, 1)])
        (out / "initrd.img").write_bytes(gzip.compress(archive, 6, mtime=0))
        make_boot_fat(out / "boot.img", arch)
        manifest = {
            "key": key,
            "arch": arch.name,
            "kernel": {"package": kernel.name, "version": kver},
            "busybox": busybox_deb.name,
            "micropython": {"source": str(mp), "sha256": parts.sha256_file(mp)},
            "libs": sorted(libs),
            "cmdline": kernel_cmdline(arch),
            "files": {
                name: {"bytes": (out / name).stat().st_size}
                for name in ("vmlinuz", "initrd.img", "boot.img")
            },
            "rootfs_bytes": len(archive),
            "build_s": round(time.monotonic() - started, 1),
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        try:
            out.rename(final)
        except OSError:  # another build finished first: theirs is as good
            if not (final / "manifest.json").exists():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=sorted(ARCHES), default="aarch64")
    ap.add_argument("--cache", type=Path, default=parts.default_cache(), help="cache directory")
    ap.add_argument("--kernel-deb", type=Path, default=None, help="a linux-image-*.deb")
    ap.add_argument(
        "--micropython", type=Path, default=None,
        help="the node binary (default: firmware/build.sh's cross build)",
    )  # fmt: skip
    ap.add_argument("--json", action="store_true", help="print the manifest")
    args = ap.parse_args(argv)
    arch = ARCHES[args.arch]

    def make() -> Path:
        apt = () if args.kernel_deb else apt_index(args.cache, arch)
        kernel = parts.kernel_deb(args.cache, args.kernel_deb, arch.deb, apt)
        return build(arch, args.cache, kernel, micropython_binary(arch, args.micropython))

    return int(parts.report("build-board-image", make, args.json))


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Builds the DEparrow x86_64 test image from Debian parts, with the Buildroot tree's overlay.

    python tools/build-test-image.py [--cache DIR] [--kernel-deb FILE] [--json]

Buildroot cannot be fetched here, so the boot test runs an image assembled from what Debian
has, around the very same rootfs overlay and init scripts (buildroot/board/common/
rootfs-overlay): the Debian kernel (linux-image-amd64's vmlinuz and a few modules),
busybox-static as /bin/sh, init and every small tool, the CPython running this script with the
edge (edge/, click, paho-mqtt, psutil, pywasm3) as edge-run. Output, in a directory keyed by a
hash of every input (so a rerun is instant):

    vmlinuz       the kernel
    initrd.img    the root file system (gzip'd cpio): the whole system runs from RAM, as a
                  USB stick or ISO image of this kind does
    disk.img      a raw disk a PC or a cloud VM boots: MBR, SYSLINUX, one FAT partition
                  (label DPBOOT) with the kernel, initrd.img and deparrow/ for the node's
                  identity ('deparrow board provision' writes there)
    manifest.json what went in

It prints the directory (or, with --json, the manifest). Needs: busybox-static, syslinux,
syslinux-common, mtools, dosfstools (tools/install-image-deps.sh installs them) and
apt-get to download the kernel package once (or --kernel-deb).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import lzma
import marshal
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OVERLAY = ROOT / "buildroot" / "board" / "common" / "rootfs-overlay"
BUSYBOX = Path("/bin/busybox")
SYSLINUX_BIOS = Path("/usr/lib/syslinux/modules/bios")
MBR_BIN = Path("/usr/lib/syslinux/mbr/mbr.bin")
# The distributions edge-run imports (pyproject.toml's dependencies that the edge uses).
EDGE_DISTS = ("click", "paho-mqtt", "psutil", "pywasm3")
# Drivers for qemu's and common PCs' disks and network cards, USB sticks and FAT.
MODULES = (
    "virtio_pci", "virtio_net", "virtio_blk", "e1000", "e1000e", "ata_piix", "ahci", "sd_mod",
    "vfat", "nls_cp437", "nls_ascii", "nls_iso8859_1", "nls_utf8",
)  # fmt: skip
STDLIB_SKIP = {
    "test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data",
    "distutils", "site-packages", "dist-packages", "venv", "unittest", "sqlite3",
}  # fmt: skip
BOARD = {"board": "pc-x86_64", "arch": "x86_64", "cpu": 1, "memory_mb": 512, "engines": ["wasm"]}
KERNEL_CMDLINE = "console=tty0 console=ttyS0,115200 quiet"


class BuildError(Exception):
    pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def need(tool: str, package: str) -> str:
    found = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
    if not found:
        raise BuildError(
            f"{tool} is missing: apt-get install {package} (tools/install-image-deps.sh)"
        )
    return found


# --- inputs ------------------------------------------------------------------------------
def kernel_deb(
    cache: Path, given: Path | None, arch: str = "amd64", apt: tuple[str, ...] = ()
) -> Path:
    """Debian's kernel for arch (a Debian architecture: amd64, arm64): the package that
    linux-image-ARCH depends on, downloaded once into cache/debs. apt: options for apt-get and
    apt-cache (another release's index)."""
    if given is not None:
        if not given.is_file():
            raise BuildError(f"--kernel-deb {given}: no such file")
        return given
    found = sorted((cache / "debs").glob(f"linux-image-*-{arch}_*_{arch}.deb"))
    if found:
        return found[-1]
    need("apt-get", "apt")
    meta = f"linux-image-{arch}" + ("" if arch == native_arch() else f":{arch}")
    dep = subprocess.run(["apt-cache", *apt, "depends", meta], capture_output=True, text=True)
    m = re.search(rf"Depends: (linux-image-[0-9][^\s:]*-{arch})", dep.stdout)
    if not m:
        raise BuildError(
            f"apt-cache does not know {meta}: run tools/install-image-deps.sh (it adds the "
            "architecture and runs apt-get update), or pass --kernel-deb"
        )
    return package_deb(cache, m.group(1), arch, apt)


def native_arch() -> str:
    out = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True)
    return out.stdout.strip() or "amd64"


def package_deb(cache: Path, package: str, arch: str, apt: tuple[str, ...] = ()) -> Path:
    """A Debian package's .deb for arch, downloaded once into cache/debs (not installed:
    another architecture's busybox-static would replace this machine's /bin/busybox)."""
    debs = cache / "debs"
    found = sorted(debs.glob(f"{package}_*_{arch}.deb"))
    if found:
        return found[-1]
    need("apt-get", "apt")
    debs.mkdir(parents=True, exist_ok=True)
    name = package if arch == native_arch() else f"{package}:{arch}"
    print(f"build-image: downloading {name} (once)", file=sys.stderr)
    got = subprocess.run(
        ["apt-get", *apt, "download", name], cwd=debs, capture_output=True, text=True
    )
    found = sorted(debs.glob(f"{package}_*_{arch}.deb"))
    if got.returncode != 0 or not found:
        hint = "" if arch == native_arch() else " (tools/install-image-deps.sh adds its arch)"
        raise BuildError(f"apt-get download {name} failed{hint}: {got.stderr.strip()[-300:]}")
    return found[-1]


def python_parts() -> dict[str, Path]:
    """The interpreter running this script, its standard library and lib-dynload."""
    exe = Path(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))
    stdlib = Path(os.__file__).resolve().parent
    dynload = next(
        (Path(p) for p in sys.path if p.endswith("lib-dynload") and Path(p).is_dir()), None
    )
    if dynload is None:
        raise BuildError("cannot find this Python's lib-dynload directory")
    return {"exe": exe, "stdlib": stdlib, "dynload": dynload}


def dist_files(name: str) -> list[tuple[Path, str]]:
    """(file on disk, path relative to site-packages) of an installed distribution's modules."""
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise BuildError(
            f"{name} is not installed in this Python ({sys.executable}): run it from the "
            "project's venv (pip install -e .)"
        ) from None
    out = []
    for f in dist.files or []:
        rel = str(f)
        if rel.startswith("..") or ".dist-info" in rel or "__pycache__" in rel:
            continue
        if not (rel.endswith(".py") or rel.endswith(".so") or rel.endswith(".typed")):
            continue
        out.append((Path(str(dist.locate_file(f))), rel))
    if not out:
        raise BuildError(f"{name}: no modules found in its installed files")
    return out


def inputs_key(deb: Path, py: dict[str, Path]) -> str:
    h = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        h.update(label.encode() + b"\0" + hashlib.sha256(data).digest())

    add("builder", Path(__file__).read_bytes())
    for base in (OVERLAY, ROOT / "edge"):
        for p in sorted(base.rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts and "native" not in p.parts:
                add(f"{p.relative_to(ROOT)}:{p.stat().st_mode & 0o777:o}", p.read_bytes())
    add("kernel", deb.name.encode() + str(deb.stat().st_size).encode())
    for p in (BUSYBOX, py["exe"], MBR_BIN, SYSLINUX_BIOS / "ldlinux.c32"):
        add(str(p), sha256_file(p).encode())
    add("python", sys.version.encode())
    for name in EDGE_DISTS:
        add(name, importlib.metadata.version(name).encode())
    return h.hexdigest()[:16]


# --- the root file system ----------------------------------------------------------------
def copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst, follow_symlinks=True)


def shared_libs(binaries: list[Path]) -> set[Path]:
    libs: set[Path] = set()
    for b in binaries:
        out = subprocess.run(["ldd", str(b)], capture_output=True, text=True).stdout
        for line in out.splitlines():
            m = re.search(r"(/\S+) \(0x", line)
            if m:
                libs.add(Path(m.group(1)))
    return libs


def strip_binaries(root: Path) -> None:
    """Debug symbols are most of an unstripped libpython; the image has no use for them."""
    strip = shutil.which("strip")
    if strip is None:
        return
    for p in root.rglob("*"):
        wanted = ".so" in p.name or p.parent.name == "bin"
        if wanted and p.is_file() and not p.is_symlink() and p.name != "busybox":
            with open(p, "rb") as f:
                elf = f.read(4) == b"\x7fELF"
            if elf:
                subprocess.run([strip, "--strip-unneeded", str(p)], capture_output=True)


def add_busybox(root: Path, busybox: Path = BUSYBOX, runner: tuple[str, ...] = ()) -> None:
    """busybox as /bin/busybox and a link for each applet; runner: what runs a busybox of
    another architecture here (qemu-user), to list its applets."""
    copy(busybox, root / "bin" / "busybox")
    applets = subprocess.run(
        [*runner, str(busybox), "--list-full"], capture_output=True, text=True, check=True
    ).stdout.split()
    for rel in applets:
        link = root / rel
        if link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")


def add_python(root: Path, py: dict[str, Path]) -> list[Path]:
    """The interpreter as /usr/bin/python3 and its standard library as precompiled modules in
    /usr/lib/pythonXY.zip (on every CPython's default path; a third of the size of the
    sources and their caches, and nothing to compile at boot). Returns the binaries whose
    shared libraries must come along."""
    major, minor = sys.version_info[:2]
    ver = f"python{major}.{minor}"
    copy(py["exe"], root / "usr" / "bin" / ver)
    (root / "usr" / "bin" / "python3").symlink_to(ver)
    tag = sys.implementation.cache_tag
    header = importlib.util.MAGIC_NUMBER + struct.pack("<I", 1) + bytes(8)  # unchecked hash
    with zipfile.ZipFile(root / "usr" / "lib" / f"python{major}{minor}.zip", "w") as z:
        for src in sorted(py["stdlib"].rglob("*.py")):
            rel = src.relative_to(py["stdlib"])
            if rel.parts[0] in STDLIB_SKIP or rel.parts[0].startswith(("config-", "lib-dynload")):
                continue
            if any(part == "tests" or part == "test" for part in rel.parts[:-1]):
                continue
            if not src.is_file():  # a dangling symlink (Debian's sitecustomize.py, say)
                continue
            cached = src.parent / "__pycache__" / f"{src.stem}.{tag}.pyc"
            if cached.exists() and cached.stat().st_mtime >= src.stat().st_mtime:
                data = cached.read_bytes()
            else:
                code = compile(src.read_bytes(), f"/usr/lib/{ver}/{rel}", "exec", dont_inherit=True)
                data = header + marshal.dumps(code)
            z.writestr(str(rel.with_suffix(".pyc")), data)
    # The prefix landmark: CPython finds /usr from /usr/lib/pythonX.Y/os.py or the zip.
    copy(py["stdlib"] / "os.py", root / "usr" / "lib" / ver / "os.py")
    binaries = [py["exe"]]
    for src in py["dynload"].glob("*.so"):
        if any(s in src.name for s in ("_tkinter", "_test", "_sqlite3", "xxlimited", "_curses")):
            continue
        copy(src, root / "usr" / "lib" / ver / "lib-dynload" / src.name)
        binaries.append(src)
    return binaries


def add_edge(root: Path) -> list[Path]:
    site = root / "usr" / "lib" / "deparrow" / "python"
    binaries = []
    for name in EDGE_DISTS:
        for src, rel in dist_files(name):
            copy(src, site / rel)
            if src.suffix == ".so":
                binaries.append(src)
    for src in (ROOT / "edge").rglob("*.py"):
        rel = src.relative_to(ROOT)
        if "native" not in rel.parts:
            copy(src, site / rel)
    # Precompiled: a TCG-emulated CPU would otherwise compile them at every boot.
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "-j", "0",
         "--invalidation-mode", "unchecked-hash", str(site)],
        check=True,
    )  # fmt: skip
    run = root / "usr" / "bin" / "edge-run"
    run.write_text(
        "#!/bin/sh\n# edge-run as pip would install it, from /usr/lib/deparrow/python\n"
        'PYTHONPATH=/usr/lib/deparrow/python exec /usr/bin/python3 -m edge.cli "$@"\n'
    )
    run.chmod(0o755)
    return binaries


def add_modules(root: Path, tree: Path, modules: tuple[str, ...] = MODULES) -> str:
    """The kernel package's modules named (and what they depend on), with a modules.dep for
    BusyBox modprobe; returns the kernel's version. Modules compressed with xz (Debian's
    kernels from trixie on, under /usr/lib/modules) go in unpacked: BusyBox loads plain ones."""
    base = next(
        (b for b in (tree / "lib" / "modules", tree / "usr" / "lib" / "modules") if b.is_dir()),
        None,
    )
    if base is None:
        raise BuildError("the kernel package has no lib/modules or usr/lib/modules")
    kver = next(p.name for p in base.iterdir())
    src = base / kver
    # name -> (the file in the package, its path in the image's /lib/modules/KVER)
    by_name: dict[str, tuple[Path, Path]] = {}
    for p in (src / "kernel").rglob("*.ko*"):
        if p.name.endswith((".ko", ".ko.xz")):
            rel = p.relative_to(src)
            rel = rel.with_name(rel.name.removesuffix(".xz"))
            by_name[rel.name.removesuffix(".ko").replace("-", "_")] = (p, rel)
    chosen: dict[str, list[str]] = {}

    def content(ko: Path) -> bytes:
        return lzma.decompress(ko.read_bytes()) if ko.suffix == ".xz" else ko.read_bytes()

    def depends(ko: Path) -> list[str]:
        m = re.search(rb"\0depends=([^\0]*)\0", content(ko))
        names = m.group(1).decode().split(",") if m else []
        return [d.replace("-", "_") for d in names if d]

    def visit(name: str) -> None:
        if name in chosen or name not in by_name:
            return
        chosen[name] = depends(by_name[name][0])
        for d in chosen[name]:
            visit(d)

    for m in modules:
        visit(m)
    dst = root / "lib" / "modules" / kver
    lines = []
    for name in chosen:
        ko, rel = by_name[name]
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (dst / rel).write_bytes(content(ko))
        # modules.dep, as depmod writes it: every dependency, each before its own
        # dependencies (modprobe loads the list from its end)
        post = _post_order(name, chosen)
        deps = " ".join(str(by_name[d][1]) for d in reversed(post) if d in by_name)
        lines.append(f"{rel}:{' ' + deps if deps else ''}")
    (dst / "modules.dep").write_text("\n".join(lines) + "\n")
    for f in ("modules.builtin", "modules.order"):
        if (src / f).exists():
            copy(src / f, dst / f)
    return kver


def _post_order(name: str, deps: dict[str, list[str]]) -> list[str]:
    """Every dependency of name, each after its own dependencies."""
    out: list[str] = []

    def walk(n: str) -> None:
        for d in deps.get(n, []):
            if d not in out:
                walk(d)
                out.append(d)

    walk(name)
    return out


def add_skeleton(root: Path) -> None:
    """What Buildroot's skeleton and its initramfs /init provide."""
    for d in ("proc", "sys", "dev", "run", "tmp", "root", "mnt", "boot", "var/lib", "var/log",
              "etc/init.d", "usr/lib", "lib64"):  # fmt: skip
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "var" / "run").symlink_to("../run")
    etc = root / "etc"
    (etc / "passwd").write_text("root::0:0:root:/root:/bin/sh\n")
    (etc / "group").write_text("root:x:0:\ntty:x:5:\n")
    (etc / "shadow").write_text("root::19000:0:99999:7:::\n")
    (etc / "os-release").write_text(
        'NAME="DEparrow test image"\nID=deparrow\nPRETTY_NAME="DEparrow test image (Debian '
        'parts, the Buildroot overlay)"\n'
    )
    init = root / "init"
    init.write_text(
        "#!/bin/sh\n# As Buildroot's initramfs /init: /dev, the console, then BusyBox init.\n"
        "mount -t devtmpfs devtmpfs /dev 2>/dev/null\n"
        "exec 0</dev/console 1>/dev/console 2>/dev/console\n"
        'exec /sbin/init "$@"\n'
    )
    init.chmod(0o755)


def add_overlay(root: Path, overlay: Path = OVERLAY) -> None:
    for src in overlay.rglob("*"):
        dst = root / src.relative_to(overlay)
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
        else:
            if dst.exists() or dst.is_symlink():
                dst.unlink()
            copy(src, dst)


# --- cpio (newc) -------------------------------------------------------------------------
def cpio(root: Path, extra_nodes: list[tuple[str, int, int, int]]) -> bytes:
    """The tree as a newc archive owned by root; extra_nodes: (path, mode, major, minor)."""
    out = bytearray()
    ino = 1

    def entry(name: str, mode: int, data: bytes, mtime: int, rmaj: int = 0, rmin: int = 0,
              nlink: int = 1) -> None:  # fmt: skip
        nonlocal ino
        nb = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, nlink, mtime, len(data), 0, 0, rmaj, rmin, len(nb), 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + nb)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))
        ino += 1

    paths = sorted(root.rglob("*"))
    for p in paths:
        rel = str(p.relative_to(root))
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            entry(rel, stat.S_IFLNK | 0o777, os.readlink(p).encode(), int(st.st_mtime))
        elif stat.S_ISDIR(st.st_mode):
            entry(rel, stat.S_IFDIR | 0o755, b"", int(st.st_mtime), nlink=2)
        else:
            perm = 0o755 if st.st_mode & 0o111 else 0o644
            entry(rel, stat.S_IFREG | perm, p.read_bytes(), int(st.st_mtime))
    for name, mode, major, minor in extra_nodes:
        entry(name, mode, b"", 0, major, minor)
    entry("TRAILER!!!", 0, b"", 0)
    out.extend(b"\0" * (-len(out) % 512))
    return bytes(out)


# --- the disk ----------------------------------------------------------------------------
def fat_type(part: Path) -> int:
    with open(part, "rb") as f:
        boot = f.read(512)
    return 0x0C if boot[82:87] == b"FAT32" else 0x0E  # FAT32 LBA or FAT16 LBA


def make_disk(out: Path, kernel: Path, initrd: Path, work: Path) -> None:
    mkfs = need("mkfs.vfat", "dosfstools")
    syslinux = need("syslinux", "syslinux")
    mcopy = need("mcopy", "mtools")
    mmd = need("mmd", "mtools")
    for p in (MBR_BIN, SYSLINUX_BIOS / "ldlinux.c32"):
        if not p.exists():
            raise BuildError(f"{p} is missing: apt-get install syslinux-common")
    payload = kernel.stat().st_size + initrd.stat().st_size
    size_mib = max(64, (payload * 2) // (1 << 20) + 16)  # room for a kernel upgrade
    part = work / "boot.vfat"
    subprocess.run(
        [mkfs, "-C", "-n", "DPBOOT", "-i", "44504250", str(part), str(size_mib * 1024)],
        check=True, capture_output=True,
    )  # fmt: skip
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    subprocess.run([syslinux, "--install", str(part)], check=True, capture_output=True, env=env)
    cfg = work / "syslinux.cfg"
    cfg.write_text(
        "# DEparrow: boot straight into the node; the serial console shows it too\n"
        "SERIAL 0 115200\nDEFAULT deparrow\nPROMPT 0\nTIMEOUT 0\n\n"
        f"LABEL deparrow\n  KERNEL /vmlinuz\n  INITRD /initrd.img\n  APPEND {KERNEL_CMDLINE}\n"
    )
    readme = work / "README.txt"
    readme.write_text(
        "DEparrow boot partition.\r\n\r\n"
        "deparrow/node.json    the node's identity ('deparrow board provision' writes it)\r\n"
        'deparrow/enroll.json  {"hub": URL, "token": "dpe_..."}: enroll at first boot\r\n'
        'deparrow/wifi.json    {"ssid": ..., "psk": ...}\r\n'
    )
    board = work / "board.json"
    # What 'deparrow board provision' enrolls the board with, unless told otherwise.
    board.write_text(json.dumps(BOARD, indent=2) + "\n")
    subprocess.run([mmd, "-i", str(part), "::/deparrow"], check=True, env=env)
    for src, name in ((kernel, "vmlinuz"), (initrd, "initrd.img"), (cfg, "syslinux.cfg"),
                      (readme, "deparrow/README.txt"),
                      (board, "deparrow/board.json")):  # fmt: skip
        subprocess.run([mcopy, "-i", str(part), str(src), f"::/{name}"], check=True, env=env)
    start = 2048  # sectors: the partition starts at 1 MiB
    sectors = part.stat().st_size // 512
    mbr = bytearray(512)
    mbr[:440] = MBR_BIN.read_bytes()[:440].ljust(440, b"\0")
    mbr[440:444] = struct.pack("<I", 0x44504250)  # disk signature
    # one bootable entry; CHS fields saturated (LBA is what counts)
    mbr[446:462] = struct.pack(
        "<B3sB3sII", 0x80, b"\xfe\xff\xff", fat_type(part), b"\xfe\xff\xff", start, sectors
    )
    mbr[510:512] = b"\x55\xaa"
    with open(out, "wb") as disk:
        disk.write(bytes(mbr).ljust(start * 512, b"\0"))
        with open(part, "rb") as f:
            shutil.copyfileobj(f, disk, 1 << 20)


# --- main --------------------------------------------------------------------------------
def build(cache: Path, deb: Path) -> Path:
    py = python_parts()
    key = inputs_key(deb, py)
    final = cache / key
    if (final / "manifest.json").exists():
        return final
    need("ldd", "libc-bin")
    if not BUSYBOX.exists():
        raise BuildError(f"{BUSYBOX} is missing: apt-get install busybox-static")
    started = time.monotonic()
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=cache))
    try:
        tree = work / "kernel"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True)
        vmlinuz = next((tree / "boot").glob("vmlinuz-*"))
        root = work / "root"
        add_skeleton(root)
        add_busybox(root)
        binaries = add_python(root, py) + add_edge(root)
        for lib in shared_libs(binaries):
            dst = str(lib) if str(lib).startswith(("/lib", "/usr/lib/")) else f"/usr/lib/{lib.name}"
            if lib.parent.name.startswith("python") or "/." in dst:
                dst = f"/usr/lib/{lib.name}"
            if not (root / dst.lstrip("/")).exists():
                copy(lib, root / dst.lstrip("/"))
        strip_binaries(root)
        kver = add_modules(root, tree)
        add_overlay(root)
        out = work / "out"
        out.mkdir()
        shutil.copy2(vmlinuz, out / "vmlinuz")
        archive = cpio(root, [("dev/console", stat.S_IFCHR | 0o600, 5, 1)])
        (out / "initrd.img").write_bytes(gzip.compress(archive, 6, mtime=0))
        make_disk(out / "disk.img", out / "vmlinuz", out / "initrd.img", work)
        manifest = {
            "key": key,
            "kernel": {"package": deb.name, "version": kver},
            "python": sys.version.split()[0],
            "edge_dists": {n: importlib.metadata.version(n) for n in EDGE_DISTS},
            "cmdline": KERNEL_CMDLINE,
            "files": {
                name: {"bytes": (out / name).stat().st_size}
                for name in ("vmlinuz", "initrd.img", "disk.img")
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


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "deparrow" / "images"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=default_cache(), help="cache directory")
    ap.add_argument("--kernel-deb", type=Path, default=None, help="a linux-image-*-amd64 .deb")
    ap.add_argument("--json", action="store_true", help="print the manifest")
    args = ap.parse_args(argv)
    return report(
        "build-test-image",
        lambda: build(args.cache, kernel_deb(args.cache, args.kernel_deb)),
        args.json,
    )


def report(name: str, make: Callable[[], Path], as_json: bool) -> int:
    """Run an image build and say where it is (or, as_json, its manifest): a main() of the
    image builders. A failure is one line naming what failed, and exit status 1."""
    try:
        out = make()
    except BuildError as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as e:
        err = (e.stderr or b"").decode(errors="replace").strip()[-400:]
        print(f"{name}: {' '.join(map(str, e.cmd))} failed: {err}", file=sys.stderr)
        return 1
    if as_json:
        manifest = json.loads((out / "manifest.json").read_text())
        print(json.dumps({**manifest, "dir": str(out)}, indent=2))
    else:
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

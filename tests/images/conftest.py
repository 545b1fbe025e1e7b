"""Fixtures of the image tests: the test image (built once, cached by its inputs), a hub the
guests can reach, and qemu guests whose console is kept for the failure message."""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deparrow import localnet
from hub.mqtt.broker import die_with_parent, free_port
from tests.conftest import ROOT, require_mosquitto

BUILDER = ROOT / "tools" / "build-test-image.py"
BOARD_BUILDER = ROOT / "tools" / "build-board-image.py"


def host_address() -> str:
    """An IPv4 address of this machine that is not loopback. The guest reaches the host's
    services there through qemu's user networking, and this machine reaches the hub there
    too, so a provisioned image and the provisioning command use one hub URL."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.254", 9))  # no packet is sent: this only picks a route
        addr = str(probe.getsockname()[0])
    except OSError:
        addr = ""
    finally:
        probe.close()
    if not addr or addr.startswith("127."):
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
        addr = next((a for a in out if "." in a and not a.startswith("127.")), "")
    if not addr:
        pytest.fail(
            "the image tests need a non-loopback IPv4 address on this machine (the guest "
            "reaches the hub there through qemu's user networking); none is configured"
        )
    return addr


@pytest.fixture(scope="session")
def test_image() -> Path:
    """tools/build-test-image.py's output directory (seconds when cached)."""
    for tool in ("qemu-system-x86_64", "mcopy", "mkfs.vfat", "syslinux"):
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin:/sbin") is None:
            pytest.fail(f"{tool} is not installed: run tools/install-image-deps.sh (make deps)")
    out = subprocess.run(
        [sys.executable, str(BUILDER), "--json"], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, f"build-test-image failed:\n{out.stderr}"
    return Path(json.loads(out.stdout)["dir"])


@pytest.fixture(scope="module")
def lan_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[localnet.LocalHub, str]]:
    """A real hub (and its Mosquitto) listening on all addresses; (hub, URL for guests)."""
    require_mosquitto()
    tmp = tmp_path_factory.mktemp("lanhub")
    hub = localnet.LocalHub(
        # the guests reach it over QEMU's private user network, by plain HTTP and MQTT
        tmp / "hub", broker="mosquitto", heartbeat_s=1.0,
        extra=("--host", "0.0.0.0", "--insecure-no-tls"),
        log_path=tmp / "hub.log",
    )  # fmt: skip
    try:
        yield hub, f"http://{host_address()}:{hub.port}"
    finally:
        hub.stop()


def doc_block(name: str) -> str:
    doc = (ROOT / "docs" / "install.md").read_text()
    m = re.search(rf"<!-- shell: {name} -->\s*```sh\n(.*?)```", doc, re.S)
    assert m, f"docs/install.md has no block {name}"
    return m.group(1).replace("\\\n", " ").strip()


def run_doc(name: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A block of docs/install.md, verbatim, with `deparrow` from this Python's environment."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", doc_block(name)], cwd=cwd, capture_output=True,
        text=True, env={**os.environ, **env, "PATH": path}, timeout=120,
    )  # fmt: skip


def doc_qemu_args(name: str, qemu: str, values: dict[str, str]) -> list[str]:
    """docs/install.md's qemu command line `name`, with $NAMEs replaced from values and
    without what Guest sets itself (-m, and -nic: the page port is a free one)."""
    words = shlex.split(doc_block(name))
    assert words[0] == qemu, words
    out, skip = [], False
    for w in words[1:]:
        if skip:
            skip = False
            continue
        if w in ("-nic", "-m"):
            skip = True
            continue
        for key, value in values.items():
            w = w.replace(f"${key}", value)
        out.append(w)
    return out


# What each emulated board needs here: qemu for the machine and for its binaries, and the
# cross compiler firmware/build.sh builds its MicroPython with.
BOARD_TOOLS = {
    "aarch64": {"qemu-system-aarch64": "qemu-system-arm", "qemu-aarch64-static":
                "qemu-user-static", "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu"},
    "riscv64": {"qemu-system-riscv64": "qemu-system-misc", "qemu-riscv64-static":
                "qemu-user-static", "riscv64-linux-gnu-gcc": "gcc-riscv64-linux-gnu"},
}  # fmt: skip


@functools.cache
def board_image(arch: str) -> Path:
    """tools/build-board-image.py's output for arch: the cross-built MicroPython node
    (firmware/build.sh, cached there) in an initramfs around Debian's kernel and busybox
    (seconds when cached, a few minutes the first time), built once per test session."""
    tools = {**BOARD_TOOLS[arch], "mcopy": "mtools", "mkfs.vfat": "dosfstools"}
    for tool, package in tools.items():
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin:/sbin") is None:
            pytest.fail(f"{tool} ({package}) is not installed: run tools/install-image-deps.sh")
    out = subprocess.run(
        [sys.executable, str(BOARD_BUILDER), "--arch", arch, "--json"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, f"build-board-image --arch {arch} failed:\n{out.stderr}"
    return Path(json.loads(out.stdout)["dir"])


class Guest:
    """A qemu guest (qemu-system-x86_64 unless told) with the given arguments (docs/install.md's),
    its console in a file, and the node's port 80 forwarded to a free port here."""

    def __init__(
        self, log: Path, boot: list[str], cwd: Path | None = None, memory_mb: int = 512,
        qemu: str = "qemu-system-x86_64",
    ) -> None:  # fmt: skip
        self.log = log
        self.page_port = free_port()
        if "-netdev" in boot:  # the doc's own network (-netdev and -device): the port is ours
            forward = f"hostfwd=tcp:127.0.0.1:{self.page_port}-"
            boot = [re.sub(r"hostfwd=tcp:127\.0\.0\.1:\d+-", forward, a) for a in boot]
            net = []
        else:
            net = ["-nic", f"user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{self.page_port}-:80"]
        cmd = [qemu, *boot, "-m", str(memory_mb), *net]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=cwd, preexec_fn=die_with_parent(signal.SIGTERM),
            )  # fmt: skip
        self.started = time.monotonic()

    def console(self, lines: int = 60) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_console(self, text: str, timeout_s: float) -> float:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if text in self.log.read_text(errors="replace"):
                return time.monotonic() - self.started
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        raise AssertionError(f"{text!r} not on the guest's console:\n{self.console()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

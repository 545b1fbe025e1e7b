"""tools/check-buildroot.py passes on buildroot/ and catches each kind of break in a copy."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import ROOT

CHECK = ROOT / "tools" / "check-buildroot.py"


def check(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CHECK), str(tree), "--json"], capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip


def test_the_tree_passes() -> None:
    out = check(ROOT / "buildroot")
    report = json.loads(out.stdout)
    assert out.returncode == 0 and report["ok"], report["problems"]
    assert report["packages"] == 4 and report["defconfigs"] == 3
    assert report["scripts"] >= 8 and report["files_named"] >= 15


def edit(path: str, old: str, new: str) -> Callable[[Path], None]:
    def apply(tree: Path) -> None:
        f = tree / path
        text = f.read_text()
        assert old in text, f"{old!r} not in {path}"
        f.write_text(text.replace(old, new, 1))

    return apply


BREAKS = {
    "package not sourced": (
        edit("Config.in", 'source "$BR2_EXTERNAL_DEPARROW_PATH/package/wasm3-run/Config.in"\n', ""),
        "package/wasm3-run: not sourced from Config.in",
    ),
    "missing .mk": (
        lambda t: (t / "package/wasm3-run/wasm3-run.mk").unlink(),
        "package/wasm3-run: has no wasm3-run.mk",
    ),
    "unknown option of our package": (
        edit(
            "configs/deparrow_x86_64_defconfig",
            "BR2_PACKAGE_PYTHON_DEPARROW_EDGE_DOCKER=y",
            "BR2_PACKAGE_PYTHON_DEPARROW_EDGE_DOKCER=y",
        ),
        "enables BR2_PACKAGE_PYTHON_DEPARROW_EDGE_DOKCER, which none of our Config.in",
    ),
    "missing overlay": (
        lambda t: shutil.rmtree(t / "board/picoclaw/rootfs-overlay"),
        "BR2_ROOTFS_OVERLAY names $(BR2_EXTERNAL_DEPARROW_PATH)/board/picoclaw/rootfs-overlay, "
        "which does not exist",
    ),
    "missing kernel fragment": (
        lambda t: (t / "board/x86_64/linux.fragment").unlink(),
        "BR2_LINUX_KERNEL_CONFIG_FRAGMENT_FILES names",
    ),
    "script syntax error": (
        edit("board/common/rootfs-overlay/usr/sbin/deparrow-boot", "esac\n", "esak\n"),
        "board/common/rootfs-overlay/usr/sbin/deparrow-boot: sh -n:",
    ),
    "script not executable": (
        lambda t: (t / "board/common/post-image.sh").chmod(0o644),
        "board/common/post-image.sh: is a script but not executable",
    ),
    "external.desc name": (
        edit("external.desc", "name: DEPARROW", "name: DE-PARROW"),
        "external.desc: name must be letters, digits and underscores",
    ),
    "python package without setup type": (
        edit(
            "package/python-pywasm3/python-pywasm3.mk",
            "PYTHON_PYWASM3_SETUP_TYPE = setuptools\n",
            "",
        ),
        "python-package needs PYTHON_PYWASM3_SETUP_TYPE",
    ),
    "download without hash": (
        lambda t: (t / "package/python-pywasm3/python-pywasm3.hash").unlink(),
        "downloads pywasm3-0.5.0.tar.gz but has no python-pywasm3.hash",
    ),
}


@pytest.mark.parametrize("name", sorted(BREAKS))
def test_a_broken_copy_fails_and_says_why(name: str, tmp_path: Path) -> None:
    # the copy sits beside the repository's edge/ and tools/, as buildroot/ does
    for d in ("edge", "tools"):
        (tmp_path / d).symlink_to(ROOT / d)
    tree = tmp_path / "buildroot"
    shutil.copytree(ROOT / "buildroot", tree, symlinks=True)
    assert check(tree).returncode == 0, check(tree).stdout
    breaker, message = BREAKS[name]
    breaker(tree)
    out = check(tree)
    report = json.loads(out.stdout)
    assert out.returncode == 1 and not report["ok"]
    assert any(message in p for p in report["problems"]), report["problems"]

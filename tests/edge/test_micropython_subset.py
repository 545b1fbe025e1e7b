"""The edge core (edge/core/, what a board freezes) must stay in the MicroPython subset: the
firmware's mpy-cross (MicroPython's own compiler, built by `make firmware-unix`) compiles every
core module, and every import in it, at any depth, is of the core itself or of the standard
library MicroPython has (the board's umqtt.simple in the umqtt adapter). The import-linter
contract in pyproject.toml forbids the node around the core, the server and CPython-only
libraries; this test is its allow-list."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

CORE_DIR = Path(__file__).resolve().parents[2] / "edge" / "core"
CORE = sorted(p.stem for p in CORE_DIR.glob("*.py"))
# MicroPython's own names and CPython's, as edge/core/compat.py feature-detects them; hmac comes
# from micropython-lib where a board has it (compat falls back to RFC 2104 by hand).
STDLIB = {"json", "ujson", "hashlib", "uhashlib", "binascii", "ubinascii", "time", "utime",
          "os", "uos", "hmac", "select", "uselect", "gc"}  # fmt: skip
ADAPTER = {"mqtt_umqtt": {"umqtt.simple"}}  # firmware/manifest.py require()s it


def test_the_core_is_what_the_board_freezes() -> None:
    assert set(CORE) >= {"__init__", "compat", "protocol", "jobs", "session", "outbox"}


@pytest.mark.parametrize("name", CORE)
def test_mpy_cross_compiles_core_module(name: str, tmp_path: Path, mpy_cross: str) -> None:
    out = subprocess.run(
        [mpy_cross, "-o", str(tmp_path / f"{name}.mpy"), str(CORE_DIR / f"{name}.py")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / f"{name}.mpy").stat().st_size > 0


@pytest.mark.parametrize("name", CORE)
def test_core_module_imports_only_the_core_and_micropython_stdlib(name: str) -> None:
    allowed = STDLIB | ADAPTER.get(name, set())
    tree = ast.parse((CORE_DIR / f"{name}.py").read_text())
    for node in ast.walk(tree):  # in functions too: a board would fail there at run time
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{name}.py: relative import (MicroPython freezes full names)"
            names = [node.module or ""]
        else:
            continue
        for mod in names:
            assert mod == "edge.core" or mod.startswith("edge.core.") or mod in allowed, (
                f"edge/core/{name}.py imports {mod}: the core runs on boards, so pass adapters "
                "in from the node and keep interpreter differences in edge/core/compat.py"
            )

"""The official WASI testsuite on the wasm engines (the pywasm3 workers, wasmtime, the wasm3-run
runner), through tools/wasi-conformance.py: every module passes except those
tools/wasi-expected.toml lists, each failing for the reason listed; the suite's preopened
directories are copies, the suite itself is left as it was."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

TOOL = ROOT / "tools" / "wasi-conformance.py"
EXPECTED = ROOT / "tools" / "wasi-expected.toml"
SUITE = (ROOT / ".." / "shared" / "wasi-testsuite").resolve()


def conformance(*args: str | Path) -> tuple[int, dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, str(TOOL), *map(str, args), "--json"],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.stdout, f"wasi-conformance printed nothing (exit {proc.returncode}): {proc.stderr}"
    return proc.returncode, json.loads(proc.stdout)


def _suite_state() -> list[tuple[str, int, float]]:
    return sorted(
        (str(p.relative_to(SUITE)), p.stat().st_size, p.stat().st_mtime) for p in SUITE.rglob("*")
    )


@pytest.mark.parametrize("engine", ["wasm3", "wasmtime", "wasm3-run"])
def test_suite_meets_the_expected_results(engine: str) -> None:
    if not (SUITE / "tests").is_dir():
        pytest.fail(
            f"the WASI testsuite is missing: expected at {SUITE} (../shared/wasi-testsuite "
            "beside the repository, with its tests/c and tests/assemblyscript folders)"
        )
    before = _suite_state()
    code, report = conformance(SUITE, "--engine", engine, "--expected", EXPECTED)
    assert _suite_state() == before  # the fs modules wrote into copies
    totals = report["engines"][engine]
    problems = "\n".join(report["problems"])
    assert not report["problems"], (
        f"{engine}: {totals['passed']} passed, {totals['failed']} failed; against "
        f"{EXPECTED.name}:\n{problems}"
    )
    assert code == 0
    assert totals["passed"] + totals["failed"] == 26  # the C (14) and AssemblyScript (12) suites
    if engine == "wasmtime":  # every module: the fs modules, and sock_* finding no socket
        assert totals["passed"] == 26, totals
    if engine == "wasm3-run":  # its C WASI has files; sock_* it refuses
        assert totals["passed"] == 24, totals


def test_a_spec_s_directories_are_preopened_copies_without_cleanup_files(tmp_path: Path) -> None:
    """`root` is the guest's `/` (the older `dirs`: each under its own name), copied per run and
    writable, with `*.cleanup` files gone before the run; the copies go after it."""
    c = SUITE / "tests" / "c" / "testsuite" / "wasm32-wasip1"
    if not c.is_dir():
        pytest.fail(f"the WASI testsuite is missing: expected at {SUITE}")
    suite = tmp_path / "tests" / "toy" / "testsuite" / "wasm32-wasip1"
    suite.mkdir(parents=True)
    shutil.copytree(c / "fs-tests.dir", suite / "fs-tests.dir")
    # what a run killed midway leaves: pwrite-with-access creates it exclusively, and fails
    # if the copy still has it
    leftover = suite / "fs-tests.dir" / "writeable" / "test_pwrite_pread.txt.cleanup"
    leftover.write_text("from an earlier run")
    for name, spec in {
        "pwrite-with-access": {"root": "fs-tests.dir"},
        "stat-dev-ino": {"root": "fs-tests.dir"},
        "fopen-with-access": {"root": "fs-tests.dir"},
    }.items():
        shutil.copy(c / f"{name}.wasm", suite)
        (suite / f"{name}.json").write_text(json.dumps(spec))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, report = conformance(tmp_path, "--engine", "wasmtime")
    assert code == 0, report
    assert report["engines"]["wasmtime"]["passed"] == 3
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written in place
    assert leftover.read_text() == "from an earlier run"


def test_older_dirs_are_preopened_under_their_own_names(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("wasi_conformance", TOOL)
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    (tmp_path / "a.dir").mkdir()
    (tmp_path / "a.dir" / "x.cleanup").write_text("")
    (tmp_path / "a.dir" / "keep").write_text("k")
    (tmp_path / "scratch").mkdir()
    dirs = tool.preopens({"dirs": ["a.dir"]}, tmp_path / "m.wasm", tmp_path / "scratch")
    assert dirs == [{"host": str(tmp_path / "scratch" / "0"), "guest": "/a.dir", "write": True}]
    assert sorted(p.name for p in (tmp_path / "scratch" / "0").iterdir()) == ["keep"]
    assert (tmp_path / "a.dir" / "x.cleanup").exists()


def test_a_module_that_misbehaves_fails_and_stale_expectations_are_reported(
    tmp_path: Path,
) -> None:
    """The checks bite: a wrong stdout, a wrong exit code, a missing env var each fail with
    the reason; a listed failure that passes, or fails otherwise, is a problem."""
    src = SUITE / "tests" / "assemblyscript" / "testsuite" / "wasm32-wasip1"
    if not src.is_dir():
        pytest.fail(f"the WASI testsuite is missing: expected at {SUITE}")
    suite = tmp_path / "tests" / "toy" / "testsuite" / "wasm32-wasip1"
    suite.mkdir(parents=True)
    for name, spec in {
        "fd_write-to-stdout": {"stdout": "goodbye"},
        "proc_exit-failure": {},  # exits 33, the default expects 0
        "environ_get-multiple-variables": {},  # asserts on variables it is not given: aborts
        "proc_exit-success": {},
        "random_get-zero-length": {},
    }.items():
        shutil.copy(src / f"{name}.wasm", suite)
        (suite / f"{name}.json").write_text(json.dumps(spec))
    expected = tmp_path / "expected.toml"
    expected.write_text(
        '[wasm3]\n"toy/proc_exit-failure" = "exit code 33"\n'  # fails as listed: fine
        '"toy/proc_exit-success" = "exit code 1"\n'  # passes: stale
        '"toy/environ_get-multiple-variables" = "exit code 1"\n'  # fails otherwise: stale
        '"toy/gone" = "exit code 1"\n'  # not in the suite
    )
    code, report = conformance(tmp_path, "--engine", "wasm3", "--expected", expected)
    results = {r["name"]: r for r in report["engines"]["wasm3"]["results"]}
    assert results["toy/fd_write-to-stdout"]["reason"] == "stdout 'hello', expected 'goodbye'"
    assert results["toy/proc_exit-failure"]["reason"] == "exit code 33, expected 0"
    assert results["toy/environ_get-multiple-variables"]["reason"].startswith(
        "exit code 255, expected 0; stderr 'abort:"
    )
    assert results["toy/proc_exit-success"]["passed"]
    assert results["toy/random_get-zero-length"]["passed"]
    assert code == 1
    problems = report["problems"]
    assert problems[0] == (
        "wasm3: toy/environ_get-multiple-variables fails for another reason than the expected "
        "'exit code 1': exit code 255, expected 0; stderr 'abort:  in src_input.ts(18:1)\\n' "
        "(update its entry)"
    )
    assert problems[1:] == [
        "wasm3: toy/fd_write-to-stdout fails (a regression): stdout 'hello', expected 'goodbye'",
        "wasm3: toy/proc_exit-success now passes: remove it from the expected failures",
        "wasm3: toy/gone is listed but not in the suite",
    ]

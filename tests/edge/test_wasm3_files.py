"""WASI's files on wasm3-run (edge/native/wasi_fs.c), through the executor MicroPython nodes use
(edge/executors/wasm3_cli.py): a job's "dirs" are its preopens, and nothing it does gets out of
them. The modules are C programs built here with clang and wasi-libc from
tests/edge/fixtures/files/: fs_job.c works on its files as a program would, fs_hostile.c tries
every way out with raw WASI calls and prints the errno of each. Each hostile run is checked
twice: what the job was told, and the host's filesystem afterwards (nothing outside touched).

The runner resolves paths with openat2(RESOLVE_BENEATH) where the kernel has it, and component
by component otherwise; DEPARROW_WASI_NO_OPENAT2=1 forces the second, so both are tested.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.executors.wasm3_cli import Wasm3CliExecutor

ROOT = Path(__file__).resolve().parents[2]
SOURCES = Path(__file__).parent / "fixtures" / "files"
SUITE = ROOT.parent / "shared" / "wasi-testsuite" / "tests" / "c" / "testsuite" / "wasm32-wasip1"

ENOTDIR, ELOOP, EMFILE, EROFS, ENOTCAPABLE, EBADF = 54, 32, 33, 69, 76, 8


@pytest.fixture(scope="module")
def runner() -> Path:
    out = ROOT / "edge" / "native" / "bin" / "wasm3-run"
    done = subprocess.run(
        [str(ROOT / "tools" / "build-wasm3-runner.sh"), "--out", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable},
    )  # fmt: skip
    assert done.returncode == 0, f"build-wasm3-runner.sh failed:\n{done.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def modules(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    if not shutil.which("clang"):
        pytest.fail("clang not installed: run `make test` (Debian: clang lld wasi-libc)")
    out = tmp_path_factory.mktemp("fs-wasm")
    built = {}
    for src in sorted(SOURCES.glob("*.c")):
        target = out / (src.stem + ".wasm")
        cmd = ["clang", "--target=wasm32-wasi", "-O2", "-Wall", "-Wextra", "-Werror"]
        done = subprocess.run([*cmd, "-Wl,--strip-all", "-o", str(target), str(src)],
                              capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 0, f"cannot build {src.name}: {done.stderr[-2000:]}"
        built[src.stem] = target.read_bytes()
    return built


@pytest.fixture
def ex(runner: Path, tmp_path: Path) -> Iterator[Wasm3CliExecutor]:
    with Wasm3CliExecutor(str(tmp_path / "executor"), runner=str(runner)) as e:
        yield e


def job(module: bytes, dirs: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"job_id": "t", "module": module, "timeout_s": 20, "memory_mb": 64}
    if dirs is not None:
        spec["dirs"] = dirs
    spec.update(extra)
    return spec


def snapshot(top: Path) -> dict[str, str]:
    """Every entry under top: a file's content, a symlink's target, or "dir"."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(top))
            if p.is_symlink():
                seen[rel] = "-> " + os.readlink(p)
            elif p.is_dir():
                seen[rel] = "dir"
            else:
                seen[rel] = p.read_text()
    return seen


def test_a_program_reads_inputs_and_writes_outputs(
    ex: Wasm3CliExecutor, modules: dict[str, bytes], tmp_path: Path
) -> None:
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    outputs.mkdir()
    (inputs / "data.txt").write_text("hello files\n")
    (inputs / "b.txt").write_text("x")
    out = ex.run(job(modules["fs_job"], [
        {"host": str(inputs), "guest": "/inputs", "write": False},
        {"host": str(outputs), "guest": "/outputs", "write": True},
    ]))  # fmt: skip
    assert (out["status"], out["exit_code"], out["error"]) == ("completed", 0, None), out
    assert out["stdout"].decode().splitlines() == [
        "read 12 bytes", "entry b.txt", "entry data.txt", "upper.txt size 12", "at 3: 3", "done",
    ]  # fmt: skip
    assert snapshot(outputs) == {
        "upper.txt": "HELLO FILES\n", "sub": "dir", "sub/list.txt": "b.txt\ndata.txt\n",
    }  # fmt: skip
    assert snapshot(inputs) == {"data.txt": "hello files\n", "b.txt": "x"}


@pytest.fixture
def trap(tmp_path: Path) -> Path:
    """A writable preopen (work/) full of ways out, a read-only one (ro/), and what lies
    outside them (secret.txt, outside/)."""
    top = tmp_path / "host"
    (top / "work" / "sub").mkdir(parents=True)
    (top / "ro").mkdir()
    (top / "outside" / "d").mkdir(parents=True)
    (top / "secret.txt").write_text("secret")
    (top / "outside" / "d" / "secret.txt").write_text("secret too")
    (top / "work" / "ok.txt").write_text("ok")
    (top / "ro" / "in.txt").write_text("input")
    os.symlink("../secret.txt", top / "work" / "link_out")
    os.symlink("../outside/d", top / "work" / "dirlink")
    os.symlink("/etc/passwd", top / "work" / "link_abs")
    os.symlink("loop", top / "work" / "loop")
    return top


# The errno of each attempt in fs_hostile.c: ENOTCAPABLE for a way out, EROFS for a change to
# the read-only directory, ELOOP for a symlink not followed. Without openat2 no symlink is
# followed at all, so those that lead out are ELOOP there.
REFUSED = {
    "prestat3": 0, "prestat5": EBADF, "inside": 0, "dotdot": ENOTCAPABLE,
    "dotdot_deep": ENOTCAPABLE, "dotdot_create": ENOTCAPABLE, "absolute": ENOTCAPABLE,
    "absolute_secret": ENOTCAPABLE, "link_out": ENOTCAPABLE, "link_out_nofollow": ELOOP,
    "dirlink_out": ENOTCAPABLE, "dirlink_create": ENOTCAPABLE, "link_abs": ENOTCAPABLE,
    "loop": ELOOP, "ro_create": EROFS, "ro_write": EROFS, "ro_trunc": EROFS, "ro_read": 0,
    "ro_mkdir": EROFS, "ro_unlink": EROFS, "ro_rename_out": EROFS, "mkdir_out": ENOTCAPABLE,
    "unlink_out": ENOTCAPABLE, "unlink_dirlink": ENOTCAPABLE, "rename_out": ENOTCAPABLE,
    "rmdir_dotdot": ENOTCAPABLE, "stat_out": ENOTCAPABLE, "stat_link_out": ENOTCAPABLE,
}  # fmt: skip
LINKS = ("link_out", "dirlink_out", "dirlink_create", "link_abs", "unlink_dirlink", "stat_link_out")


@pytest.mark.parametrize("resolver", ["openat2", "walk"])
def test_hostile_paths_are_refused_and_nothing_outside_is_touched(
    ex: Wasm3CliExecutor, modules: dict[str, bytes], trap: Path, resolver: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    if resolver == "walk":
        monkeypatch.setenv("DEPARROW_WASI_NO_OPENAT2", "1")
    before = snapshot(trap)
    out = ex.run(job(modules["fs_hostile"], [
        {"host": str(trap / "work"), "guest": "/work", "write": True},
        {"host": str(trap / "ro"), "guest": "/ro", "write": False},
    ]))  # fmt: skip
    assert (out["status"], out["exit_code"]) == ("completed", 0), out
    lines = out["stdout"].decode().splitlines()
    said = dict(line.split(" ", 1) for line in lines if " read " not in line)
    opened = said.pop("opened")
    expected = dict(REFUSED)
    if resolver == "walk":
        expected.update(dict.fromkeys(LINKS, ELOOP))
    assert {k: int(v) for k, v in said.items()} == expected
    assert "inside read ok" in lines and "ro_read read input" in lines
    # the descriptor cap: 128 per job, less stdio and the two preopens
    assert opened == f"123 then {EMFILE}"
    assert snapshot(trap) == before


def test_no_dirs_means_no_preopens(ex: Wasm3CliExecutor, modules: dict[str, bytes]) -> None:
    out = ex.run(job(modules["fs_hostile"]))
    assert out["status"] == "completed", out
    lines = out["stdout"].decode().splitlines()
    assert lines[:3] == ["prestat3 8", "prestat5 8", "inside 8"]


def test_a_preopen_that_is_not_there_is_the_nodes_error(
    ex: Wasm3CliExecutor, modules: dict[str, bytes], tmp_path: Path
) -> None:
    out = ex.run(job(modules["fs_job"], [{"host": str(tmp_path / "nope"), "guest": "/inputs"}]))
    assert out["status"] == "failed"
    assert out["error"].startswith("executor error: cannot open the job's directory "), out


@pytest.mark.parametrize(
    "dirs",
    [
        [{"host": "relative/path", "guest": "/x"}],
        [{"host": "/tmp", "guest": ""}],
        [{"host": "/tmp\x00/etc", "guest": "/x"}],
        "not a list",
        [{"host": "/tmp", "guest": "/x"}] * 33,
    ],
)
def test_malformed_dirs_are_an_invalid_job(
    ex: Wasm3CliExecutor, modules: dict[str, bytes], dirs: Any
) -> None:
    out = ex.run(job(modules["fs_job"], dirs))
    assert out["status"] == "failed"
    assert out["error"].startswith("invalid job: "), out


@pytest.mark.parametrize(
    "value",
    [b"", b"r", b"x/g\x00/tmp", b"r\x00/tmp", b"r/g\x00", b"r/g", b"w/g\x00/tmp\x00/etc",
     b"r/g\x00" + b"a" * 5000],
)  # fmt: skip
def test_a_malformed_dir_record_is_refused(runner: Path, tmp_path: Path, value: bytes) -> None:
    """The runner reads the job file's dir records itself: bounds checked, refused whole."""
    (tmp_path / "module.wasm").write_bytes(b"\0asm\x01\0\0\0")
    (tmp_path / "job").write_bytes(b"dir %d\n%s\n" % (len(value), value))
    subprocess.run([str(runner), str(tmp_path)], timeout=30, check=True)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["error"] == "executor error: job file: a dir record is malformed"


# --- the official WASI testsuite's file modules ----------------------------------------------

FS_MODULES = (
    sorted(p.stem for p in SUITE.glob("*.json") if "root" in p.read_text())
    if SUITE.is_dir()
    else []
)


@pytest.mark.skipif(not FS_MODULES, reason=f"the WASI testsuite is not at {SUITE}")
@pytest.mark.parametrize("name", FS_MODULES)
def test_wasi_testsuite_file_modules(ex: Wasm3CliExecutor, tmp_path: Path, name: str) -> None:
    """Run as its specification says (../shared/wasi-testsuite/README.md): the spec's root,
    copied here (the suite's copy is read-only), preopened as the guest's "/"."""
    spec = json.loads((SUITE / (name + ".json")).read_text())
    root = tmp_path / "root"
    shutil.copytree(SUITE / spec["root"], root)
    for p in [root, *root.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    out = ex.run(job(
        (SUITE / (name + ".wasm")).read_bytes(), [{"host": str(root), "guest": "/", "write": True}],
        args=spec.get("args", []), env=spec.get("env", {}),
    ))  # fmt: skip
    assert out["error"] is None, out
    assert out["exit_code"] == spec.get("exit_code", 0), out
    if "stdout" in spec:
        assert out["stdout"].decode() == spec["stdout"]

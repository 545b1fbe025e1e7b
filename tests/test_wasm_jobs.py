"""The shipped wasm jobs: the manifests (jobs.json, files.json) match the modules, the modules
run in wasm3 as jobs.json says, wordfreq's expected outputs are right, and wasm-jobs/build.sh
reproduces the committed bytes. tests/edge/test_wordfreq.py runs the file jobs."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import wasm3

import wasm_jobs

JOBS_DIR = Path(wasm_jobs.__file__).resolve().parent
MANIFEST = wasm_jobs.manifest()
FILE_JOBS = wasm_jobs.file_jobs()
MODULES = sorted({job["module"] for job in [*MANIFEST.values(), *FILE_JOBS.values()]})
# The preview1 calls the edge executors implement; a module needing more must say so.
WASI_SUBSET = {
    f"wasi_snapshot_preview1.{name}"
    for name in (
        "args_get",
        "args_sizes_get",
        "environ_get",
        "environ_sizes_get",
        "clock_time_get",
        "random_get",
        "fd_write",
        "fd_read",
        "proc_exit",
    )
}
# What a program built with wasi-libc that opens files also imports: the preopens it finds at
# start-up, path_open and friends. The file jobs (files.json) may use these as well.
FILE_CALLS = {
    f"wasi_snapshot_preview1.{name}"
    for name in (
        "fd_close",
        "fd_fdstat_get",
        "fd_fdstat_set_flags",
        "fd_prestat_get",
        "fd_prestat_dir_name",
        "fd_readdir",
        "fd_seek",
        "path_filestat_get",
        "path_open",
    )
}


def _uleb(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _sections(data: bytes) -> dict[int, bytes]:
    assert data[:8] == b"\0asm\1\0\0\0", "not a wasm 1.0 binary"
    sections, pos = {}, 8
    while pos < len(data):
        section_id = data[pos]
        size, pos = _uleb(data, pos + 1)
        sections[section_id] = data[pos : pos + size]
        pos += size
    return sections


def _limits(data: bytes, pos: int) -> tuple[int, int | None, int]:
    flags = data[pos]
    minimum, pos = _uleb(data, pos + 1)
    maximum = None
    if flags & 1:
        maximum, pos = _uleb(data, pos)
    return minimum, maximum, pos


def _imports(data: bytes) -> list[str]:
    """Every import of a module as "module.name", read from the binary's import section."""
    section = _sections(data).get(2, b"")
    if not section:
        return []
    count, pos = _uleb(section, 0)
    names = []
    for _ in range(count):
        parts = []
        for _ in range(2):
            length, pos = _uleb(section, pos)
            parts.append(section[pos : pos + length].decode())
            pos += length
        kind = section[pos]
        pos += 1
        if kind == 0:  # function: type index
            _, pos = _uleb(section, pos)
        elif kind == 1:  # table: element type, limits
            _, _, pos = _limits(section, pos + 1)
        elif kind == 2:  # memory: limits
            _, _, pos = _limits(section, pos)
        else:  # global: value type, mutability
            pos += 2
        names.append(".".join(parts))
    return names


def _load(module: str) -> wasm3.Runtime:
    env = wasm3.Environment()
    runtime = env.new_runtime(64 * 1024)
    runtime.load(env.parse_module(wasm_jobs.path(module).read_bytes()))
    return runtime


@pytest.mark.parametrize("module", MODULES)
def test_module_exists_and_parses(module: str) -> None:
    wasm3.Environment().parse_module(wasm_jobs.path(module).read_bytes())


def test_every_built_module_is_in_the_manifest() -> None:
    on_disk = sorted(p.name for p in JOBS_DIR.glob("*.wasm"))
    assert on_disk == MODULES


@pytest.mark.parametrize("name", list(MANIFEST))
def test_manifest_entry_is_complete(name: str) -> None:
    job = MANIFEST[name]
    keys = {"module", "description", "entrypoint", "args", "stdin", "env", "expected"}
    assert keys <= job.keys(), f"{name}: missing {sorted(keys - job.keys())}"
    assert isinstance(job["example"], bool)
    assert all(isinstance(a, str) for a in job["args"])
    if job["stdin"] is not None:
        assert wasm_jobs.path(job["stdin"]).is_file()
    expected = job["expected"]
    if job["example"]:
        assert {"stdout", "returns", "exit_code"} <= expected.keys(), name
    else:
        assert "error" in expected or "exit_code" in expected, name


@pytest.mark.parametrize("name", list(MANIFEST))
def test_manifest_imports_match_the_binary(name: str) -> None:
    job = MANIFEST[name]
    imports = _imports(wasm_jobs.path(job["module"]).read_bytes())
    assert imports == job["imports"], f"update jobs.json: {job['module']} imports {imports}"
    assert set(imports) <= WASI_SUBSET, f"{job['module']} needs {set(imports) - WASI_SUBSET}"


def test_file_jobs_are_apart_from_jobs_json() -> None:
    """jobs.json is run on every engine (the pywasm3 workers too, which have no files)."""
    assert not FILE_JOBS.keys() & MANIFEST.keys()
    assert not {job["module"] for job in FILE_JOBS.values()} & {
        job["module"] for job in MANIFEST.values()
    }


@pytest.mark.parametrize("name", list(FILE_JOBS))
def test_file_job_entry_is_complete(name: str) -> None:
    job = FILE_JOBS[name]
    keys = {"module", "description", "entrypoint", "args", "env", "dirs", "expected", "example"}
    assert keys <= job.keys(), f"{name}: missing {sorted(keys - job.keys())}"
    assert {"stdout", "stderr", "exit_code", "outputs"} <= job["expected"].keys(), name
    for d in job["dirs"]:
        assert d["guest"].startswith("/") and isinstance(d["write"], bool), d
        assert d["host"] is None or (JOBS_DIR / d["host"]).is_dir(), d
    outputs = job["expected"]["outputs"]
    assert outputs is None or (JOBS_DIR / outputs).is_dir(), outputs
    imports = _imports(wasm_jobs.path(job["module"]).read_bytes())
    assert imports == job["imports"], f"update files.json: {job['module']} imports {imports}"
    extra = set(imports) - WASI_SUBSET - FILE_CALLS
    assert not extra, f"{job['module']} needs {extra}"


def _wordfreq(folder: Path) -> tuple[str, dict[str, int]]:
    """What wordfreq must give, computed here another way: counts.tsv and summary.json."""
    counts: dict[bytes, int] = {}
    files = size = 0
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            files, size = files + 1, size + len(data)
            for w in re.findall(rb"[A-Za-z0-9\x80-\xff]+(?:'[A-Za-z0-9\x80-\xff]+)*", data):
                counts[w.lower()] = counts.get(w.lower(), 0) + 1
    rows = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    tsv = "".join(f"{w.decode()}\t{n}\n" for w, n in rows)
    summary = {"files": files, "bytes": size, "words": sum(counts.values()), "distinct": len(rows)}
    return tsv, summary


def test_wordfreq_expected_outputs_are_right() -> None:
    job = FILE_JOBS["wordfreq"]
    inputs = JOBS_DIR / job["dirs"][0]["host"]
    expected = JOBS_DIR / job["expected"]["outputs"]
    tsv, summary = _wordfreq(inputs)
    assert sorted(p.name for p in expected.iterdir()) == ["counts.tsv", "summary.json"]
    assert (expected / "counts.tsv").read_text() == tsv
    assert json.loads((expected / "summary.json").read_text()) == summary
    assert (expected / "summary.json").read_text() == json.dumps(summary) + "\n"
    top = tsv.split("\n", 1)[0].replace("\t", " (")
    assert job["expected"]["stdout"] == (
        f"wordfreq: {summary['files']} files, {summary['bytes']} bytes, {summary['words']} words, "
        f"{summary['distinct']} distinct; most frequent: {top}) "
        "-> /outputs/counts.tsv, /outputs/summary.json\n"
    )


def test_examples_are_the_runnable_jobs() -> None:
    assert [name for name, _ in wasm_jobs.examples()] == ["fib", "sieve", "sha256", "hello"]


def test_path_names_a_missing_file_clearly() -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.wasm"):
        wasm_jobs.path("nope.wasm")


def test_fib_in_wasm3() -> None:
    runtime = _load("fib.wasm")
    assert runtime.find_function("fib")(25) == 75025
    assert runtime.find_function("fib_iter")(50) == 12586269025
    assert runtime.find_function("fib_iter")(92) == 7540113804746346429


def test_fib_example_returns_what_the_manifest_says() -> None:
    job = MANIFEST["fib"]
    func = _load(job["module"]).find_function(job["entrypoint"])
    assert [func(*(int(a) for a in job["args"]))] == job["expected"]["returns"]


def test_sha256_expected_output_is_the_real_digest() -> None:
    job = MANIFEST["sha256"]
    digest = hashlib.sha256(wasm_jobs.path(job["stdin"]).read_bytes()).hexdigest()
    assert job["expected"]["stdout"] == f"{digest}  -\n"


def test_trap_fixture_traps() -> None:
    with pytest.raises(RuntimeError, match="unreachable"):
        _load("trap.wasm").find_function("_start")()


def test_grow_fixture_has_no_memory_maximum() -> None:
    memory = _sections(wasm_jobs.path("grow.wasm").read_bytes())[5]
    count, pos = _uleb(memory, 0)
    assert count == 1
    assert _limits(memory, pos)[1] is None, "grow.wasm must leave its memory unbounded"


def _run_python(code: str, timeout: float) -> subprocess.CompletedProcess[str]:
    # wasm3 holds the GIL and can't be interrupted, so fixtures that never end run in a
    # child process that the test can kill.
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout
    )


def test_grow_fixture_stops_only_at_the_host_limit() -> None:
    code = f"""
import resource, wasm3
resource.setrlimit(resource.RLIMIT_AS, (256 << 20, 256 << 20))
env = wasm3.Environment()
rt = env.new_runtime(65536)
rt.load(env.parse_module(open({str(wasm_jobs.path("grow.wasm"))!r}, "rb").read()))
try:
    rt.find_function("_start")()
except RuntimeError as e:
    print(e)
print(len(rt.get_memory(0)) >> 20)
"""
    result = _run_python(code, timeout=60)
    error, mib = result.stdout.splitlines()
    assert "unreachable" in error
    assert 64 < int(mib) < 256


def test_loop_fixture_never_returns() -> None:
    code = f"""
import wasm3
env = wasm3.Environment()
rt = env.new_runtime(65536)
rt.load(env.parse_module(open({str(wasm_jobs.path("loop.wasm"))!r}, "rb").read()))
rt.find_function("spin")()
"""
    with pytest.raises(subprocess.TimeoutExpired):
        _run_python(code, timeout=1)


def test_build_reproduces_the_committed_modules(tmp_path: Path) -> None:
    """Needs wabt, clang, lld, wasi-libc and libclang-rt-14-dev-wasm32 (.ci/run installs them)."""
    result = subprocess.run(
        ["bash", str(JOBS_DIR / "build.sh")],
        env={**os.environ, "OUT": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0:
        pytest.fail(f"wasm-jobs/build.sh failed (exit {result.returncode}):\n{result.stderr}")
    built = sorted(p.name for p in tmp_path.glob("*.wasm"))
    assert built == MODULES
    differ = [m for m in MODULES if (tmp_path / m).read_bytes() != wasm_jobs.path(m).read_bytes()]
    assert not differ, (
        f"rebuilt {differ} differ from the committed files: run wasm-jobs/build.sh and commit "
        "them, or check the toolchain (committed with clang 14.0.6, wabt 1.0.32)"
    )

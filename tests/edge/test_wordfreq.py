"""The file jobs of wasm-jobs/files.json (wordfreq) run through `edge-run job --dir` as a user
runs them, on both engines that give a job files: what they print and write is what
files.json says, byte for byte, and the same on wasmtime and wasm3-run."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import wasm_jobs

JOBS_DIR = Path(wasm_jobs.__file__).resolve().parent
FILE_JOBS = wasm_jobs.file_jobs()
ENGINES = ["wasmtime", "wasm3-run"]
EDGE = [sys.executable, "-m", "edge.cli", "job"]


def edge_run(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*EDGE, *args], capture_output=True, timeout=120)


def files_in(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", list(FILE_JOBS))
def test_file_job_gives_what_files_json_says(tmp_path: Path, name: str, engine: str) -> None:
    job = FILE_JOBS[name]
    flags, writable = [], []
    for i, d in enumerate(job["dirs"]):
        host = tmp_path / f"dir{i}"  # a copy: the job gets it read-write through edge-run
        if d["host"] is None:
            host.mkdir()
        else:
            shutil.copytree(JOBS_DIR / d["host"], host)
        if d["write"]:
            writable.append(host)
        flags += ["--dir", f"{host}::{d['guest']}"]
    before = {str(p): files_in(p) for p in tmp_path.iterdir()}

    module = str(wasm_jobs.path(job["module"]))
    out = edge_run("--engine", engine, *flags, module, "--", *job["args"])

    expected = job["expected"]
    assert (out.returncode, out.stderr.decode(), out.stdout.decode()) == (
        expected["exit_code"],
        expected["stderr"],
        expected["stdout"],
    )
    (outputs,) = writable
    want = {} if expected["outputs"] is None else files_in(JOBS_DIR / expected["outputs"])
    assert files_in(outputs) == want
    for p in tmp_path.iterdir():  # the inputs are left as they were
        if p not in writable:
            assert files_in(p) == before[str(p)]


@pytest.mark.parametrize("engine", ENGINES)
def test_wordfreq_takes_its_folders_as_arguments(tmp_path: Path, engine: str) -> None:
    """`wordfreq INPUTS OUTPUTS`: one directory given to the job, the folders inside it."""
    job = FILE_JOBS["wordfreq"]
    shutil.copytree(JOBS_DIR / job["dirs"][0]["host"], tmp_path / "in")
    (tmp_path / "out").mkdir()
    out = edge_run(
        "--engine", engine, "--dir", f"{tmp_path}::/work", str(wasm_jobs.path("wordfreq.wasm")),
        "--", "/work/in", "/work/out",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode() == job["expected"]["stdout"].replace("/outputs", "/work/out")
    assert files_in(tmp_path / "out") == files_in(JOBS_DIR / job["expected"]["outputs"])


@pytest.mark.parametrize("engine", ENGINES)
def test_wordfreq_without_outputs_says_so_before_reading(tmp_path: Path, engine: str) -> None:
    out = edge_run(
        "--engine", engine, "--dir", f"{tmp_path}::/inputs", str(wasm_jobs.path("wordfreq.wasm"))
    )  # fmt: skip
    assert out.returncode == 73 and out.stdout == b""
    assert out.stderr.decode() == (
        "wordfreq: no output directory /outputs: the job was given none there; give it one, "
        "e.g. edge-run job --dir OUT::/outputs\n"
    )


def test_wasm3_engine_refuses_wordfreq_naming_the_engines_with_files() -> None:
    out = edge_run(str(wasm_jobs.path("wordfreq.wasm")))
    assert out.returncode == 65
    assert b"path_open" in out.stderr and b"wasmtime and wasm3-run engines give files" in out.stderr


@pytest.mark.parametrize("engine", ENGINES)
def test_the_readme_tour_runs_as_written(tmp_path: Path, engine: str) -> None:
    """The README's wordfreq block: its command, run as written (the output folder moved to a
    temporary one), prints what the README says and writes the files it shows."""
    readme = (JOBS_DIR.parent / "README.md").read_text()
    block = readme.split("edge-run job --engine wasm3-run wasm-jobs/wordfreq.wasm", 1)[1]
    block = block.split("```", 1)[0]
    lines = block.splitlines()
    flags = lines[1].split("#")[0].split()
    assert flags[-2:] == ["--outputs", "/tmp/wordfreq-out"], flags
    said = lines[2].lstrip("# ")
    out = tmp_path / "out"
    done = subprocess.run(
        [*EDGE, "--engine", engine, "wasm-jobs/wordfreq.wasm", *flags[:-1], str(out)],
        capture_output=True, timeout=120, cwd=JOBS_DIR.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode() == said + "\n"
    summary = lines[3].split("# ", 1)[1]
    assert (out / "summary.json").read_text().strip() == summary
    assert (out / "counts.tsv").read_text().startswith("the\t37\nand\t25\nin\t15\n")

"""Example and benchmark WebAssembly jobs shipped with DEparrow."""

import json
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent


def path(name: str) -> Path:
    """The path of a module or input file shipped here, e.g. ``path("fib.wasm")``."""
    p = _HERE / name
    if not p.is_file():
        raise FileNotFoundError(
            f"no file {name!r} in {_HERE}; the modules are listed in jobs.json "
            "and rebuilt by wasm-jobs/build.sh"
        )
    return p


def data_names() -> list[str]:
    """The example data files under data/, as `example:` input references name them
    (e.g. ``wordfreq/inputs/README.txt``), sorted."""
    base = _HERE / "data"
    return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file())


def data(name: str) -> bytes:
    """The bytes of an example data file (see data_names); FileNotFoundError for anything
    else, paths out of data/ included."""
    base = (_HERE / "data").resolve()
    p = (base / name).resolve()
    if base not in p.parents or not p.is_file():
        raise FileNotFoundError(name)
    return p.read_bytes()


def manifest() -> dict[str, dict[str, Any]]:
    """jobs.json: job name -> module, entrypoint, args, stdin, env, expected outcome, imports."""
    with open(_HERE / "jobs.json", encoding="utf-8") as f:
        jobs: dict[str, dict[str, Any]] = json.load(f)
    return jobs


def file_jobs() -> dict[str, dict[str, Any]]:
    """files.json: the jobs that work on files, as in jobs.json plus ``dirs`` (the directories
    to give the job) and ``expected.outputs`` (a folder here holding exactly what it writes).

    Apart from jobs.json because only the engines with files (wasmtime, wasm3-run) run them.
    """
    with open(_HERE / "files.json", encoding="utf-8") as f:
        jobs: dict[str, dict[str, Any]] = json.load(f)
    return jobs


def examples() -> list[tuple[str, dict[str, Any]]]:
    """The jobs meant to be shown and run as examples (not the failure fixtures), in order."""
    return [(name, job) for name, job in manifest().items() if job["example"]]

"""wasi-conformance: the official WASI testsuite (wasm32-wasip1) through the node's own executors.

    python tools/wasi-conformance.py ../shared/wasi-testsuite --engine wasm3 [--engine wasmtime]
        [--engine wasm3-run]
        [--expected tools/wasi-expected.toml] [--timeout 10] [--workers N] [--json]

Each SUITE_DIR is searched for folders of `*.wasm` test modules (the upstream layout is
`tests/<suite>/testsuite/wasm32-wasip1/`; a module is named `<suite>/<module>`, e.g.
`c/clock_getres-monotonic`). Each module runs as its JSON specification says
(wasi-testsuite's doc/specification.md): a module without a `.json` beside it gets the default
specification, a missing field its default; the program gets the spec's `args` after its name
and exactly the spec's `env`, and passes when its WASI exit code equals `exit_code` (default 0)
and, where the spec gives them, its stdout and stderr equal `stdout` and `stderr`.

A module runs as a job would on a node: a job dict (module bytes, `_start`, args, env, empty
stdin, a timeout and a memory cap) handed to `Wasm3Executor` (the pywasm3 workers),
`WasmtimeExecutor` or `Wasm3CliExecutor` (`wasm3-run`, the C runner of MicroPython nodes), several
at once on that executor's worker processes. A job that fails (invalid module, trap, timeout) fails
its test with the executor's error as the reason.

A spec that preopens directories gets them as the job's `dirs`, read-write: `root` (relative to
the module's folder) as the guest's `/`, or each of the older `dirs` under its own name (as
`/NAME`: wasi-libc resolves a relative path from its working directory `/`, so `NAME/file` finds
it as the upstream runners' `NAME` preopen would). The suite is never written in place: each run
gets a copy of its directories in a temporary folder, with the suite's `*.cleanup` files removed
before the run (as the specification asks; the copy, and so whatever the run left, is removed
after it). An engine without files (wasm3) refuses such modules as it refuses any job that
imports WASI's filesystem calls.

Output: `PASS name` or `FAIL name: reason` per module and `ENGINE: N passed, M failed` per
engine; `--json` prints the same as one JSON document. With `--expected FILE` (a TOML file: per
engine, each module expected to fail and the start of its failure reason), every failure is
checked against it: the exit status is 1 when a module fails that should pass, when an expected
failure now passes (its entry must go), or when it fails for another reason than the one listed
(its entry must be updated), and 0 otherwise. Without it, the exit status is 1 when any module
fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ENGINES = ("wasm3", "wasmtime", "wasm3-run")


def discover(suite_dirs: list[Path]) -> list[tuple[str, Path]]:
    """(name, module path) of every test module under the given folders, sorted by name."""
    found: dict[str, Path] = {}
    for top in suite_dirs:
        for module in sorted(top.rglob("*.wasm")) if top.is_dir() else []:
            folder = module.parent
            suite = folder.parent.parent.name if folder.parent.name == "testsuite" else folder.name
            found.setdefault(f"{suite}/{module.stem}", module)
    return sorted(found.items())


def load_spec(module: Path) -> dict[str, Any]:
    """The module's specification with the defaults filled in."""
    spec: dict[str, Any] = {"args": [], "env": {}, "exit_code": 0}
    path = module.with_suffix(".json")
    if path.exists():
        spec.update(json.loads(path.read_text(encoding="utf-8")))
    return spec


def preopens(spec: dict[str, Any], module: Path, scratch: Path) -> list[dict[str, Any]]:
    """The job's dirs for a spec: copies of its directories under `scratch`, writable, without
    the suite's `*.cleanup` files. `root` is the guest's `/`; each of `dirs` is `/NAME`."""
    wanted = [(spec["root"], "/")] if spec.get("root") else []
    wanted += [(str(d), "/" + Path(str(d)).name) for d in spec.get("dirs") or []]
    dirs = []
    for i, (rel, guest) in enumerate(wanted):
        copy = scratch / str(i)
        shutil.copytree(module.parent / rel, copy, symlinks=True)
        for path in [copy, *copy.rglob("*")]:
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | stat.S_IWUSR)
        for path in copy.rglob("*.cleanup"):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        dirs.append({"host": str(copy), "guest": guest, "write": True})
    return dirs


def _text(data: bytes, limit: int = 200) -> str:
    text = data.decode("utf-8", "replace")
    return repr(text if len(text) <= limit else text[:limit] + "...")


def check(spec: dict[str, Any], outcome: dict[str, Any]) -> str | None:
    """Why an executor outcome fails its spec, or None when it passes."""
    stdout, stderr = outcome.get("stdout") or b"", outcome.get("stderr") or b""
    if outcome.get("status") != "completed":
        error = str(outcome.get("error") or outcome.get("status") or "failed")
        return " ".join(error.split())  # wasmtime's backtraces span lines
    exit_code = int(outcome.get("exit_code") or 0)
    if exit_code != spec["exit_code"]:
        tail = f"; stderr {_text(stderr)}" if stderr.strip() else ""
        return f"exit code {exit_code}, expected {spec['exit_code']}{tail}"
    for stream, data in (("stdout", stdout), ("stderr", stderr)):
        want = spec.get(stream)
        if want is not None and data != want.encode():
            return f"{stream} {_text(data)}, expected {want!r}"
    return None


def make_executor(engine: str, workers: int, scratch: Path) -> Any:
    if engine == "wasmtime":
        from edge.executors.wasmtime_exec import WasmtimeExecutor

        return WasmtimeExecutor(workers=workers)
    if engine == "wasm3-run":
        from edge.executors.wasm3_cli import Wasm3CliExecutor

        return Wasm3CliExecutor(str(scratch / "jobs"))
    from edge.executors.wasm3 import Wasm3Executor

    return Wasm3Executor(workers=workers)


def run_engine(
    engine: str, modules: list[tuple[str, Path]], timeout: float, workers: int
) -> list[dict[str, Any]]:
    """Each module's result on one engine: {name, passed, reason, seconds}."""
    with tempfile.TemporaryDirectory(prefix="wasi-conformance-") as scratch:
        return _run_engine(engine, modules, timeout, workers, Path(scratch))


def _run_engine(
    engine: str, modules: list[tuple[str, Path]], timeout: float, workers: int, scratch: Path
) -> list[dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    pending: list[tuple[str, dict[str, Any], Any]] = []
    with make_executor(engine, workers, scratch) as executor:
        for i, (name, module) in enumerate(modules):
            spec = load_spec(module)
            job = {
                "job_id": module.name,  # the program's argv[0]
                "module": module.read_bytes(),
                "entrypoint": "_start",
                "args": [str(a) for a in spec["args"]],
                "env": {str(k): str(v) for k, v in spec["env"].items()},
                "stdin": b"",
                "timeout_s": timeout,
                "memory_mb": 64,
            }
            dirs = preopens(spec, module, scratch / f"dirs{i}")
            if dirs:
                job["dirs"] = dirs
            pending.append((name, spec, executor.submit(job)))
        while pending:
            waiting = []
            for name, spec, handle in pending:
                outcome = executor.poll(handle)
                if outcome is None:
                    waiting.append((name, spec, handle))
                    continue
                reason = check(spec, outcome)
                results[name] = {
                    "name": name,
                    "passed": reason is None,
                    "reason": reason,
                    "seconds": round((outcome.get("wall_ms") or 0) / 1000, 3),
                }
            pending = waiting
            if pending:
                time.sleep(0.005)
    return [results[name] for name, _ in modules]


def load_expected(path: Path) -> dict[str, dict[str, str]]:
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    return {engine: dict(data.get(engine) or {}) for engine in ENGINES}


def judge(results: list[dict[str, Any]], expected: dict[str, str]) -> list[str]:
    """What is wrong with the results against the expected failures; marks each result."""
    problems = []
    for r in results:
        want = expected.get(r["name"])
        r["expected_failure"] = want
        if r["passed"] and want is not None:
            problems.append(f"{r['name']} now passes: remove it from the expected failures")
        elif not r["passed"] and want is None:
            problems.append(f"{r['name']} fails (a regression): {r['reason']}")
        elif not r["passed"] and want is not None and not r["reason"].startswith(want):
            problems.append(
                f"{r['name']} fails for another reason than the expected {want!r}: "
                f"{r['reason']} (update its entry)"
            )
    names = {r["name"] for r in results}
    problems += [f"{n} is listed but not in the suite" for n in sorted(set(expected) - names)]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run the WASI testsuite's modules through the node's executors."
    )
    parser.add_argument("suite_dirs", nargs="+", type=Path, metavar="SUITE_DIR")
    parser.add_argument(
        "--engine", action="append", choices=ENGINES, help="repeat for several (default wasm3)"
    )
    parser.add_argument("--expected", type=Path, help="TOML file of the expected failures")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per module")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = parser.parse_args(argv)

    missing = [str(d) for d in args.suite_dirs if not d.is_dir()]
    modules = discover(args.suite_dirs)
    if missing or not modules:
        where = ", ".join(missing) or ", ".join(map(str, args.suite_dirs))
        print(f"wasi-conformance: no test modules in {where}", file=sys.stderr)
        return 2
    expected = load_expected(args.expected) if args.expected else None
    report: dict[str, Any] = {"engines": {}, "problems": []}
    for engine in args.engine or ["wasm3"]:
        started = time.monotonic()
        results = run_engine(engine, modules, args.timeout, max(1, args.workers))
        problems = judge(results, expected[engine]) if expected is not None else []
        passed = sum(r["passed"] for r in results)
        report["engines"][engine] = {
            "passed": passed,
            "failed": len(results) - passed,
            "seconds": round(time.monotonic() - started, 2),
            "results": results,
        }
        report["problems"] += [f"{engine}: {p}" for p in problems]
        if not args.json:
            for r in results:
                word = "PASS" if r["passed"] else "FAIL"
                note = " (expected)" if not r["passed"] and r.get("expected_failure") else ""
                print(f"{word} {r['name']}" + (f": {r['reason']}{note}" if r["reason"] else ""))
            print(f"{engine}: {passed} passed, {len(results) - passed} failed")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for problem in report["problems"]:
            print(f"PROBLEM {problem}")
    if expected is not None:
        return 1 if report["problems"] else 0
    return 0 if all(e["failed"] == 0 for e in report["engines"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Job files against stdin/stdout: the same bytes in and out of a wasm job either way, on both
wasm engines that take files (wasmtime, wasm3-run), locally and through a real hub.

    python bench/files.py [--json] [--runs 10] [--hub-runs 5] [--skip-hub]

The program is bench/copy.wat (built here with wat2wasm): it copies /inputs/in.bin to
/outputs/out.bin when it has the file, else stdin to stdout, in 64 KiB chunks. The data is
1,000,000 bytes of ASCII text (the hub keeps up to 1 MiB of stdout and shows it as text).

- local: per engine, --runs jobs each way, alternated, on a warm executor in this process.
  The file way is what a node does: lay the input out (edge.core.jobfiles.prepare), run with
  the job's "dirs", collect /outputs, remove the job's tree; the stdin way is the same job
  with the bytes as stdin and no dirs. Median ms per job each way, and files/stdin.
- hub: a real hub (its own broker) and one real `edge-run` node at a time, set to the engine
  by its preferences. Per engine, --hub-runs jobs each way, alternated, end to end from the
  client: the file way uploads the input, submits it as inputs[0], waits, and downloads
  outputs[0]; the stdin way uploads it, submits it as "input", waits, and takes the result's
  stdout. Median wall ms each way, and files/stdin.

Every run checks that the bytes out are the bytes in (and, through the hub, that the node set
to the engine ran the job). Prints a table, and as its last line one JSON object.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge.core import jobfiles  # noqa: E402

SIZE = 1_000_000
LINE = b"DEparrow bench: the same bytes in and out, as files or through stdin and stdout.\n"
ENGINES = ("wasmtime", "wasm3-run")


def build_module(tmp: Path) -> bytes:
    wat2wasm = shutil.which("wat2wasm")
    if wat2wasm is None:
        raise SystemExit("wat2wasm not found: install wabt (apt-get install wabt)")
    out = tmp / "copy.wasm"
    subprocess.run([wat2wasm, str(ROOT / "bench" / "copy.wat"), "-o", str(out)], check=True)
    return out.read_bytes()


def payload(size: int) -> bytes:
    return (LINE * (size // len(LINE) + 1))[:size]


def median_ms(seconds: list[float]) -> float:
    return round(statistics.median(seconds) * 1000, 1)


def ratio(a: float, b: float) -> float:
    return round(a / b, 2) if b else float("nan")


def alternate(runs: int, files: Callable[[], None], stdin: Callable[[], None]) -> dict[str, Any]:
    """One warm-up of each way, then runs of each, alternated so drift hits both alike."""
    files()
    stdin()
    times: dict[str, list[float]] = {"files": [], "stdin": []}
    for _ in range(runs):
        for way, fn in (("files", files), ("stdin", stdin)):
            t = time.perf_counter()
            fn()
            times[way].append(time.perf_counter() - t)
    f, s = median_ms(times["files"]), median_ms(times["stdin"])
    return {"files_ms": f, "stdin_ms": s, "files_over_stdin": ratio(f, s)}


# --- local: a warm executor in this process ------------------------------------------------
def executor(engine: str, tmp: Path) -> Any:
    if engine == "wasmtime":
        from edge.executors.wasmtime_exec import WasmtimeExecutor

        return WasmtimeExecutor()
    from edge.executors.wasm3_cli import Wasm3CliExecutor

    return Wasm3CliExecutor(str(tmp / "wasm3-run-jobs"))


def local(engine: str, module: bytes, data: bytes, runs: int, tmp: Path) -> dict[str, Any]:
    base = str(tmp / f"{engine}-files")
    os.makedirs(base, exist_ok=True)
    caps = jobfiles.limits()  # a node's defaults (16 MiB of output)
    assert caps is not None
    job = {
        "job_id": "copy", "engine": "wasm", "module": module, "entrypoint": "_start",
        "args": [], "env": {}, "stdin": b"", "timeout_s": 30, "memory_mb": 64,
    }  # fmt: skip
    seq = [0]

    def check(way: str, out: dict[str, Any]) -> None:
        if out["status"] != "completed" or out["exit_code"] != 0:
            raise RuntimeError(f"{engine}, {way}: the job did not complete: {out}")

    with executor(engine, tmp) as ex:

        def files() -> None:
            seq[0] += 1
            root, dirs = jobfiles.prepare(base, f"j{seq[0]}", [("in.bin", data)])
            try:
                out = ex.run({**job, "dirs": dirs})
                check("files", out)
                got = jobfiles.collect(root + "/out", caps)
            finally:
                jobfiles.remove_tree(root)
            if [f["path"] for f in got] != ["out.bin"] or got[0]["data"] != data:
                raise RuntimeError(f"{engine}, files: /outputs is not the input: {got!r:.200}")
            if out["stdout"]:
                raise RuntimeError(f"{engine}, files: the job printed {out['stdout'][:80]!r}")

        def stdin() -> None:
            out = ex.run({**job, "stdin": data})
            check("stdin", out)
            if out["stdout"] != data:
                raise RuntimeError(
                    f"{engine}, stdin: stdout is not the input ({len(out['stdout'])} bytes)"
                )

        return alternate(runs, files, stdin)


# --- through a real hub -------------------------------------------------------------------
def start_node(hub: Any, owner: Any, engine: str, tmp: Path) -> tuple[Any, dict[str, Any]]:
    """An `edge-run` node set to engine by its preferences file, once the hub has it idle:
    its process and its entry in the owner's node list."""
    from deparrow.localnet import Proc, wait_for

    name = f"node-{engine}"
    prefs = tmp / f"{name}.json"
    prefs.write_text(json.dumps({"wasm_engine": engine}))
    token = owner.enrollment_token()["token"]
    cmd = [sys.executable, "-m", "edge.cli", "--hub", hub.url, "--token", token,
           "--name", name, "--data-dir", str(tmp / name), "--config", str(prefs),
           "--always-run", "--dashboard-port", "0"]  # fmt: skip
    node = Proc(name, cmd, tmp / f"{name}.log")
    try:
        idle = wait_for(
            f"node {name} to come online",
            lambda: [n for n in owner.nodes() if n["name"] == name and n["state"] == "idle"],
            60,
            [node, hub.proc],
        )
        if "unavailable" in node.output():  # it fell back to the default engine (pywasm3)
            raise RuntimeError(f"{name} is not on {engine}:\n{node.tail()}")
    except BaseException:
        node.stop()
        raise
    return node, idle[0]


def through_hub(module: bytes, data: bytes, runs: int, tmp: Path) -> dict[str, Any]:
    from deparrow.localnet import LocalHub

    module_ref = "base64:" + base64.b64encode(module).decode()
    hub = LocalHub(tmp / "hub", heartbeat_s=0.5, extra=["--welcome-grant", "100000"])
    figures: dict[str, Any] = {}
    try:
        _, owner = hub.user("owner")
        _, client = hub.user("bench")
        for engine in ENGINES:
            node, me = start_node(hub, owner, engine, tmp)
            try:
                figures[engine] = one_engine(hub.url, client, me["id"], module_ref, data, runs)
                figures[engine]["node_id"] = me["id"]
            finally:
                node.stop()
            # Gone from the hub before the next node: no job goes to a stopped node.
            owner.remove_node(me["id"])
    finally:
        hub.stop()
    return figures


def one_engine(
    url: str, client: Any, node_id: str, module_ref: str, data: bytes, runs: int
) -> dict[str, Any]:
    engine = {"type": "wasm", "module": module_ref}

    def finished(spec: dict[str, Any]) -> dict[str, Any]:
        job: dict[str, Any] = client.wait(client.submit(spec)["id"], timeout_s=60, poll_s=0.01)
        result = job.get("result") or {}
        if job["state"] != "completed" or result.get("exit_code") != 0:
            raise RuntimeError(f"job {job['id']}: {job['state']}, {result.get('error')}")
        if job["node"] != node_id:
            raise RuntimeError(f"job {job['id']} ran on {job['node']}, not on {node_id}")
        return job

    def files() -> None:
        ref = client.upload(data)
        spec = {"engine": engine, "inputs": [{"path": "in.bin", "ref": ref}], "outputs": True,
                "timeout": 60}  # fmt: skip
        job = finished(spec)
        outputs = job["result"].get("outputs") or []
        if [o["path"] for o in outputs] != ["out.bin"]:
            raise RuntimeError(f"job {job['id']}: outputs {outputs}")
        req = urllib.request.Request(
            url + outputs[0]["url"], headers={"Authorization": "Bearer " + client.jwt()}
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            got = resp.read()
        if got != data:
            raise RuntimeError(f"job {job['id']}: out.bin is not the input ({len(got)} bytes)")

    def stdin() -> None:
        job = finished({"engine": engine, "input": client.upload(data), "timeout": 60})
        got = (job["result"].get("stdout") or "").encode()
        if got != data:
            raise RuntimeError(f"job {job['id']}: stdout is not the input ({len(got)} bytes)")

    return alternate(runs, files, stdin)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", action="store_true", help="only the JSON line on stdout")
    p.add_argument("--runs", type=int, default=10, help="local jobs each way per engine (10)")
    p.add_argument("--hub-runs", type=int, default=5, help="hub jobs each way per engine (5)")
    p.add_argument("--skip-hub", action="store_true", help="only the local part")
    args = p.parse_args(argv)
    if args.runs < 1 or args.hub_runs < 1:
        p.error("--runs and --hub-runs must be at least 1")

    def say(text: str) -> None:
        if not args.json:
            print(text, flush=True)

    started = time.perf_counter()
    data = payload(SIZE)
    result: dict[str, Any] = {
        "bytes_in": len(data), "bytes_out": len(data), "engines": list(ENGINES),
        "runs": args.runs, "hub_runs": None if args.skip_hub else args.hub_runs,
        "cpus": os.cpu_count(),
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="deparrow-files-bench-") as tmp_name:
        tmp = Path(tmp_name)
        module = build_module(tmp)
        result["local"] = {}
        for engine in ENGINES:
            say(f"local, {engine}: {args.runs} jobs each way...")
            result["local"][engine] = local(engine, module, data, args.runs, tmp)
        if not args.skip_hub:
            say(f"through a hub, one node per engine: {args.hub_runs} jobs each way...")
            result["hub"] = through_hub(module, data, args.hub_runs, tmp)
    result["bench_s"] = round(time.perf_counter() - started, 1)

    say(f"\n{len(data):,} bytes in and out, median ms per job ({result['cpus']} CPUs)")
    say(f"{'where':8} {'engine':10} {'files':>9} {'stdin':>9} {'files/stdin':>12}")
    for where in ("local", "hub"):
        for engine, f in (result.get(where) or {}).items():
            say(f"{where:8} {engine:10} {f['files_ms']:>9} {f['stdin_ms']:>9} "
                f"{f['files_over_stdin']:>11}x")  # fmt: skip
    say(f"(whole bench: {result['bench_s']} s)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

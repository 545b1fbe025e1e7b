"""Runs jobs through both wasm executors of a MicroPython node, in the DEparrow firmware
(tests/firmware/test_dpwasm3.py drives it):

    micropython tests/firmware/mp_engines.py JOBS.json WORKDIR WASM3_RUN

JOBS.json: {case: job spec, with "module" and "stdin" in base64}. Each job runs in dpwasm3,
in this process (firmware/wasm3_exec.py), then in a wasm3-run process
(edge/executors/wasm3_cli.py), both with a 4 KiB stdout cap and a 1 KiB stderr cap; one line
`CASE {"case", "dpwasm3", "wasm3-run"}` per case, each outcome with its output in base64 and
the milliseconds it took. Then the executor's own checks, as `CHECK name ok|why` lines.
"""

import json
import sys
from binascii import a2b_base64, b2a_base64

from wasm3_exec import Wasm3ModuleExecutor

from edge.core import compat
from edge.executors.wasm3_cli import Wasm3CliExecutor

CAPS = {"stdout_cap": 4096, "stderr_cap": 1024}


def spec_of(raw):
    spec = dict(raw)
    for key in ("module", "stdin"):
        spec[key] = a2b_base64(raw[key])
    return spec


def run(executor, spec):
    start = compat.ticks_ms()
    out = dict(executor.run(spec))
    out["ms"] = compat.ticks_diff(compat.ticks_ms(), start)
    for key in ("stdout", "stderr"):
        out[key] = b2a_base64(out[key]).decode().strip()
    return out


def check(name, ok, why=""):
    print("CHECK " + name + " " + ("ok" if ok else "FAILED " + why))


def cancel_and_go_on(board, loop, fib):
    """A running job is cancelled at once, and the one queued behind it runs."""
    running = board.submit({"job_id": "spin", "module": loop, "entrypoint": "_start",
                            "timeout_s": 30})  # fmt: skip
    queued = board.submit({"job_id": "next", "module": fib, "entrypoint": "fib", "args": ["20"]})
    compat.sleep_ms(200)
    check("running on its own thread", board.poll(running) is None, repr(board.poll(running)))
    start = compat.ticks_ms()
    board.cancel(running)
    took = compat.ticks_diff(compat.ticks_ms(), start)
    check("cancelled within a second", took < 1000, str(took) + " ms")
    status = (board.poll(running) or {}).get("status")
    check("cancelled", status == "cancelled", repr(status))
    start = compat.ticks_ms()
    while board.poll(queued) is None and compat.ticks_diff(compat.ticks_ms(), start) < 10000:
        compat.sleep_ms(5)
    returns = (board.poll(queued) or {}).get("returns")
    check("the next one runs", returns == [6765], repr(returns))


def main(path, workdir, runner):
    with open(path) as f:
        jobs = json.load(f)
    board = Wasm3ModuleExecutor(**CAPS)
    cli = Wasm3CliExecutor(workdir, runner=runner, **CAPS)
    for case in sorted(jobs):
        spec = spec_of(jobs[case])
        line = {"case": case, "dpwasm3": run(board, spec), "wasm3-run": run(cli, spec)}
        print("CASE " + json.dumps(line))
    cancel_and_go_on(board, spec_of(jobs["endless loop times out"])["module"],
                     spec_of(jobs["fib"])["module"])  # fmt: skip
    board.close()
    cli.close()


main(sys.argv[1], sys.argv[2], sys.argv[3])

"""The wasm3-run executor (edge/executors/wasm3_cli.py), the one MicroPython nodes use, with
the same cases as tests/edge/test_wasm3_executor.py has for the CPython executor: the same
outcomes and error kinds, whichever interpreter drives it."""

try:
    import os
except ImportError:  # pragma: no cover
    import uos as os

from edge.core import compat
from edge.executors.wasm3_cli import Wasm3CliExecutor
from tests.edge.mp import harness
from tests.edge.mp.harness import fixture

EX = Wasm3CliExecutor(harness.setting("DP_WORK") + "/executor")
KEYS = ["cpu_ms", "error", "exit_code", "returns", "status", "stderr", "stdout", "wall_ms"]


def job(module, entrypoint="_start", args=None, **extra):
    spec = {"job_id": "t", "module": module, "entrypoint": entrypoint, "args": args or [],
            "env": {}, "stdin": b"", "timeout_s": 10, "memory_mb": 64}  # fmt: skip
    spec.update(extra)
    return spec


def wait(handle, ex=EX, timeout_ms=30000):
    return harness.eventually("an outcome", lambda: ex.poll(handle), timeout_ms)


def run(spec, ex=EX):
    return wait(ex.submit(spec), ex)


def alive(pid):
    try:
        with open("/proc/" + str(pid) + "/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] not in (b"Z", b"X")


def test_invoke_returns_values():
    calc = fixture("calc")
    out = run(job(calc, "add", ["2", "40"]))
    assert out["status"] == "completed" and out["error"] is None, out
    assert out["returns"] == [42] and out["exit_code"] == 0
    assert sorted(out.keys()) == KEYS
    assert run(job(calc, "mul64", [str(2**31), "4"]))["returns"] == [2**33]
    assert run(job(calc, "divmod", ["7", "2"]))["returns"] == [3, 1]
    assert run(job(calc, "nothing"))["returns"] == []
    assert run(job(calc, "add", ["-1", "0"]))["returns"] == [-1]  # i32 results are signed


def test_wasi_program_gets_args_env_stdin():
    out = run(job(fixture("wasi_echo"), args=["a b", "c"], env={"WHO": "parrot"},
                  stdin=b"hello stdin", job_id="echo-1"))  # fmt: skip
    assert out["status"] == "completed" and out["exit_code"] == 0, out
    assert out["stdout"] == (
        b"argc=3 argv0=echo-1 [a b] [c]\nWHO=parrot\n"
        b"stdin=HELLO STDIN (11 bytes)\ntime_ok=1 random_ok=1 slept_ok=1 tty=1\n"
    ), out["stdout"]
    assert out["stderr"] == b"done\n"
    assert out["returns"] is None


def test_proc_exit_is_an_exit_code_and_keeps_stdout():
    out = run(job(fixture("exit3")))
    assert out["status"] == "completed" and out["error"] is None
    assert out["exit_code"] == 3 and out["stdout"] == b"bye\n"


def test_bytes_that_are_not_a_module():
    for module in (b"", b"not wasm at all", b"\0asm\x01\0\0\0\x01\x7f"):
        out = run(job(module))
        assert out["status"] == "failed" and out["error"].startswith("invalid module: "), out


def test_missing_entrypoint_export():
    out = run(job(fixture("calc"), "nope"))
    assert out["error"].startswith("invalid module: ") and "'nope'" in out["error"]
    assert "add, divmod, mul64, nothing, recurse" in out["error"]  # says what it exports
    out = run(job(fixture("calc")))  # no _start: not a WASI command
    assert out["error"].startswith("invalid module: ") and "'_start'" in out["error"]


def test_unsupported_import_is_named():
    out = run(job(fixture("sockets")))
    assert out["status"] == "failed"
    assert out["error"].startswith(
        "invalid module: unsupported import wasi_snapshot_preview1.sock_accept"
    ), out["error"]


def test_file_imports_load_and_see_no_directories_without_dirs():
    out = run(job(fixture("files")))  # imports path_open: wasm3-run gives files
    assert (out["status"], out["exit_code"], out["error"]) == ("completed", 0, None), out


def test_timeout_ends_the_job_and_the_executor_goes_on():
    handle = EX.submit(job(fixture("spin"), "spin", timeout_s=1))
    out = wait(handle)
    assert out["status"] == "failed"
    assert out["error"] == "timeout: job exceeded its 1s limit", out["error"]
    assert out["wall_ms"] >= 1000 and out["cpu_ms"] > 0, out
    harness.eventually("the runner to be gone", lambda: not alive(handle.pid), 5000)
    assert run(job(fixture("calc"), "add", ["2", "3"]))["returns"] == [5]


def test_memory_grow_loop_ends_at_the_cap():
    out = run(job(fixture("grow"), memory_mb=8, timeout_s=20))
    assert out["status"] == "failed"
    assert out["error"] == "memory limit: job exceeded 8 MiB (memory.grow past the cap)", out
    # a C program whose malloc runs dry is over its limit the same way
    out = run(job(fixture("hog"), memory_mb=16))
    assert out["error"].startswith("memory limit: job exceeded 16 MiB"), out["error"]
    assert run(job(fixture("calc"), "add", ["2", "3"]))["returns"] == [5]


def test_growing_past_the_modules_own_maximum_answers_minus_one():
    out = run(job(fixture("growmax"), "grow2", memory_mb=8))
    assert out["status"] == "completed" and out["returns"] == [1, -1], out


def test_initial_memory_above_the_cap():
    out = run(job(fixture("bigmem"), memory_mb=64))
    assert out["error"].startswith("memory limit: job exceeded 64 MiB"), out["error"]
    assert "125 MiB" in out["error"]


def test_trap_keeps_output_and_says_why():
    out = run(job(fixture("trap")))
    assert out["status"] == "failed" and out["error"] == "trap: unreachable executed", out
    assert out["stdout"] == b"before\n"
    assert out["stderr"] == b""


def test_deep_recursion_is_a_trap_not_a_crash():
    calc = fixture("calc")
    assert run(job(calc, "recurse", ["1000"]))["returns"] == [1000]
    out = run(job(calc, "recurse", ["100000000"]))
    assert out["error"] == "trap: stack overflow", out


def test_cancel_a_running_job():
    handle = EX.submit(job(fixture("spin"), "spin", timeout_s=30))
    compat.sleep_ms(200)
    assert EX.poll(handle) is None and alive(handle.pid)
    with open("/proc/" + str(handle.pid) + "/stat", "rb") as f:
        stat = f.read()
    assert stat[stat.rfind(b")") + 2 :].split()[16] == b"19"  # nice: the owner comes first
    EX.cancel(handle)
    assert EX.poll(handle)["status"] == "cancelled"
    harness.eventually("the runner to be gone", lambda: not alive(handle.pid), 5000)
    EX.cancel(handle)  # a second cancel changes nothing
    assert EX.poll(handle)["status"] == "cancelled"
    assert run(job(fixture("calc"), "add", ["1", "2"]))["returns"] == [3]


def test_suspended_job_neither_times_out_nor_counts_the_pause():
    handle = EX.submit(job(fixture("spin"), "spin", timeout_s=1))
    assert EX.suspend(handle) and EX.suspend(handle, "throttle")
    compat.sleep_ms(3000)  # three times its timeout, stopped
    assert EX.poll(handle) is None and alive(handle.pid)
    assert EX.resume(handle)  # still stopped for "throttle"
    compat.sleep_ms(200)
    assert EX.poll(handle) is None
    assert EX.resume(handle, "throttle") and not EX.resume(handle, "throttle")
    out = wait(handle)
    assert out["error"] == "timeout: job exceeded its 1s limit", out
    assert 1000 <= out["wall_ms"] < 3000, out  # the 3 s stopped are not its time


def test_invalid_arguments():
    calc = fixture("calc")
    out = run(job(calc, "add", ["x", "1"]))
    assert out["status"] == "failed"
    assert out["error"] == "invalid argument: 'x': add expects an integer for parameter 1 (i32)"
    out = run(job(calc, "add", ["1"]))
    assert out["error"] == "invalid argument: add expects 2 argument(s), got 1", out["error"]
    out = run(job(calc, "add", ["1", str(2**32)]))
    assert out["error"].startswith("invalid argument: '4294967296'") and "that fits" in out["error"]
    assert run(job(calc, "add", ["0x10", "-1"]))["returns"] == [15]
    assert run(job(calc, "add", [" 1_000 ", "007"]))["returns"] == [1007]  # as Python's int()


def test_runner_crash_is_an_executor_error():
    for sig, error in (
        ("SEGV", "executor error: wasm3 runner crashed (SIGSEGV)"),
        ("KILL", "executor error: wasm3-run exited without a result"),
    ):
        handle = EX.submit(job(fixture("spin"), "spin", timeout_s=30))
        compat.sleep_ms(200)
        assert os.system("kill -" + sig + " " + str(handle.pid)) == 0
        out = wait(handle)
        assert out["status"] == "failed" and out["error"] == error, out
    assert run(job(fixture("calc"), "add", ["1", "2"]))["returns"] == [3]


def test_jobs_run_side_by_side():
    spin = fixture("spin")
    handles = [EX.submit(job(spin, "spin", timeout_s=1)) for _ in range(2)]
    outs = [wait(h) for h in handles]
    assert [o["error"] for o in outs] == ["timeout: job exceeded its 1s limit"] * 2
    assert handles[0].pid != handles[1].pid


def test_gas_metering_for_instrumented_modules():
    metered = fixture("metered")
    # Within budget (50 turns x 10 gas), and without a budget at all, it runs.
    assert run(job(metered, "spin", ["50"], gas=1000))["returns"] == [50]
    assert run(job(metered, "spin", ["100000"]))["returns"] == [100000]
    out = run(job(metered, "spin", ["100000"], gas=1000))
    assert out["status"] == "failed"
    assert out["error"] == "gas limit: job used more than its 1000 units of gas", out
    assert run(job(fixture("calc"), "add", ["2", "3"]))["returns"] == [5]  # next job runs


def test_stdout_cap_truncates_with_a_note():
    ex = Wasm3CliExecutor(harness.setting("DP_WORK") + "/capped", stdout_cap=100000)
    out = run(job(fixture("flood")), ex)
    assert out["status"] == "completed"
    assert out["stdout"] == b"x" * 100000
    assert out["stderr"] == b"end\n[deparrow: stdout truncated at 100000 bytes]\n"


def test_close_stops_every_runner():
    ex = Wasm3CliExecutor(harness.setting("DP_WORK") + "/closing")
    busy = ex.submit(job(fixture("spin"), "spin", timeout_s=30))
    compat.sleep_ms(100)
    ex.close()
    assert ex.poll(busy)["status"] == "cancelled"
    harness.eventually("the runner to be gone", lambda: not alive(busy.pid), 5000)
    try:
        ex.submit(job(b""))
    except RuntimeError:
        pass
    else:
        raise AssertionError("a closed executor took a job")


def test_example_jobs():
    manifest = compat.json_loads(harness.wasm_job("jobs.json"))
    for name in sorted(manifest.keys()):
        spec = manifest[name]
        expected = spec["expected"]
        stdin = harness.wasm_job(spec["stdin"]) if spec.get("stdin") else b""
        timeout_s = 1 if expected.get("error") == "timeout" else 10
        out = run(job(harness.wasm_job(spec["module"]), spec["entrypoint"], spec["args"],
                      env=spec["env"], stdin=stdin, timeout_s=timeout_s, memory_mb=32))  # fmt: skip
        if "error" in expected:
            assert out["status"] == "failed", name
            assert out["error"].startswith(expected["error"] + ": "), (name, out["error"])
            continue
        assert out["status"] == "completed", (name, out)
        assert out["stdout"].decode() == expected["stdout"], name
        assert out["returns"] == expected["returns"], name
        assert out["exit_code"] == expected["exit_code"], name
        if "stderr" in expected:
            assert out["stderr"].decode() == expected["stderr"], name


harness.run(globals())

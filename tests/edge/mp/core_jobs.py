"""The node's job state machine (edge/core/jobs.py) driving the real wasm3-run executor: events in
order, signed results, duplicates and re-sends, busy and malformed assignments, cancel."""

from edge.core import compat, protocol
from edge.core.jobs import JobRunner
from edge.executors.wasm3_cli import Wasm3CliExecutor
from tests.edge.mp import harness

NODE = "n_0123456789abcdef"
SECRET = "s3cret-of-this-node"
EX = Wasm3CliExecutor(harness.setting("DP_WORK") + "/jobs")


class Wire:
    """What the runner published, in order: [(kind, msg)]."""

    def __init__(self):
        self.sent = []

    def __call__(self, kind, msg):
        self.sent.append((kind, msg))

    def kinds(self):
        return [(k, m.get("state")) for k, m in self.sent]

    def results(self):
        return [m for k, m in self.sent if k == protocol.RESULT]


def assignment(job_id, module, entrypoint="_start", args=None, attempt=1, **extra):
    msg = protocol.assign(
        job_id, attempt,
        {"type": "wasm", "entrypoint": entrypoint, "args": args or [], "env": {}},
        compat.b64encode(module), compat.hexlify(compat.sha256(module).digest()),
        None, 10, 32,
    )  # fmt: skip
    msg.update(extra)
    return msg


def finish(runner):
    harness.eventually("the job to finish", lambda: not runner.running, 30000, runner.poll)


def test_a_job_runs_and_its_result_is_signed():
    wire = Wire()
    runner = JobRunner(NODE, SECRET, EX, wire)
    assert runner.on_assign(assignment("j1", harness.wasm_job("fib.wasm"), "fib", ["20"])) == (
        "accepted"
    )
    assert runner.busy() and runner.running_ids() == ["j1"]
    finish(runner)
    assert wire.kinds() == [("event", "accepted"), ("event", "running"), ("result", "completed")]
    result = wire.results()[0]
    assert result["returns"] == [6765] and result["exit_code"] == 0 and result["error"] is None
    assert result["node_id"] == NODE and result["attempt"] == 1
    assert protocol.verify_result(SECRET, result, b"")
    assert runner.completed == 1 and not runner.busy()


def test_a_wasi_job_reports_its_output():
    wire = Wire()
    runner = JobRunner(NODE, SECRET, EX, wire)
    runner.on_assign(assignment("j2", harness.wasm_job("sieve.wasm"), args=["1000"]))
    finish(runner)
    result = wire.results()[0]
    stdout = compat.b64decode(result["stdout_b64"])
    assert stdout == b"primes below 1000: 168\n", stdout
    assert result["returns"] is None and protocol.verify_result(SECRET, result, stdout)


def test_duplicates_are_harmless():
    wire = Wire()
    runner = JobRunner(NODE, SECRET, EX, wire)
    msg = assignment("j3", harness.wasm_job("fib.wasm"), "fib", ["15"])
    assert runner.on_assign(msg) == "accepted"
    assert runner.on_assign(msg) == "duplicate"  # still running: ignored
    finish(runner)
    assert runner.on_assign(msg) == "resent"  # finished: the cached result again
    results = wire.results()
    assert len(results) == 2 and results[0] == results[1]
    assert runner.completed == 1


def test_a_busy_node_rejects_and_a_cancel_stops_the_job():
    wire = Wire()
    runner = JobRunner(NODE, SECRET, EX, wire)
    spin = assignment("j4", harness.fixture("spin"), "spin")
    assert runner.on_assign(spin) == "accepted"
    other = assignment("j5", harness.wasm_job("fib.wasm"), "fib", ["5"])
    assert runner.on_assign(other) == "rejected"
    assert wire.sent[-1][1]["state"] == "rejected" and wire.sent[-1][1]["detail"] == "node busy"
    assert runner.on_cancel(protocol.cancel("j4", 1)) == "cancelled"
    assert runner.on_cancel(protocol.cancel("j4", 1)) == "unknown"
    assert wire.sent[-1][1]["state"] == "cancelled"
    assert not runner.running and not wire.results()  # a cancelled job sends no result
    assert runner.on_assign(other) == "accepted"
    finish(runner)
    assert wire.results()[0]["returns"] == [5]


def test_a_late_cancel_for_an_earlier_attempt_leaves_the_current_one_running():
    """The hub gave this node the job again (attempt 2: it had lost attempt 1 to the node), and
    a cancel for attempt 1 arrives late. It must not stop attempt 2; attempt 2's cancel must."""
    wire = Wire()
    runner = JobRunner(NODE, SECRET, EX, wire)

    def cancel(msg):  # as it comes off the wire
        return runner.on_cancel(protocol.decode(protocol.encode(msg)))

    assert runner.on_assign(assignment("j8", harness.fixture("spin"), "spin", attempt=2)) == (
        "accepted"
    )
    assert cancel(protocol.cancel("j8", 1)) == "stale"
    assert cancel({"v": 1, "job_id": "j8"}) == "dropped"  # the protocol requires the attempt
    assert runner.poll() == 0 and runner.running_ids() == ["j8"]
    assert wire.kinds() == [("event", "accepted"), ("event", "running")]
    assert cancel(protocol.cancel("j8", 2)) == "cancelled"
    assert wire.sent[-1][1]["state"] == "cancelled" and wire.sent[-1][1]["attempt"] == 2
    assert not runner.running and not wire.results()
    # A cancel for a later attempt than the one running stops it too: the hub has moved on,
    # and would ignore this attempt's result.
    assert runner.on_assign(assignment("j9", harness.fixture("spin"), "spin")) == "accepted"
    assert cancel(protocol.cancel("j9", 2)) == "cancelled"
    assert wire.sent[-1][1]["state"] == "cancelled" and wire.sent[-1][1]["attempt"] == 1
    assert not runner.running and not wire.results()


def test_a_runaway_job_times_out():
    wire = Wire()
    runner = JobRunner(NODE, SECRET, EX, wire)
    runner.on_assign(assignment("j6", harness.fixture("spin"), "spin", timeout_s=1))
    finish(runner)
    result = wire.results()[0]
    assert result["state"] == "failed" and result["exit_code"] == -1
    assert result["error"] == "timeout: job exceeded its 1s limit", result["error"]
    assert runner.failed == 1


def test_bad_assignments_fail_or_are_rejected_with_a_reason():
    wire = Wire()
    runner = JobRunner(NODE, SECRET, EX, wire)
    fib = harness.wasm_job("fib.wasm")
    assert runner.on_assign({"job_id": 7}) == "dropped"
    bad_args = assignment("b1", fib, "fib")
    bad_args["engine"]["args"] = [1]
    assert runner.on_assign(bad_args) == "failed"
    error = wire.results()[-1]["error"]
    assert error == "invalid assignment: engine.args must be a list of strings", error
    assert runner.on_assign(assignment("b2", fib, module_sha256="00" * 32)) == "failed"
    assert wire.results()[-1]["error"] == "invalid module: sha256 does not match"
    docker = assignment("b3", fib)
    docker["engine"]["type"] = "docker"
    assert runner.on_assign(docker) == "rejected"
    assert wire.sent[-1][1]["detail"] == "engine not available here"
    assert runner.on_assign(assignment("b4", b"\0asm\x01\0\0\0")) == "accepted"
    finish(runner)
    assert wire.results()[-1]["error"].startswith("invalid module: no exported function")
    for msg in wire.results():
        assert protocol.verify_result(SECRET, msg, compat.b64decode(msg["stdout_b64"]))


harness.run(globals())

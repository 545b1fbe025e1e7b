# The wire contract between nodes, agents and the hub: topics, message shapes, signing.
#
# This is the one module of edge/ the hub imports, so both sides speak one definition.
# It stays in the MicroPython subset: no typing, no dataclasses, no f-string tricks.
# docs/protocol.md is the prose version of this file; change both together.

from edge.core import compat

VERSION = 1
PREFIX = "dp/v1"

# Node -> hub (a node may publish only under its own nodes/<id>/ prefix).
HELLO = "hello"  # QoS 1: capabilities, once per connection
HEARTBEAT = "heartbeat"  # QoS 0: state + offered resources, every interval
STATUS = "status"  # QoS 1, retained: online/offline (the last will says offline)
EVENT = "event"  # QoS 1: a job changed state on this node
RESULT = "result"  # QoS 1: a job's signed result
NODE_OUT = (HELLO, HEARTBEAT, STATUS, EVENT, RESULT)

# Hub -> node.
ASSIGN = "assign"  # QoS 1: run this job
CANCEL = "cancel"  # QoS 1: stop this job
NODE_IN = (ASSIGN, CANCEL)

# Agent <-> hub.
SUBMIT = "submit"  # agent -> hub, QoS 1
REPLY = "reply"  # hub -> agent, QoS 1
# Service calls between agents, through the hub (hub/agents/calls.py, docs/agents.md).
INVOKE = "invoke"  # caller agent -> hub, QoS 1: call a service; the outcome comes on `reply`
CALL = "call"  # hub -> serving agent, QoS 1: a paid call to answer before its deadline
RESPONSE = "response"  # serving agent -> hub, QoS 1: the answer to a call
NOTICE = "notice"  # hub -> agent and its owner, QoS 1: e.g. its service job was stopped
AGENT_OUT = (SUBMIT, INVOKE, RESPONSE)
AGENT_IN = (REPLY, CALL, NOTICE)

# Node states reported in heartbeats.
IDLE = "idle"
BUSY = "busy"
SUSPENDED = "suspended"
OFFLINE = "offline"
ONLINE = "online"

# Job events a node reports, in order.
ACCEPTED = "accepted"
RUNNING = "running"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"
REJECTED = "rejected"  # the node cannot take it (busy, engine missing); the hub requeues

# Payload size limits the hub enforces (bytes); larger messages are logged and dropped.
MAX_HEARTBEAT = 16 * 1024
MAX_EVENT = 16 * 1024
MAX_OUTPUT_BYTES = 16 * 1024 * 1024  # a job's files under /outputs, at most (docs/jobs.md)
MAX_RESULT = 2 * 1024 * 1024 + MAX_OUTPUT_BYTES * 4 // 3 + 64 * 1024  # they travel in base64
MAX_SUBMIT = 8 * 1024 * 1024
MAX_CALL = 256 * 1024  # invoke and response: a service's input or output travels inline


def node_topic(node_id, kind):
    return PREFIX + "/nodes/" + node_id + "/" + kind


def agent_topic(agent_id, kind):
    return PREFIX + "/agents/" + agent_id + "/" + kind


def parse_topic(topic):
    """Split 'dp/v1/nodes/<id>/<kind>' into ('nodes', id, kind); None when foreign."""
    parts = topic.split("/")
    if len(parts) != 5 or parts[0] + "/" + parts[1] != PREFIX:
        return None
    if parts[2] not in ("nodes", "agents") or not parts[3]:
        return None
    return parts[2], parts[3], parts[4]


def encode(msg):
    return compat.json_dumps(msg)


def decode(payload):
    """Bytes -> dict; raises ValueError naming the problem."""
    try:
        msg = compat.json_loads(payload)
    except Exception as e:  # MicroPython raises plain ValueError, CPython JSONDecodeError
        raise ValueError("payload is not JSON: " + str(e))
    if not isinstance(msg, dict):
        raise ValueError("payload must be a JSON object")
    return msg


# --- node -> hub -------------------------------------------------------------


def hello(
    node_id, engines, resources, version, running=(), allow_network=(), files=None, slots=1,
    gpus=None,
    max_message=None,
):  # fmt: skip
    """running: jobs still running from before a reconnect (the hub requeues the others).
    allow_network: the engines whose jobs may use the network here (the owner's choice); the
    hub sends a job that asks for network access only to a node that lists its engine.
    files: {"engines", "max_input_bytes", "max_output_bytes", "max_output_files"}: the
    engines that take file jobs here and how large; None: no file jobs.
    slots: how many jobs it runs at once (a board: 1). gpus: the GPUs it has, each
    {"index", "name", "uuid", "memory_mb"}; what it offers of them now is in resources.gpu.
    max_message: the largest message (bytes) it can take, a board's share of its heap; the
    hub sends it no larger assignment. None: no limit of its own."""
    msg = {
        "v": VERSION,
        "node_id": node_id,
        "engines": list(engines),
        "resources": resources,
        "version": version,
        "running": list(running),
        "allow_network": list(allow_network),
        "slots": slots,
    }
    if files is not None:
        msg["files"] = files
    if gpus:
        msg["gpus"] = gpus
    if max_message:
        msg["max_message"] = max_message
    return msg


def heartbeat(
    node_id, seq, state, resources, running, allow_network=(), free=None, suspended=None
):  # fmt: skip
    """resources: {"cpu": cores offered, "memory_mb": RAM offered, "gpu": n, "load": 0..1}.
    state: idle while a slot is free, busy when every slot runs a job, suspended while the
    owner's preferences stop jobs. free: what is left of the offer after the running jobs'
    shares, {"cpu", "memory_mb", "gpu", "slots"}. suspended: while state is suspended, why
    and when jobs may run again, {"why", "resume_in_s"} (resume_in_s None: no one can tell)."""
    msg = {
        "v": VERSION,
        "node_id": node_id,
        "seq": seq,
        "ts": compat.time_ms(),
        "state": state,
        "resources": resources,
        "running": list(running),
        "allow_network": list(allow_network),
    }
    if free is not None:
        msg["free"] = free
    if suspended is not None:
        msg["suspended"] = suspended
    return msg


def status(node_id, state):
    return {"v": VERSION, "node_id": node_id, "state": state}


def event(node_id, job_id, attempt, state, detail=None):
    msg = {
        "v": VERSION,
        "node_id": node_id,
        "job_id": job_id,
        "attempt": attempt,
        "state": state,
        "ts": compat.time_ms(),
    }
    if detail:
        msg["detail"] = detail
    return msg


def result_digest(stdout, returns, outputs=None):
    """sha256 hex over what the job produced: its stdout, its returned values, then the
    path, size and sha256 of each file it left under /outputs, in the message's order."""
    h = compat.sha256(stdout)
    if returns:
        h.update(b"\x00" + ",".join([str(r) for r in returns]).encode())
    if outputs:
        h.update(b"\x01")
        for f in outputs:
            h.update((f["path"] + "\x00" + str(f["size"]) + "\x00" + f["sha256"] + "\n").encode())
    return compat.hexlify(h.digest())


def signing_string(job_id, attempt, node_id, state, exit_code, digest, wall_ms, cpu_ms):
    # A fixed field order instead of canonical JSON: both interpreters build it the same way.
    return "|".join(
        [
            "v1",
            job_id,
            str(attempt),
            node_id,
            state,
            str(exit_code),
            digest,
            str(wall_ms),
            str(cpu_ms),
        ]
    ).encode()


def outcome(status, error, stdout, stderr, wall_ms, cpu_ms, exit_code=None, returns=None):
    """What an executor reports when a job ends, the input of result() below."""
    return {
        "status": status,
        "exit_code": exit_code,
        "stdout": stdout,
        "stderr": stderr,
        "returns": returns,
        "error": error,
        "wall_ms": wall_ms,
        "cpu_ms": cpu_ms,
    }


def result(node_id, secret, job_id, attempt, outcome):
    """Build the signed result message from an executor outcome dict.

    outcome: {"status", "exit_code", "stdout" (bytes), "stderr" (bytes), "returns",
    "error", "wall_ms", "cpu_ms"}, and "outputs" ([{"path", "size", "sha256", "data"}]) for a
    file job: they travel in the message as {"path", "size", "sha256", "b64"}.
    """
    stdout = outcome.get("stdout") or b""
    returns = outcome.get("returns")
    state = COMPLETED if outcome["status"] == COMPLETED else FAILED
    exit_code = outcome.get("exit_code")
    if exit_code is None:
        exit_code = -1
    wall_ms = int(outcome.get("wall_ms") or 0)
    cpu_ms = int(outcome.get("cpu_ms") or 0)
    outputs = outcome.get("outputs")
    digest = result_digest(stdout, returns, outputs)
    sig = compat.hmac_sha256_hex(
        secret,
        signing_string(job_id, attempt, node_id, state, exit_code, digest, wall_ms, cpu_ms),
    )
    msg = {
        "v": VERSION,
        "node_id": node_id,
        "job_id": job_id,
        "attempt": attempt,
        "state": state,
        "exit_code": exit_code,
        "stdout_b64": compat.b64encode(stdout),
        "stderr_b64": compat.b64encode(outcome.get("stderr") or b""),
        "returns": returns,
        "error": outcome.get("error"),
        "wall_ms": wall_ms,
        "cpu_ms": cpu_ms,
        "digest": digest,
        "sig": sig,
    }
    if outputs is not None:
        msg["outputs"] = [
            {"path": f["path"], "size": f["size"], "sha256": f["sha256"],
             "b64": compat.b64encode(f["data"])}
            for f in outputs
        ]  # fmt: skip
    return msg


def verify_result(secret, msg, stdout):
    """True when msg's digest matches stdout/returns/outputs (as listed: the hub checks each
    file's bytes against its sha256 itself) and its HMAC matches secret."""
    digest = result_digest(stdout, msg.get("returns"), msg.get("outputs"))
    if digest != msg.get("digest"):
        return False
    expected = compat.hmac_sha256_hex(
        secret,
        signing_string(
            msg["job_id"],
            msg["attempt"],
            msg["node_id"],
            msg["state"],
            msg["exit_code"],
            digest,
            msg["wall_ms"],
            msg["cpu_ms"],
        ),
    )
    return compat.compare_digest(expected, msg.get("sig") or "")


# --- hub -> node -------------------------------------------------------------


def assign(
    job_id,
    attempt,
    engine,
    module_b64,
    module_sha256,
    stdin_b64,
    timeout_s,
    memory_mb,
    gas=None,
    files=None,
    cpu=None,
    gpu=0,
):
    """engine: {"type": "wasm", "entrypoint", "args", "env"} (or docker/native, no module).
    cpu: the CPU-equivalents the job was given (its share of the node); gpu: how many of the
    node's GPUs it gets (absent: none).
    gas: a budget for a wasm module instrumented with metering.usegas; None: unmetered.
    files: {"inputs": [{"path", "sha256", "b64"}]} for a file job (it sees them read-only
    under /inputs, and what it writes under /outputs comes back in its result); None: none."""
    msg = {
        "v": VERSION,
        "job_id": job_id,
        "attempt": attempt,
        "engine": engine,
        "module_b64": module_b64,
        "module_sha256": module_sha256,
        "stdin_b64": stdin_b64,
        "timeout_s": timeout_s,
        "memory_mb": memory_mb,
    }
    if cpu is not None:
        msg["cpu"] = cpu
    if gas is not None:
        msg["gas"] = gas
    if files is not None:
        msg["files"] = files
    if gpu:
        msg["gpu"] = gpu
    return msg


def cancel(job_id, attempt):
    return {"v": VERSION, "job_id": job_id, "attempt": attempt}


# --- agent <-> hub -----------------------------------------------------------


def submit(request_id, token, spec):
    """An agent's job submission; token is the agent's API token (checked by the hub)."""
    return {"v": VERSION, "request_id": request_id, "token": token, "spec": spec}


def reply(request_id, ok, body):
    return {"v": VERSION, "request_id": request_id, "ok": ok, "body": body}


def invoke(request_id, token, service_id, input, timeout_s=None):
    """A caller agent's service call; token is the caller's API token (it pays)."""
    msg = {"v": VERSION, "request_id": request_id, "token": token, "service": service_id,
           "input": input}  # fmt: skip
    if timeout_s is not None:
        msg["timeout_s"] = timeout_s
    return msg


def call(call_id, service_id, service, caller, input, price, deadline_ms):
    """A call for the serving agent to answer before deadline_ms (ms since the epoch)."""
    return {"v": VERSION, "call_id": call_id, "service_id": service_id, "service": service,
            "caller": caller, "input": input, "price": price,
            "deadline_ms": deadline_ms}  # fmt: skip


def response(call_id, token, ok, output=None, error=None):
    """The serving agent's answer: ok with an output, or not ok with an error message."""
    msg = {"v": VERSION, "call_id": call_id, "token": token, "ok": ok}
    if ok:
        msg["output"] = output
    else:
        msg["error"] = error or "failed"
    return msg


def notice(agent_id, kind, message, ref=None):
    return {"v": VERSION, "agent": agent_id, "kind": kind, "message": message, "ref": ref}

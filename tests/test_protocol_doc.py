"""docs/protocol.md is executable: its shell blocks act as a node and as an agent against a real
hub on a real Mosquitto, and its JSON examples decode with the hub's own wire types.

Blocks are marked in the doc with `<!-- shell: NAME -->` / `<!-- example: NAME -->` before a
fenced block, and the topic table with `<!-- topics -->`. Change the doc and the code together.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import msgspec
import psutil
import pytest
from aiohttp import web

import wasm_jobs
from deparrow import localnet
from deparrow.client import Client
from edge.core import compat, protocol
from hub.api import routes as api
from hub.api import types
from hub.market import spec
from hub.mqtt import bridge, wire
from hub.mqtt.bridge import parse_mqtt_url
from hub.mqtt.finals import FINAL, final_reply
from tests.conftest import ROOT, Proc, require_mosquitto, start_hub, start_node, wait_until

DOC = ROOT / "docs" / "protocol.md"
FIB = {
    "name": "fib",
    "engine": {"type": "wasm", "module": "example:fib", "entrypoint": "fib", "args": ["20"]},
    "timeout": 10,
}
# What the doc's recipes need besides bash; all come with Debian's coreutils, sed,
# mosquitto-clients and openssl (tools/install-system-deps.sh installs the last two).
TOOLS = ("bash", "sed", "sha256sum", "base64", "mkfifo", "mosquitto_pub", "mosquitto_sub",
         "mosquitto_rr", "openssl")  # fmt: skip


def doc() -> str:
    return DOC.read_text()


def blocks(marker: str, lang: str) -> dict[str, str]:
    pattern = rf"<!-- {marker}: ([\w-]+) -->\s*```{lang}\n(.*?)```"
    found = re.findall(pattern, doc(), flags=re.DOTALL)
    names = [name for name, _ in found]
    assert len(names) == len(set(names)), f"duplicate {marker} block names: {names}"
    return dict(found)


def examples() -> dict[str, Any]:
    return {name: json.loads(text) for name, text in blocks("example", "json").items()}


def shell(names: list[str], extra: str = "") -> str:
    """The named shell blocks of the doc, in order, as one strict bash script."""
    sh = blocks("shell", "sh")
    return "set -euo pipefail\n" + "\n".join(sh[n] for n in names) + "\n" + extra


def require_tools() -> None:
    require_mosquitto()
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(
            f"the shell recipes in docs/protocol.md need {', '.join(missing)}: "
            "run `make deps` (or apt-get install them)"
        )


def kill_while_connected(proc: localnet.Proc, broker_port: int) -> None:
    """SIGKILL the shell node while its connection with the last will is open: the main
    loop's wait, where an idle node spends nearly all its time. Killed in the milliseconds
    between two waits (a heartbeat), a node leaves no will and the hub notices its missed
    heartbeats instead; so the node is frozen, and killed once its wait is connected, or else
    let run a little."""
    deadline = time.monotonic() + 10
    while True:
        os.killpg(proc.p.pid, signal.SIGSTOP)
        for p in psutil.Process(proc.p.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                if p.name() != "mosquitto_sub" or "--will-topic" not in p.cmdline():
                    continue
                conns = (
                    p.net_connections("tcp")
                    if hasattr(p, "net_connections")
                    else p.connections("tcp")
                )
                if any(
                    c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port == broker_port
                    for c in conns
                ):
                    os.killpg(proc.p.pid, signal.SIGKILL)
                    proc.kill()
                    return
        os.killpg(proc.p.pid, signal.SIGCONT)
        assert time.monotonic() < deadline, "the shell node's wait never connected"
        time.sleep(0.05)


def have_curl() -> bool:
    # curl is not in tools/install-system-deps.sh: where it is missing, the HTTP steps are
    # done with hub.client (the same requests) and the MQTT recipes are still run verbatim.
    return shutil.which("curl") is not None


# --- the doc against the code, no hub needed -------------------------------------------------
def test_every_topic_is_documented_with_qos_retain_and_limit() -> None:
    text = doc()
    table = text.split("<!-- topics -->", 1)[1].strip().split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = cells
    expected = {
        protocol.node_topic("<node_id>", k): k for k in protocol.NODE_OUT + protocol.NODE_IN
    }
    expected.update(
        {protocol.agent_topic("<agent_id>", k): k for k in (protocol.SUBMIT, protocol.REPLY)}
    )
    assert set(rows) == set(expected)
    for topic, kind in expected.items():
        _, _, qos, retain, limit = rows[topic]
        assert qos == ("0" if kind == protocol.HEARTBEAT else "1"), topic
        assert retain == ("yes" if kind == protocol.STATUS else "no"), topic
        assert limit == str(bridge.SIZE_LIMITS.get(kind, "—")), topic
        assert f"### `{kind}`" in text, f"no section for {kind}"
    assert protocol.PREFIX == "dp/v1" and "**`dp/v1`**" in text


def test_json_examples_decode_with_the_wire_types() -> None:
    ex = examples()
    assert {
        "hello",
        "heartbeat",
        "status",
        "event",
        "event-rejected",
        "result",
        "assign",
        "cancel",
        "submit",
        "reply-ok",
        "reply-400",
        "reply-401",
        "reply-402",
        "reply-final",
        "token-response",
        "enrollment-token-response",
        "enroll-response",
    } <= set(ex)
    secret = "ab" * 32
    built = {
        "hello": protocol.hello("n", [], {}, "", [], gpus=[{"index": 0}]),
        "heartbeat": protocol.heartbeat("n", 0, "idle", {}, [], free={}),
        "status": protocol.status("n", "online"),
        "event": protocol.event("n", "j", 1, "running", "why"),
        "result": protocol.result("n", secret, "j", 1, {"status": "completed"}),
    }
    for name, kind in [
        ("hello", "hello"),
        ("heartbeat", "heartbeat"),
        ("status", "status"),
        ("event", "event"),
        ("event-rejected", "event"),
        ("result", "result"),
    ]:
        msgspec.json.decode(json.dumps(ex[name]), type=wire.NODE_TYPES[kind])
        keys = set(built[kind]) - ({"detail"} if kind == "event" else set())
        assert keys <= set(ex[name]) <= set(built[kind]), name
    assert ex["event-rejected"]["state"] == protocol.REJECTED and ex["event-rejected"]["detail"]
    assert msgspec.json.decode(json.dumps(ex["heartbeat"]["resources"]), type=wire.OfferedResources)

    # The result example is really signed with the secret of the enrollment example.
    enrolled = msgspec.convert(ex["enroll-response"], type=types.EnrollResponse)
    result = ex["result"]
    assert result["node_id"] == enrolled.node_id
    stdout = base64.b64decode(result["stdout_b64"])
    assert protocol.verify_result(enrolled.node_secret, result, stdout)
    assert not protocol.verify_result(secret, result, stdout)

    # The assignment example is what the hub sends for the fib example job.
    assign = ex["assign"]
    assert set(assign) == set(protocol.assign("j", 1, {}, "", "", None, 1, 1, cpu=1))
    assert set(assign["engine"]) == {"type", "entrypoint", "args", "env"}
    module = base64.b64decode(assign["module_b64"])
    assert module == wasm_jobs.path("fib.wasm").read_bytes()
    assert hashlib.sha256(module).hexdigest() == assign["module_sha256"]
    assert set(ex["cancel"]) == set(protocol.cancel("j", 1))

    submit = msgspec.json.decode(json.dumps(ex["submit"]), type=wire.Submit)
    msgspec.convert(submit.spec, type=spec.JobSpec)
    assert submit.spec == FIB
    for name in ("reply-ok", "reply-400", "reply-401", "reply-402"):
        assert set(ex[name]) == set(protocol.reply("r", True, {})), name
    assert ex["reply-ok"]["ok"] and ex["reply-ok"]["request_id"] == submit.request_id
    for status in (400, 401, 402):
        body = ex[f"reply-{status}"]["body"]
        assert body["status"] == status and body["error"]
    assert ex["reply-402"]["body"]["shortfall"]

    # The final reply: what finals.py builds, its body the REST API's view of the job, for
    # the job of the reply-ok example, settled by the result example.
    final = ex["reply-final"]
    assert set(final) == set(final_reply("r", {"state": "completed"})) and final[FINAL] is True
    assert FINAL not in ex["reply-ok"]
    job = msgspec.convert(final["body"], type=types.JobView)
    assert final["ok"] == (job.state == "completed") and final["request_id"] == submit.request_id
    assert job.id == ex["reply-ok"]["body"]["id"] == ex["result"]["job_id"]
    assert job.result is not None and job.result.digest == ex["result"]["digest"]
    assert job.hold == ex["reply-ok"]["body"]["hold"] and job.node == ex["result"]["node_id"]
    assert (
        msgspec.convert(job.spec, type=spec.JobSpec).engine
        == msgspec.convert(FIB, type=spec.JobSpec).engine
    )

    msgspec.convert(ex["token-response"], type=types.TokenResponse)
    msgspec.convert(ex["enrollment-token-response"], type=types.EnrollmentTokenView)


def test_signing_recipe_matches_the_protocol(tmp_path: Path) -> None:
    require_tools()
    template = "v1|job_id|attempt|node_id|state|exit_code|digest|wall_ms|cpu_ms"
    assert f'"{template}"' in doc()
    names: list[Any] = template.split("|")[1:]  # field names in place of their values
    assert protocol.signing_string(*names).decode() == template
    # The doc's shell recipe (sha256sum + openssl) gives what protocol.py computes.
    secret = "b27533e5011fbc741a03e16bfa0f391180a30d431574a908d08044573faafb1e"
    cases = [
        (b"", [6765]),
        (b"hello from wasm\n", None),
        (b"bye\n", [1, -2, 30]),
        (b"\x00\xffbinary", []),
        (b"", None),
    ]
    script = shell(["helpers", "sign"], 'sign_result; echo "$DIGEST $SIG"')
    for stdout, returns in cases:
        (tmp_path / "stdout").write_bytes(stdout)
        env = {
            **os.environ,
            "WORK": str(tmp_path),
            "NODE_SECRET": secret,
            "JOB_ID": "j_1",
            "ATTEMPT": "2",
            "NODE_ID": "n_1",
            "STATE": "completed",
            "EXIT_CODE": "-1",
            "RETURNS": ",".join(str(r) for r in returns or []),
            "WALL_MS": "1207",
            "CPU_MS": "0",
        }
        out = subprocess.run(
            ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=10, check=True
        ).stdout.split()
        digest = protocol.result_digest(stdout, returns)
        sig = compat.hmac_sha256_hex(
            secret, protocol.signing_string("j_1", 2, "n_1", "completed", -1, digest, 1207, 0)
        )
        assert out == [digest, sig], (stdout, returns)


def test_documented_http_paths_exist() -> None:
    app = web.Application()
    api.add_routes(app)
    routes = {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource}
    calls = re.findall(r'-X (\w+) "\$HUB(/api/v1/[\w/-]+)"', doc())
    assert {path for _, path in calls} >= {
        "/api/v1/auth/token",
        "/api/v1/enrollment-tokens",
        "/api/v1/nodes/enroll",
    }
    for method, path in calls:
        assert (method, path) in routes, (method, path)


# --- the shell recipes against a real hub ------------------------------------------------------
def test_shell_node_runs_a_job_and_is_paid(tmp_path: Path) -> None:
    require_tools()
    # The hub's own Mosquitto: the recipes run under its logins and ACLs.
    hub = start_hub(tmp_path, broker="mosquitto")
    proc: Proc | None = None
    try:
        owner_user, owner = hub.user("owner")
        _, alice = hub.user("alice")
        job = alice.submit(FIB)  # queued: no node yet; the hello below gets it assigned
        work = tmp_path / "work"
        work.mkdir()
        env = {"WORK": str(work)}
        steps = ["helpers"]
        if have_curl():
            env.update(HUB=hub.url, API_TOKEN=owner_user["token"])
            steps.append("enroll")
        else:
            token = owner.enrollment_token()["token"]
            creds = owner.request(
                "POST",
                "/api/v1/nodes/enroll",
                {
                    "token": token,
                    "name": "shell-node",
                    "engines": ["wasm"],
                    "cpu": 2,
                    "memory_mb": 512,
                },
                auth=False,
            )
            host, port = parse_mqtt_url(creds["mqtt"]["url"])
            env.update(
                NODE_ID=creds["node_id"],
                NODE_SECRET=creds["node_secret"],
                MQTT_PASSWORD=creds["mqtt"]["password"],
                MQTT_HOST=host,
                MQTT_PORT=str(port),
                HEARTBEAT_S=str(creds["heartbeat_interval_s"]),
            )
        # The stand-in for a Wasm runtime: fib(20), taking 1.2 s of wall time. The pause before
        # the main loop proves the assignment waits for the inbox in the persistent session.
        # The node's broker password is kept for the test to speak as the node below.
        glue = (
            "run_job() { sleep 1.2; EXIT_CODE=0; RETURNS=6765; }\n"
            'printf %s "$MQTT_PASSWORD" > "$WORK/mqtt-password"\nsleep 1\n'
        )
        steps += ["connect", "announce", "heartbeats", "events", "sign", "result"]
        script = shell(steps, glue) + blocks("shell", "sh")["main-loop"]
        proc = Proc(["bash", "-c", script], tmp_path / "shell-node.log", env=env)

        done = wait_until(
            "the shell node's result to settle",
            lambda: (j := alice.job(job["id"]))["state"] in ("completed", "failed") and j,
            15,
            (proc,),
        )
        assert done["state"] == "completed", (done, proc.output())
        (node,) = owner.nodes()
        assert node["name"] == "shell-node" and done["node"] == node["id"]
        assert done["attempt"] == 1 and done["timings"]["started_at"] is not None  # events came
        assert done["result"]["returns"] == [6765] and done["result"]["exit_code"] == 0
        assert 1200 <= done["result"]["wall_ms"] < 2000
        # 1.2 s of one CPU is 2 started seconds at 10 credits/hour: 5,555 µc.
        assert done["cost"] == "0.005555"
        assert alice.wallet()["balance"] == "99.994445" and alice.wallet()["held"] == "0"
        assert owner.wallet()["balance"] == "100.005555"
        assert owner.nodes()[0]["earned"] == "0.005555"

        # The heartbeat loop keeps the node alive (and idle again) past 3 missed beats.
        time.sleep(2.0)
        assert owner.nodes()[0]["state"] == "idle", proc.output()

        # The node dies without a goodbye: the broker publishes its last will, retained.
        host, port = parse_mqtt_url(hub.admin.status()["broker"]["url"])
        kill_while_connected(proc, port)
        password = (work / "mqtt-password").read_text()
        broker = ["-h", host, "-p", str(port), "-u", node["id"], "-P", password]
        status_topic = protocol.node_topic(node["id"], protocol.STATUS)

        def retained_status() -> Any:
            out = subprocess.run(
                ["mosquitto_sub", *broker, "-t", status_topic, "-C", "1", "-W", "2"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            return json.loads(out.stdout) if out.stdout.strip() else None

        offline = {"v": 1, "node_id": node["id"], "state": "offline"}
        wait_until("the last will", lambda: retained_status() == offline, 5)
        wait_until(
            "the hub to see the node offline", lambda: owner.nodes()[0]["state"] == "offline", 5
        )

        # The node's cached result, sent again (as for a re-sent assignment): nothing moves.
        # Sent as the node now that it is gone: a login has one connection at a time, and
        # this one would have closed the node's.
        (cached,) = work.glob("result.*.json")
        result_topic = protocol.node_topic(node["id"], protocol.RESULT)
        subprocess.run(
            ["mosquitto_pub", *broker, "-q", "1", "-t", result_topic, "-f", str(cached)],
            check=True,
            timeout=10,
        )
        time.sleep(0.5)
        assert alice.job(job["id"])["cost"] == "0.005555"
        assert owner.wallet()["balance"] == "100.005555"
        assert hub.admin.request("GET", "/api/v1/ledger/audit")["balanced"]
    finally:
        if proc is not None and proc.p.poll() is None:
            os.killpg(proc.p.pid, signal.SIGKILL)
            proc.kill()
        hub.proc.stop()


def test_shell_agent_submits_and_reads_the_reply(tmp_path: Path) -> None:
    require_tools()
    hub = start_hub(tmp_path, broker="mosquitto")
    try:
        agent_user, agent = hub.user("agent-7")
        host, port = parse_mqtt_url(hub.admin.status()["broker"]["public_url"])
        env = {
            **os.environ,
            "MQTT_HOST": host,
            "MQTT_PORT": str(port),
            "HUB": hub.url,
            "API_TOKEN": agent_user["token"],
        }
        steps = ["helpers"]
        if have_curl():
            steps.append("agent-id")
        else:
            env["AGENT_ID"] = agent_user["id"]
        steps += ["agent-login", "agent-request"]

        def submit(**override: str) -> dict[str, Any]:
            lines = "".join(f"{k}={shlex.quote(v)}\n" for k, v in override.items())
            sh = blocks("shell", "sh")
            script = shell(steps, lines) + sh["agent-submit"] + sh["agent-done"]
            out = subprocess.run(
                ["bash", "-c", script],
                env=env,
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=20,
            )
            assert out.returncode == 0, out.stderr
            reply: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
            return reply

        ex = examples()
        first = submit()
        assert first["ok"], first
        assert set(first["body"]) == set(ex["reply-ok"]["body"])
        assert first["body"]["hold"] == "0.027777"  # 10 s of one CPU, held in full
        job_id = first["body"]["id"]
        assert [j["id"] for j in agent.jobs()] == [job_id]

        again = submit(REQUEST_ID=first["request_id"])  # a retry creates nothing new
        assert again["ok"] and again["body"]["id"] == job_id

        bad = submit(SPEC='{"engine":{}}')
        assert (
            not bad["ok"] and bad["body"]["status"] == 400 and bad["body"]["field"] == "engine.type"
        )
        assert set(bad["body"]) == set(ex["reply-400"]["body"])
        wrong = submit(API_TOKEN="dpt_wrong-token")
        assert wrong["body"] == ex["reply-401"]["body"]
        pricey = json.dumps({**FIB, "timeout": 86400, "resources": {"cpu": 10}})
        poor = submit(SPEC=pricey)
        assert poor["body"]["status"] == 402 and poor["body"]["shortfall"] == "2300.027777"
        assert set(poor["body"]) == set(ex["reply-402"]["body"])

        assert [j["id"] for j in agent.jobs()] == [job_id]
        assert Client(hub.url, agent_user["token"]).wallet()["held"] == "0.027777"

        # Logged in with a token that is not the agent's: the broker refuses the login.
        script = (
            shell(["helpers", "agent-login", "agent-request"])
            + blocks("shell", "sh")["agent-submit"]
        )
        refused = subprocess.run(
            ["bash", "-c", script],
            env={**env, "AGENT_ID": agent_user["id"], "API_TOKEN": "dpt_not-the-agents-token"},
            cwd=tmp_path, capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        assert refused.returncode != 0 and "not authorised" in refused.stderr, refused.stderr
    finally:
        hub.proc.stop()


def test_shell_agent_gets_the_final_reply(tmp_path: Path) -> None:
    """The agent's recipe end to end: submit, the answer, and the job's final reply when a
    real node has run it, read from the same persistent session."""
    require_tools()
    hub = start_hub(tmp_path, broker="mosquitto")
    node: Proc | None = None
    try:
        _, owner = hub.user("owner")
        agent_user, agent = hub.user("agent-8")
        node = start_node(hub, owner, tmp_path)
        host, port = parse_mqtt_url(hub.admin.status()["broker"]["public_url"])
        env = {
            **os.environ,
            "MQTT_HOST": host,
            "MQTT_PORT": str(port),
            "HUB": hub.url,
            "API_TOKEN": agent_user["token"],
            "AGENT_ID": agent_user["id"],
        }
        sh = blocks("shell", "sh")
        script = (
            shell(["helpers", "agent-login", "agent-request"])
            + sh["agent-submit"]
            + sh["agent-final"]
            + sh["agent-done"]
        )
        out = subprocess.run(
            ["bash", "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
            timeout=90,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        reply, final = (json.loads(line) for line in out.stdout.strip().splitlines()[-2:])
        assert reply["ok"] and FINAL not in reply
        assert final[FINAL] is True and final["ok"] is True
        assert final["request_id"] == reply["request_id"]
        job = final["body"]
        assert job["id"] == reply["body"]["id"] and job["state"] == "completed"
        assert job["result"]["returns"] == [6765] and job == agent.job(job["id"])
        assert set(final) == set(examples()["reply-final"])
    finally:
        if node is not None:
            node.stop()
        hub.proc.stop()

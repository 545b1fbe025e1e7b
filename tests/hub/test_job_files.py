"""Job files through the hub: admission of a spec's inputs, the scheduler's match on what file
jobs a node takes, the inputs in the assign message, the outputs a signed result brings back
(checked, stored, served over REST), verified jobs' outputs, retention and blob collection, and
https:// inputs fetched at submission.

The real app factory, a real SQLite file, a real Mosquitto; the nodes are paho clients speaking
edge/core/protocol.py (tests/hub/test_mqtt_results.py), the https:// inputs come from a real
HTTPS server with a throwaway CA (trustme). Time moves with the hub's clock (`Jobs.clock`),
never by sleeping; waits are on conditions with deadlines.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trustme
from aiohttp import web

import wasm_jobs
from edge.core import protocol
from hub.api import types
from hub.api.services import SERVICES
from hub.app import create_app
from hub.config import HubConfig
from hub.market.job_view import output_url
from tests.hub.test_mqtt_results import Node
from tests.hub.test_supervision import Hub, eventually

FILES = {
    "engines": ["wasm"],
    "max_input_bytes": 1 << 20,
    "max_output_bytes": 1 << 20,
    "max_output_files": 64,
}
WORDFREQ = {"type": "wasm", "module": "example:wordfreq"}
FIB = {
    "name": "fib",
    "engine": {"type": "wasm", "module": "example:fib", "entrypoint": "fib", "args": ["20"]},
    "timeout": 10,
}
README = "wordfreq/inputs/README.txt"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def b64(data: bytes) -> str:
    return "base64:" + base64.b64encode(data).decode()


def file_job(*inputs: dict[str, str], **more: Any) -> dict[str, Any]:
    """A wordfreq job with these inputs whose outputs come back."""
    return {"name": "files", "engine": WORDFREQ, "inputs": list(inputs), "outputs": True, **more}


def out(path: str, data: bytes) -> dict[str, Any]:
    """An output file as an executor reports it (protocol.result sends it in base64)."""
    return {"path": path, "size": len(data), "sha256": sha(data), "data": data}


def module_bytes(name: str) -> bytes:
    jobs = {**wasm_jobs.manifest(), **wasm_jobs.file_jobs()}
    return wasm_jobs.path(jobs[name]["module"]).read_bytes()


class Clock:
    """The hub's clock, standing still until a test moves it."""

    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t


class FileNode(Node):
    def finish(
        self,
        assign: dict[str, Any],
        outputs: list[dict[str, Any]] | None = None,
        stdout: bytes = b"done\n",
    ) -> dict[str, Any]:
        """The signed result of a completed run that left `outputs` under /outputs."""
        outcome = protocol.outcome("completed", None, stdout, b"", 1200, 1100, 0)
        if outputs is not None:
            outcome["outputs"] = outputs
        return protocol.result(self.id, self.secret, assign["job_id"], assign["attempt"], outcome)


class FileHub(Hub):
    def __init__(self, api: Any, clock: Clock) -> None:
        super().__init__(api)
        self.clock = clock

    async def submit(self, who: dict[str, str], spec: dict[str, Any]) -> tuple[int, Any]:
        r = await self.api.post("/api/v1/jobs", json=spec, headers=who)
        return r.status, await r.json()

    async def submitted(self, who: dict[str, str], spec: dict[str, Any]) -> str:
        status, body = await self.submit(who, spec)
        assert status == 201, body
        return str(body["id"])

    async def view(self, who: dict[str, str], job_id: str) -> dict[str, Any]:
        r = await self.api.get(f"/api/v1/jobs/{job_id}", headers=who)
        assert r.status == 200, await r.text()
        body: dict[str, Any] = await r.json()
        msgspec.convert(body, type=types.JobView)  # the shape the API promises
        return body

    async def wallet(self, who: dict[str, str]) -> tuple[int, int]:
        body = await (await self.api.get("/api/v1/wallet", headers=who)).json()
        return int(body["balance_micro"]), int(body["held_micro"])

    async def upload(self, who: dict[str, str], data: bytes) -> str:
        r = await self.api.post("/api/v1/blobs", data=data, headers=who)
        assert r.status == 201, await r.text()
        return str((await r.json())["ref"])

    async def enroll(
        self, owner: dict[str, str], files: Any = FILES, engines: tuple[str, ...] = ("wasm",)
    ) -> FileNode:
        """A node enrolled through the API, idle after a hello announcing `files`."""
        t = await (await self.api.post("/api/v1/enrollment-tokens", headers=owner)).json()
        r = await self.api.post("/api/v1/nodes/enroll", json={"token": t["token"], "name": "n"})
        assert r.status == 201, await r.text()
        body = await r.json()
        node = FileNode(self.services.mqtt_url, body["node_id"], body["node_secret"])
        self.peers.append(node)
        resources = {"cpu": 2, "memory_mb": 512}
        node.send(protocol.HELLO, protocol.hello(node.id, engines, resources, "t", files=files))
        await eventually("the node idle", lambda: self.node_state(node.id) == protocol.IDLE)
        return node

    def files(self, job_id: str, role: str) -> list[tuple[str, str, int]]:
        return [tuple(r) for r in self.services.store.job_files(job_id, role)]  # type: ignore[misc]

    def count(self, sql: str) -> int:
        return int(self.services.store.db.query_one(sql)[0])

    def has_blob(self, data: bytes) -> bool:
        return bool(self.services.store.has_blob(sha(data)))

    def retention(self) -> None:
        """The retention step of the hub's tick, at the hub's clock, in its own transaction."""
        with self.services.store.db.transaction():
            self.services.jobs.retention.run(self.clock.t)


MakeHub = Callable[..., Awaitable[FileHub]]


@pytest.fixture
async def make_hub(aiohttp_client: Any, tmp_path: Path, mosquitto: str) -> AsyncIterator[MakeHub]:
    """The real app on a real SQLite file and Mosquitto, with the HubConfig a test asks for."""
    hubs: list[FileHub] = []

    async def make(**config: Any) -> FileHub:
        config.setdefault("welcome_grant_credits", 10)
        app = create_app(HubConfig(data_dir=tmp_path / "hub", mqtt_url=mosquitto, **config))
        client = await aiohttp_client(app)
        client.services = app[SERVICES]
        clock = Clock()
        client.services.jobs.clock = clock
        hubs.append(FileHub(client, clock))
        return hubs[-1]

    yield make
    for hub in hubs:
        for peer in hub.peers:
            peer.stop()


# --- 1. admission --------------------------------------------------------------------------


REFUSED = [
    pytest.param(
        [{"path": "a.txt", "ref": b64(b"one")}, {"path": "a.txt", "ref": b64(b"two")}],
        "inputs[1].path",
        "inputs[1].path: 'a.txt' is given twice",
        id="given-twice",
    ),
    pytest.param(
        [{"path": "..", "ref": b64(b"x")}],
        "inputs[0].path",
        "inputs[0].path: file path '..' must be relative, without '.', '..' or '//'",
        id="dot-dot",
    ),
    pytest.param(
        [{"path": "ok.txt", "ref": b64(b"x")}, {"path": "data/../../etc/passwd", "ref": b64(b"x")}],
        "inputs[1].path",
        "inputs[1].path: file path 'data/../../etc/passwd' must be relative",
        id="dot-dot-inside",
    ),
    pytest.param(
        [{"path": "/etc/passwd", "ref": b64(b"x")}],
        "inputs[0].path",
        "invalid request: Expected `str` matching regex",
        id="absolute",
    ),
    pytest.param(
        [{"path": "a.txt", "ref": b64(b"a" * 600)}, {"path": "b.txt", "ref": b64(b"b" * 600)}],
        "inputs",
        "inputs: 1200 bytes (so far, at b.txt) is over the hub's 1000-byte limit for a job's files",
        id="over-total",
    ),
    pytest.param(
        [{"path": "big.bin", "ref": b64(b"z" * 1001)}],
        "inputs[0].ref",
        "inputs[0].ref: 1001 bytes is over the 1000-byte limit",
        id="one-over",
    ),
    pytest.param(
        [{"path": "a.txt", "ref": "sha256:" + "0" * 64}],
        "inputs[0].ref",
        f"inputs[0].ref: no uploaded blob sha256:{'0' * 64}; upload it first",
        id="unknown-sha256",
    ),
    pytest.param(
        [{"path": "r.txt", "ref": "example:wordfreq/inputs/NOPE.txt"}],
        "inputs[0].ref",
        "inputs[0].ref: no example file 'wordfreq/inputs/NOPE.txt' (have: "
        + ", ".join(wasm_jobs.data_names())
        + ")",
        id="unknown-example-file",
    ),
    pytest.param(  # the pattern lets '..' through; the example's data folder does not
        [{"path": "r.txt", "ref": "example:wordfreq/../../files.json"}],
        "inputs[0].ref",
        "inputs[0].ref: no example file 'wordfreq/../../files.json' (have: "
        + ", ".join(wasm_jobs.data_names())
        + ")",
        id="example-outside-its-data",
    ),
]


@pytest.mark.parametrize(("inputs", "field", "message"), REFUSED)
async def test_a_spec_with_bad_inputs_is_refused_and_nothing_is_held(
    make_hub: MakeHub, inputs: list[dict[str, str]], field: str, message: str
) -> None:
    hub = await make_hub(max_files_bytes=1000)
    _, _, alice = await hub.user("alice")
    before = await hub.wallet(alice)
    status, body = await hub.submit(alice, file_job(*inputs))
    assert status == 400, body
    assert body["field"] == field
    assert body["error"].startswith(message), body["error"]
    # Nothing held, nothing queued, no file rows.
    assert await hub.wallet(alice) == before
    listed = await (await hub.api.get("/api/v1/jobs", headers=alice)).json()
    assert listed["jobs"] == []
    assert hub.count("SELECT count(*) FROM jobs") == 0
    assert hub.count("SELECT count(*) FROM job_files") == 0
    assert hub.services.ledger.audit().balanced


async def test_inputs_are_admitted_and_stored_by_reference(make_hub: MakeHub) -> None:
    hub = await make_hub(max_files_bytes=1000)
    _, _, alice = await hub.user("alice")
    words, upload = b"the cat sat on the mat\n", bytes(range(200))
    uploaded = await hub.upload(alice, upload)
    assert uploaded == "sha256:" + sha(upload)
    readme = wasm_jobs.data(README)
    spec = file_job(
        {"path": "words.txt", "ref": b64(words)},
        {"path": "data/up.bin", "ref": uploaded},
        {"path": "README.txt", "ref": "example:" + README},
    )
    before, _ = await hub.wallet(alice)
    status, body = await hub.submit(alice, spec)
    assert status == 201, body
    job_id = body["id"]

    view = await hub.view(alice, job_id)
    # The inline input is stored as a blob and named by it; the others keep their references.
    assert view["spec"]["inputs"] == [
        {"path": "words.txt", "ref": "sha256:" + sha(words)},
        {"path": "data/up.bin", "ref": uploaded},
        {"path": "README.txt", "ref": "example:" + README},
    ]
    row = hub.services.store.job(job_id)
    assert "base64:" not in row["spec"]
    assert hub.files(job_id, "input") == sorted(
        [
            ("words.txt", sha(words), len(words)),
            ("data/up.bin", sha(upload), len(upload)),
            ("README.txt", sha(readme), len(readme)),
        ]
    )
    assert row["files_bytes"] == len(words) + len(upload) + len(readme)
    assert hub.services.store.blob(sha(words)) == words
    assert hub.services.store.blob(sha(readme)) == readme
    # Held like any job: the hold moved out of the balance.
    balance, held = await hub.wallet(alice)
    assert held == int(row["hold"]) > 0 and balance == before - held


# --- 2. scheduling -------------------------------------------------------------------------


async def test_a_file_job_goes_only_to_a_node_that_takes_its_files(make_hub: MakeHub) -> None:
    hub = await make_hub()
    _, _, owner = await hub.user("owner")
    _, _, alice = await hub.user("alice")
    plain = await hub.enroll(owner, files=None)
    data = b"w" * 1000
    job_id = await hub.submitted(alice, file_job({"path": "in.txt", "ref": b64(data)}))

    def reason() -> str:
        return str(hub.services.store.job(job_id)["reason"])

    no_files = "no online node takes file jobs on the wasm engine"
    await eventually("the no-files reason", lambda: reason().startswith(no_files))
    # A job without files still goes to the node without files; the file job stays queued.
    fib = await hub.submitted(alice, FIB)
    assert (await plain.next(protocol.ASSIGN))["job_id"] == fib
    assert hub.job_state(job_id) == "queued"

    # A node that takes file jobs, but on another engine only, does not take it either.
    docker_only = {**FILES, "engines": ["docker"]}
    other = await hub.enroll(owner, files=docker_only, engines=("wasm", "docker"))
    assert json.loads(hub.services.store.node(other.id)["files"]) == docker_only  # from its hello
    # Its hello's batch ran a scheduling pass (the node is idle once that batch is in).
    assert reason().startswith(no_files) and hub.job_state(job_id) == "queued"

    # A node that takes wasm file jobs, one byte too few of them: the reason says the bytes.
    small = await hub.enroll(owner, files={**FILES, "max_input_bytes": 999})
    too_big = "no online node takes 1000 bytes of input files (the most offered: 999)"
    await eventually("the bytes reason", lambda: reason() == too_big)
    assert hub.job_state(job_id) == "queued"

    # One that takes exactly as many gets it.
    fits = await hub.enroll(owner, files={**FILES, "max_input_bytes": 1000})
    assign = await fits.next(protocol.ASSIGN)
    assert assign["job_id"] == job_id
    job = hub.services.store.job(job_id)
    assert job["state"] == "assigned" and job["node"] == fits.id
    assert small.id != fits.id != other.id


# --- 3. inputs out, outputs back -----------------------------------------------------------


async def test_inputs_go_out_with_the_assignment_and_outputs_come_back(make_hub: MakeHub) -> None:
    hub = await make_hub()
    _, _, owner = await hub.user("owner")
    _, _, alice = await hub.user("alice")
    _, _, bob = await hub.user("bob")
    node = await hub.enroll(owner)
    words, upload = b"one two two\n", b"\x00\x01binary\xff"
    readme = wasm_jobs.data(README)
    spec = file_job(
        {"path": "words.txt", "ref": b64(words)},
        {"path": "sub/up.bin", "ref": await hub.upload(alice, upload)},
        {"path": "README.txt", "ref": "example:" + README},
    )
    before, _ = await hub.wallet(alice)
    job_id = await hub.submitted(alice, spec)

    assign = await node.next(protocol.ASSIGN)
    assert assign["job_id"] == job_id
    assert assign["module_sha256"] == sha(module_bytes("wordfreq"))
    expected = [
        {"path": p, "sha256": sha(d), "b64": base64.b64encode(d).decode()}
        for p, d in sorted([("words.txt", words), ("sub/up.bin", upload), ("README.txt", readme)])
    ]
    assert assign["files"] == {"inputs": expected}

    node.running(assign)
    hub.clock.t += 2
    stdout = b"wordfreq: 3 files\n"
    counts, summary = b"two\t2\none\t1\n", b'{"words": 3}\n'
    outputs = [out("counts.tsv", counts), out("sub/summary.json", summary)]
    node.send(protocol.RESULT, node.finish(assign, outputs, stdout))
    await eventually("the job completed", lambda: hub.job_state(job_id) == "completed")

    view = await hub.view(alice, job_id)
    result = view["result"]
    assert result["stdout"] == stdout.decode() and result["exit_code"] == 0
    assert result["digest"] == protocol.result_digest(stdout, None, outputs)
    assert result["outputs"] == [
        {"path": "counts.tsv", "size": len(counts), "sha256": sha(counts),
         "url": f"/api/v1/jobs/{job_id}/outputs/counts.tsv"},
        {"path": "sub/summary.json", "size": len(summary), "sha256": sha(summary),
         "url": f"/api/v1/jobs/{job_id}/outputs/sub/summary.json"},
    ]  # fmt: skip
    assert view["outputs_expired_at"] is None
    # Settled: the owner paid the job's cost, once.
    balance, held = await hub.wallet(alice)
    assert held == 0 and view["cost"] is not None
    assert before - balance == round(float(view["cost"]) * 1_000_000) > 0
    assert hub.services.ledger.audit().balanced

    for f, data in [(result["outputs"][0], counts), (result["outputs"][1], summary)]:
        r = await hub.api.get(f["url"], headers=alice)
        assert r.status == 200
        assert await r.read() == data
        assert r.headers["X-Content-SHA256"] == sha(data)
        assert r.headers["Content-Disposition"].endswith(f'filename="{f["path"].split("/")[-1]}"')
        # Someone else's job's files are not found, as the job itself is not.
        r = await hub.api.get(f["url"], headers=bob)
        assert r.status == 404
        assert (await r.json())["error"] == f"no job {job_id}"

    r = await hub.api.get(output_url(job_id, "nope.txt"), headers=alice)
    assert r.status == 404
    assert (await r.json())["error"] == (
        f"job {job_id} has no output 'nope.txt' (it has: counts.tsv, sub/summary.json)"
    )
    # An input is not an output.
    r = await hub.api.get(output_url(job_id, "words.txt"), headers=alice)
    assert r.status == 404


# --- 4. outputs that are not what they say ---------------------------------------------------


def dropped_for(caplog: pytest.LogCaptureFixture, why: str) -> bool:
    return any(
        r.levelno == logging.WARNING and r.getMessage().endswith(why) for r in caplog.records
    )


@pytest.mark.parametrize(
    "lie",
    [
        pytest.param({"data": b"hellx"}, id="bytes-not-their-sha256"),
        pytest.param({"size": 6}, id="size-not-the-bytes"),
    ],
)
async def test_a_result_whose_output_bytes_do_not_match_is_dropped(
    make_hub: MakeHub, caplog: pytest.LogCaptureFixture, lie: dict[str, Any]
) -> None:
    hub = await make_hub()
    _, _, owner = await hub.user("owner")
    _, _, alice = await hub.user("alice")
    node = await hub.enroll(owner)
    job_id = await hub.submitted(alice, file_job({"path": "in.txt", "ref": b64(b"in")}))
    assign = await node.next(protocol.ASSIGN)
    node.running(assign)
    await eventually("the job running", lambda: hub.job_state(job_id) == "running")
    hub.clock.t += 2

    # Signed by the node as it is: digest and signature cover path, size and sha256, so they
    # verify; only the bytes that travel are not what those say.
    bad = {**out("out.txt", b"hello"), **lie}
    result = node.finish(assign, [bad])
    assert protocol.verify_result(node.secret, result, b"done\n")
    dropped = hub.bridge.dropped
    node.send(protocol.RESULT, result)
    await eventually("the result dropped", lambda: hub.bridge.dropped > dropped)
    assert dropped_for(
        caplog, "result outputs: out.txt: its bytes are not the size and sha256 it says"
    )
    job = hub.services.store.job(job_id)
    assert job["state"] == "running" and job["result"] is None
    assert hub.files(job_id, "output") == []
    assert not hub.has_blob(bad["data"]) and not hub.has_blob(b"hello")
    _, held = await hub.wallet(alice)
    assert held == int(job["hold"])  # still held: nothing was settled

    # The same attempt's honest result is then taken.
    node.send(protocol.RESULT, node.finish(assign, [out("out.txt", b"hello")]))
    await eventually("the job completed", lambda: hub.job_state(job_id) == "completed")
    assert hub.files(job_id, "output") == [("out.txt", sha(b"hello"), 5)]


async def test_outputs_on_a_job_without_files_are_dropped(
    make_hub: MakeHub, caplog: pytest.LogCaptureFixture
) -> None:
    hub = await make_hub()
    _, _, owner = await hub.user("owner")
    _, _, alice = await hub.user("alice")
    node = await hub.enroll(owner)
    job_id = await hub.submitted(alice, FIB)
    assert hub.services.store.job(job_id)["files_bytes"] is None
    assign = await node.next(protocol.ASSIGN)
    assert "files" not in assign
    node.running(assign)
    hub.clock.t += 2
    dropped = hub.bridge.dropped
    node.send(protocol.RESULT, node.finish(assign, [out("sneaky.bin", b"not asked for")]))
    await eventually("the result dropped", lambda: hub.bridge.dropped > dropped)
    assert dropped_for(caplog, "result outputs: the job is not a file job")
    assert hub.job_state(job_id) in ("assigned", "running")
    assert not hub.has_blob(b"not asked for")
    assert hub.files(job_id, "output") == []

    node.send(protocol.RESULT, node.finish(assign))
    await eventually("the job completed", lambda: hub.job_state(job_id) == "completed")
    assert "outputs" not in json.loads(hub.services.store.job(job_id)["result"])


# --- 5. verified file jobs -----------------------------------------------------------------


async def test_replicas_that_leave_the_same_outputs_agree_and_a_different_one_dissents(
    make_hub: MakeHub,
) -> None:
    hub = await make_hub()
    nodes = []
    for name in ("o1", "o2", "o3"):  # three owners: the replicas go to distinct ones
        _, _, owner = await hub.user(name)
        nodes.append(await hub.enroll(owner))
    _, _, alice = await hub.user("alice")
    data = b"to be counted\n"
    job_id = await hub.submitted(
        alice, file_job({"path": "in.txt", "ref": b64(data)}, verify={"replicas": 3})
    )
    assigns = [await n.next(protocol.ASSIGN) for n in nodes]
    replicas = {a["job_id"] for a in assigns}
    assert len(replicas) == 3 and job_id not in replicas
    for a in assigns:  # each replica reads its verified job's inputs
        want = [{"path": "in.txt", "sha256": sha(data), "b64": base64.b64encode(data).decode()}]
        assert a["files"] == {"inputs": want}
        nodes[assigns.index(a)].running(a)
    hub.clock.t += 2

    agreed, other = b"to\t1\nbe\t1\ncounted\t1\n", b"to\t1\nbe\t1\ncounted\t2\n"
    dissenter, *agreeing = zip(nodes, assigns, strict=True)
    # The dissent first: two agreeing results decide, and a third would then be cancelled.
    node, assign = dissenter
    node.send(protocol.RESULT, node.finish(assign, [out("counts.tsv", other)]))
    await eventually("a replica recorded", lambda: hub.job_state(assign["job_id"]) == "completed")
    for node, assign in agreeing:
        node.send(protocol.RESULT, node.finish(assign, [out("counts.tsv", agreed)]))
    await eventually("the verified job completed", lambda: hub.job_state(job_id) == "completed")

    view = await hub.view(alice, job_id)
    verification = view["verification"]
    assert verification["outcome"] == "agreed"
    verdicts = {r["job"]: r["verdict"] for r in verification["runs"]}
    assert verdicts == {
        dissenter[1]["job_id"]: "dissented",
        agreeing[0][1]["job_id"]: "agreed",
        agreeing[1][1]["job_id"]: "agreed",
    }
    assert view["result"]["outputs"] == [
        {"path": "counts.tsv", "size": len(agreed), "sha256": sha(agreed),
         "url": f"/api/v1/jobs/{job_id}/outputs/counts.tsv"}
    ]  # fmt: skip
    assert hub.files(job_id, "output") == [("counts.tsv", sha(agreed), len(agreed))]
    r = await hub.api.get(view["result"]["outputs"][0]["url"], headers=alice)
    assert r.status == 200 and await r.read() == agreed
    assert r.headers["X-Content-SHA256"] == sha(agreed)
    assert hub.services.ledger.audit().balanced


# --- 6. retention ----------------------------------------------------------------------------


async def test_outputs_expire_after_retention_and_unreferenced_blobs_are_collected(
    make_hub: MakeHub,
) -> None:
    hub = await make_hub(output_retention_s=3600, blob_grace_s=600, queue_ttl_s=30 * 86400)
    _, _, owner = await hub.user("owner")
    _, _, alice = await hub.user("alice")
    node = await hub.enroll(owner)
    mine, only, shared, fib = b"mine alone\n", b"only output\n", b"shared\n", module_bytes("fib")
    job_id = await hub.submitted(alice, file_job({"path": "mine.txt", "ref": b64(mine)}))
    assign = await node.next(protocol.ASSIGN)
    # Queued meanwhile, and not finished when job_id's files expire: one refers to the fib
    # module, the other to `shared` as its input.
    fib_job = await hub.submitted(alice, FIB)
    shared_job = await hub.submitted(alice, file_job({"path": "s.txt", "ref": b64(shared)}))
    hub.clock.t += 10
    outputs = [out("only.txt", only), out("shared.txt", shared), out("copy.wasm", fib)]
    node.send(protocol.RESULT, node.finish(assign, outputs))
    await eventually("the job completed", lambda: hub.job_state(job_id) == "completed")
    finished = float(hub.services.store.job(job_id)["finished_at"])
    assert finished == hub.clock.t
    url = output_url(job_id, "only.txt")

    # A second before the end of its retention: all there.
    hub.clock.t = finished + 3600 - 1
    hub.retention()
    r = await hub.api.get(url, headers=alice)
    assert r.status == 200 and await r.read() == only
    assert (await hub.view(alice, job_id))["outputs_expired_at"] is None
    assert all(hub.has_blob(d) for d in (mine, only, shared, fib))

    # A second after: gone, and the hub says why.
    hub.clock.t = finished + 3600 + 1
    hub.retention()
    r = await hub.api.get(url, headers=alice)
    assert r.status == 410
    assert (await r.json())["error"] == (
        f"the outputs of job {job_id} expired (kept 3600s after it ended)"
    )
    view = await hub.view(alice, job_id)
    assert view["outputs_expired_at"] == hub.clock.t
    assert [f["path"] for f in view["result"]["outputs"]] == ["only.txt", "shared.txt", "copy.wasm"]
    assert hub.files(job_id, "output") == [] and hub.files(job_id, "input") == []
    # Its own blobs went with it; those other jobs still name stayed.
    assert not hub.has_blob(mine) and not hub.has_blob(only)
    assert hub.has_blob(shared) and hub.files(shared_job, "input")[0][1] == sha(shared)
    assert hub.has_blob(fib) and hub.services.store.job(fib_job)["module_sha256"] == sha(fib)
    assert hub.has_blob(module_bytes("wordfreq"))  # its own module: the job row names it
    assert hub.services.store.job(shared_job)["outputs_expired_at"] is None


async def test_an_upload_waits_out_the_grace_and_uploading_it_again_renews_it(
    make_hub: MakeHub,
) -> None:
    hub = await make_hub(blob_grace_s=600)
    _, _, alice = await hub.user("alice")
    old, fresh = b"uploaded first\n", b"uploaded later\n"
    start = hub.clock.t
    await hub.upload(alice, old)

    hub.clock.t = start + 600 - 1  # within the grace: kept for the job that will name it
    hub.retention()
    assert hub.has_blob(old)
    await hub.upload(alice, old)  # again: its grace starts over
    await hub.upload(alice, fresh)

    hub.clock.t = start + 600 + 10  # past the first upload's grace, within the second's
    hub.retention()
    assert hub.has_blob(old), "uploading a blob again did not renew it"
    assert hub.has_blob(fresh), "an upload younger than blob_grace_s was collected"

    hub.clock.t = start + 2 * 600 + 10  # nobody named them: collected
    hub.retention()
    assert not hub.has_blob(old) and not hub.has_blob(fresh)


# --- 7. https:// inputs ----------------------------------------------------------------------


PAYLOAD = b"fetched over https\n" * 10


class Remote:
    def __init__(self, url: str) -> None:
        self.url = url
        self.hits: list[str] = []


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def remote(aiohttp_server: Any, ca: trustme.CA) -> Remote:
    """An HTTPS server on 127.0.0.1 with a certificate from the test CA."""
    box: list[Remote] = []

    async def file(request: web.Request) -> web.Response:
        box[0].hits.append(request.path)
        return web.Response(body=PAYLOAD)

    app = web.Application()
    app.router.add_get("/x", file)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    server = await aiohttp_server(app, ssl=context)
    box.append(Remote(str(server.make_url("/x"))))
    assert box[0].url.startswith("https://127.0.0.1:")
    return box[0]


async def test_an_https_input_is_fetched_into_a_blob(
    make_hub: MakeHub, remote: Remote, ca: trustme.CA, tmp_path: Path
) -> None:
    pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(pem))
    hub = await make_hub(fetch_allow_private=True, fetch_ca_file=str(pem))
    _, _, alice = await hub.user("alice")
    job_id = await hub.submitted(alice, file_job({"path": "remote.txt", "ref": remote.url}))
    assert remote.hits == ["/x"]
    view = await hub.view(alice, job_id)
    assert view["spec"]["inputs"] == [{"path": "remote.txt", "ref": "sha256:" + sha(PAYLOAD)}]
    assert hub.files(job_id, "input") == [("remote.txt", sha(PAYLOAD), len(PAYLOAD))]
    assert hub.services.store.blob(sha(PAYLOAD)) == PAYLOAD
    assert hub.services.store.job(job_id)["files_bytes"] == len(PAYLOAD)


async def test_an_https_input_on_a_loopback_address_is_refused_by_default(
    make_hub: MakeHub, remote: Remote
) -> None:
    hub = await make_hub()
    _, _, alice = await hub.user("alice")
    before = await hub.wallet(alice)
    status, body = await hub.submit(alice, file_job({"path": "remote.txt", "ref": remote.url}))
    assert status == 400, body
    assert body["field"] == "inputs[0].ref"
    assert body["error"].startswith(f"inputs[0].ref: {remote.url}: "), body["error"]
    assert "the address 127.0.0.1 is loopback" in body["error"]
    assert remote.hits == []  # refused before connecting
    assert await hub.wallet(alice) == before
    assert hub.count("SELECT count(*) FROM jobs") == 0
    assert not hub.has_blob(PAYLOAD)

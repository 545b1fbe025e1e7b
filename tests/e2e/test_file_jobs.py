"""File jobs end to end: a real hub, a real node on each engine with files, the wordfreq
program reading its inputs under /inputs and writing /outputs, the outputs downloaded from
the hub and compared byte for byte with what the program must write."""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import requests

import wasm_jobs
from deparrow.client import Client
from deparrow.localnet import Proc, wait_for
from tests.conftest import HubProc
from tests.edge.test_docker_executor import IMAGE, api  # noqa: F401  (the podman fixture)

DATA = Path(wasm_jobs.__file__).parent / "data" / "wordfreq"


def start(hub: HubProc, owner: Client, tmp_path: Path, name: str, prefs: dict[str, Any]) -> Proc:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(prefs))
    token = owner.enrollment_token()["token"]
    cmd = [sys.executable, "-m", "edge.cli", "--hub", hub.url, "--token", token, "--name", name,
           "--data-dir", str(tmp_path / name), "--config", str(path), "-v"]  # fmt: skip
    node = Proc(name, cmd, tmp_path / f"{name}.log")
    wait_for(name, lambda: any(n["name"] == name and n["state"] == "idle" for n in owner.nodes()),
             60, [node])  # fmt: skip
    return node


def wordfreq(**more: Any) -> dict[str, Any]:
    inputs = [
        {"path": str(p.relative_to(DATA / "inputs")),
         "ref": "base64:" + base64.b64encode(p.read_bytes()).decode()}
        for p in sorted((DATA / "inputs").rglob("*")) if p.is_file()
    ]  # fmt: skip
    return {"name": "wordfreq", "engine": {"type": "wasm", "module": "example:wordfreq"},
            "inputs": inputs, "outputs": True, "timeout": 30, **more}  # fmt: skip


def get(client: Client, url: str) -> tuple[int, bytes, dict[str, str]]:
    req = urllib.request.Request(
        client.hub + url, headers={"Authorization": "Bearer " + client.jwt()}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


@pytest.mark.parametrize("engine", ["wasmtime", "wasm3-run", None])  # None: the default
def test_a_file_job_reads_inputs_and_its_outputs_come_back(
    hub: HubProc, tmp_path: Path, engine: str
) -> None:
    _, owner = hub.user("owner")
    _, alice = hub.user("alice")
    # the default engine (pywasm3 workers) hands file jobs to wasm3-run, whose WASI has files
    node = start(hub, owner, tmp_path, "n", {"wasm_engine": engine} if engine else {})
    try:
        job = alice.wait(alice.submit(wordfreq())["id"], timeout_s=60)
        assert job["state"] == "completed", (job, node.tail())
        result = job["result"]
        assert result["exit_code"] == 0 and result["stdout"].startswith("wordfreq: 3 files"), result
        expected = sorted(p.name for p in (DATA / "expected").iterdir())
        assert [f["path"] for f in result["outputs"]] == expected
        for f in result["outputs"]:
            want = (DATA / "expected" / f["path"]).read_bytes()
            assert f["size"] == len(want) and f["sha256"] == hashlib.sha256(want).hexdigest()
            status, body, headers = get(alice, f["url"])
            assert status == 200 and body == want
            assert headers["X-Content-SHA256"] == f["sha256"]
        status, body, _ = get(alice, f"/api/v1/jobs/{job['id']}/outputs/nope.txt")
        assert status == 404 and b"has no output 'nope.txt'" in body, body
        status, _, _ = get(owner, result["outputs"][0]["url"])  # not the owner's job
        assert status == 404
        # nothing of the job is left on the node's disk
        assert list((tmp_path / "n" / "jobfiles").iterdir()) == []
        # the job's page lists the files, and a signed-in owner downloads them there
        web = requests.Session()
        web.post(hub.url + "/signin", data={"token": alice.token}, timeout=10).raise_for_status()
        page = web.get(f"{hub.url}/jobs/{job['id']}", timeout=10).text
        first = result["outputs"][0]
        href = f"/jobs/{job['id']}/files/{first['path']}"
        assert f'href="{href}"' in page and "Files it wrote" in page
        got = web.get(hub.url + href, timeout=10)
        assert (
            got.status_code == 200
            and got.content == (DATA / "expected" / first["path"]).read_bytes()
        )
    finally:
        node.stop()


def test_past_the_owners_caps_a_job_ends_with_output_limit_and_a_node_without_files_takes_none(
    hub: HubProc, tmp_path: Path
) -> None:
    _, owner = hub.user("owner")
    _, alice = hub.user("alice")
    plain = start(hub, owner, tmp_path, "plain", {"files": {"enabled": False}})
    try:
        submitted = alice.submit(wordfreq())
        wait_for("the reason", lambda: "file jobs" in (alice.job(submitted["id"])["reason"] or ""),
                 20, [plain])  # fmt: skip
        assert alice.job(submitted["id"])["reason"].startswith(
            "no online node takes file jobs on the wasm engine"
        )
        alice.cancel(submitted["id"])
        capped = start(hub, owner, tmp_path, "capped",
                       {"wasm_engine": "wasmtime", "files": {"max_output_files": 1}})  # fmt: skip
        try:
            job = alice.wait(alice.submit(wordfreq())["id"], timeout_s=60)
            assert job["state"] == "failed", job
            assert job["result"]["error"] == (
                "output limit: the job wrote more than 1 files under /outputs (this node's cap)"
            )
            assert job["result"].get("outputs") is None
            assert list((tmp_path / "capped" / "jobfiles").iterdir()) == []
        finally:
            capped.stop()
    finally:
        plain.stop()


SHELL_JOB = (
    "set -e; mkdir -p /outputs/up; wc -w < /inputs/carroll/jabberwocky.txt > /outputs/words;"
    " tr a-z A-Z < /inputs/README.txt > /outputs/up/README.TXT; echo done"
)


def shell_job(engine: dict[str, Any]) -> dict[str, Any]:
    spec = wordfreq()
    spec["engine"] = engine
    return spec


def check_shell_outputs(alice: Client, job: dict[str, Any]) -> None:
    assert job["state"] == "completed" and job["result"]["exit_code"] == 0, job
    assert job["result"]["stdout"] == "done\n"
    outputs = {f["path"]: f for f in job["result"]["outputs"]}
    assert sorted(outputs) == ["up/README.TXT", "words"]
    words = len((DATA / "inputs" / "carroll" / "jabberwocky.txt").read_text().split())
    assert get(alice, outputs["words"]["url"])[1].strip() == str(words).encode()
    readme = (DATA / "inputs" / "README.txt").read_bytes().upper()
    assert get(alice, outputs["up/README.TXT"]["url"])[1] == readme


def test_a_native_node_runs_a_file_job_in_its_sandbox(hub: HubProc, tmp_path: Path) -> None:
    _, owner = hub.user("owner")
    _, alice = hub.user("alice")
    node = start(hub, owner, tmp_path, "nat", {"native": {"enabled": True}})
    try:
        engine = {"type": "native", "command": ["sh", "-c", SHELL_JOB]}
        job = alice.wait(alice.submit(shell_job(engine))["id"], timeout_s=60)
        check_shell_outputs(alice, job)
        # the job's user (nobody) could not reach the data directory under a 0700 folder, so
        # the node keeps its file jobs in a folder of its own in /tmp: empty again
        node_id = job["node"]
        (left,) = Path(tempfile.gettempdir()).glob(f"deparrow-jobfiles-*-{node_id}")
        assert list(left.iterdir()) == []
        left.rmdir()
    finally:
        node.stop()


def test_a_docker_node_binds_a_file_jobs_directories(
    hub: HubProc,
    tmp_path: Path,
    api: Any,  # noqa: F811
) -> None:
    _, owner = hub.user("owner")
    _, alice = hub.user("alice")
    node = start(hub, owner, tmp_path, "dock", {"docker": {"enabled": True}})
    try:
        engine = {"type": "docker", "image": IMAGE, "command": ["sh", "-c", SHELL_JOB]}
        job = alice.wait(alice.submit(shell_job(engine))["id"], timeout_s=120)
        check_shell_outputs(alice, job)
        assert list((tmp_path / "dock" / "jobfiles").iterdir()) == []
    finally:
        node.stop()

"""docs/jobs.md is executable: its job specs are admitted by a real hub database, its refusals
are the hub's own words, and its result is what the hub stores for a node's signed result.

Blocks are marked in the doc: `<!-- spec -->`, `<!-- refused -->` with its `<!-- answer -->`,
and `<!-- result -->` before a fenced json block; `<!-- refusals -->` before a list of
`change` → `error` lines. Every json block on the page carries one of these marks.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest

import wasm_jobs
from edge.core import protocol
from hub.api.services import Services
from hub.app import open_services
from hub.config import HubConfig
from hub.ledger.money import format_micro
from hub.market import admission
from hub.market.errors import JobError
from hub.market.spec import JobSpec
from tests.hub.test_earnings import add_node

DOC = Path(__file__).resolve().parent.parent / "docs" / "jobs.md"
MARKS = ("spec", "refused", "answer", "result")  # and "outputs" before a text block
# A Markdown code span: a run of backticks, its text, the same run again.
CODE = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)")


def doc() -> str:
    return DOC.read_text()


def blocks(mark: str) -> list[Any]:
    found = re.findall(rf"<!-- {mark} -->\s*```json\n(.*?)```", doc(), flags=re.DOTALL)
    return [json.loads(b) for b in found]


def example() -> dict[str, Any]:
    first: dict[str, Any] = blocks("spec")[0]
    return first


def refusals() -> list[tuple[dict[str, Any], str]]:
    """(the spec, the error) of each line of the refusals list: a change to the example (top
    level keys replaced), or a whole spec when the change is an object."""
    section = doc().split("<!-- refusals -->\n", 1)[1].split("\n\n", 1)[0]
    out = []
    for line in section.splitlines():
        spans = [m.group(2) for m in CODE.finditer(line)]
        assert line.startswith("- ") and " → " in line and len(spans) >= 2, line
        change, error = spans[0], spans[-1]
        if change.startswith("{"):
            spec = json.loads(change)
        else:
            spec = {**example(), **json.loads("{" + change + "}")}
        # A span wider than its text has one space of padding on each side (CommonMark).
        if error.startswith(" ") and error.endswith(" ") and error.strip():
            error = error[1:-1]
        out.append((spec, error))
    return out


@pytest.fixture
def services(tmp_path: Path) -> Services:
    return open_services(HubConfig(data_dir=tmp_path, welcome_grant_credits=1000))


def submit(s: Services, raw: dict[str, Any]) -> Any:
    """What POST /api/v1/jobs does with a body: decode it into the spec, then admit it."""
    user, _, _ = s.create_user("someone", "user")
    spec = msgspec.json.decode(json.dumps(raw).encode(), type=JobSpec)
    admission.replicas_of(spec)
    return s.jobs.submit(user, spec)


def test_every_json_block_is_marked() -> None:
    text = doc()
    total = len(re.findall(r"```json\n", text))
    marked = sum(len(re.findall(rf"<!-- {m} -->\s*```json\n", text)) for m in MARKS)
    assert total == marked, "a json block in docs/jobs.md that no test reads: mark it"


def test_specs_are_admitted(services: Services) -> None:
    specs = blocks("spec")
    assert specs
    for raw in specs:
        job = submit(services, raw)
        assert job["state"] == "queued", raw
    first = services.store.job(submit(services, example())["id"])
    assert first is not None
    assert f'"hold":"{format_micro(int(first["hold"]))}"' in doc()  # the curl answer quoted


def test_every_quoted_refusal_is_what_the_hub_says(services: Services) -> None:
    cases = refusals()
    assert len(cases) > 20
    for raw, error in cases:
        with pytest.raises((msgspec.ValidationError, JobError)) as caught:
            submit(services, raw)
        assert str(caught.value) == error, raw


def test_the_refused_spec_gets_the_quoted_answer(services: Services) -> None:
    [raw], [answer] = blocks("refused"), blocks("answer")
    spec = msgspec.convert(raw, JobSpec)  # a valid shape: admission refuses it
    with pytest.raises(JobError) as caught:
        admission.replicas_of(spec)
    assert {"error": str(caught.value), "field": caught.value.field} == answer
    with pytest.raises(JobError, match=re.escape(answer["error"])):
        submit(services, raw)


def test_the_result_is_what_the_hub_stores(services: Services) -> None:
    """The example's result, sent by a node as a signed result message, is stored as quoted."""
    [quoted] = blocks("result")
    owner, _, _ = services.create_user("owner", "user")
    node = add_node(services, owner)
    raw = {**example(), "verify": None}
    job = submit(services, raw)
    assert services.jobs.assign(job, node["id"]) is not None
    outcome = protocol.outcome(
        "completed",
        quoted["error"],
        quoted["stdout"].encode(),
        quoted["stderr"].encode(),
        quoted["wall_ms"],
        quoted["cpu_ms"],
        quoted["exit_code"],
        quoted["returns"],
    )
    msg = protocol.result(node["id"], node["secret"], job["id"], 1, outcome)
    assert base64.b64decode(msg["stdout_b64"]).decode() == quoted["stdout"]
    assert services.jobs.on_result(node["id"], msg) == "settled"
    row = services.store.job(job["id"])
    assert row is not None and row["state"] == "completed"
    assert json.loads(row["result"]) == quoted


def test_the_outputs_listed_are_what_wordfreq_writes() -> None:
    """The file job's listing: each file, its size and the start of its sha256, as the
    wordfreq job writes them (tests/e2e/test_file_jobs.py runs it through a hub)."""
    block = re.search(r"<!-- outputs -->\s*```text\n(.*?)```", doc(), re.S)
    assert block is not None
    expected = Path(wasm_jobs.__file__).parent / "data" / "wordfreq" / "expected"
    rows = [line.split() for line in block.group(1).splitlines()]
    assert [r[0] for r in rows] == sorted(p.name for p in expected.iterdir())
    for name, size, _, _, digest, _, url in rows:
        data = (expected / name).read_bytes()
        assert int(size) == len(data)
        assert hashlib.sha256(data).hexdigest().startswith(digest.rstrip("…"))
        assert url == f"/api/v1/jobs/j_…/outputs/{name}"

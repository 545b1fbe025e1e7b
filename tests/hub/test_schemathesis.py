"""schemathesis against a live hub: every operation of the OpenAPI document the hub serves,
as nobody, as a user and as an admin, with valid and invalid data; it finds nothing (issue 15
item 7).

The run is schemathesis's own engine, as `st run` drives it (its coverage, fuzzing and
stateful phases), with a fixed seed and derandomized generation so that CI sends the same
requests every time, and a bounded number of examples per operation. The hub exempts loopback
callers from its rate limits (its default), so nothing here is throttled.

What a JSON Schema cannot say is configured here, rather than weakening the API:
- 402 is an answer to a valid request wherever the document lists it: the caller's wallet
  cannot pay (a job's hold, an agent's funds, a transfer, a call).
- A valid request that names something names something that exists. Valid cases are given
  one: a job's references (an uploaded blob), an enrollment token, a new user's referrer; and
  what else the hub checks of a job beyond its schema (hub/market/admission.py) is met.
- Headers that frame the HTTP message are not sent with fuzzed values: aiohttp's parser
  answers a malformed Content-Length (say) with a text/plain 400 of its own, before the hub.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import pytest
import requests
import schemathesis
from schemathesis.engine import events, from_schema

from deparrow.client import Client
from edge.core import jobfiles
from hub.config import HubConfig
from tests.conftest import ROOT, start_hub

SEED = 15
EXAMPLES = 25  # per operation, identity and mode, in the fuzzing phase
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "positive_data_acceptance",
]
# What a valid request may get: schemathesis's default, and 402 where the document lists it.
ACCEPTED = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]
FRAMING = {"content-length", "transfer-encoding", "host", "connection", "expect", "upgrade"}
WASM = b"\0asm\x01\0\0\0"  # the smallest WebAssembly module


@dataclass
class Hub:
    """The hub under test, a user of it, and what the user stored there."""

    url: str
    user_id: str
    user_token: str
    jwts: dict[str, str]
    module: str  # an uploaded WebAssembly module
    data: str  # an uploaded input
    takes_whole_floats: bool  # 2.0 where an integer is declared is taken as 2

    @property
    def client(self) -> Client:
        return Client(self.url, self.user_token)


@pytest.fixture(scope="module")
def live_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    hub = start_hub(tmp_path_factory.mktemp("fuzzed"))
    user, client = hub.user("fuzzer")
    r = requests.post(hub.url + "/api/v1/nodes/enroll", json={"token": "x" * 8, "cpu": 1,
                      "memory_mb": 1.0}, timeout=10)  # fmt: skip
    yield Hub(
        url=hub.url,
        user_id=user["id"],
        user_token=user["token"],
        jwts={"user": client.jwt(), "admin": hub.admin.jwt()},
        module=client.upload(WASM),
        data=client.upload(b"some input\n"),
        takes_whole_floats=r.status_code == 401,  # not 400
    )
    hub.stop()


def _checks(accepted: list[str]) -> dict[str, Any]:
    return {
        "enabled": False,
        **{name: {"enabled": True} for name in CHECKS},
        "positive_data_acceptance": {"enabled": True, "expected-statuses": accepted},
    }


def _config(authorization: str | None, mode: str, document: dict[str, Any]) -> schemathesis.Config:
    payable = [
        {"include-path": path, "include-method": method.upper(),
         "checks": _checks([*ACCEPTED, "402"])}
        for path, ops in document["paths"].items()
        for method, op in ops.items()
        if "402" in op["responses"]
    ]  # fmt: skip
    return schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "generation": {
                "mode": mode,
                "max-examples": EXAMPLES,
                "deterministic": True,
                "database": "none",
            },
            "checks": _checks(ACCEPTED),
            "operations": payable,
            **({"headers": {"Authorization": authorization}} if authorization else {}),
        }
    )


def _valid_job(spec: dict[str, Any], hub: Hub) -> None:
    """What the hub checks of a job beyond its schema, met by a generated valid spec."""
    engine = spec.get("engine")
    wasm = isinstance(engine, dict) and engine.get("type") == "wasm"
    if wasm:
        engine["module"] = hub.module
    if isinstance(spec.get("input"), str):
        spec["input"] = hub.data
    paths: set[str] = set()
    for i, f in enumerate(spec.get("inputs") or []):
        if not isinstance(f, dict):
            continue
        f["ref"] = hub.data
        if jobfiles.check_path(f.get("path")) or f.get("path") in paths:
            f["path"] = f"input-{i}"
        paths.add(f["path"])
    if not wasm:
        spec.pop("gas", None)
    if not wasm or spec.get("type") == "service":
        spec.pop("verify", None)
    if isinstance(spec.get("resources"), dict):
        spec["resources"].pop("gpu", None)  # no GPU jobs yet
    config = HubConfig()
    most = config.max_service_s if spec.get("type") == "service" else config.max_timeout_s
    if isinstance(spec.get("timeout"), int | float) and spec["timeout"] > most:
        spec["timeout"] = most


def _schema(hub: Hub, who: str, mode: str) -> Any:
    jwt = hub.jwts.get(who)
    document = Client(hub.url).request("GET", "/api/v1/openapi.json", auth=False)
    schema = schemathesis.openapi.from_url(
        hub.url + "/api/v1/openapi.json",
        config=_config("Bearer " + jwt if jwt else None, mode, document),
    )

    @schema.hook("map_case")
    def existing_references(context: Any, case: Any) -> Any:
        if case.headers:
            for name in [h for h in case.headers if h.lower() in FRAMING]:
                del case.headers[name]
        positive = case.meta is not None and case.meta.generation.mode.is_positive
        if not positive or not isinstance(case.body, dict):
            return case
        operation = f"{case.method} {case.path}"
        if operation == "POST /api/v1/jobs":
            _valid_job(case.body, hub)
        elif operation == "POST /api/v1/nodes/enroll":
            case.body["token"] = hub.client.enrollment_token()["token"]
        elif operation == "POST /api/v1/users" and case.body.get("referred_by") is not None:
            case.body["referred_by"] = hub.user_id
        return case

    return schema


def _fuzz(hub: Hub, schema: Any) -> tuple[list[str], set[str], int, int]:
    """Every phase: (what it found, the operations it tested, requests)."""
    found: list[str] = []
    tested: set[str] = set()
    cases = 0
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            cases += len(event.recorder.cases)
            tested.add(event.recorder.label)
            for case_id, checks in event.recorder.checks.items():
                for check in checks:
                    if check.failure_info is None:
                        continue
                    failure = check.failure_info.failure
                    interaction = event.recorder.interactions.get(case_id)
                    response = interaction.response if interaction else None
                    if response is None:
                        got = "no response"
                    else:
                        got = f"{response.status_code} {response.content[:300]!r}"
                    found.append(
                        f"{failure.operation or event.recorder.label} ({check.name}): "
                        f"{failure.title}\n{failure.message}\nGot: {got}\n"
                        f"{check.failure_info.code_sample[:2000]}"
                    )
        elif isinstance(event, events.NonFatalError | events.FatalError):
            found.append(f"{type(event).__name__}: {getattr(event, 'info', event)}")
    return found, tested, cases


def main() -> None:
    """One run, in a process of its own: `python -m tests.hub.test_schemathesis WHO MODE` with
    the Hub as JSON on stdin; its report as JSON on stdout."""
    who, mode = sys.argv[1:3]
    hub = Hub(**json.load(sys.stdin))
    schema = _schema(hub, who, mode)
    started = time.monotonic()
    found, tested, cases = _fuzz(hub, schema)
    operations = [f"{r.ok().method.upper()} {r.ok().path}" for r in schema.get_all_operations()]
    report = {"found": found, "tested": sorted(tested), "operations": operations,
              "cases": cases, "took": time.monotonic() - started}  # fmt: skip
    json.dump(report, sys.stdout)


# Valid and invalid data in runs of their own: drawn together, the invalid side of an operation
# that has nothing to make invalid (a bare string in its path) is retried until Hypothesis gives
# up, and the run takes three times as long as the two apart.
@pytest.mark.parametrize("mode", ["positive", "negative"])
@pytest.mark.parametrize("who", ["nobody", "user", "admin"])
def test_schemathesis_finds_nothing(live_hub: Hub, who: str, mode: str) -> None:
    # Each run in a new process with a fixed hash seed: Hypothesis draws some values from the
    # constants of the modules this process has imported (which depends on the tests pytest
    # collected), in the order of a set of strings (which depends on the hash seed).
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    run = subprocess.run(
        [sys.executable, "-m", "tests.hub.test_schemathesis", who, mode],
        input=json.dumps(asdict(live_hub)), capture_output=True, text=True, env=env,
        cwd=ROOT, timeout=100, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    print(f"{who}, {mode}: {report['cases']} requests in {report['took']:.1f} s")
    assert len(report["operations"]) >= 25
    assert set(report["operations"]) <= set(report["tested"])
    assert not report["found"], "\n\n".join(report["found"])


def test_whole_numbers_written_with_a_fraction_are_whole_numbers(live_hub: Hub) -> None:
    """2.0 where the document says integer is taken as 2, as JSON Schema reads it."""
    assert live_hub.takes_whole_floats


if __name__ == "__main__":
    main()

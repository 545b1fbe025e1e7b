"""Every MQTT payload decoder of the hub, driven by hypothesis with random and malformed
payloads (issue 15, item 7): whatever a node or an agent publishes, the bridge's handler
answers with what it did (a string, a drop reason for nonsense) and never raises; the books
stay balanced. Real services on a real SQLite file; the messages go straight to the handler
the bridge calls for each one (`Messages.handle`), no broker in between."""

from __future__ import annotations

import base64
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.core import protocol
from hub.api.services import Services
from hub.app import open_services
from hub.config import HubConfig
from hub.mqtt.messages import Messages
from hub.store.rows import new_id

KINDS = {"nodes": ["hello", "heartbeat", "status", "event", "result"],
         "agents": ["submit", "invoke", "response"]}  # fmt: skip

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


class World:
    def __init__(self) -> None:
        self.dir = tempfile.TemporaryDirectory()
        self.s: Services = open_services(
            HubConfig(data_dir=Path(self.dir.name), welcome_grant_credits=10)
        )
        owner, _, _ = self.s.create_user("owner", "user")
        token, _ = self.s.store.create_enrollment_token(owner, 3600)
        self.node, self.secret = self.s.store.create_node(
            token=token, owner=owner, name="n", engines=["wasm"], arch="x86_64", cpu=2,
            memory_mb=512, mqtt_password="x" * 20,
        )  # fmt: skip
        self.agent, self.agent_token = self.s.agents.create_agent(owner, "a", fund=1_000_000)
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.m = Messages(
            self.s.store, self.s.jobs, self.s.scheduler, self.s.agents,
            publish=lambda t, msg: self.sent.append((t, msg)),
            changed=lambda *_: None, dispatch=lambda: None, drop=lambda _t, why: "dropped: " + why,
        )  # fmt: skip

    def valid(self, kind: str) -> dict[str, Any]:
        """A well-formed message of each kind, for hypothesis to break field by field."""
        n = self.node
        job = new_id("j")
        # fmt: off
        out: dict[str, dict[str, Any]] = {
            "hello": protocol.hello(n, ["wasm"], {"cpu": 1, "memory_mb": 64}, "t", files={
                "engines": ["wasm"], "max_input_bytes": 10, "max_output_bytes": 10,
                "max_output_files": 1}),
            "heartbeat": protocol.heartbeat(n, 1, "idle", {"cpu": 1, "memory_mb": 64}, []),
            "status": protocol.status(n, "online"),
            "event": protocol.event(n, job, 1, "running"),
            "result": protocol.result(n, self.secret, job, 1, {
                "status": "completed", "stdout": b"x", "wall_ms": 1, "cpu_ms": 1, "exit_code": 0,
                "outputs": [{"path": "a", "size": 1, "sha256": "0" * 64, "data": b"x"}]}),
            "submit": protocol.submit("r1", self.agent_token, {
                "engine": {"type": "wasm", "module": "example:fib"},
                "inputs": [{"path": "a", "ref": "base64:" + base64.b64encode(b"x").decode()}]}),
            "invoke": protocol.invoke("r2", self.agent_token, "s_x", {"n": 1}),
            "response": protocol.response("c_x", self.agent_token, True, {"n": 1}),
        }
        # fmt: on
        return out[kind]

    def topic(self, space: str, kind: str) -> str:
        ident = self.node if space == "nodes" else self.agent
        return f"{protocol.PREFIX}/{space}/{ident}/{kind}"


@pytest.fixture(scope="module")
def world() -> World:
    return World()


def _handled(world: World, topic: str, payload: bytes) -> None:
    with world.s.db.transaction():  # the bridge runs each message in a savepoint of a batch
        what = world.m.handle(topic, payload)
    assert isinstance(what, str)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(space=st.sampled_from(sorted(KINDS)), data=st.data(), raw=st.binary(max_size=200))
def test_random_bytes_are_dropped_never_raised(
    world: World, space: str, data: st.DataObject, raw: bytes
) -> None:
    kind = data.draw(st.sampled_from(KINDS[space]))
    _handled(world, world.topic(space, kind), raw)


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(space=st.sampled_from(sorted(KINDS)), data=st.data())
def test_well_formed_messages_with_a_field_broken_are_handled(
    world: World, space: str, data: st.DataObject
) -> None:
    kind = data.draw(st.sampled_from(KINDS[space]))
    msg = world.valid(kind)
    key = data.draw(st.sampled_from(sorted(msg)))
    action = data.draw(st.sampled_from(["replace", "drop", "nest"]))
    if action == "drop":
        del msg[key]
    elif action == "replace":
        msg[key] = data.draw(json_values)
    else:  # deep nesting where an object or list is read (spliced in: json would recurse)
        msg[key] = "DEEP"
    payload = json.dumps(msg).encode()
    if action == "nest":
        depth = data.draw(st.integers(1, 5000))
        payload = payload.replace(b'"DEEP"', b"[" * depth + b"]" * depth, 1)
    _handled(world, world.topic(space, kind), payload)


def test_deeply_nested_payloads_of_every_kind_are_handled(world: World) -> None:
    for space, kinds in KINDS.items():
        for kind in kinds:
            deep = b"[" * 100_000 + b"]" * 100_000
            _handled(world, world.topic(space, kind), deep)
            msg = world.valid(kind)
            body = json.dumps(msg).encode()
            nested = body[:-1] + b', "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
            _handled(world, world.topic(space, kind), nested)


def test_the_books_balance_after_the_fuzzing(world: World) -> None:
    assert world.s.ledger.audit().balanced

"""Typed decoding of the MQTT messages defined in edge/protocol.py.

edge/protocol.py builds the messages (plain dicts, so boards can run it); these Structs check
what arrives at the hub. tests/hub/test_wire.py round-trips every builder through them, so the
two cannot drift apart silently.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Count = Annotated[int, msgspec.Meta(ge=0)]


class Hello(msgspec.Struct):
    v: int
    node_id: Id
    engines: list[Annotated[str, msgspec.Meta(max_length=32)]]
    resources: dict[str, Any]
    version: str
    running: list[Id] = []


class OfferedResources(msgspec.Struct):
    cpu: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    memory_mb: Count = 0
    gpu: Count = 0
    load: float = 0.0


class Heartbeat(msgspec.Struct):
    v: int
    node_id: Id
    seq: Count
    ts: int
    state: Annotated[str, msgspec.Meta(pattern="^(idle|busy|suspended)$")]
    resources: OfferedResources
    running: list[Id]


class Status(msgspec.Struct):
    v: int
    node_id: Id
    state: Annotated[str, msgspec.Meta(pattern="^(online|offline)$")]


class Event(msgspec.Struct):
    v: int
    node_id: Id
    job_id: Id
    attempt: Count
    state: str
    ts: int
    detail: str | None = None


class Result(msgspec.Struct):
    v: int
    node_id: Id
    job_id: Id
    attempt: Count
    state: Annotated[str, msgspec.Meta(pattern="^(completed|failed)$")]
    exit_code: int
    stdout_b64: str
    stderr_b64: str
    returns: list[int] | None
    error: str | None
    wall_ms: Count
    cpu_ms: Count
    digest: Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]
    sig: Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]


class Submit(msgspec.Struct):
    v: int
    request_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    token: Annotated[str, msgspec.Meta(min_length=8, max_length=256)]
    spec: dict[str, Any]


NODE_TYPES: dict[str, type[msgspec.Struct]] = {
    "hello": Hello,
    "heartbeat": Heartbeat,
    "status": Status,
    "event": Event,
    "result": Result,
}

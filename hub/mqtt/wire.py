"""Typed decoding of the MQTT messages defined in edge/core/protocol.py.

edge/core/protocol.py builds the messages (plain dicts, so boards can run it); these Structs check
what arrives at the hub. tests/hub/test_wire.py round-trips every builder through them, so the
two cannot drift apart silently.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
# Every integer is bounded: SQLite stores 64-bit integers, and a node must not be able to make
# the hub fail half-way through handling its message.
Count = Annotated[int, msgspec.Meta(ge=0, le=2**53)]
Int = Annotated[int, msgspec.Meta(ge=-(2**53), le=2**53)]
Version = Annotated[int, msgspec.Meta(ge=0, le=1000)]


class OfferedResources(msgspec.Struct):
    cpu: Annotated[float, msgspec.Meta(ge=0, le=4096)] = 0.0
    memory_mb: Annotated[int, msgspec.Meta(ge=0, le=2**40)] = 0
    gpu: Annotated[int, msgspec.Meta(ge=0, le=64)] = 0
    load: Annotated[float, msgspec.Meta(ge=0, le=1024)] = 0.0


EngineName = Annotated[str, msgspec.Meta(max_length=32)]
# The engines whose jobs may use the network on the node. Absent (a node older than the
# field) means none: a job that asks for network access never goes to a node that did not say.
AllowNetwork = Annotated[list[EngineName], msgspec.Meta(max_length=16)]


class FileCaps(msgspec.Struct):
    """What file jobs a node takes (edge/core/jobfiles.py): on which engines, how large."""

    engines: Annotated[list[EngineName], msgspec.Meta(max_length=16)]
    max_input_bytes: Count
    max_output_bytes: Count
    max_output_files: Count


class Hello(msgspec.Struct):
    v: Version
    node_id: Id
    engines: list[EngineName]
    resources: OfferedResources
    version: Annotated[str, msgspec.Meta(max_length=64)]
    running: Annotated[list[Id], msgspec.Meta(max_length=64)] = []
    allow_network: AllowNetwork = []
    files: FileCaps | None = None  # None: no file jobs (a board without storage, or older)


class Heartbeat(msgspec.Struct):
    v: Version
    node_id: Id
    seq: Count
    ts: Int
    state: Annotated[str, msgspec.Meta(pattern="^(idle|busy|suspended)$")]
    resources: OfferedResources
    running: Annotated[list[Id], msgspec.Meta(max_length=64)]
    allow_network: AllowNetwork = []


class Status(msgspec.Struct):
    v: Version
    node_id: Id
    state: Annotated[str, msgspec.Meta(pattern="^(online|offline)$")]


class Event(msgspec.Struct):
    v: Version
    node_id: Id
    job_id: Id
    attempt: Count
    state: Annotated[str, msgspec.Meta(max_length=32)]
    ts: Int
    detail: Annotated[str, msgspec.Meta(max_length=1024)] | None = None


class OutputFile(msgspec.Struct):
    """A file a job left under /outputs; its bytes are checked against sha256 by the hub."""

    path: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
    size: Count
    sha256: Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]
    b64: str


class Result(msgspec.Struct):
    v: Version
    node_id: Id
    job_id: Id
    attempt: Count
    state: Annotated[str, msgspec.Meta(pattern="^(completed|failed)$")]
    exit_code: Int
    stdout_b64: str
    stderr_b64: str
    # i64/u64 results (msgspec bounds them to 64 bits) are stored inside JSON text, not in an
    # integer column.
    returns: Annotated[list[int], msgspec.Meta(max_length=64)] | None
    error: Annotated[str, msgspec.Meta(max_length=4096)] | None
    wall_ms: Count
    cpu_ms: Count
    digest: Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]
    sig: Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]
    outputs: Annotated[list[OutputFile], msgspec.Meta(max_length=4096)] | None = None


class Submit(msgspec.Struct):
    v: Version
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

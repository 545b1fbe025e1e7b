"""Typed decoding of the MQTT messages defined in edge/core/protocol.py.

edge/core/protocol.py builds the messages (plain dicts, so boards can run it); these Structs check
what arrives at the hub. tests/hub/test_wire.py round-trips every builder through them, so the
two cannot drift apart silently.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

import msgspec

from hub.agents.types import MAX_JSON_DEPTH

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


class GpuInfo(msgspec.Struct):
    """One GPU a node has (edge/gpu.py): what the dashboard and `deparrow node list` show."""

    index: Annotated[int, msgspec.Meta(ge=0, le=1024)]
    name: Annotated[str, msgspec.Meta(max_length=128)] = "GPU"
    uuid: Annotated[str, msgspec.Meta(max_length=128)] | None = None
    memory_mb: Annotated[int, msgspec.Meta(ge=0, le=2**40)] | None = None


class FreeResources(msgspec.Struct):
    """What a node has left of its offer after its running jobs' shares."""

    cpu: Annotated[float, msgspec.Meta(ge=0, le=4096)] = 0.0
    memory_mb: Annotated[int, msgspec.Meta(ge=0, le=2**40)] = 0
    gpu: Annotated[int, msgspec.Meta(ge=0, le=64)] = 0
    slots: Annotated[int, msgspec.Meta(ge=0, le=256)] = 0


class Suspended(msgspec.Struct):
    """Why a suspended node runs nothing now, and in how many seconds it may at the earliest."""

    why: Annotated[str, msgspec.Meta(max_length=256)] = ""
    resume_in_s: Annotated[int, msgspec.Meta(ge=0, le=366 * 86400)] | None = None


class Hello(msgspec.Struct):
    v: Version
    node_id: Id
    engines: list[EngineName]
    resources: OfferedResources
    version: Annotated[str, msgspec.Meta(max_length=64)]
    running: Annotated[list[Id], msgspec.Meta(max_length=256)] = []
    allow_network: AllowNetwork = []
    files: FileCaps | None = None  # None: no file jobs (a board without storage, or older)
    slots: Annotated[int, msgspec.Meta(ge=1, le=256)] = 1  # jobs at once; older nodes: one
    gpus: Annotated[list[GpuInfo], msgspec.Meta(max_length=64)] = []
    # the largest message it takes (a board: a share of its heap); None: no limit of its own
    max_message: Annotated[int, msgspec.Meta(ge=1, le=2**40)] | None = None


class Heartbeat(msgspec.Struct):
    v: Version
    node_id: Id
    seq: Count
    ts: Int
    state: Annotated[str, msgspec.Meta(pattern="^(idle|busy|suspended)$")]
    resources: OfferedResources
    running: Annotated[list[Id], msgspec.Meta(max_length=256)]
    allow_network: AllowNetwork = []
    free: FreeResources | None = None
    suspended: Suspended | None = None


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


# --- what no decoder refuses: nesting and duplicate keys ---------------------------------------
# A whole JSON string (so that brackets and quotes inside strings are skipped), with the colon
# after it when it is an object's key; or a bracket.
_STRING = rb'"[^"\\]*(?:\\.[^"\\]*)*"'
_TOKEN = re.compile(_STRING + rb"(\s*:)?|[\[\]{}]", re.DOTALL)
# Every string of a text, and the colon after it when it is a key.
_STRINGS = re.compile(rb"(" + _STRING + rb")(\s*:)?", re.DOTALL)
_OPEN = frozenset(b"[{")


def json_problem(data: bytes | bytearray) -> str | None:
    """Why a JSON text that a decoder would take is still refused, or None: it nests deeper
    than MAX_JSON_DEPTH (msgspec and json decode recursively, and the schema checks after
    them recurse further: deep input would crash them rather than be refused), or an object
    has a key twice (decoders keep the last one silently, so a reader of the raw text could
    see another request than the hub). Not a validator: malformed JSON is the decoder's to
    refuse.

    Regular expressions over the strings and brackets only. The usual body (no key twice in
    the whole text, few brackets) is settled by one findall; the others are walked token by
    token, an object's keys apart from another's."""
    if data.count(b"[") + data.count(b"{") <= MAX_JSON_DEPTH:
        keys = [k for k, colon in _STRINGS.findall(data) if colon]
        if len(set(keys)) == len(keys) and not any(b"\\" in k for k in keys):
            return None
    seen_stack: list[set[bytes] | None] = []  # per open bracket: an object's keys, or None
    for m in _TOKEN.finditer(data):
        first = data[m.start()]
        if first == 0x22:  # a string
            if m.start(1) < 0 or not seen_stack:
                continue
            seen = seen_stack[-1]
            if seen is None:  # a colon after a string in an array: malformed, the decoder's
                continue
            key = bytes(data[m.start() : m.start(1)])
            if b"\\" in key:  # "a" and "\u0061" are the same key: compare them unescaped
                try:
                    name = json.loads(key)
                except ValueError:
                    continue
                key = json.dumps(name, ensure_ascii=False).encode("utf-8", "surrogatepass")
            if key in seen:
                name = json.loads(key) if b"\\" in key else key[1:-1].decode("utf-8", "replace")
                return f"has the key {name!r} twice in one object: send each key once"
            seen.add(key)
        elif first in _OPEN:
            seen_stack.append(set() if first == 0x7B else None)
            if len(seen_stack) > MAX_JSON_DEPTH:
                return f"nests deeper than {MAX_JSON_DEPTH} levels of arrays and objects"
        elif seen_stack:
            seen_stack.pop()
    return None


def top_level_string(data: bytes | bytearray, name: str) -> str | None:
    """The value of a top-level string field of a JSON object the decoder cannot take whole
    (too deep, say): the request_id to answer a refused message with. None when absent."""
    depth, want, wanted = 0, ('"' + name + '"').encode(), False
    for m in _TOKEN.finditer(data):
        first = data[m.start()]
        if first == 0x22:
            if depth == 1 and m.start(1) >= 0:
                wanted = data[m.start() : m.start(1)] == want
            elif depth == 1 and wanted:
                try:
                    value = json.loads(data[m.start() : m.end()])
                except ValueError:
                    return None
                return value if isinstance(value, str) else None
        else:
            depth += 1 if first in _OPEN else -1
            wanted = False
    return None

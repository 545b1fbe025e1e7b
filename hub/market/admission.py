"""Admission of a job spec, before anything is held or stored: the references it names
(uploaded blobs, inline base64, example jobs) resolved to stored blobs, the replicas it asks
for checked, the spec rewritten to store references only, the engine object of its assign
message. Raises JobError (hub/market/errors.py) naming the field at fault."""

from __future__ import annotations

import base64
import binascii
from typing import Any

import msgspec

import wasm_jobs
from edge.core import jobfiles
from hub.market import verification
from hub.market.errors import JobError
from hub.market.spec import DockerEngine, InputFile, JobSpec, WasmEngine
from hub.store.rows import Store

WASM_MAGIC = b"\0asm"  # the first bytes of every WebAssembly module


def resolve_ref(store: Store, ref: str, field: str, limit: int) -> str:
    """Turn a module/input reference into the sha256 of a stored blob."""
    kind, _, value = ref.partition(":")
    if kind == "sha256":
        if not store.has_blob(value):
            raise JobError(f"{field}: no uploaded blob {ref}; upload it first", field)
        return value
    if kind == "base64":
        try:
            data = base64.b64decode("".join(value.split()), validate=True)
        except (binascii.Error, ValueError) as e:
            raise JobError(f"{field}: not valid base64 ({e})", field) from None
    elif kind == "example":
        examples = {**wasm_jobs.manifest(), **wasm_jobs.file_jobs()}
        if field.startswith("inputs"):  # an example's data file: wasm-jobs/data/<name>
            try:
                data = wasm_jobs.data(value)
            except FileNotFoundError:
                have = ", ".join(wasm_jobs.data_names())
                why = f"{field}: no example file {value!r} (have: {have})"
                raise JobError(why, field) from None
            if len(data) > limit:
                raise JobError(f"{field}: {len(data)} bytes is over the {limit}-byte limit", field)
            return store.put_blob(data)
        if value not in examples:
            names = ", ".join(sorted(examples))
            raise JobError(f"{field}: no example job {value!r} (have: {names})", field)
        if field == "input":  # an example's sample stdin, not its module
            sample = examples[value].get("stdin")
            if not sample:
                with_input = ", ".join(sorted(n for n, e in examples.items() if e.get("stdin")))
                raise JobError(
                    f"{field}: example job {value!r} has no sample input (these do: {with_input})",
                    field,
                )
            data = wasm_jobs.path(sample).read_bytes()
        else:
            data = wasm_jobs.path(examples[value]["module"]).read_bytes()
    else:  # the pattern in hub/market/spec.py already excludes this
        raise JobError(f"{field}: unknown reference {ref!r}", field)
    if len(data) > limit:
        raise JobError(f"{field}: {len(data)} bytes is over the {limit}-byte limit", field)
    if field == "engine.module" and not data.startswith(WASM_MAGIC):
        # Refused before it is stored (the submit's caller checks uploaded modules).
        raise JobError(
            f"{field}: the module is empty ({ref!r} carries no bytes)"
            if not data
            else f"{field}: not a WebAssembly module (it does not start with \\0asm)",
            field,
        )
    return store.put_blob(data)


def resolve_inputs(store: Store, spec: JobSpec, limit: int) -> list[tuple[str, str, int]]:
    """A file job's inputs as stored blobs: [(path, sha256, size)], in the spec's order, all
    together at most `limit` bytes. https:// references must have been fetched already (the
    API does it before the job is admitted: hub/api/fetch.py)."""
    out: list[tuple[str, str, int]] = []
    seen: set[str] = set()
    total = 0
    for i, f in enumerate(spec.inputs):
        field = f"inputs[{i}]"
        problem = jobfiles.check_path(f.path)
        if problem:
            raise JobError(f"{field}.path: {problem}", field + ".path")
        if f.path in seen:
            raise JobError(f"{field}.path: {f.path!r} is given twice", field + ".path")
        seen.add(f.path)
        if f.ref.startswith(("https:", "http:")):
            raise JobError(
                f"{field}.ref: a URL is fetched by a running hub before it admits the job;"
                " here, upload the file first (sha256:) or inline it (base64:)",
                field + ".ref",
            )
        digest = resolve_ref(store, f.ref, field + ".ref", limit)
        size = store.blob_size(digest)
        total += size
        if total > limit:
            raise JobError(
                f"inputs: {total} bytes (so far, at {f.path}) is over the hub's {limit}-byte"
                " limit for a job's files",
                "inputs",
            )
        out.append((f.path, digest, size))
    return out


def replicas_of(spec: JobSpec) -> int:
    """k from `verify: {replicas: k}` (1 without it), or JobError saying what is wrong."""
    if spec.verify is None:
        return 1
    k = spec.verify.replicas
    top = verification.MAX_REPLICAS
    if not 1 <= k <= top:
        raise JobError(
            f"verify.replicas: {k} is not between 1 and {top}; 3 is usual (2 of 3 must"
            " agree), 5 tolerates two wrong nodes",
            "verify.replicas",
        )
    if not isinstance(spec.engine, WasmEngine):
        kind = "docker" if isinstance(spec.engine, DockerEngine) else "native"
        raise JobError(
            f"verify: only wasm jobs can be verified, not {kind}: replicas are compared"
            f" byte for byte, and a {kind} job may read the clock, random numbers or the"
            " network, so honest nodes would disagree. Drop `verify` or use a wasm module",
            "verify",
        )
    if spec.type == "service":
        raise JobError(
            "verify: a service runs until stopped and has no single result to compare;"
            " only batch jobs can be verified",
            "verify",
        )
    return k


def engine_message(spec: JobSpec) -> dict[str, Any]:
    """The `engine` object of an assign message (docs/protocol.md), per engine type."""
    e = spec.engine
    if isinstance(e, WasmEngine):
        return {"type": "wasm", "entrypoint": e.entrypoint, "args": list(e.args), "env": e.env}
    msg: dict[str, Any] = {
        "type": "docker" if isinstance(e, DockerEngine) else "native",
        "command": list(e.command),
        "env": dict(e.env),
        "network": e.network,
    }
    if isinstance(e, DockerEngine):
        msg.update(image=e.image, pids=e.pids)
    return msg


def message_bytes(
    spec: JobSpec, module_size: int, stdin_size: int, inputs: list[tuple[str, str, int]]
) -> int:
    """How large the job's assign message is, at most (bytes): the module, stdin and input
    files in base64, the engine object, and room for the rest (ids, hashes, limits). A node
    that announces a max_message below it (a board: a share of its heap) is never sent it."""

    def b64(n: int) -> int:
        return 4 * ((n + 2) // 3)

    size = ENVELOPE_BYTES + len(msgspec.json.encode(engine_message(spec)))
    size += b64(module_size) + b64(stdin_size)
    return size + sum(b64(n) + len(path) + FILE_ENTRY_BYTES for path, _, n in inputs)


# What an assign message carries besides the engine object and the payloads (keys, two
# sha256 hex digests, ids, numbers), with room to spare; and per input file (its sha256 and keys).
ENVELOPE_BYTES = 512
FILE_ENTRY_BYTES = 128


def by_reference(
    spec: JobSpec,
    module: str | None,
    stdin: str | None,
    inputs: list[tuple[str, str, int]] | None = None,
) -> JobSpec:
    """The spec as stored: an inline (`base64:`) module, input or input file replaced by the
    `sha256:` reference of the blob it was stored as, so a job row stays small however large
    its module, and the scheduler and job lists never parse megabytes of base64."""
    if inputs and any(f.ref.startswith("base64:") for f in spec.inputs):
        spec = msgspec.structs.replace(
            spec,
            inputs=[
                InputFile(f.path, "sha256:" + digest if f.ref.startswith("base64:") else f.ref)
                for f, (_, digest, _) in zip(spec.inputs, inputs, strict=True)
            ],
        )
    engine = spec.engine
    if (
        module is not None
        and isinstance(engine, WasmEngine)
        and engine.module.startswith("base64:")
    ):
        spec = msgspec.structs.replace(
            spec, engine=msgspec.structs.replace(engine, module="sha256:" + module)
        )
    if stdin is not None and spec.input and spec.input.startswith("base64:"):
        spec = msgspec.structs.replace(spec, input="sha256:" + stdin)
    return spec

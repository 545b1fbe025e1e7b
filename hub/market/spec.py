"""The job spec (msgspec Structs) and the job states: the market's domain types. A leaf:
imports nothing of the hub. The API's request/response shapes are in hub/api/types.py, the
stored rows in hub/store/rows.py.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

import msgspec

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[\w.\- ]+$")]
EnvKey = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z_][\w]*$")]
Arg = Annotated[str, msgspec.Meta(max_length=4096)]

# A module or input reference: "sha256:<hex>" (uploaded blob), "base64:<data>" (inline) or
# "example:<name>" (a job shipped in wasm-jobs/).
REF_PATTERN = r"^(sha256:[0-9a-f]{64}|base64:[A-Za-z0-9+/=\s]*|example:[\w\-]+)$"
Ref = Annotated[str, msgspec.Meta(pattern=REF_PATTERN)]

# An input file's reference: any of the above, or an https:// URL the hub fetches at submission.
INPUT_REF_PATTERN = REF_PATTERN[:-2] + r"|example:[\w\-]+(/[\w.\-]+)+|https?://\S{1,2040})$"
InputRef = Annotated[str, msgspec.Meta(pattern=INPUT_REF_PATTERN)]
# Where the job sees a file, relative to /inputs: names of letters, digits and ._-+@=, only;
# '.' and '..' are refused by the hub (hub/market/admission.py) and again by the node.
FILE_PATH_PATTERN = r"^[\w.\-+@=,]+(/[\w.\-+@=,]+)*$"
FilePath = Annotated[str, msgspec.Meta(min_length=1, max_length=1024, pattern=FILE_PATH_PATTERN)]
MAX_INPUT_FILES = 64

JOB_STATES = ("queued", "assigned", "running", "completed", "failed", "cancelled")
TERMINAL_STATES = ("completed", "failed", "cancelled")


EnvMap = dict[EnvKey, Annotated[str, msgspec.Meta(max_length=4096)]]
# A container image reference as `docker pull` takes it: name[:tag][@digest], lower case.
IMAGE_PATTERN = r"^[a-z0-9][a-z0-9._\-/]*(:[\w][\w.\-]{0,127})?(@sha256:[0-9a-f]{64})?$"


class WasmEngine(msgspec.Struct, forbid_unknown_fields=True, tag="wasm", tag_field="type"):
    """A WebAssembly module run by wasm3 (or wasmtime) on any node, boards included."""

    module: Ref
    entrypoint: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] = "_start"
    args: Annotated[list[Arg], msgspec.Meta(max_length=256)] = []
    env: EnvMap = {}


class DockerEngine(msgspec.Struct, forbid_unknown_fields=True, tag="docker", tag_field="type"):
    """A container on a full machine whose owner runs the Docker executor."""

    image: Annotated[str, msgspec.Meta(min_length=1, max_length=256, pattern=IMAGE_PATTERN)]
    command: Annotated[list[Arg], msgspec.Meta(max_length=256)] = []  # [] = the image's own
    env: EnvMap = {}
    network: bool = False  # runs only on nodes whose owner allows network access
    pids: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 256


class NativeEngine(msgspec.Struct, forbid_unknown_fields=True, tag="native", tag_field="type"):
    """A command run in a sandbox, on nodes whose owner turned the native executor on."""

    command: Annotated[list[Arg], msgspec.Meta(min_length=1, max_length=256)]
    env: EnvMap = {}
    network: bool = False


Engine = WasmEngine | DockerEngine | NativeEngine


class InputFile(msgspec.Struct, forbid_unknown_fields=True):
    """A file the job reads at /inputs/<path>: uploaded (sha256:), inline (base64:), an
    example data file (example:wordfreq/inputs/README.txt, from wasm-jobs/data) or fetched by
    the hub (https://)."""

    path: FilePath
    ref: InputRef


class Resources(msgspec.Struct, forbid_unknown_fields=True):
    # CPU-equivalents; 0.001 granularity (stored as milli-CPUs).
    cpu: Annotated[float, msgspec.Meta(gt=0, le=256)] = 1.0
    memory_mb: Annotated[int, msgspec.Meta(ge=1, le=1024 * 1024)] = 64
    gpu: Annotated[int, msgspec.Meta(ge=0, le=64)] = 0


class Verify(msgspec.Struct, forbid_unknown_fields=True):
    """Run the job on `replicas` nodes of distinct owners and take the majority's result.
    The bounds (1..5) are checked by the hub with a message that says why (hub/market/jobs.py)."""

    replicas: Annotated[
        int, msgspec.Meta(description="1 to 5; a strict majority must agree (2 of 3, 3 of 5)")
    ]


class JobSpec(msgspec.Struct, forbid_unknown_fields=True):
    engine: Engine
    name: Name = "job"
    # batch: runs to completion, held at its maximum price, settled at actual use.
    # service: runs until cancelled or its timeout (its lifetime), billed per period (an
    # hour by default): one period is held ahead, paid at the period's end, and the job stops
    # when the owner's wallet cannot hold the next one.
    type: Literal["batch", "service"] = "batch"
    resources: Resources = msgspec.field(default_factory=Resources)
    timeout: Annotated[int, msgspec.Meta(ge=1)] = 60
    priority: Literal["normal", "high"] = "normal"
    input: Ref | None = None  # fed to the job's stdin
    # A gas budget for a wasm module instrumented with metering.usegas (docs/edge.md).
    gas: Annotated[int, msgspec.Meta(ge=1, le=10**15)] | None = None
    constraints: dict[str, str] = {}
    # Verification by replicas: deterministic (wasm) batch jobs only (docs/economy.md).
    verify: Verify | None = None
    # Files (docs/jobs.md): the job reads `inputs` under /inputs, read-only; with `outputs`
    # (or any input) it is a file job, and what it writes under /outputs comes back with the
    # result as files to download.
    inputs: Annotated[list[InputFile], msgspec.Meta(max_length=MAX_INPUT_FILES)] = []
    outputs: bool = False

    @property
    def files(self) -> bool:
        """Whether it is a file job: it gets /inputs and /outputs."""
        return bool(self.inputs) or self.outputs

    @property
    def cpu_milli(self) -> int:
        """The CPU-equivalents the job asked for, in milli-CPUs (at least one): what the
        scheduler takes from a node's free CPU and what the job is billed for."""
        return max(1, round(self.resources.cpu * 1000))


_FIELD_RE = re.compile(r"(?:at|in) `\$\.?([^`]*)`")


_MISSING_RE = re.compile(r"missing required field `([^`]*)`")


def error_field(message: str) -> str | None:
    """msgspec says 'Expected ... - at `$.engine.module`'; pull out 'engine.module'.
    For a missing field ('Object missing required field `module` - at `$.engine`') the
    field itself is the answer: 'engine.module'."""
    m = _FIELD_RE.search(message)
    path = m.group(1) if m else ""
    missing = _MISSING_RE.search(message)
    if missing:
        path = f"{path}.{missing.group(1)}" if path else missing.group(1)
    return path or None

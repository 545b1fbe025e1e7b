# Type stub for edge/core/protocol.py (which stays untyped so MicroPython can run it unchanged).
from typing import Any, Final

VERSION: Final[int]
PREFIX: Final[str]
HELLO: Final[str]
HEARTBEAT: Final[str]
STATUS: Final[str]
EVENT: Final[str]
RESULT: Final[str]
NODE_OUT: Final[tuple[str, ...]]
ASSIGN: Final[str]
CANCEL: Final[str]
NODE_IN: Final[tuple[str, ...]]
SUBMIT: Final[str]
REPLY: Final[str]
INVOKE: Final[str]
CALL: Final[str]
RESPONSE: Final[str]
NOTICE: Final[str]
AGENT_OUT: Final[tuple[str, ...]]
AGENT_IN: Final[tuple[str, ...]]
IDLE: Final[str]
BUSY: Final[str]
SUSPENDED: Final[str]
OFFLINE: Final[str]
ONLINE: Final[str]
ACCEPTED: Final[str]
RUNNING: Final[str]
COMPLETED: Final[str]
FAILED: Final[str]
CANCELLED: Final[str]
REJECTED: Final[str]
MAX_HEARTBEAT: Final[int]
MAX_EVENT: Final[int]
MAX_OUTPUT_BYTES: Final[int]
MAX_RESULT: Final[int]
MAX_SUBMIT: Final[int]
MAX_CALL: Final[int]

Msg = dict[str, Any]

def node_topic(node_id: str, kind: str) -> str: ...
def agent_topic(agent_id: str, kind: str) -> str: ...
def parse_topic(topic: str) -> tuple[str, str, str] | None: ...
def encode(msg: Msg) -> bytes: ...
def decode(payload: bytes | str) -> Msg: ...
def hello(
    node_id: str,
    engines: Any,
    resources: Msg,
    version: str,
    running: Any = ...,
    allow_network: Any = ...,
    files: Msg | None = ...,
    slots: int = ...,
    gpus: list[Msg] | None = ...,
    max_message: int | None = ...,
) -> Msg: ...
def heartbeat(
    node_id: str,
    seq: int,
    state: str,
    resources: Msg,
    running: Any,
    allow_network: Any = ...,
    free: Msg | None = ...,
    suspended: Msg | None = ...,
) -> Msg: ...
def status(node_id: str, state: str) -> Msg: ...
def event(node_id: str, job_id: str, attempt: int, state: str, detail: str | None = ...) -> Msg: ...
def result_digest(
    stdout: bytes, returns: list[int] | None, outputs: list[Msg] | None = ...
) -> str: ...
def signing_string(
    job_id: str,
    attempt: int,
    node_id: str,
    state: str,
    exit_code: int,
    digest: str,
    wall_ms: int,
    cpu_ms: int,
) -> bytes: ...
def outcome(
    status: str,
    error: str | None,
    stdout: bytes,
    stderr: bytes,
    wall_ms: int,
    cpu_ms: int,
    exit_code: int | None = None,
    returns: list[int] | None = None,
) -> Msg: ...
def result(node_id: str, secret: str, job_id: str, attempt: int, outcome: Msg) -> Msg: ...
def verify_result(secret: str, msg: Msg, stdout: bytes) -> bool: ...
def assign(
    job_id: str,
    attempt: int,
    engine: Msg,
    module_b64: str | None,
    module_sha256: str | None,
    stdin_b64: str | None,
    timeout_s: int,
    memory_mb: int,
    gas: int | None = None,
    files: Msg | None = None,
    cpu: float | None = None,
    gpu: int = 0,
) -> Msg: ...
def cancel(job_id: str, attempt: int) -> Msg: ...
def submit(request_id: str, token: str, spec: Msg) -> Msg: ...
def reply(request_id: str, ok: bool, body: Msg) -> Msg: ...
def invoke(
    request_id: str, token: str, service_id: str, input: Any, timeout_s: float | None = None
) -> Msg: ...
def call(
    call_id: str,
    service_id: str,
    service: str,
    caller: str,
    input: Any,
    price: str,
    deadline_ms: int,
) -> Msg: ...
def response(
    call_id: str, token: str, ok: bool, output: Any = None, error: str | None = None
) -> Msg: ...
def notice(agent_id: str, kind: str, message: str, ref: str | None = None) -> Msg: ...

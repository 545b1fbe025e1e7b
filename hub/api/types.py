"""The REST API's request and response shapes (msgspec Structs): what hub/api/openapi.py
describes and the routes encode. The job spec they carry is hub/market/spec.py's.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from hub.market.spec import Name


class JobTimings(msgspec.Struct):
    submitted_at: float
    assigned_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None


class OutputView(msgspec.Struct):
    path: str  # where the job wrote it, relative to /outputs
    size: int
    sha256: str
    url: str  # GET it (with your token) for the bytes, until the hub's retention is over


class JobResult(msgspec.Struct):
    exit_code: int | None
    stdout: str
    stderr: str
    returns: list[int] | None
    error: str | None
    digest: str | None
    wall_ms: int
    cpu_ms: int
    outputs: list[OutputView] | None = None  # a file job's files under /outputs


class JobView(msgspec.Struct):
    id: str
    name: str
    state: str
    owner: str
    node: str | None
    attempt: int
    priority: str
    hold: str  # credits, as a decimal string
    cost: str | None
    reason: str | None  # why it is queued or why it failed, in words
    timings: JobTimings
    result: JobResult | None
    spec: dict[str, Any]
    billing: ServiceBilling | None = None  # service jobs only
    retries: Retries | None = None  # attempts its nodes lost, and how many may be lost
    verification: Verification | None = None  # jobs with verify.replicas > 1 only
    replica_of: str | None = None  # a replica: the verified job it belongs to
    outputs_expired_at: float | None = None  # its output files were collected then


class Try(msgspec.Struct):
    attempt: int
    node: str | None
    outcome: str  # what ended it, in words
    at: float


class Retries(msgspec.Struct):
    max_attempts: int  # attempts a job may lose to its nodes before it fails
    node_failures: int  # attempts lost so far (node offline, restarted, silent, crashed)
    history: list[Try]  # each lost attempt, oldest first


class ReplicaView(msgspec.Struct):
    job: str  # the replica's own id (GET /api/v1/jobs/<id> shows it)
    replica: int  # 1..k
    state: str
    node: str | None
    attempt: int
    result_hash: str | None  # sha256 of its result (docs/protocol.md, "Verification")
    verdict: str | None  # agreed | dissented | failed | no quorum | cancelled
    paid: str | None  # credits its node's owner was paid
    cost: str | None  # credits the submitter paid for it


class Verification(msgspec.Struct):
    replicas: int  # k
    quorum: int  # results that must agree: a strict majority of k
    outcome: str  # pending | agreed | no quorum | cancelled
    result_hash: str | None  # the agreed result's hash
    runs: list[ReplicaView]


class ServiceBilling(msgspec.Struct):
    period_s: int  # how often the job is billed (3600: per hour)
    periods_billed: int  # whole periods paid so far
    period_start: float | None  # start of the current, unpaid period (None: not running)
    period_price: str  # credits per period


class SubmitResponse(msgspec.Struct):
    id: str
    state: str
    hold: str
    max_price: str


class WalletView(msgspec.Struct):
    owner: str
    balance: str
    held: str
    balance_micro: int
    held_micro: int


class TransferRequest(msgspec.Struct, forbid_unknown_fields=True):
    to: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]  # a user or agent id
    amount: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]  # credits, e.g. "2.5"
    memo: Annotated[str, msgspec.Meta(max_length=200)] = ""


class TransferResponse(msgspec.Struct):
    entry: int
    to: str
    amount: str
    balance: str
    replayed: bool


class HistoryItem(msgspec.Struct):
    entry: int
    at: float
    reason: str
    amount: str
    balance_after: str
    counterparties: list[str]


class TokenRequest(msgspec.Struct, forbid_unknown_fields=True):
    token: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class TokenResponse(msgspec.Struct):
    jwt: str
    expires_at: int
    user: str
    role: str


class NodeTokenRequest(msgspec.Struct, forbid_unknown_fields=True):
    """A node signs in with the id and MQTT password from its node.json."""

    node_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    password: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class CreateUser(msgspec.Struct, forbid_unknown_fields=True):
    name: Name
    role: Literal["user", "admin"] = "user"
    # Who invited this user: paid a referral bonus when the user's first node proves real.
    referred_by: Annotated[str, msgspec.Meta(max_length=64)] | None = None


class UserCreated(msgspec.Struct):
    id: str
    name: str
    role: str
    token: str
    welcome_grant: str


class EnrollmentTokenView(msgspec.Struct):
    token: str
    expires_at: int
    command: str
    # The fingerprint ("sha256:<hex>") of the certificate a node pins when the hub serves TLS
    # with its own CA (docs/tls.md); None when the node needs no pin.
    ca: str | None = None


class EnrollRequest(msgspec.Struct, forbid_unknown_fields=True):
    token: Annotated[str, msgspec.Meta(min_length=8, max_length=256)]
    name: Name = "node"
    engines: list[Annotated[str, msgspec.Meta(max_length=32)]] = msgspec.field(
        default_factory=lambda: ["wasm"]
    )
    arch: Annotated[str, msgspec.Meta(max_length=64)] = ""
    cpu: Annotated[float, msgspec.Meta(ge=0, le=4096)] = 1.0
    # Bounded as a node's heartbeat is (hub/mqtt/wire.py): SQLite keeps 64-bit integers.
    memory_mb: Annotated[int, msgspec.Meta(ge=0, le=2**40)] = 0


class MqttCredentials(msgspec.Struct):
    url: str
    username: str
    password: str
    client_id: str


class EnrollResponse(msgspec.Struct):
    node_id: str
    node_secret: str
    owner: str
    mqtt: MqttCredentials
    heartbeat_interval_s: float


class GpuView(msgspec.Struct):
    """One GPU a node has, as its hello described it (a node's claim: the hub cannot look)."""

    index: int
    name: str
    uuid: str | None = None
    memory_mb: int | None = None


class FreeView(msgspec.Struct):
    """What a node's last heartbeat said it has left after its running jobs' shares."""

    cpu: float
    memory_mb: int
    gpu: int
    slots: int


class NodeView(msgspec.Struct):
    id: str
    name: str
    owner: str
    state: str
    engines: list[str]
    arch: str
    cpu: float
    memory_mb: int
    last_seen: float | None
    running: list[str]  # the job ids its last heartbeat named
    earned: str
    uptime_s: int  # availability paid or payable (docs/economy.md, "Staying online")
    slots: int  # jobs it runs at once (its hello; 1 for a board or an older node)
    jobs_running: int  # the hub's jobs on it now, assigned or running: of `slots`
    gpus: list[GpuView]  # the GPUs it has, from its hello; [] when none
    free: FreeView | None  # what its last heartbeat said is free; None when it did not say
    reputation: float | None = None  # 0..1, 0.5 for a new node (docs/economy.md)
    uptime_waiting_s: int = 0  # today's availability, unpaid until a job proves the node
    allow_network: list[str] = []  # engines whose jobs may use the network there


class NodeList(msgspec.Struct):
    nodes: list[NodeView]  # mine (an admin: everyone's), removed ones left out


class ErrorBody(msgspec.Struct):
    error: str
    field: str | None = None
    shortfall: str | None = None


class BlobView(msgspec.Struct):
    ref: str
    size: int

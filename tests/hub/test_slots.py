"""Slots and GPUs at the hub: nodes announce them with real hello and heartbeat messages (through
the bridge's `handle`, as its MQTT consumer calls it), the real scheduler packs jobs onto them
over a real SQLite file, and results settle through `Jobs.on_result` with exact prices.

The GPUs here are what a hello claims (no GPU on this machine): the scheduler's rules are what
is tested, and that a node is never given more GPUs than its hello listed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from edge.core import protocol
from hub.api.services import Services
from hub.app import open_services
from hub.config import HubConfig
from hub.ledger import economy
from hub.market.jobs import JobError, wallet_of
from hub.market.spec import JobSpec
from hub.mqtt.bridge import Bridge
from tests.hub.conftest import db_url
from tests.hub.test_earnings import add_node

pytestmark = pytest.mark.both_stores

L4 = {"index": 0, "name": "NVIDIA L4", "uuid": "GPU-0", "memory_mb": 23034}


NOW = [1_800_000_000.0]  # the hub's clock: the time between assignment and result is billed


@pytest.fixture
def s(tmp_path: Path, store: str | Path) -> Services:
    services = open_services(
        HubConfig(data_dir=tmp_path, db_url=db_url(store), welcome_grant_credits=100)
    )
    services.jobs.clock = lambda: NOW[0]
    return services


def announce(
    s: Services,
    node: Any,
    *,
    slots: int = 1,
    cpu: float = 2,
    memory_mb: int = 512,
    gpus: list[dict[str, Any]] | None = None,
    gpu_offered: int | None = None,
    engines: tuple[str, ...] = ("wasm", "native"),
    max_message: int | None = None,
) -> None:
    """A hello and an idle heartbeat from the node, as edge/core/session.py sends them."""
    bridge = Bridge("mqtt://127.0.0.1:9", s.store, s.jobs, s.scheduler)
    offer = {"cpu": cpu, "memory_mb": memory_mb,
             "gpu": len(gpus or []) if gpu_offered is None else gpu_offered, "load": 0}  # fmt: skip
    hello = protocol.hello(
        node["id"], list(engines), offer, "t", [], (), None, slots, gpus, max_message
    )
    assert bridge.handle(protocol.node_topic(node["id"], protocol.HELLO),
                         protocol.encode(hello)) == "hello"  # fmt: skip
    beat = protocol.heartbeat(node["id"], 1, protocol.IDLE, offer, [])
    assert bridge.handle(protocol.node_topic(node["id"], protocol.HEARTBEAT),
                         protocol.encode(beat)) == "heartbeat"  # fmt: skip


def submit(s: Services, user: str, **resources: Any) -> Any:
    engine: dict[str, Any] = {"type": "wasm", "module": "example:fib", "entrypoint": "fib"}
    if resources.get("gpu"):
        engine = {"type": "native", "command": ["nvidia-smi", "-L"]}
    spec = {"engine": engine, "timeout": 10, "resources": resources}
    return s.jobs.submit(user, msgspec.convert(spec, JobSpec))


def placed(s: Services) -> dict[str, str]:
    return {a.message["job_id"]: a.node_id for a in s.scheduler.schedule()}


def reason(s: Services, job: Any) -> str:
    return str(s.store.job(job["id"])["reason"])


def settle(s: Services, job: Any, wall_ms: int) -> str:
    job = s.store.job(job["id"])
    node = s.store.node(job["node"])
    NOW[0] += wall_ms / 1000  # the hub sees as long a run as the node reports
    msg = protocol.result(node["id"], node["secret"], job["id"], job["attempt"], {
        "status": "completed", "exit_code": 0, "stdout": b"ok", "returns": None, "error": None,
        "wall_ms": wall_ms, "cpu_ms": wall_ms})  # fmt: skip
    return s.jobs.on_result(node["id"], msg)


def users(s: Services) -> tuple[str, str]:
    owner, _, _ = s.create_user("owner", "user")
    alice, _, _ = s.create_user("alice", "user")
    return owner, alice


def test_a_node_takes_as_many_jobs_as_its_slots_and_cpus_allow(s: Services) -> None:
    owner, alice = users(s)
    node = add_node(s, owner)
    announce(s, node, slots=2, cpu=2)
    jobs = [submit(s, alice, cpu=1) for _ in range(3)]
    assert placed(s) == {jobs[0]["id"]: node["id"], jobs[1]["id"]: node["id"]}
    assert "busy" in reason(s, jobs[2])
    assert settle(s, jobs[0], 500) == "settled"  # a slot frees: the third goes there
    assert placed(s) == {jobs[2]["id"]: node["id"]}


def test_jobs_are_packed_by_cpu_and_ram_not_only_by_count(s: Services) -> None:
    owner, alice = users(s)
    node = add_node(s, owner)
    announce(s, node, slots=8, cpu=2, memory_mb=512)
    halves = [submit(s, alice, cpu=0.5, memory_mb=64) for _ in range(5)]
    got = placed(s)
    assert list(got) == [j["id"] for j in halves[:4]]  # four halves fill two CPUs
    assert "busy" in reason(s, halves[4])
    settle(s, halves[0], 100)
    big = submit(s, alice, cpu=0.5, memory_mb=400)  # the CPU is there, the RAM is not
    assert placed(s) == {halves[4]["id"]: node["id"]}
    assert "busy" in reason(s, big)


def test_a_job_pays_for_the_cpu_it_asked_for_not_a_whole_cpu(s: Services) -> None:
    owner, alice = users(s)
    node = add_node(s, owner)
    announce(s, node, slots=4)
    job = submit(s, alice, cpu=0.25)
    assert int(job["hold"]) == economy.max_price(250, 10, "normal") == 6944  # a quarter
    placed(s)
    before = s.ledger.balance(wallet_of(owner))
    assert settle(s, job, 3000) == "settled"
    assert s.ledger.balance(wallet_of(owner)) - before == economy.node_pay(250, 3000, 10) == 2083


def test_gpu_jobs_go_only_to_nodes_with_free_gpus_and_pay_the_gpu_rate(s: Services) -> None:
    owner, alice = users(s)
    plain, gpu_node = add_node(s, owner), add_node(s, owner)
    announce(s, plain, slots=2)
    job = submit(s, alice, cpu=1, gpu=1)
    assert placed(s) == {}
    assert reason(s, job) == "no node with a GPU online"
    # 1 CPU + 1 GPU for the 10 s timeout, held at submission
    assert int(job["hold"]) == economy.max_price(1000, 10, "normal", gpus=1) == 27777 + 138888

    announce(s, gpu_node, slots=2, gpus=[L4])
    two = submit(s, alice, cpu=1, gpu=2)
    assert placed(s) == {job["id"]: gpu_node["id"]}  # never the node without a GPU
    assert reason(s, two) == "no online node has 2 GPUs (the most: 1)"
    other = submit(s, alice, cpu=1, gpu=1)
    assert placed(s) == {}  # the one GPU is taken; a slot is free, the GPU is not
    assert reason(s, other) == "every node that can run it is busy or its owner is using it"

    before = s.ledger.balance(wallet_of(owner))
    paid_before = s.ledger.balance(wallet_of(alice))
    assert settle(s, job, 1500) == "settled"  # two started seconds
    pay = economy.node_pay(1000, 1500, 10, gpus=1)
    assert pay == economy.node_pay(1000, 1500, 10) + economy.gpu_pay(1, 1500, 10)
    assert pay == 5555 + 27777  # 2 s at 10/h + 2 s at 50/h
    assert s.ledger.balance(wallet_of(owner)) - before == pay
    assert s.ledger.balance(wallet_of(alice)) - paid_before == int(job["hold"]) - pay
    assert s.store.job(job["id"])["cost"] == pay
    assert placed(s) == {other["id"]: gpu_node["id"]}
    assert s.ledger.audit().balanced


def test_a_node_is_never_given_more_gpus_than_its_hello_listed(s: Services) -> None:
    owner, alice = users(s)
    node = add_node(s, owner)
    announce(s, node, slots=4, gpus=[L4], gpu_offered=4)  # its heartbeats claim four
    jobs = [submit(s, alice, cpu=0.5, gpu=1) for _ in range(2)]
    assert placed(s) == {jobs[0]["id"]: node["id"]}
    assert "busy" in reason(s, jobs[1])


def test_gpus_kept_by_their_owner_are_not_offered(s: Services) -> None:
    """gpu_only_when_idle: while the owner is active the node offers no GPU; a GPU job waits
    for it, and says that a node could run it, not that none has a GPU."""
    owner, alice = users(s)
    node = add_node(s, owner)
    announce(s, node, slots=2, gpus=[L4], gpu_offered=0)
    job = submit(s, alice, gpu=1)
    cpu_job = submit(s, alice, cpu=1)
    assert placed(s) == {cpu_job["id"]: node["id"]}  # the CPU is offered, the GPU is not
    assert reason(s, job) == "every node that can run it is busy or its owner is using it"


def test_a_wasm_job_cannot_ask_for_a_gpu(s: Services) -> None:
    _, alice = users(s)
    spec = {"engine": {"type": "wasm", "module": "example:fib"}, "resources": {"gpu": 1}}
    with pytest.raises(JobError, match=r"resources\.gpu: a wasm job cannot use a GPU"):
        s.jobs.submit(alice, msgspec.convert(spec, JobSpec))
    assert s.ledger.balance(wallet_of(alice)) == 100 * 10**6  # nothing held


def test_the_gpu_worked_example_of_docs_economy() -> None:
    """docs/economy.md, "GPU": cpu 1, gpu 1, timeout 60, runs 1.5 s."""
    assert economy.max_price(1000, 60, "normal", gpus=1) == 166_666 + 833_333 == 999_999
    assert economy.node_pay(1000, 1500, 60, gpus=1) == 5_555 + 27_777 == 33_332
    assert economy.max_price(1000, 60, "high", gpus=1) == 2 * 999_999


def test_a_node_is_never_sent_an_assignment_larger_than_it_takes(s: Services) -> None:
    """A board announces the largest message it can take (a quarter of its free heap); the hub
    sends it nothing larger, and a job no online node can take says why."""
    import base64

    owner, alice = users(s)
    board = add_node(s, owner)
    announce(s, board, max_message=20 * 1024)
    small = submit(s, alice)
    big_stdin = "base64:" + base64.b64encode(bytes(30 * 1024)).decode()
    fib = {"type": "wasm", "module": "example:fib", "entrypoint": "fib"}
    spec = {"engine": fib, "input": big_stdin, "timeout": 10}
    big = s.jobs.submit(alice, msgspec.convert(spec, JobSpec))
    assert placed(s) == {small["id"]: board["id"]}
    assert reason(s, big) == (
        "no online node takes an assignment of 41 KiB (the most a node announced: 20 KiB;"
        " boards take a quarter of their free heap)"
    )
    for job in (small, big):  # the estimate holds the real message, with little to spare
        real = len(protocol.encode(s.jobs.assign_message(job["id"])))
        estimate = int(s.store.job(job["id"])["message_bytes"])
        assert real <= estimate <= real + 1024, (real, estimate)
    settle(s, small, 100)
    laptop = add_node(s, owner)
    announce(s, laptop)  # a full machine: no limit of its own
    assert placed(s) == {big["id"]: laptop["id"]}

"""Slots and GPUs as GET /api/v1/nodes shows them: the real app factory, a real SQLite file, a
real Mosquitto; the nodes speak through the hub's own message path (`Bridge.handle`, what its
MQTT consumer calls) with the bytes edge/core/protocol.py makes.

The GPU is a hello's claim, as a node with an NVIDIA L4 would send it: no GPU is needed here.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from edge.core import protocol
from hub.api.types import NodeList, NodeView
from tests.hub.conftest import new_user
from tests.hub.test_leader import until
from tests.hub.test_node_auth import enroll

pytestmark = pytest.mark.both_stores

L4 = {"index": 0, "name": "NVIDIA L4", "uuid": "GPU-5e1c1d0a-7f3e-4b7c-9d1e-2a6f0c9b8e41",
      "memory_mb": 23034}  # fmt: skip
GPU_JOB = {
    "name": "cuda",
    "engine": {"type": "docker", "image": "nvidia/cuda:12.4.1-base-ubuntu22.04",
               "command": ["nvidia-smi"]},
    "resources": {"gpu": 1},
    "timeout": 60,
}  # fmt: skip


def say(api: Any, node_id: str, kind: str, msg: dict[str, Any]) -> str:
    topic = protocol.node_topic(node_id, kind)
    return str(api.services.bridge.handle(topic, protocol.encode(msg)))


async def test_nodes_show_their_slots_gpus_jobs_and_what_is_free(api: Any) -> None:
    _, alice = await new_user(api, "alice")
    _, bob = await new_user(api, "bob")
    box = (await enroll(api, alice, "gpu-box"))["node_id"]
    board = (await enroll(api, alice, "board"))["node_id"]
    offer = {"cpu": 4, "memory_mb": 8192, "gpu": 1}
    hello = protocol.hello(box, ["docker"], offer, "t", slots=2, gpus=[L4])
    assert say(api, box, protocol.HELLO, hello) == "hello"
    small = protocol.hello(board, ["wasm"], {"cpu": 1, "memory_mb": 256}, "t")
    assert say(api, board, protocol.HELLO, small) == "hello"
    free = {"cpu": 4.0, "memory_mb": 8192, "gpu": 1, "slots": 2}
    beat = protocol.heartbeat(box, 1, protocol.IDLE, offer, [], free=free)
    assert say(api, box, protocol.HEARTBEAT, beat) == "heartbeat"

    r = await api.post("/api/v1/jobs", json=GPU_JOB, headers=bob)
    assert r.status == 201, await r.text()
    job_id = (await r.json())["id"]
    api.services.bridge.dispatch()  # the pass runs in the bridge's next batch
    await until(lambda: api.services.store.job(job_id)["node"] is not None)
    assert api.services.store.job(job_id)["node"] == box  # the only node with a GPU

    r = await api.get("/api/v1/nodes", headers=alice)
    assert r.status == 200
    body = await r.json()
    msgspec.convert(body, NodeList)  # the shape the OpenAPI document declares
    nodes = {n["id"]: n for n in body["nodes"]}
    assert nodes[box]["slots"] == 2 and nodes[box]["jobs_running"] == 1
    assert nodes[box]["gpus"] == [L4]
    assert nodes[box]["free"] == free
    assert nodes[board]["slots"] == 1 and nodes[board]["jobs_running"] == 0
    assert nodes[board]["gpus"] == [] and nodes[board]["free"] is None

    r = await api.get(f"/api/v1/nodes/{box}", headers=alice)
    one = await r.json()
    assert one == nodes[box]
    msgspec.convert(one, NodeView)

    # The job's view carries what it asked for, its GPU included.
    job = await (await api.get(f"/api/v1/jobs/{job_id}", headers=bob)).json()
    assert job["spec"]["resources"]["gpu"] == 1 and job["node"] == box


async def test_an_older_heartbeat_handled_after_a_newer_one_changes_nothing(api: Any) -> None:
    """Hub replicas share a node's messages and may handle two beats in either order: the
    older one must not undo the newer (a stale `busy` kept nodes from work for a beat)."""
    _, alice = await new_user(api, "alice")
    node = (await enroll(api, alice, "n"))["node_id"]
    offer = {"cpu": 2, "memory_mb": 512}
    assert say(api, node, protocol.HELLO, protocol.hello(node, ["wasm"], offer, "t")) == "hello"
    newer = protocol.heartbeat(node, 6, protocol.IDLE, offer, [])
    older = protocol.heartbeat(node, 5, protocol.BUSY, offer, ["j_1"])
    assert say(api, node, protocol.HEARTBEAT, newer) == "heartbeat"
    assert say(api, node, protocol.HEARTBEAT, older).startswith("ignored")
    assert api.services.store.node(node)["state"] == protocol.IDLE
    assert say(api, node, protocol.HEARTBEAT, newer) == "heartbeat"  # the same one again: kept
    # A node that starts again counts from the start: its hello resets the order.
    assert say(api, node, protocol.HELLO, protocol.hello(node, ["wasm"], offer, "t")) == "hello"
    again = protocol.heartbeat(node, 0, protocol.BUSY, offer, ["j_2"])
    assert say(api, node, protocol.HEARTBEAT, again) == "heartbeat"
    assert api.services.store.node(node)["state"] == protocol.BUSY

"""A MicroPython node announces the largest message it can take (a quarter of its free heap) and
the hub never sends it a larger assignment: the job waits, saying why, instead of the node
running out of memory reading it, dropping its connection and the job looping until its
attempts run out. Real MicroPython, real Mosquitto, a real hub."""

from __future__ import annotations

import base64
from pathlib import Path

from edge.core import session
from tests.conftest import start_hub, wait_until
from tests.edge.test_micropython_node import (  # noqa: F401  # fixtures
    E2E_HEAP,
    micropython,
    native,
    start_mp_node,
)

FIB = {"type": "wasm", "module": "example:fib", "entrypoint": "fib", "args": ["20"]}


def test_cpython_has_no_limit_of_its_own() -> None:
    assert session.max_message() is None


def test_a_board_is_not_sent_an_assignment_it_cannot_hold(
    tmp_path: Path,
    mosquitto: str,
    micropython: str,  # noqa: F811
    native: dict[str, Path],  # noqa: F811
) -> None:
    hub = start_hub(tmp_path, mqtt_url=mosquitto)
    node = None
    try:
        _, owner = hub.user("owner")
        _, alice = hub.user("alice")
        token = owner.enrollment_token()["token"]
        node = start_mp_node(
            micropython, native, tmp_path / "mp", tmp_path / "mp.log",
            "--hub", hub.url, "--token", token, "--name", "mp",
        )  # fmt: skip
        wait_until(
            "online", lambda: [n["state"] for n in owner.nodes()] == ["idle"], 60, [node, hub.proc]
        )
        heap = int(E2E_HEAP.rstrip("k")) * 1024
        # its stdin alone, in base64, is larger than the node's whole heap
        stdin = "base64:" + base64.b64encode(bytes(heap)).decode()
        big = alice.submit({"engine": FIB, "input": stdin, "timeout": 20})
        wait_until(
            "the reason",
            lambda: "no online node takes an assignment of" in alice.job(big["id"])["reason"],
            20,
            [node, hub.proc],
        )
        small = alice.wait(alice.submit({"engine": FIB, "timeout": 20})["id"], timeout_s=60)
        assert small["state"] == "completed" and small["result"]["returns"] == [6765], small
        view = alice.job(big["id"])
        assert view["state"] == "queued" and view["attempt"] == 0, view  # never sent
        assert "MemoryError" not in node.output()
        alice.cancel(big["id"])
    finally:
        if node is not None:
            node.stop()
        hub.stop()

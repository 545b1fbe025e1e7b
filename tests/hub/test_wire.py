"""edge/core/protocol.py builds messages; hub/mqtt/wire.py decodes them. They must agree."""

from __future__ import annotations

import msgspec
import pytest

from edge.core import protocol
from hub.mqtt import wire

SECRET = "ab" * 32


def test_every_node_message_round_trips() -> None:
    msgs = {
        "hello": protocol.hello("n_1", ["wasm"], {"cpu": 2.0}, "0.1.0", ["j_1"]),
        "heartbeat": protocol.heartbeat("n_1", 3, "idle", {"cpu": 2.0, "memory_mb": 100}, []),
        "status": protocol.status("n_1", "offline"),
        "event": protocol.event("n_1", "j_1", 1, "running"),
        "result": protocol.result(
            "n_1",
            SECRET,
            "j_1",
            2,
            {
                "status": "completed",
                "exit_code": 0,
                "stdout": b"hi\n",
                "stderr": b"",
                "returns": [5],
                "error": None,
                "wall_ms": 10,
                "cpu_ms": 9,
            },
        ),
    }
    assert set(msgs) == set(protocol.NODE_OUT)
    for kind, msg in msgs.items():
        decoded = msgspec.json.decode(protocol.encode(msg), type=wire.NODE_TYPES[kind])
        back = msgspec.to_builtins(decoded)
        for key, value in msg.items():
            if isinstance(value, dict):
                assert back[key] == {**back[key], **value}, kind  # defaults fill the rest
            else:
                assert back[key] == value, (kind, key)


def test_submit_round_trips() -> None:
    msg = protocol.submit("r1", "dpt_token-123", {"engine": {}})
    assert msgspec.json.decode(protocol.encode(msg), type=wire.Submit).request_id == "r1"


def test_result_signature_covers_output_and_usage() -> None:
    outcome = {
        "status": "completed",
        "exit_code": 0,
        "stdout": b"42\n",
        "stderr": b"",
        "returns": None,
        "error": None,
        "wall_ms": 1000,
        "cpu_ms": 900,
    }
    msg = protocol.result("n_1", SECRET, "j_1", 1, outcome)
    assert protocol.verify_result(SECRET, msg, b"42\n")
    assert not protocol.verify_result(SECRET, msg, b"43\n")
    assert not protocol.verify_result("cd" * 32, msg, b"42\n")
    for field, value in [
        ("wall_ms", 999999),
        ("attempt", 2),
        ("state", "failed"),
        ("exit_code", 1),
        ("node_id", "n_2"),
    ]:
        assert not protocol.verify_result(SECRET, {**msg, field: value}, b"42\n"), field


def test_hand_written_hmac_matches_the_library() -> None:
    from edge.core import compat

    saved = compat._hmac
    try:
        expected = compat.hmac_sha256_hex("key", b"message")
        compat._hmac = None  # as on a board without the hmac module
        assert compat.hmac_sha256_hex("key", b"message") == expected
        assert (
            compat.hmac_sha256_hex("k" * 100, b"m")
            == (compat._hmac or __import__("hmac")).new(b"k" * 100, b"m", "sha256").hexdigest()
        )
    finally:
        compat._hmac = saved


@pytest.mark.parametrize(
    "topic",
    [
        "dp/v1/nodes//hello",
        "dp/v2/nodes/n/hello",
        "x",
        "dp/v1/things/n/hello",
        "dp/v1/nodes/n/hello/extra",
    ],
)
def test_foreign_topics_are_rejected(topic: str) -> None:
    assert protocol.parse_topic(topic) is None


def test_decode_rejects_non_objects() -> None:
    for bad in (b"[1]", b"nope", b"\xff"):
        with pytest.raises(ValueError):
            protocol.decode(bad)

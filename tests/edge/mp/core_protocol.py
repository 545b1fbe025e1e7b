"""The wire contract and its crypto, byte for byte the same on MicroPython and CPython:
topics, message shapes, the result digest and HMAC signature (against the worked example in
docs/protocol.md), and the compat shims they rest on."""

from edge.core import compat, protocol
from tests.edge.mp import harness

SECRET = "b27533e5011fbc741a03e16bfa0f391180a30d431574a908d08044573faafb1e"
NODE = "n_1f71891257bae0d9"
JOB = "j_56f0459e8b97a3e5"


def test_topics():
    assert protocol.node_topic(NODE, protocol.HEARTBEAT) == "dp/v1/nodes/" + NODE + "/heartbeat"
    assert protocol.agent_topic("u_1", protocol.SUBMIT) == "dp/v1/agents/u_1/submit"
    assert protocol.parse_topic("dp/v1/nodes/" + NODE + "/assign") == ("nodes", NODE, "assign")
    assert protocol.parse_topic("dp/v2/nodes/x/assign") is None
    assert protocol.parse_topic("dp/v1/nodes//assign") is None
    assert protocol.parse_topic("dp/v1/other/x/assign") is None
    assert protocol.parse_topic("dp/v1/nodes/x") is None


def test_encode_decode_round_trip():
    msg = protocol.heartbeat(NODE, 7, protocol.IDLE, {"cpu": 1.5, "memory_mb": 64}, ["j1"])
    raw = protocol.encode(msg)
    assert isinstance(raw, bytes)
    back = protocol.decode(raw)
    assert back == msg
    assert back["v"] == 1 and back["seq"] == 7 and back["running"] == ["j1"]
    assert protocol.decode(bytearray(raw)) == msg
    assert protocol.decode(raw.decode()) == msg


def test_decode_names_the_problem():
    for bad, why in ((b"{nope", "payload is not JSON"), (b"[1, 2]", "must be a JSON object")):
        try:
            protocol.decode(bad)
        except ValueError as e:
            assert why in str(e), str(e)
        else:
            raise AssertionError("decoded " + repr(bad))


def test_message_shapes():
    hello = protocol.hello(NODE, ("wasm",), {"cpu": 1}, "0.1.0", ["j1"])
    assert hello["engines"] == ["wasm"] and hello["running"] == ["j1"] and hello["v"] == 1
    ev = protocol.event(NODE, JOB, 2, protocol.REJECTED, "node busy")
    assert ev["detail"] == "node busy" and ev["attempt"] == 2 and ev["ts"] > 1600000000000
    assert "detail" not in protocol.event(NODE, JOB, 1, protocol.RUNNING)
    assert protocol.status(NODE, protocol.OFFLINE) == {"v": 1, "node_id": NODE, "state": "offline"}
    a = protocol.assign(JOB, 1, {"type": "wasm"}, "AA==", "ab", None, 10, 64)
    assert a["timeout_s"] == 10 and a["stdin_b64"] is None
    assert protocol.cancel(JOB, 3) == {"v": 1, "job_id": JOB, "attempt": 3}


def test_result_signature_matches_the_documented_example():
    # docs/protocol.md, "The result signature": the same digest and sig, on both interpreters
    assert protocol.result_digest(b"", [6765]) == (
        "6e00e1f6cbc739c35bda5fabe7ab9639eb4461caaebf5edb1e4ee3ae5949fa7d"
    )
    outcome = {"status": "completed", "exit_code": 0, "stdout": b"", "stderr": b"",
               "returns": [6765], "error": None, "wall_ms": 1207, "cpu_ms": 1180}  # fmt: skip
    msg = protocol.result(NODE, SECRET, JOB, 1, outcome)
    assert msg["sig"] == "6f7d152009c2695cfd7dd15dc2f1202418907c2e95c608838d34d3209497fae0"
    assert msg["state"] == "completed" and msg["exit_code"] == 0 and msg["stdout_b64"] == ""
    assert protocol.verify_result(SECRET, msg, b"")
    assert not protocol.verify_result(SECRET, msg, b"x")
    assert not protocol.verify_result("another secret", msg, b"")
    forged = dict(msg, wall_ms=99999)
    assert not protocol.verify_result(SECRET, forged, b"")


def test_failed_result_has_exit_code_minus_one():
    outcome = {"status": "failed", "exit_code": None, "error": "timeout: job exceeded its 1s limit",
               "wall_ms": 1000, "cpu_ms": 990, "stdout": b"partial"}  # fmt: skip
    msg = protocol.result(NODE, SECRET, JOB, 1, outcome)
    assert msg["state"] == "failed" and msg["exit_code"] == -1
    assert msg["error"].startswith("timeout: ")
    assert compat.b64decode(msg["stdout_b64"]) == b"partial"
    assert protocol.verify_result(SECRET, msg, b"partial")


def test_compat_hmac_and_encodings():
    # RFC 4231, test case 2 (CPython's hmac here, the RFC 2104 fallback on MicroPython)
    assert compat.hmac_sha256_hex("Jefe", "what do ya want for nothing?") == (
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    )
    long_key = "k" * 100  # longer than a block: hashed first
    assert len(compat.hmac_sha256_hex(long_key, b"m")) == 64
    assert compat.b64encode(b"\x00\xffhi") == "AP9oaQ=="
    assert compat.b64decode("AP9oaQ==") == b"\x00\xffhi"
    assert compat.hexlify(b"\x01\xab") == "01ab"
    assert compat.compare_digest("abc", "abc") and not compat.compare_digest("abc", "abd")
    assert not compat.compare_digest("abc", "ab")
    assert compat.json_loads(compat.json_dumps({"a": [1, None, True]})) == {"a": [1, None, True]}


def test_compat_clocks():
    t0 = compat.ticks_ms()
    compat.sleep_ms(20)
    assert compat.ticks_diff(compat.ticks_ms(), t0) >= 19
    assert compat.time_ms() > 1600000000000


harness.run(globals())

"""The diagnosis's checks against the MQTT broker: TCP to it, the login, and a round trip
(publish, then receive our own message)."""

from __future__ import annotations

import secrets
import socket
import ssl
import time
from typing import Any

from edge.diagnose_report import FAIL, MAX_ROUND_TRIP_MS, OK, SKIP, Check, Hints, why


def check_tcp(host: str, port: int, timeout_s: float, hint: str) -> Check:
    name = f"broker TCP {host}:{port}"
    start = time.perf_counter()
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as e:
        return Check(name, FAIL, why(e, timeout_s), f"is the hub's broker running? {hint}")
    ms = (time.perf_counter() - start) * 1000
    return Check(name, OK, f"connected in {ms:.1f} ms", ms=ms)


def check_mqtt(
    host: str,
    port: int,
    username: str | None,
    password: str | None,
    client_id: str,
    topic: str,
    timeout_s: float,
    hints: Hints,
    max_ms: float = MAX_ROUND_TRIP_MS,
    context: ssl.SSLContext | None = None,
) -> list[Check]:
    """Log in (CONNECT with these credentials), then publish on `topic` and wait for our own
    message to come back: [login, round trip]. context: MQTT over TLS, verified with it (the
    TLS line, edge/diagnose_tls.py, has checked the certificate already)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    login = f"MQTT login as {username or 'anonymous'}"
    trip = f"MQTT round trip on {topic}"
    seen: dict[str, Any] = {}
    nonce = secrets.token_hex(8).encode()

    def on_connect(_c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        seen["connack"] = rc

    def on_subscribe(_c: Any, _u: Any, _mid: Any, codes: Any, _p: Any) -> None:
        seen["suback"] = list(codes)

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        if bytes(msg.payload) == nonce:
            seen["echo"] = time.perf_counter()

    c = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True
    )
    if username:
        c.username_pw_set(username, password)
    if context is not None:
        c.tls_set_context(context)
    c.on_connect = on_connect
    c.on_subscribe = on_subscribe
    c.on_message = on_message

    def pump(key: str) -> bool:
        """Run the network loop until `key` is seen; False on timeout or a lost connection."""
        deadline = time.monotonic() + timeout_s
        while key not in seen and time.monotonic() < deadline:
            if c.loop(0.02) != mqtt.MQTT_ERR_SUCCESS and key not in seen:
                seen["lost"] = True
                return False
        return key in seen

    skip = Check(trip, SKIP, "not logged in to the broker")
    try:
        try:
            c.connect(host, port, keepalive=max(10, int(timeout_s) * 2))
        except (OSError, ValueError) as e:
            return [Check(login, FAIL, why(e, timeout_s), hints.mqtt), skip]
        if not pump("connack"):
            detail = (
                "the broker closed the connection without answering the MQTT login"
                if seen.get("lost")
                else f"no answer to the MQTT login within {timeout_s:g} s"
            )
            hint = f"is {host}:{port} an MQTT broker? {hints.mqtt}"
            if context is None:
                hint += "; a TLS port takes an mqtts:// URL"
            return [Check(login, FAIL, detail, hint), skip]
        rc = seen["connack"]
        if rc.is_failure:
            return [Check(login, FAIL, f"refused by the broker: {rc}", hints.login), skip]
        checks = [Check(login, OK, "accepted")]
        c.subscribe(topic, qos=1)
        if not pump("suback"):
            return [*checks, Check(trip, FAIL, "the broker did not confirm the subscription",
                                   hints.mqtt)]  # fmt: skip
        if any(getattr(code, "is_failure", False) for code in seen["suback"]):
            return [*checks, Check(
                trip, FAIL, f"the broker refused to subscribe us to {topic}",
                "the broker's ACL should let this login read and write its own topics",
            )]  # fmt: skip
        start = time.perf_counter()
        c.publish(topic, nonce, qos=1)
        if not pump("echo"):
            return [*checks, Check(
                trip, FAIL, f"published, but nothing came back within {timeout_s:g} s",
                "the broker's ACL may keep this login from writing or reading " + topic,
            )]  # fmt: skip
        ms = (seen["echo"] - start) * 1000
        detail = f"{ms:.1f} ms (publish, receive our echo; QoS 1)"
        if ms > max_ms:
            return [*checks, Check(
                trip, FAIL, detail + f", over {max_ms:g} ms",
                "a slow path to the broker: assignments and results will be late", ms=ms,
            )]  # fmt: skip
        return [*checks, Check(trip, OK, detail, ms=ms)]
    finally:
        try:
            c.disconnect()
            c.loop(0.01)
        except Exception:  # already closed by the broker: nothing to tidy
            pass

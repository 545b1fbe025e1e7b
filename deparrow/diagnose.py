"""`deparrow network diagnose` and `deparrow status --deep`: the network checks as a user sees
them. The probes themselves are edge/diagnose.py, shared with `edge-run diagnose`; this module
adds what only a user has: an API token (checked at the hub, it names the echo topic), the
broker address the hub gives out, and the CA the CLI trusts an https:// hub with (--ca).

A client-side tool: the hub's server code never imports it.
"""

from __future__ import annotations

import secrets
import ssl

from deparrow.client import Client, HubError
from edge.core import protocol
from edge.diagnose import (
    DIAG_KIND,
    FAIL,
    MAX_SKEW_S,
    OK,
    SKIP,
    Check,
    Hints,
    HubAnswer,
    passed,
    run_checks,
    split_mqtt_url,
)

__all__ = ["FAIL", "SKIP", "Check", "passed", "user_checks"]


def user_checks(
    hub_url: str,
    token: str | None,
    *,
    mqtt_url: str | None = None,
    mqtt_username: str | None = None,
    mqtt_password: str | None = None,
    timeout_s: float = 5.0,
    max_skew_s: float = MAX_SKEW_S,
    ca: str | None = None,
) -> list[Check]:
    """Every check for a user of the hub at hub_url. ValueError for a malformed URL.
    ca: the CA an https:// hub and an mqtts:// broker are verified with, as the CLI's --ca
    takes it (a PEM file or a sha256: fingerprint; None: the system's CAs)."""
    if mqtt_url is not None:
        split_mqtt_url(mqtt_url)
    if mqtt_password is not None and not mqtt_username:
        raise ValueError("an MQTT password needs an MQTT user name (--mqtt-username)")
    if mqtt_username is None and token:
        # The hub's own broker takes a user's id and API token as its login.
        try:
            who = Client(hub_url, timeout_s=timeout_s, ca=ca).request(
                "POST", "/api/v1/auth/token", {"token": token}, auth=False
            )
            mqtt_username, mqtt_password = str(who["user"]), token
        except Exception:  # the hub checks below say what is wrong, one line each
            pass
    hints = Hints(
        hub="check --hub (env DEPARROW_HUB)",
        mqtt=(
            "check --mqtt"
            if mqtt_url
            else "this is the address the hub gives out (its --mqtt-public-url); "
            "pass --mqtt URL to check another"
        ),
        login="check --mqtt-username and --mqtt-password",
        hub_auth="check --token (env DEPARROW_TOKEN); an admin creates one with "
        "'deparrow user create NAME'",
        tls=(
            "check --ca (env DEPARROW_CA): the hub's CA file, or the sha256: fingerprint "
            "'deparrow node token' prints"
            if ca
            else "pass --ca with the hub's CA file or the sha256: fingerprint 'deparrow node "
            "token' prints (env DEPARROW_CA)"
        ),
    )

    def auth(answer: HubAnswer | None, _verified: ssl.SSLContext | None) -> tuple[Check, str]:
        anonymous = protocol.agent_topic("diag-" + secrets.token_hex(4), DIAG_KIND)
        if answer is None:
            return Check("hub API token", SKIP, "the hub did not answer"), anonymous
        if not token:
            return Check("hub API token", SKIP, "none given (pass --token)"), anonymous
        try:
            who = Client(hub_url, timeout_s=timeout_s, ca=ca).request(
                "POST", "/api/v1/auth/token", {"token": token}, auth=False
            )
        except HubError as e:
            return Check("hub API token", FAIL, str(e), hints.hub_auth), anonymous
        user = str(who["user"])
        return (
            Check("hub API token", OK, f"accepted: you are {user} ({who['role']})"),
            protocol.agent_topic(user, DIAG_KIND),
        )

    return run_checks(
        hub_url,
        mqtt_url=mqtt_url,
        username=mqtt_username,
        password=mqtt_password,
        client_id="deparrow-diag-" + secrets.token_hex(3),
        auth=auth,
        hints=hints,
        timeout_s=timeout_s,
        max_skew_s=max_skew_s,
        ca=ca,
    )

"""Broker passwords in Mosquitto's own `$7$` format (what `mosquitto_passwd` writes): the
store hashes a node's and a user's MQTT password with it, and the broker logins
(hub/mqtt/logins.py) check them. Pure Python, standard library only."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os

# What mosquitto_passwd writes (Mosquitto 2.0): PBKDF2-HMAC-SHA512, 101 rounds, 12-byte salt,
# 64-byte key. Few rounds, because the broker runs them at every CONNECT; the passwords are
# 144-bit random tokens, not something a person chose, so the rounds are not what protects them.
ITERATIONS = 101
SALT_BYTES = 12
MAX_PASSWORD = 256


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = ITERATIONS) -> str:
    """Mosquitto's `$7$` format: `$7$<rounds>$<base64 salt>$<base64 PBKDF2-SHA512 key>`."""
    if not password or len(password) > MAX_PASSWORD:
        raise ValueError(f"an MQTT password must be 1 to {MAX_PASSWORD} characters")
    if not 1 <= iterations <= 10_000_000:
        raise ValueError(f"iterations must be 1 to 10,000,000, not {iterations}")
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    key = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(key).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    """Whether password matches a `$7$` hash; False for anything else, never an exception."""
    parts = encoded.split("$")
    if len(parts) != 5 or parts[0] != "" or parts[1] != "7" or not parts[2].isdigit():
        return False
    iterations = int(parts[2])
    if not password or len(password) > MAX_PASSWORD or not 1 <= iterations <= 10_000_000:
        return False
    try:
        salt = base64.b64decode(parts[3], validate=True)
        want = base64.b64decode(parts[4], validate=True)
    except (binascii.Error, ValueError):
        return False
    got = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, len(want) or 64)
    return bool(want) and hmac.compare_digest(got, want)

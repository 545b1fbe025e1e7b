"""Broker logins and ACLs for the hub's own broker: one rule set, written for both brokers.

Who may log in and what each login may touch comes from the store: the hub itself
(`deparrow-hub`: everything under `dp/v1/`), each enrolled node (its id: only
`dp/v1/nodes/<id>/#`) and each user, agents included (their user id: only
`dp/v1/agents/<id>/#`). A node's or an agent's subtree carries nothing but what passes between
it and the hub, so whatever it writes there can fool nobody but itself; it can neither speak
for nor listen to anyone else. docs/protocol.md ("Broker authentication") says the same for
users of the protocol.

The rules are rendered as Mosquitto's own `password_file` and `acl_file` (the `$7$` PBKDF2-SHA512
hashes that `mosquitto_passwd` writes), and the embedded amqtt broker reads the same two files
through `Policy`, so both brokers enforce one text. Plaintext passwords exist only in flight:
a node's at enrollment, a user's API token (their MQTT password) at creation, and the hub's
own in its data directory.

Pure Python on purpose: the store hashes passwords with it and the embedded broker's plugins
check logins with it, and neither should pull in the other's dependencies.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edge.core import protocol

log = logging.getLogger(__name__)

HUB_USER = "deparrow-hub"
# What mosquitto_passwd writes (Mosquitto 2.0): PBKDF2-HMAC-SHA512, 101 rounds, 12-byte salt,
# 64-byte key. Few rounds, because the broker runs them at every CONNECT; the passwords are
# 144-bit random tokens, not something a person chose, so the rounds are not what protects them.
ITERATIONS = 101
SALT_BYTES = 12
# Names go into line-based files: whatever could start another line or field stays out.
USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_PASSWORD = 256

Action = Literal["publish", "subscribe", "receive"]


class AuthFileError(ValueError):
    """A password or ACL file that this module did not write (or that was damaged)."""


# --- passwords ---------------------------------------------------------------------------------
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


def valid_username(name: str) -> bool:
    return USERNAME.fullmatch(name) is not None


# --- accounts and the two files -----------------------------------------------------------------
@dataclass(frozen=True)
class Account:
    """One broker login and the topic filters it may read and write."""

    username: str
    password_hash: str
    readwrite: tuple[str, ...]

    def __post_init__(self) -> None:
        if not valid_username(self.username):
            raise ValueError(f"{self.username!r} cannot be a broker user name")
        if not self.password_hash.startswith("$7$") or any(c in self.password_hash for c in ":\n "):
            raise ValueError(f"broker user {self.username}: not a $7$ password hash")
        for f in self.readwrite:
            if not valid_filter(f) or "\n" in f:
                raise ValueError(f"broker user {self.username}: bad topic filter {f!r}")


def hub_account(password_hash: str) -> Account:
    return Account(HUB_USER, password_hash, (protocol.PREFIX + "/#",))


def node_account(node_id: str, password_hash: str) -> Account:
    return Account(node_id, password_hash, (protocol.node_topic(node_id, "#"),))


def agent_account(user_id: str, password_hash: str) -> Account:
    return Account(user_id, password_hash, (protocol.agent_topic(user_id, "#"),))


def accounts(
    hub: Account, nodes: Iterable[tuple[str, str]], users: Iterable[tuple[str, str]]
) -> list[Account]:
    """The hub's login, then (id, hash) of nodes and of users as their accounts. A row that
    cannot be a login (a damaged hash, say) is left out and logged, not fatal to the rest."""
    out = [hub]
    for make, rows in ((node_account, nodes), (agent_account, users)):
        for ident, encoded in rows:
            try:
                out.append(make(ident, encoded))
            except ValueError as e:
                log.error("left out of the broker's logins: %s", e)
    return out


def render_password_file(accounts: Iterable[Account]) -> str:
    lines = ["# generated by the DEparrow hub as nodes and users come and go; do not edit"]
    lines += [f"{a.username}:{a.password_hash}" for a in accounts]
    return "\n".join(lines) + "\n"


def render_acl_file(accounts: Iterable[Account]) -> str:
    """Mosquitto's acl_file: no `pattern` lines, so a login not listed may touch nothing."""
    lines = ["# generated by the DEparrow hub as nodes and users come and go; do not edit"]
    for a in accounts:
        lines += ["", f"user {a.username}"]
        lines += [f"topic readwrite {f}" for f in a.readwrite]
    return "\n".join(lines) + "\n"


def parse_password_file(text: str) -> dict[str, str]:
    users: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, encoded = line.partition(":")
        if not sep or not valid_username(name) or not encoded.startswith("$7$"):
            raise AuthFileError(f"password file line {n}: expected 'user:$7$...'")
        users[name] = encoded
    return users


def parse_acl_file(text: str) -> dict[str, list[tuple[str, str]]]:
    """The subset of Mosquitto's acl_file that render_acl_file writes: `user NAME` sections of
    `topic [read|write|readwrite] FILTER` lines. user -> [(access, filter)]."""
    acl: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for n, raw in enumerate(text.splitlines(), 1):
        words = raw.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "user" and len(words) == 2 and valid_username(words[1]):
            current = acl.setdefault(words[1], [])
        elif words[0] == "topic" and current is not None and len(words) in (2, 3):
            access, topic = ("readwrite", words[1]) if len(words) == 2 else (words[1], words[2])
            if access not in ("read", "write", "readwrite") or not valid_filter(topic):
                raise AuthFileError(f"ACL file line {n}: bad topic line {raw.strip()!r}")
            current.append((access, topic))
        else:
            raise AuthFileError(f"ACL file line {n}: not understood: {raw.strip()!r}")
    return acl


# --- topic matching -----------------------------------------------------------------------------
def valid_filter(f: str) -> bool:
    levels = f.split("/")
    if not f or "\x00" in f:
        return False
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT matching of a concrete topic; wildcards never match a leading `$` level."""
    if not topic or "+" in topic or "#" in topic:
        return False
    flt, top = topic_filter.split("/"), topic.split("/")
    if topic.startswith("$") and flt[0] in ("+", "#"):
        return False
    for i, level in enumerate(flt):
        if level == "#":
            return True
        if i >= len(top) or (level != "+" and level != top[i]):
            return False
    return len(flt) == len(top)


def filter_within(requested: str, allowed: str) -> bool:
    """Whether every topic `requested` can match is also matched by `allowed`."""
    if not valid_filter(requested):
        return False
    req, alw = requested.split("/"), allowed.split("/")
    for i, level in enumerate(alw):
        if level == "#":  # this level, all below it, and the parent itself
            return not (i == 0 and requested.startswith("$"))
        if i >= len(req) or req[i] == "#":
            return False
        if level != "+" and req[i] != level:  # also refuses a requested "+" here
            return False
    return len(req) == len(alw)


# --- the rules, as the embedded broker applies them -----------------------------------------------
class Policy:
    """Logins and ACLs read back from the two rendered files (for the embedded broker)."""

    def __init__(self, users: dict[str, str], acl: dict[str, list[tuple[str, str]]]) -> None:
        self.users = users
        self.acl = acl

    @classmethod
    def load(cls, password_file: Path, acl_file: Path) -> Policy:
        return cls(
            parse_password_file(password_file.read_text()), parse_acl_file(acl_file.read_text())
        )

    def authenticate(self, username: str | None, password: str | None) -> bool:
        encoded = self.users.get(username or "")
        return encoded is not None and verify_password(password or "", encoded)

    def allowed(self, username: str | None, action: Action, topic: str) -> bool:
        """publish and receive take a topic; subscribe takes a filter, which must lie wholly
        inside one the user may read (Mosquitto grants a wider one and filters what it
        delivers; refusing it outright leaves the same messages out)."""
        for access, f in self.acl.get(username or "", ()):
            if action == "publish":
                ok = access != "read" and topic_matches(f, topic)
            elif action == "receive":
                ok = access != "write" and topic_matches(f, topic)
            else:
                ok = access != "write" and filter_within(topic, f)
            if ok:
                return True
        return False


# --- files --------------------------------------------------------------------------------------
def write_atomic(path: Path, text: str, mode: int = 0o600) -> None:
    """Replace path with text all at once (a reader sees the old or the new file, whole)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def hub_password(data_dir: Path) -> str:
    """The hub's own broker password: made at the first start, kept in the data directory."""
    path = data_dir / "mqtt-password"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first: use theirs
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(24) + "\n")
    password = path.read_text().strip()
    if not password or len(password) > MAX_PASSWORD:
        raise AuthFileError(f"{path} is empty or damaged: delete it and restart the hub")
    return password

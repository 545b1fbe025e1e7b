"""Hub configuration: one frozen object built by the CLI (or a test) and handed to create_app."""

from __future__ import annotations

import functools
import ipaddress
import os
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(os.environ.get("DEPARROW_DATA", str(Path(base) / "deparrow")))


def is_loopback(host: str) -> bool:
    """Whether an address to listen on reaches this machine only. A name other than
    localhost may resolve to anything, so it counts as beyond loopback."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_unspecified(host: str) -> bool:
    """Whether host is a listen-on-everything address (0.0.0.0, ::): no other machine can
    use it to reach us, so it is never given out."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return host == ""


@functools.lru_cache(maxsize=2)
def outward_address(ipv6: bool = False) -> str:
    """This machine's address on the interface with the default route, what other machines
    most likely reach it by: a UDP socket "connected" to a public address sends nothing but
    makes the kernel pick the source address. Without a route, the host name."""
    family, target = (socket.AF_INET6, "2001:db8::1") if ipv6 else (socket.AF_INET, "192.0.2.1")
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((target, 9))
            address = str(s.getsockname()[0])
    except OSError:
        return socket.gethostname()
    return address if not is_unspecified(address) else socket.gethostname()


def advertised_host(host: str, by_name: bool = False) -> str:
    """The host to give out for a listen address: itself, unless it is 0.0.0.0 or ::; then
    the outward address, or with by_name (a TLS hub: its own certificate names the host
    name, not the addresses) the host name."""
    if not is_unspecified(host):
        return host
    return (socket.gethostname() if by_name else "") or outward_address(":" in host)


def advertised_url(url: str) -> str:
    """url with a 0.0.0.0 or :: host replaced by advertised_host's answer."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if not is_unspecified(host):
        return url
    outward = advertised_host(host)
    where = f"[{outward}]" if ":" in outward else outward
    login = parts.netloc.rpartition("@")[0]
    netloc = (f"{login}@" if login else "") + where + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True)
class HubConfig:
    data_dir: Path = field(default_factory=default_data_dir)
    # The store: None is the SQLite file data_dir/hub.sqlite; a postgresql:// URL puts it on a
    # PostgreSQL server that several hub replicas may share (hub/store/pg.py, docs/scale.md).
    db_url: str | None = None
    # Several replicas (docs/scale.md): where this one stands, given out by GET
    # /api/v1/bootstrap so nodes and clients can prefer a near replica ("" when unsaid).
    region: str = ""
    # With replicas on one broker cluster: subscribe to the nodes' and agents' topics as MQTT
    # shared subscriptions in this group, so the replicas split the traffic and each message
    # is handled by one of them. None: a plain subscription (one hub).
    mqtt_share_group: str | None = None
    # With a broker cluster (--mqtt): the directory where the hub writes the cluster's login
    # files (Mosquitto's password and ACL files, docs/broker-cluster.md), from the store, for
    # the servers to reload. None: the operator keeps the cluster's logins.
    mqtt_auth_dir: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8765
    # None: the hub starts its own broker (Mosquitto when on PATH, else embedded amqtt).
    mqtt_url: str | None = None
    # What nodes are told to connect to; None derives it from the host a node used to reach us.
    mqtt_public_url: str | None = None
    # The hub's URL as other machines reach it (a name, a proxy's https:// address): what the
    # enroll command and the start-up lines give out. None: the URL a caller reached us by,
    # with 0.0.0.0 or :: replaced by this machine's outward address (advertised_host).
    public_url: str | None = None
    broker: str = "auto"  # auto | mosquitto | embedded (only when mqtt_url is None)
    broker_port: int = 1883  # where the hub's own broker listens (0: any free port)
    jwt_secret: str = ""
    jwt_ttl_s: int = 3600
    welcome_grant_credits: int = 100
    heartbeat_interval_s: float = 5.0
    # A node missing this many beats is offline and its assigned jobs go back to the queue.
    missed_beats_offline: int = 3
    max_module_bytes: int = 4 * 1024 * 1024
    max_input_bytes: int = 4 * 1024 * 1024
    # A file job's inputs, all together (each one an upload, an https URL, base64, an example).
    max_files_bytes: int = 16 * 1024 * 1024
    # https:// inputs: fetched by the hub from public addresses only, unless the operator
    # allows private and loopback ones (a test network); fetch_ca_file adds trusted CAs.
    fetch_allow_private: bool = False
    fetch_ca_file: str | None = None
    fetch_timeout_s: float = 60.0
    # A job's outputs are kept this long after it ends; then their files expire.
    output_retention_s: float = 7 * 86400
    # An uploaded blob no job refers to is collected after this long.
    blob_grace_s: float = 86400
    max_timeout_s: int = 24 * 3600
    # Service jobs: billed every period (the rule says per hour), living at most this long.
    service_period_s: int = 3600
    max_service_s: int = 7 * 86400  # nodes refuse longer timeouts (edge/core/jobs.py)
    # Extra time past a job's timeout before the hub gives up waiting for a node's result.
    result_grace_s: float = 30.0
    # A job no node has taken within this long fails and its hold is refunded.
    queue_ttl_s: float = 3600.0
    # Attempts of a job its nodes may lose (offline, restarted, silent, executor broke) before
    # it fails and is refunded; each lost attempt is retried on another node.
    max_attempts: int = 3
    enrollment_ttl_s: int = 24 * 3600
    # TLS (docs/tls.md): HTTPS, and MQTT over TLS on tls_mqtt_port (0: any free port) for
    # nodes and agents, with the operator's tls_cert/tls_key or, with none, a CA and a server
    # certificate the hub makes in data_dir/tls covering tls_names besides its own names.
    tls: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_names: tuple[str, ...] = ()
    tls_mqtt_port: int = 8883
    # Listening beyond loopback without TLS is refused unless the operator says so.
    insecure_no_tls: bool = False
    # Rate limits on the REST API and the dashboard (hub/api/limits.py, docs/security.md): per
    # token (or address without one), and logins per address. 0 turns one off. Loopback
    # callers are exempt unless rate_limit_loopback (a proxy on this machine: limit there).
    rate_requests_per_s: float = 100.0
    rate_requests_burst: float = 200.0
    rate_logins_per_s: float = 1.0
    rate_logins_burst: float = 20.0
    rate_limit_loopback: bool = False

    @property
    def db_path(self) -> Path:
        return self.data_dir / "hub.sqlite"

    @property
    def db_target(self) -> str | Path:
        """What open_database() opens: the --db URL, else the SQLite file."""
        return self.db_url or self.db_path

    @property
    def admin_token_path(self) -> Path:
        return self.data_dir / "admin-token"

    def exposure_problem(self) -> str | None:
        """Why the hub must not start on this address as configured, or None.

        Beyond loopback, tokens, node passwords and results would cross the network in plain
        text: that takes TLS, or the operator saying in so many words that the network is
        trusted (or that a TLS proxy in front of the hub is what the world sees)."""
        if self.tls and self.insecure_no_tls:
            return "--tls and --insecure-no-tls contradict each other: choose one"
        if self.tls or self.insecure_no_tls or is_loopback(self.host):
            return None
        return (
            f"refusing to listen on {self.host} without TLS: API tokens, node passwords and "
            "results would cross the network readable and changeable by anyone on the path. "
            "Add --tls (the hub makes its own certificate, or give --tls-cert and --tls-key), "
            "or keep the hub on 127.0.0.1 behind a TLS reverse proxy (docs/tls.md), or pass "
            "--insecure-no-tls on a network you trust"
        )

    def with_secret(self) -> HubConfig:
        """Fill in a JWT secret that survives restarts (kept in the data directory)."""
        if self.jwt_secret:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        path = self.data_dir / "jwt-secret"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        secret = path.read_text().strip()
        return HubConfig(**{**self.__dict__, "jwt_secret": secret})

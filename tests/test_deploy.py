"""deploy/: the files an operator runs DEparrow at scale with (docs/scale.md), checked by the
tools that will read them. nginx's own parser on deploy/nginx/deparrow.conf, then a real nginx
with that file in front of two real hub processes sharing one real PostgreSQL: requests reach
both replicas, GETs and POSTs go on when one replica dies, and the dashboard's live stream
passes through as the hub writes it. The compose file's broker script (busybox sh, as in the
image) with deploy/broker/mosquitto.conf and a real Mosquitto, before a real hub writing the
logins (--mqtt-auth-dir). systemd's parser on the units; the compose file as YAML and as
podman-compose reads it, with every `deparrow hub` flag it (and the rest of deploy/,
docs/scale.md and docs/broker-cluster.md) uses checked against `deparrow hub --help`.

nginx runs as a child process on free loopback ports, with a prefix directory of its own; only
the addresses in the file are rendered for the test (the replicas' and the listen ports, the
certificate): every other line is the file as shipped."""

from __future__ import annotations

import http.client
import json
import os
import pwd
import re
import shlex
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import paho.mqtt.client as mqtt
import psycopg
import pytest
import trustme
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from deparrow.client import Client
from deparrow.localnet import LocalHub, Proc, free_port, wait_for
from deparrow.pgserver import LocalPostgres

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
NGINX_CONF = DEPLOY / "nginx" / "deparrow.conf"
UNIT = DEPLOY / "systemd" / "deparrow-hub@.service"
COMPOSE = DEPLOY / "compose.yaml"
SCALE_DOC = ROOT / "docs" / "scale.md"
BROKER_DOC = ROOT / "docs" / "broker-cluster.md"
# The docs that give `deparrow hub` command lines for deploy/.
DOCS = (SCALE_DOC, BROKER_DOC, DEPLOY / "systemd" / "README.md")
# The store's URL as deploy/ gives it: with TCP keepalives, so a lost server is noticed.
KEEPALIVES = "keepalives=1&keepalives_idle=10&keepalives_interval=3&keepalives_count=3"


def tool(name: str, package: str) -> str:
    exe = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if exe is None:
        pytest.fail(f"{name} is not installed: run `make test` (Debian package {package})")
    return exe


# --- nginx ------------------------------------------------------------------------------------


class Nginx:
    """deploy/nginx/deparrow.conf in a prefix directory of its own, for two upstreams."""

    def __init__(self, prefix: Path, upstreams: tuple[str, str], cert: Path, key: Path) -> None:
        self.exe = tool("nginx", "nginx")
        self.prefix = prefix
        self.http_port, self.https_port = free_port(), free_port()
        self.url = f"https://127.0.0.1:{self.https_port}"
        text = NGINX_CONF.read_text()
        renders = [
            ("server hub-1:8765 ", f"server {upstreams[0]} "),
            ("server hub-2:8765 ", f"server {upstreams[1]} "),
            ("listen 80;", f"listen 127.0.0.1:{self.http_port};"),
            ("listen 443 ssl http2;", f"listen 127.0.0.1:{self.https_port} ssl http2;"),
            ("/etc/nginx/deparrow/fullchain.pem", str(cert)),
            ("/etc/nginx/deparrow/privkey.pem", str(key)),
        ]
        for old, new in renders:
            assert text.count(old) == 1, f"{old!r} is no longer in {NGINX_CONF}"
            text = text.replace(old, new)
        prefix.mkdir(parents=True)
        (prefix / "deparrow.conf").write_text(text)
        temp = {n: prefix / "temp" / n for n in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
        for d in temp.values():
            d.mkdir(parents=True)
        # As root the workers would be `nobody`, who cannot enter pytest's directories.
        user = "user root;" if os.geteuid() == 0 else ""
        (prefix / "nginx.conf").write_text(f"""
{user}
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {temp["body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
    include {prefix}/deparrow.conf;
}}
""")
        self.args = [self.exe, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", "stderr"]
        self.proc: Proc | None = None

    def check(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.args, "-t"], capture_output=True, text=True, timeout=30)

    def start(self) -> None:
        self.proc = Proc("nginx", self.args, self.prefix / "nginx.log")

        def answers() -> bool:
            try:
                with socket_to(self.https_port):
                    return True
            except OSError:
                return False

        wait_for("nginx to listen", answers, 15, [self.proc])

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


def socket_to(port: int) -> Any:
    import socket

    return socket.create_connection(("127.0.0.1", port), timeout=2)


@pytest.fixture
def tls(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and nginx's certificate for 127.0.0.1: (ca, cert chain, key)."""
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    ca_path, chain, key = tmp_path / "ca.pem", tmp_path / "fullchain.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    server.private_key_and_cert_chain_pem.write_to_path(str(chain))
    server.private_key_pem.write_to_path(str(key))
    return ca_path, chain, key


def test_nginx_accepts_the_file(tmp_path: Path, tls: tuple[Path, Path, Path]) -> None:
    _, chain, key = tls
    nginx = Nginx(tmp_path / "nginx", ("127.0.0.1:1", "127.0.0.1:2"), chain, key)
    done = nginx.check()
    assert done.returncode == 0, done.stderr
    assert "syntax is ok" in done.stderr and "test is successful" in done.stderr


def test_nginx_sends_on_a_get_but_never_a_post_that_reached_a_failing_replica(
    tmp_path: Path, tls: tuple[Path, Path, Path]
) -> None:
    """Two stand-ins for replicas: one reads each request and drops the connection (a replica
    that died while handling it), one answers. A GET that met the first is answered by the
    second; a POST that met the first is not sent again (it may have been done): 502."""
    seen: dict[str, list[str]] = {"dying": [], "healthy": []}

    class Dying(BaseHTTPRequestHandler):
        def handle_one_request(self) -> None:
            self.raw_requestline = self.rfile.readline(65537)
            if self.parse_request():
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                seen["dying"].append(self.command)
            self.close_connection = True  # no answer at all

        def log_message(self, *args: Any) -> None:
            pass

    class Healthy(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def answer(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen["healthy"].append(self.command)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        do_GET = do_POST = answer

        def log_message(self, *args: Any) -> None:
            pass

    servers = [ThreadingHTTPServer(("127.0.0.1", 0), h) for h in (Dying, Healthy)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    ca, chain, key = tls
    upstreams = (f"127.0.0.1:{servers[0].server_port}", f"127.0.0.1:{servers[1].server_port}")
    nginx = Nginx(tmp_path / "nginx", upstreams, chain, key)
    nginx.start()
    context = ssl.create_default_context(cafile=str(ca))

    def send(method: str) -> int:
        c = http.client.HTTPSConnection("127.0.0.1", nginx.https_port, context=context)
        try:
            c.request(method, "/api/v1/jobs", "{}" if method == "POST" else None)
            r = c.getresponse()
            r.read()
            return r.status
        finally:
            c.close()

    try:
        posts = []
        while "POST" not in seen["dying"]:  # round robin: the second at the latest
            assert len(posts) < 4, seen
            posts.append(send("POST"))
        assert posts.count(502) == seen["dying"].count("POST") >= 1
        assert posts.count(200) == seen["healthy"].count("POST")
        gets = [send("GET") for _ in range(4)]
        assert gets == [200] * 4 and seen["healthy"].count("GET") == 4
        assert seen["dying"].count("GET") >= 1  # met the dying one first, then went on
    finally:
        nginx.stop()
        for s in servers:
            s.shutdown()
            s.server_close()


class Cluster:
    def __init__(self, hubs: list[LocalHub], nginx: Nginx, ca: Path) -> None:
        self.hubs, self.nginx, self.ca = hubs, nginx, ca
        self.ssl = ssl.create_default_context(cafile=str(ca))

    def conn(self) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(
            "127.0.0.1", self.nginx.https_port, context=self.ssl, timeout=15
        )

    def get(self, path: str) -> tuple[int, Any]:
        c = self.conn()
        try:
            c.request("GET", path)
            r = c.getresponse()
            return r.status, json.loads(r.read() or b"null")
        finally:
            c.close()


@pytest.fixture
def cluster(
    tmp_path: Path, postgres_server: LocalPostgres, mosquitto: str, tls: tuple[Path, Path, Path]
) -> Iterator[Cluster]:
    """Two hub replicas on one PostgreSQL database and one broker, behind nginx."""
    db = postgres_server.create_database(f"deploy_{os.getpid()}_{tmp_path.name}"[:60])
    flags = ("--db", f"{db}?{KEEPALIVES}", "--mqtt-share", "hubs")
    hubs = [LocalHub(tmp_path / "hub1", mqtt_url=mosquitto, extra=flags)]
    try:
        # The first replica made the admin; the second reads its token from its own data
        # directory, where an operator copies it.
        (tmp_path / "hub2").mkdir()
        shutil.copy(tmp_path / "hub1" / "admin-token", tmp_path / "hub2" / "admin-token")
        hubs.append(LocalHub(tmp_path / "hub2", mqtt_url=mosquitto, extra=flags))
        ca, chain, key = tls
        upstreams = (f"127.0.0.1:{hubs[0].port}", f"127.0.0.1:{hubs[1].port}")
        nginx = Nginx(tmp_path / "nginx", upstreams, chain, key)
        nginx.start()
    except BaseException:
        for h in hubs:
            h.stop()
        raise
    yield Cluster(hubs, nginx, ca)
    nginx.stop()
    for h in hubs:
        h.stop()


def replica_of(hub: LocalHub) -> str:
    return str(Client(hub.url).request("GET", "/readyz", auth=False)["replica"])


def test_requests_reach_both_replicas_and_go_on_when_one_dies(cluster: Cluster) -> None:
    first, second = cluster.hubs
    ids = [replica_of(first), replica_of(second)]
    assert ids[0] != ids[1]

    served = []
    for _ in range(10):
        status, body = cluster.get("/readyz")
        assert status == 200, body
        served.append(body["replica"])
    assert set(served) == set(ids), served  # round robin over both

    admin = Client(cluster.nginx.url, first.admin.token, ca=str(cluster.ca))
    assert admin.create_user("before")["name"] == "before"

    first.proc.kill()  # a crash: no goodbye
    served = []
    for _ in range(10):
        status, body = cluster.get("/readyz")
        assert status == 200, body
        served.append(body["replica"])
    assert set(served) == {ids[1]}
    # A POST too: nginx sends it on only when it never reached the dead replica, which a
    # refused connection is.
    user = admin.create_user("after")
    assert Client(second.url, user["token"]).wallet()["balance"] == "100"
    status, body = cluster.get("/api/v1/bootstrap")
    assert status == 200 and second.url in [r["url"] for r in body["replicas"]]


def test_the_proxy_limits_logins_and_keeps_the_health_endpoints_to_itself(
    cluster: Cluster,
) -> None:
    """From another address than the proxy's own (127.0.0.2 is not 127.0.0.1 to nginx)."""

    def request(method: str, path: str, body: str | None = None) -> http.client.HTTPResponse:
        c = http.client.HTTPSConnection("127.0.0.1", cluster.nginx.https_port,
                                        context=cluster.ssl, timeout=15,
                                        source_address=("127.0.0.2", 0))  # fmt: skip
        c.request(method, path, body, {"Content-Type": "application/json"})
        r = c.getresponse()
        r.body = r.read()  # type: ignore[attr-defined]
        c.close()
        return r

    assert cluster.get("/readyz")[0] == 200  # on the proxy's machine
    for path in ("/readyz", "/healthz", "/metrics"):
        assert request("GET", path).status == 403, path
    assert request("GET", "/api/v1/status").status == 200

    statuses = [request("POST", "/api/v1/auth/token", '{"token": "dpt_wrong"}') for _ in range(30)]
    refused = [r for r in statuses if r.status == 429]
    assert statuses[0].status == 401  # the hub's answer, let through
    assert refused and refused[0].getheader("Retry-After") == "1"
    assert "too many requests" in json.loads(refused[0].body)["error"]  # type: ignore[attr-defined]
    # The address's other requests are counted apart from its logins.
    assert request("GET", "/api/v1/status").status == 200


def test_the_live_stream_passes_through_as_it_is_written(cluster: Cluster) -> None:
    first, second = cluster.hubs
    user, _ = first.user("watcher")
    _, payer_client = second.user("payer")

    c = cluster.conn()
    form = urlencode({"token": user["token"], "next": "/"})
    c.request("POST", "/signin", form, {"Content-Type": "application/x-www-form-urlencoded"})
    signed = c.getresponse()
    signed.read()
    assert signed.status == 303
    cookie = signed.getheader("Set-Cookie", "").split(";", 1)[0]
    assert cookie.startswith("dp_session=")
    c.close()

    live = cluster.conn()
    live.request("GET", "/live", headers={"Cookie": cookie, "Accept": "text/event-stream"})
    stream = live.getresponse()
    assert stream.status == 200
    assert stream.getheader("Content-Type", "").startswith("text/event-stream")

    def events() -> Iterator[tuple[str, dict[str, Any]]]:
        kind = ""
        while True:
            line = stream.readline().decode()
            assert line, "the stream ended"
            if line.startswith("event: "):
                kind = line[7:].strip()
            elif line.startswith("data: "):
                yield kind, json.loads(line[6:])

    seen = events()
    assert next(seen)[0] == "hello"
    kind, wallet = next(seen)  # the balance as the page opens
    assert kind == "wallet" and wallet["balance"] == "100"
    # While the response stays open, a change made at the other replica arrives in it: each
    # event is passed on as the hub writes it (a buffered proxy would sit on these few bytes).
    payer_client.transfer(user["id"], "5", key="deploy-1")
    kind, wallet = next(seen)
    assert kind == "wallet" and wallet["balance"] == "105"
    live.close()


def test_the_docs_backup_commands_restore_the_ledger(
    tmp_path: Path, postgres_server: LocalPostgres, mosquitto: str
) -> None:
    """docs/scale.md's pg_dump and pg_restore lines, as written, but for the database's URL."""
    blocks = re.findall(r"```sh\n(.*?)```", SCALE_DOC.read_text(), re.S)
    lines = [ln for b in blocks for ln in b.splitlines() if ln.startswith(("pg_dump", "pg_rest"))]
    assert [ln.split()[0] for ln in lines] == ["pg_dump", "pg_restore"]
    doc_url = "postgresql://deparrow@10.0.1.5/deparrow"
    dump_name = "deparrow-2026-12-07.dump"
    assert all(doc_url in ln for ln in lines) and dump_name in lines[1]

    db = postgres_server.create_database(f"backup_{os.getpid()}")
    hub = LocalHub(tmp_path / "hub", mqtt_url=mosquitto, extra=("--db", db))
    try:
        hub.user("kept")
        dump = lines[0].replace(doc_url, db).replace("$(date +%F)", "2026-12-07")
        done = subprocess.run(dump, shell=True, cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
        hub.user("lost")  # after the dump
    finally:
        hub.stop()
    restore = lines[1].replace(doc_url, db)
    done = subprocess.run(restore, shell=True, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    with psycopg.connect(db) as c:
        names = {row[0] for row in c.execute("SELECT name FROM users")}
    assert "kept" in names and "lost" not in names


# --- the brokers' logins in the compose file ---------------------------------------------------


def mqtt_login(port: int, username: str, password: str, ca: Path) -> bool:
    """Whether Mosquitto's TLS listener on port lets this login in."""
    answered = threading.Event()
    result: dict[str, bool] = {}

    def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        result["ok"] = not reason.is_failure
        answered.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"check-{free_port()}")
    client.username_pw_set(username, password)
    client.tls_set(ca_certs=str(ca))
    client.on_connect = on_connect
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        answered.wait(10)
    finally:
        client.disconnect()
        client.loop_stop()
    return result.get("ok", False)


def test_the_compose_brokers_take_the_logins_the_hub_writes(
    tls: tuple[Path, Path, Path],
) -> None:
    """The broker service's own shell script (compose.yaml, run by busybox as in the image)
    with deploy/broker/mosquitto.conf, before a real `deparrow hub --mqtt-auth-dir`: Mosquitto
    starts once the hub has written the logins, the hub connects with its own, and a user made
    later logs in once the script has noticed the files changed and reloaded Mosquitto. Only
    the paths and ports are rendered for the test; Mosquitto runs as us, not `mosquitto`."""
    sh = tool("busybox", "busybox")
    mosquitto = tool("mosquitto", "mosquitto")
    me = pwd.getpwuid(os.getuid()).pw_name
    # Mosquitto reads its configuration again on SIGHUP as the user it runs as.
    work = Path(tempfile.mkdtemp(prefix="deparrow-compose-brokers-"))
    work.chmod(0o755)
    shared, etc = work / "broker-auth", work / "etc"
    (etc / "certs").mkdir(parents=True)
    shared.mkdir()
    ca, chain, key = tls
    shutil.copy(chain, etc / "certs" / "broker.pem")
    shutil.copy(key, etc / "certs" / "broker.key")
    node_port, hub_port = free_port(), free_port()
    conf = (DEPLOY / "broker" / "mosquitto.conf").read_text()
    assert conf.count("listener 8883\n") == 1 and "include_dir /etc/mosquitto/conf.d" in conf
    conf = conf.replace("/etc/mosquitto", str(etc))
    conf = conf.replace("listener 8883", f"listener {node_port}")
    (etc / "mosquitto.conf").write_text(conf + f"user {me}\n")
    broker = yaml.safe_load(COMPOSE.read_text())["x-broker"]
    assert broker["command"][:2] == ["sh", "-euc"]
    script = broker["command"][2].replace("$$", "$")
    for shipped, here in [
        ("/srv/deparrow/broker-auth", str(shared)),
        ("/etc/mosquitto", str(etc)),
        ("listener 1884", f"listener {hub_port}"),
        ("chown mosquitto:mosquitto", f"chown {me}"),
        ("mosquitto -c", f"{mosquitto} -c"),
    ]:
        assert shipped in script, shipped
        script = script.replace(shipped, here)
    brokers = Proc("broker", [sh, "sh", "-euc", script], work / "broker.log")
    password = "hub-" + os.urandom(8).hex()
    hub = None
    try:
        hub = LocalHub(
            work / "hub",
            mqtt_url=f"mqtt://deparrow-hub:{password}@127.0.0.1:{hub_port}",
            extra=("--mqtt-auth-dir", str(shared),
                   "--mqtt-public-url", f"mqtts://127.0.0.1:{node_port}"),
        )  # fmt: skip
        assert (etc / "deparrow" / "passwd").read_text() == (shared / "passwd").read_text()
        user = hub.admin.create_user("agent")
        wait_for(
            "the new user's broker login",
            lambda: mqtt_login(node_port, user["id"], user["token"], ca),
            15,
            [brokers],
        )
        assert not mqtt_login(node_port, user["id"], "not-the-token", ca)
        assert brokers.alive(), brokers.tail()
    finally:
        if hub is not None:
            hub.stop()
        # The script hands SIGTERM on to Mosquitto and ends with it.
        assert brokers.stop() == 0, brokers.tail()
        shutil.rmtree(work, ignore_errors=True)


# --- systemd ----------------------------------------------------------------------------------


def test_the_hub_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    exe = tool("systemd-analyze", "systemd")
    # verify checks that ExecStart's program exists: this checkout's stands in for the one in
    # /opt/deparrow the unit names.
    deparrow = Path(sys.executable).parent / "deparrow"
    assert deparrow.exists()
    text = UNIT.read_text()
    assert text.count("/opt/deparrow/bin/deparrow hub") == 1
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace("/opt/deparrow/bin/deparrow", str(deparrow)))
    done = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    # And the check can fail.
    unit.write_text(unit.read_text().replace("RestartSec=2", "RestartSec=soon"))
    done = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert "Failed to parse sec value" in done.stderr


def test_the_env_example_gives_every_variable_the_unit_uses() -> None:
    unit = UNIT.read_text()
    used = set(re.findall(r"\$\{?(DEPARROW_[A-Z_]+)", unit)) | {"DEPARROW_DB"}
    given = {
        line.split("=", 1)[0]
        for line in (DEPLOY / "systemd" / "hub.env.example").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert used == given


# --- the flags deploy/ and docs/scale.md use ----------------------------------------------------


def hub_flags() -> set[str]:
    done = subprocess.run([sys.executable, "-m", "deparrow.cli", "hub", "--help"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", done.stdout))


def hub_commands() -> dict[str, list[list[str]]]:
    """Every `deparrow hub` command line in deploy/ and the docs about it, as words."""
    found: dict[str, list[list[str]]] = {}
    compose = yaml.safe_load(COMPOSE.read_text())
    found["compose.yaml"] = [
        [str(w) for w in s["command"]]
        for s in compose["services"].values()
        if s.get("command", [None])[0] == "hub"
    ]
    unit = UNIT.read_text().replace("\\\n", " ")
    exec_start = next(ln for ln in unit.splitlines() if ln.startswith("ExecStart="))
    found[UNIT.name] = [exec_start.split()[1:]]
    for doc in DOCS:
        blocks = re.findall(r"```sh\n(.*?)```", doc.read_text(), re.S)
        lines = [ln for b in blocks for ln in b.replace("\\\n", " ").splitlines()]
        found[str(doc.relative_to(ROOT))] = [
            shlex.split(ln.split("deparrow hub", 1)[1].split("#", 1)[0])
            for ln in lines
            if "deparrow hub" in ln
        ]
    return found


# Flags of other commands the docs name in prose: `deparrow --bootstrap`, `edge-run --bootstrap`
# and `edge-run --failover-after`.
NOT_THE_HUBS = {"--bootstrap", "--failover-after"}


def test_every_hub_flag_deploy_and_the_doc_use_exists() -> None:
    known = hub_flags()
    assert {"--db", "--mqtt", "--mqtt-share", "--mqtt-auth-dir", "--public-url"} <= known
    found = hub_commands()
    for where in ("compose.yaml", UNIT.name, "docs/scale.md", "docs/broker-cluster.md"):
        assert found[where], f"{where}: no `deparrow hub` command line found"
    for where, commands in found.items():
        for words in commands:
            unknown = [w for w in words if w.startswith("--") and w not in known]
            assert not unknown, f"{where}: `deparrow hub` has no {unknown}"
    # The env example's extra arguments, and every flag the docs name in prose (`--flag ...`).
    env = (DEPLOY / "systemd" / "hub.env.example").read_text()
    extra = re.search(r"^DEPARROW_HUB_ARGS=(.*)$", env, re.M)
    assert extra is not None
    named = {"hub.env.example": set(re.findall(r"--[a-z][a-z0-9-]*", extra.group(1)))}
    for doc in DOCS:
        named[doc.name] = set(re.findall(r"`(--[a-z][a-z0-9-]*)", doc.read_text()))
    for where, flags in named.items():
        unknown = sorted(flags - known - NOT_THE_HUBS)
        assert not unknown, f"{where}: `deparrow hub` has no {unknown}"


def test_the_compose_file_has_the_whole_cluster() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert sorted(services) == ["broker-1", "broker-2", "broker-3", "hub-1", "hub-2", "nginx",
                                "postgres"]  # fmt: skip
    assert services["postgres"]["image"].endswith("postgres:15")
    for name in ("hub-1", "hub-2"):
        words = services[name]["command"]
        assert words[words.index("--mqtt") + 1].count("mqtt://") == 3
        assert words[words.index("--mqtt-share") + 1] == "hubs"
        assert "postgresql://" in services[name]["environment"]["DEPARROW_DB"]
    # The files it mounts from deploy/ and builds with are there.
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./") and "certs" not in source and "auth" not in source:
                assert (DEPLOY / source).exists(), source
    build = services["hub-1"]["build"]
    containerfile = (DEPLOY / build["context"] / build["dockerfile"]).resolve()
    assert containerfile == DEPLOY / "Containerfile"
    for line in containerfile.read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), line


def test_podman_compose_reads_the_compose_file() -> None:
    """podman-compose 1.0 (Debian bookworm) has no `config`; `ps` parses and interpolates the
    whole file, then only lists containers."""
    exe = tool("podman-compose", "podman-compose")
    env = {**os.environ, "DEPARROW_DB_PASSWORD": "pw1", "DEPARROW_BROKER_PASSWORD": "pw2",
           "DEPARROW_NAME": "hub.example.org"}  # fmt: skip
    done = subprocess.run([exe, "-f", str(COMPOSE), "ps"], capture_output=True, text=True,
                          timeout=120, env=env, cwd=DEPLOY)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    env.pop("DEPARROW_DB_PASSWORD")
    missing = subprocess.run([exe, "-f", str(COMPOSE), "ps"], capture_output=True, text=True,
                             timeout=120, env=env, cwd=DEPLOY)  # fmt: skip
    assert missing.returncode != 0
    assert "set DEPARROW_DB_PASSWORD in deploy/.env" in missing.stderr

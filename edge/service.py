"""Install once, run always: `edge-run` as a systemd service (a system unit, or a user unit
that needs no root), so the node starts at boot and comes back after a failure.

The library writes the unit and drives systemctl; the `edge-run service` commands
(edge/cli_service.py) are the thin layer over it. CPython only (not part of the board core).
Where systemd is not the running init (a container, WSL without systemd), nothing is started:
the result says which commands to run on a machine that has it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

UNIT_NAME = "deparrow-edge.service"
SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
SYSTEM_DATA_DIR = Path("/var/lib/deparrow-edge")


class ServiceError(Exception):
    """Installing, removing or asking about the service failed; the message says how to fix it."""


def user_unit_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "systemd" / "user"


def systemd_running() -> bool:
    """Whether systemd is this machine's init (the test sd_booted(3) makes)."""
    return Path("/run/systemd/system").is_dir()


def quote(arg: str) -> str:
    """One argument of ExecStart= as systemd reads it: specifiers (%) and variables ($)
    escaped, quoted when it has spaces or quotes."""
    if not arg:
        return '""'
    escaped = arg.replace("%", "%%").replace("$", "$$")
    if any(c in escaped for c in " \t\"'\\;"):
        return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return escaped


def unit_text(exec_start: Sequence[str], data_dir: Path, user: bool) -> str:
    """The unit: starts after the network is up, restarts on failure (not after a clean stop),
    runs at low CPU and I/O priority (the jobs themselves run at nice 19), keeps its state in
    `data_dir`."""
    if not exec_start or not Path(exec_start[0]).is_absolute():
        raise ServiceError("the program a unit starts must be an absolute path")
    lines = [
        "# Written by `edge-run service install`; `edge-run service uninstall` removes it.",
        "[Unit]",
        "Description=DEparrow node (edge-run): runs WebAssembly jobs for credits while idle",
        "Documentation=man:systemd.service(5)",
        "After=network-online.target",
        "Wants=network-online.target",
        "StartLimitIntervalSec=600",
        "StartLimitBurst=10",
        "",
        "[Service]",
        "Type=simple",
        "ExecStart=" + " ".join(quote(a) for a in exec_start),
        "WorkingDirectory=" + quote(str(data_dir)),
        "Environment=PYTHONUNBUFFERED=1",
        "Restart=on-failure",
        "RestartSec=10",
        "Nice=10",
        "CPUWeight=20",
        "IOSchedulingClass=idle",
        "TimeoutStopSec=30",
        "",
        "[Install]",
        "WantedBy=" + ("default.target" if user else "multi-user.target"),
        "",
    ]
    return "\n".join(lines)


@dataclass
class Outcome:
    """What install/uninstall did: the unit's path, the systemctl commands run, and those
    left for the user to run (when systemd is not running here)."""

    unit_path: Path
    ran: list[list[str]] = field(default_factory=list)
    to_run: list[list[str]] = field(default_factory=list)


def _systemctl(user: bool) -> list[str]:
    exe = shutil.which("systemctl") or "systemctl"
    return [exe, "--user"] if user else [exe]


def _run(cmd: list[str]) -> None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except OSError as e:
        raise ServiceError(f"cannot run {' '.join(cmd)}: {e}") from None
    if done.returncode:
        why = done.stderr.strip() or done.stdout.strip() or f"exit {done.returncode}"
        raise ServiceError(f"`{' '.join(cmd)}` failed: {why.splitlines()[-1]}")


def install(
    text: str, unit_dir: Path, user: bool, start: bool = True, manage: bool | None = None
) -> Outcome:
    """Writes the unit into unit_dir; with systemd running (or manage=True), reloads it and
    enables and starts the service."""
    path = unit_dir / UNIT_NAME
    try:
        unit_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.chmod(0o644)
        os.replace(tmp, path)
    except PermissionError:
        raise ServiceError(
            f"cannot write {path}: permission denied (a system unit needs root: run with sudo, "
            "or install a user unit with --user)"
        ) from None
    except OSError as e:
        raise ServiceError(f"cannot write {path}: {e}") from None
    ctl = _systemctl(user)
    commands = [[*ctl, "daemon-reload"]]
    if start:
        commands.append([*ctl, "enable", "--now", UNIT_NAME])
    out = Outcome(path)
    if manage if manage is not None else systemd_running():
        for cmd in commands:
            _run(cmd)
            out.ran.append(cmd)
    else:
        out.to_run = commands
    return out


def uninstall(unit_dir: Path, user: bool, manage: bool | None = None) -> Outcome:
    """Stops and disables the service (with systemd running), then removes the unit."""
    path = unit_dir / UNIT_NAME
    if not path.exists():
        raise ServiceError(f"no service installed: {path} does not exist")
    ctl = _systemctl(user)
    out = Outcome(path)
    managing = manage if manage is not None else systemd_running()
    if managing:
        cmd = [*ctl, "disable", "--now", UNIT_NAME]
        _run(cmd)
        out.ran.append(cmd)
    try:
        path.unlink()
    except OSError as e:
        raise ServiceError(f"cannot remove {path}: {e}") from None
    reload = [*ctl, "daemon-reload"]
    if managing:
        _run(reload)
        out.ran.append(reload)
    else:
        out.to_run = [[*ctl, "disable", "--now", UNIT_NAME], reload]
    return out


def status(unit_dir: Path, user: bool) -> dict[str, str | bool]:
    """Whether the unit is installed and, with systemd running, enabled and active."""
    path = unit_dir / UNIT_NAME
    info: dict[str, str | bool] = {"unit": str(path), "installed": path.exists()}
    if path.exists() and systemd_running():
        ctl = _systemctl(user)
        for verb in ("is-enabled", "is-active"):
            done = subprocess.run([*ctl, verb, UNIT_NAME], capture_output=True, text=True)
            info[verb.removeprefix("is-")] = done.stdout.strip() or done.stderr.strip()
    elif path.exists():
        info["systemd"] = "not running here: the unit is written but not started"
    return info

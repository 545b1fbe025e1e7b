"""The native executor's sandbox, apart from the executor's bookkeeping (`native.py`): the
bubblewrap command line, the job's directories in it, the rlimits a job's process sets on itself
before it runs, and the /proc reading that finds a job's processes and counts a user's. Linux
only, as bwrap is.

A job's "dirs" (edge/core/jobfiles.py) are bound at their guest paths, `--ro-bind` unless
"write" is true (`--bind`). bwrap mounts them as the job's user, so that user must be able to
reach them: the node checks it first, and says so as its own "executor error".

A job's "gpus" (edge/executors/gpus.py) are the device files of exactly those GPUs
(/dev/nvidia<N>, N the minor number the driver gives the GPU's UUID, else its index) and the
shared ones the driver needs, bound with `--dev-bind`; the other GPUs' files are not in the
sandbox at all, so the job cannot open them whatever it sets.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
from collections.abc import Sequence
from typing import Any

from edge.core import jobfiles

NOBODY = 65534
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# what programs read from /etc: the dynamic loader's cache, alternatives' links, users' names
ETC = (
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/alternatives",
    "/etc/localtime",
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/hosts",
)
ETC_NET = ("/etc/resolv.conf", "/etc/gai.conf", "/etc/ssl", "/etc/ca-certificates")


def visible(path: str) -> bool:
    """Whether a host path (symlinks resolved) is inside the folders a sandbox shows."""
    return any(path == d or path.startswith(d + "/") for d in SYSTEM_DIRS)


# where the sandbox has mounts of its own: a job's directory goes elsewhere (/tmp/x is fine)
OWN_MOUNTS = (*SYSTEM_DIRS, "/etc", "/proc", "/dev")


def dirs_problem(dirs: Any) -> str | None:
    """What is wrong with a job's "dirs" for the sandbox, or None (jobfiles.check_dirs, and
    no guest path on the sandbox's own mounts, which it would hide or could not be put in)."""
    problem = jobfiles.check_dirs(dirs)
    if problem:
        return str(problem)
    for i, d in enumerate(dirs or []):
        guest = d["guest"]
        if guest in ("/", "/tmp") or any(
            guest == m or guest.startswith(m + "/") for m in OWN_MOUNTS
        ):
            return (
                f"dirs[{i}].guest {guest!r} is the sandbox's own (/, /tmp, "
                f"{', '.join(OWN_MOUNTS)}): put it elsewhere, such as /inputs"
            )
    return None


def unreachable(dirs: Sequence[dict[str, Any]], uid: int | None) -> str | None:
    """The node's error for the first of a job's directories that is not there, or that the
    job's user (`uid`, when the node switches users) cannot reach, as bwrap would only find
    out once the job had started: every folder above it must let that user through."""
    for d in dirs:
        host = d["host"]
        if not os.path.isdir(host):
            return f"executor error: cannot open the job's directory {host}"
        if uid is None:
            continue
        above = os.path.realpath(host)
        while above != "/":
            above = os.path.dirname(above)
            st = os.stat(above)
            bit = 0o100 if st.st_uid == uid else 0o010 if st.st_gid == uid else 0o001
            if not st.st_mode & bit:
                return (
                    f"executor error: cannot open the job's directory {host}: {above} is "
                    f"closed to the jobs' user (uid {uid}); let others through it (chmod o+x)"
                )
    return None


# what every NVIDIA GPU's user needs besides the GPU's own /dev/nvidiaN: the driver's control
# node, unified memory (CUDA opens nvidia-uvm-tools too since driver 570), modesetting, and the
# MIG capabilities; only those this host has are given
GPU_SHARED = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset", "nvidia-caps")
# the driver's page of each GPU: its UUID and the minor number of its device file
GPU_INFO_DIR = "/proc/driver/nvidia/gpus"


def device_minors(info_dir: str = GPU_INFO_DIR) -> dict[str, int]:
    """{UUID: minor number} of the GPUs the driver lists (empty where it lists none). NVML's
    index, which the node gives, is the GPUs' PCI order; the device file is /dev/nvidia<minor>,
    the order the driver found them in: mostly the same, but not always."""
    found = {}
    with contextlib.suppress(OSError):
        for bus in os.listdir(info_dir):
            fields = {}
            with (
                contextlib.suppress(OSError),
                open(os.path.join(info_dir, bus, "information")) as f,
            ):
                for line in f:
                    key, _, value = line.partition(":")
                    fields[key.strip()] = value.strip()
            with contextlib.suppress(KeyError, ValueError):
                found[fields["GPU UUID"]] = int(fields["Device Minor"])
    return found


def gpu_devices(
    gpus: Sequence[dict[str, Any]], dev_dir: str = "/dev", info_dir: str = GPU_INFO_DIR
) -> list[tuple[str, str]]:
    """(host path, sandbox path) of the device files the job's GPUs need, to bind into the
    sandbox (`dev_dir`: where the host's are): each GPU's own (by its UUID's minor number where
    the driver lists it, else by its index) and the shared ones. FileNotFoundError names a GPU
    whose device file is missing: its job must not run as if it had it."""
    minors = device_minors(info_dir) if gpus else {}
    found = []
    for gpu in gpus:
        minor = minors.get(gpu.get("uuid") or "", gpu["index"])
        own = os.path.join(dev_dir, f"nvidia{minor}")
        if not os.path.exists(own):
            raise FileNotFoundError(f"GPU {gpu['index']} has no device file {own}")
        found.append((own, f"/dev/nvidia{minor}"))
    if found:
        for name in GPU_SHARED:
            if os.path.exists(os.path.join(dev_dir, name)):
                found.append((os.path.join(dev_dir, name), "/dev/" + name))
    return found


def bwrap_argv(
    bwrap: str,
    network: bool,
    tmp_bytes: int,
    dirs: Sequence[dict[str, Any]] = (),
    devices: Sequence[tuple[str, str]] = (),
) -> list[str]:
    """bwrap and its options, up to the `--` before the job's command. `devices`: the host's
    device files to give the job (gpu_devices), each at its path in the sandbox's /dev."""
    argv = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns"]
    argv += ["--share-net"] if network else []
    argv += ["--die-with-parent", "--cap-drop", "ALL"]
    for path in SYSTEM_DIRS:
        if os.path.islink(path):  # merged /usr: /bin -> usr/bin and the like
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    for path in ETC + (ETC_NET if network else ()):
        argv += ["--ro-bind-try", path, path]
    argv += ["--proc", "/proc", "--dev", "/dev", "--size", str(tmp_bytes), "--tmpfs", "/tmp"]
    # --dev-bind, not --bind: bwrap's /dev is nodev, and a device file bound without dev could
    # not be opened (NVML: "Insufficient Permissions")
    for host, guest in devices:
        argv += ["--dev-bind", host, guest]
    if devices:
        # CUDA's cuInit fails (CUDA_ERROR_OPERATING_SYSTEM) without sysfs, which it reads for
        # the GPUs' PCI and NUMA topology (nvidia-smi does without): read-only, as a container
        # has it, and only for a job given devices
        argv += ["--ro-bind", "/sys", "/sys"]
    # the job's directories: parents before children, each on a mount point bwrap makes in its
    # root (or in /tmp) while that is still writable
    for d in sorted(dirs, key=lambda d: d["guest"].count("/")):
        argv += ["--bind" if d.get("write") else "--ro-bind", d["host"], d["guest"]]
    # nothing else stays writable: bwrap's own root and /dev are tmpfs too, remounted
    # read-only without their submounts (the job's directories, /tmp keep their own modes)
    argv += ["--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/tmp", "--"]
    return argv


def limiter(limits: list[tuple[int, int, int]]) -> Any:
    """preexec_fn: SIGKILL when the node dies, then the job's rlimits (soft, hard). It runs
    in the forked child after the switch to the job's user (which would clear the death
    signal), and allocates nothing once RLIMIT_AS, set last, is below what the child maps."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: --die-with-parent still covers the sandbox
        prctl = None
    limits = sorted(limits, key=lambda item: item[0] == resource.RLIMIT_AS)

    def apply() -> None:
        if prctl is not None:
            prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        for which, soft, hard in limits:
            resource.setrlimit(which, (soft, hard))

    return apply


def exited(pid: int) -> bool:
    """Whether the process has exited, without reaping it."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def count_processes(uid: int) -> int:
    """Processes (zombies too) whose real user is `uid`, as RLIMIT_NPROC counts them. From
    /proc/PID/status: a process that switched users is not dumpable, and its /proc entry
    then belongs to root whoever runs it."""
    n, want = 0, str(uid).encode()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError), open(f"/proc/{name}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    n += line.split()[1] == want
                    break
    return n


def descendants(root: int) -> list[int]:
    """Every process below `root`, parents before children (from /proc)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        kids = children.get(todo.pop(0), [])
        out += kids
        todo += kids
    return out

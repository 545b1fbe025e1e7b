# Job files on a node: a file job's inputs laid out read-only under its /inputs, what it writes
# under /outputs collected after the run, and its directories removed whatever happens.
#
# A job is a file job when its assignment carries "files" (docs/jobs.md): the node writes
# the inputs into a directory of its own for the job (checked against their sha256), gives
# the executor two "dirs" (/inputs read-only, /outputs read-write), watches what the job
# writes while it runs, and reads /outputs back into the result when it ends. Past the
# owner's caps on output bytes or files the job ends with "output limit". Symlinks, FIFOs
# and devices a job leaves under /outputs are never followed nor collected.
#
# Plain MicroPython subset: boards with a filesystem run file jobs through wasm3-run too.

try:
    import os
except ImportError:  # pragma: no cover - MicroPython ports that name it uos
    import uos as os  # type: ignore[no-redef]

from edge.core import compat

MAX_DIRS = 32  # preopened directories per job (FS_MAX_DIRS in edge/native/wasm3run.h)
MAX_PATH = 1024  # bytes in a job file's relative path
MAX_DEPTH = 16  # directories deep under /inputs or /outputs
MAX_INPUTS = 64  # input files per job (the hub's JobSpec says the same)
INPUTS = "/inputs"
OUTPUTS = "/outputs"
OUTPUT_LIMIT = "output limit"

# A node's defaults; the owner changes them in the node's preferences ("files").
DEFAULT_MAX_INPUT_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_OUTPUT_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_OUTPUT_FILES = 64
CHECK_MS = 500  # how often a running file job's /outputs is measured

_S_IFMT = 0o170000
_S_IFDIR = 0o040000
_S_IFREG = 0o100000


class OutputLimit(Exception):
    """The job wrote more under /outputs than this node takes."""


def limits(prefs=None):
    """The node's caps from its preferences' "files" ({"enabled", "max_input_bytes",
    "max_output_bytes", "max_output_files"}), defaults filled in; None when file jobs are off."""
    prefs = prefs or {}
    if prefs.get("enabled") is False:
        return None
    out = {
        "max_input_bytes": DEFAULT_MAX_INPUT_BYTES,
        "max_output_bytes": DEFAULT_MAX_OUTPUT_BYTES,
        "max_output_files": DEFAULT_MAX_OUTPUT_FILES,
    }
    for key in out:
        value = prefs.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError("files." + key + " must be a whole number of at least 0")
            out[key] = value
    return out


def check_path(path):
    """What is wrong with a job file's path relative to /inputs or /outputs, or None:
    "data/words.txt" is fine; "", "/abs", "a/../b", "a//b", "./a" and NUL are not."""
    if not isinstance(path, str) or not path:
        return "a file path must be a non-empty string"
    if len(path.encode()) > MAX_PATH:
        return "file path " + repr(path[:40]) + "... is over " + str(MAX_PATH) + " bytes"
    for c in path:
        if c == "\\" or ord(c) < 32 or ord(c) == 127:
            return "file path " + repr(path) + " has a control character or a backslash"
    parts = path.split("/")
    if len(parts) > MAX_DEPTH:
        return "file path " + repr(path) + " is more than " + str(MAX_DEPTH) + " levels deep"
    for part in parts:
        if part in ("", ".", ".."):
            return "file path " + repr(path) + " must be relative, without '.', '..' or '//'"
        if len(part.encode()) > 255:
            return "file path " + repr(path) + " has a name over 255 bytes"
    return None


def _normalised(guest):
    """An absolute guest path without '.', '..', '//' or a trailing '/' ("/" itself is fine)."""
    if not guest.startswith("/") or "\x00" in guest:
        return False
    if guest == "/":
        return True
    return check_path(guest[1:]) is None


def check_dirs(dirs):
    """What is wrong with a job's "dirs", or None: a list of at most MAX_DIRS
    {"host": "/abs/dir", "guest": "/abs/normalised", "write": bool}, preopened in order
    (WASI fds 3, 4...) or bound into a container or sandbox at their guest path; "write"
    false or absent is read-only. The one check of their shape every engine makes; a host
    directory that is not there is the engine's "executor error" when it opens it (the node
    made it, not the job)."""
    if dirs is None:
        return None
    if not isinstance(dirs, list) or len(dirs) > MAX_DIRS:
        return "dirs must be a list of at most " + str(MAX_DIRS) + " directories"
    seen = []
    for i in range(len(dirs)):
        d = dirs[i]
        at = "dirs[" + str(i) + "]"
        if not isinstance(d, dict) or [k for k in d if k not in ("host", "guest", "write")]:
            return at + ' must be {"host": path, "guest": path, "write": bool}'
        host, guest = d.get("host"), d.get("guest")
        if not isinstance(host, str) or "\x00" in host or not host.startswith("/"):
            return at + ".host must be an absolute path (got " + repr(host) + ")"
        if not isinstance(guest, str) or not _normalised(guest):
            return (
                at + ".guest must be an absolute, normalised path such as /inputs (got "
                + repr(guest) + ")"
            )  # fmt: skip
        if guest in seen:
            return at + ".guest " + repr(guest) + " is given twice"
        seen.append(guest)
        if not isinstance(d.get("write", False), bool):
            return at + ".write must be true or false"
    return None


def _kind(path):
    """The file type bits of path (symlinks followed), or None when there is nothing."""
    try:
        return os.stat(path)[0] & _S_IFMT
    except OSError:
        return None


def _entries(path):
    """(name, type bits) of a directory's entries, symlinks not followed: a link is neither
    a directory nor a regular file here."""
    out = []
    if hasattr(os, "scandir"):  # CPython
        with os.scandir(path) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    out.append((e.name, _S_IFDIR))
                elif e.is_file(follow_symlinks=False):
                    out.append((e.name, _S_IFREG))
                else:
                    out.append((e.name, 0))
        return out
    for e in os.ilistdir(path):  # MicroPython: d_type as given by readdir
        out.append((e[0], e[1] & _S_IFMT))
    return out


def _makedirs(path):
    here = ""
    for part in path.split("/"):
        if not part:
            continue
        here += "/" + part
        if _kind(here) is None:
            os.mkdir(here)


def remove_tree(path):
    """Remove a directory and everything in it, symlinks as links; True when it is gone."""
    kind = _kind(path)
    if kind is None:
        try:
            os.remove(path)  # a dangling link
        except OSError:
            pass
        return True
    try:
        if kind == _S_IFDIR and not _is_link(path):
            for name, t in _entries(path):
                child = path + "/" + name
                if t == _S_IFDIR:
                    remove_tree(child)
                else:
                    os.remove(child)
            os.rmdir(path)
        else:
            os.remove(path)
    except OSError:
        return False
    return _kind(path) is None


def clear(base):
    """Make base an empty directory (what a crash left there is no job's any more); returns
    what could not be removed yet."""
    _makedirs(base)
    if hasattr(os, "chmod"):  # a native job's user passes through it to its own folder
        os.chmod(base, 0o711)
    left = []
    for name, _ in _entries(base):
        if not remove_tree(base + "/" + name):
            left.append(base + "/" + name)
    return left


def _is_link(path):
    if hasattr(os, "lstat"):
        return os.lstat(path)[0] & _S_IFMT == 0o120000
    return False


def _write_input(root, path, data):
    parts = path.split("/")
    if len(parts) > 1:
        _makedirs(root + "/" + "/".join(parts[:-1]))
    with open(root + "/" + path, "wb") as f:
        f.write(data)


def prepare(base, name, inputs):
    """Lay out a file job under base/name: in/ holds the inputs ([(path, bytes)]), out/ is
    empty. Returns (root, dirs), dirs as the executors take them. Raises ValueError for a bad
    path (nothing is left behind) and OSError when the disk refuses."""
    for path, _ in inputs:
        problem = check_path(path)
        if problem:
            raise ValueError(problem)
    root = base + "/" + name
    remove_tree(root)  # a leftover of an earlier try of this attempt
    try:
        _makedirs(root + "/in")
        os.mkdir(root + "/out")
        for path, data in inputs:
            _write_input(root + "/in", path, data)
        if hasattr(os, "chmod"):  # a native job runs as another user: it writes out/ too
            os.chmod(root, 0o711)
            os.chmod(root + "/out", 0o777)
            _chmod_tree(root + "/in")
    except Exception:
        remove_tree(root)
        raise
    return root, [
        {"host": root + "/in", "guest": INPUTS, "write": False},
        {"host": root + "/out", "guest": OUTPUTS, "write": True},
    ]


def _chmod_tree(path):
    os.chmod(path, 0o755)
    for name, t in _entries(path):
        if t == _S_IFDIR:
            _chmod_tree(path + "/" + name)
        else:
            os.chmod(path + "/" + name, 0o644)


def _walk(top, rel, out, max_files):
    """Regular files under top as [(relative path, size)], depth first in name order; raises
    OutputLimit past max_files (so a job that makes a million files is not listed whole)."""
    entries = _entries(top if not rel else top + "/" + rel)
    entries.sort()
    for name, t in entries:
        path = name if not rel else rel + "/" + name
        if t == _S_IFDIR:
            _walk(top, path, out, max_files)
        elif t == _S_IFREG:
            if len(out) >= max_files:
                raise OutputLimit(
                    "output limit: the job wrote more than " + str(max_files)
                    + " files under /outputs (this node's cap)"
                )  # fmt: skip
            out.append((path, os.stat(top + "/" + path)[6]))
    return out


def _listing(out_dir, caps):
    """[(path, size)] of the regular files under out_dir; OutputLimit past the caps."""
    files = _walk(out_dir, "", [], caps["max_output_files"])
    total = 0
    for _, size in files:
        total += size
    if total > caps["max_output_bytes"]:
        raise OutputLimit(
            "output limit: the job wrote more than " + str(caps["max_output_bytes"])
            + " bytes under /outputs (this node's cap)"
        )  # fmt: skip
    return files


def measure(out_dir, caps):
    """Raise OutputLimit when what is under out_dir is past the caps; else how many files."""
    return len(_listing(out_dir, caps))


def collect(out_dir, caps):
    """What the job left under out_dir: [{"path", "size", "sha256", "data"}], path order.
    Raises OutputLimit past the caps, checked before anything is read."""
    files = _listing(out_dir, caps)
    out = []
    for path, size in files:
        if check_path(path):  # a name no job file may have (too long, a backslash): skipped
            continue
        with open(out_dir + "/" + path, "rb") as f:
            data = f.read(size + 1)
        if len(data) > size:  # grew since it was measured: a process of the job lives on
            raise OutputLimit("output limit: " + path + " kept growing after the job ended")
        out.append(
            {"path": path, "size": len(data),
             "sha256": compat.hexlify(compat.sha256(data).digest()), "data": data}
        )  # fmt: skip
    return out

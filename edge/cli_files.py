"""The files of a job as its owner gives and gets them on the command line, shared by
`edge-run job` and `deparrow job run` (the same flags on both): --file PATH[=NAME] values
turned into the job's inputs, and an output file saved into the --outputs folder."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlsplit

import click

from edge.core import jobfiles

# --file PATH[=NAME] and --outputs DIR mean the same here and on `deparrow job run`, which
# parses its --file values with file_inputs() below.
#
# A job file's name as the hub takes it: FILE_PATH_PATTERN of hub/market/spec.py, spelled
# again since the node never imports the server (tests/e2e/test_file_job_cli.py checks that
# the two agree). A name the hub would refuse is refused here too, before anything runs.
FILE_NAME_PATTERN = r"^[\w.\-+@=,]+(/[\w.\-+@=,]+)*$"
# --file values the hub resolves itself (deparrow only): fetched, an example's data, a blob.
REF_PREFIXES = ("https://", "http://", "example:", "sha256:")


class FileArgError(click.BadParameter):
    """A --file value that cannot be given to a job; code: 66 when it cannot be read, else 2."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message, param_hint="--file")
        self.code = code


def _file_name(name: str, value: str) -> str:
    problem = jobfiles.check_path(name)
    if problem:
        raise FileArgError(f"{value}: {problem}")
    if not re.fullmatch(FILE_NAME_PATTERN, name):
        raise FileArgError(
            f"{value}: the file name {name!r} may have only letters, digits and . _ - + @ = , "
            "(and / between folders); give another NAME as PATH=NAME"
        )
    return name


def _ref_name(ref: str) -> str:
    """The default NAME of a URL or example: reference: the last part of its path."""
    if ref.startswith(("https://", "http://")):
        tail = unquote(urlsplit(ref).path.rsplit("/", 1)[-1])
    else:
        tail = ref.rsplit("/", 1)[-1] if "/" in ref else ""
    if not tail:
        raise FileArgError(f"{ref}: give the name the job sees it by, as {ref}=NAME")
    return tail


def _files_below(top: Path, warn: Callable[[str], None] | None) -> list[tuple[str, Path]]:
    """The regular files below top as [(relative path, file)], in name order; symlinks and
    anything else that is not a directory or a regular file are skipped, not followed."""
    found: list[tuple[str, Path]] = []

    def walk(folder: Path, rel: str) -> None:
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            raise FileArgError(f"cannot read {folder}: {e.strerror}", 66) from None
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                walk(Path(entry.path), rel + entry.name + "/")
            elif entry.is_file(follow_symlinks=False):
                found.append((rel + entry.name, Path(entry.path)))
            elif warn is not None:
                what = "a symlink, not followed" if entry.is_symlink() else "not a regular file"
                warn(f"--file: skipped {entry.path} ({what})")

    walk(top, "")
    return found


def file_inputs(
    values: tuple[str, ...], refs: bool = False, warn: Callable[[str], None] | None = None
) -> list[tuple[str, Path | str]]:
    """--file PATH[=NAME] values as [(NAME, source)]: the job reads each at /inputs/NAME.

    NAME defaults to PATH's base name and may name folders (data/a.txt); PATH is split from
    NAME at its last '=', so a PATH with '=' in it needs =NAME after it. A directory gives
    every regular file below it at NAME/<its path in the directory> (NAME '.': at /inputs
    itself), symlinks below it not followed. A source is a local file's Path or, with refs
    (`deparrow job run`), a URL or hub reference (REF_PREFIXES) kept as the string the hub
    resolves. Raises FileArgError naming the problem, before anything is read or sent."""
    out: list[tuple[str, Path | str]] = []
    for value in values:
        source, sep, name = value.rpartition("=")
        if not sep:
            source, name = value, ""
        elif not source or not name:
            raise FileArgError(f"{value!r} is not PATH[=NAME]")
        if source.startswith(REF_PREFIXES):
            if not refs:
                raise FileArgError(
                    f"{source} is not a local file: edge-run runs the job here and fetches "
                    "nothing; download it and give the file"
                )
            out.append((_file_name(name or _ref_name(source), value), source))
            continue
        try:
            mode = os.stat(source).st_mode
        except OSError as e:
            raise FileArgError(f"cannot read {source}: {e.strerror}", 66) from None
        if stat.S_ISDIR(mode):
            base = name or os.path.basename(os.path.abspath(source))
            found = _files_below(Path(source), warn)
            if not found:
                raise FileArgError(f"{source} has no regular files in it")
            for rel, path in found:
                out.append((_file_name(rel if base == "." else f"{base}/{rel}", value), path))
        elif stat.S_ISREG(mode):
            out.append((_file_name(name or os.path.basename(source), value), Path(source)))
        else:
            raise FileArgError(f"{source} is neither a regular file nor a directory")
    seen: set[str] = set()
    for name, _ in out:
        if name in seen:
            raise FileArgError(f"two files would be /inputs/{name}; give one another NAME")
        seen.add(name)
    if len(out) > jobfiles.MAX_INPUTS:
        raise FileArgError(
            f"{len(out)} files: a job takes at most {jobfiles.MAX_INPUTS} input files"
        )
    return out


def save_output(dest: str, path: str, data: bytes) -> str:
    """Write one output file at dest/path (folders made as needed) through a temporary file
    renamed into place, so a reader never sees half of it. Refuses a path that would land
    outside dest, through '..' or a symlink already there. Returns where it went; raises
    ValueError for a refused path and OSError when the disk refuses."""
    problem = jobfiles.check_path(path)
    if problem:
        raise ValueError(f"output refused: {problem}")
    root = os.path.realpath(dest)

    def inside(p: str) -> bool:
        return os.path.commonpath([root, os.path.realpath(p)]) == root

    target = os.path.join(root, *path.split("/"))
    folder = os.path.dirname(target)
    if not inside(target):
        raise ValueError(f"output {path!r} refused: it would be written outside {dest}")
    os.makedirs(folder, exist_ok=True)
    if not inside(folder):  # a folder swapped for a link meanwhile
        raise ValueError(f"output {path!r} refused: it would be written outside {dest}")
    tmp = os.path.join(folder, f".{os.path.basename(target)}.{secrets.token_hex(4)}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return target

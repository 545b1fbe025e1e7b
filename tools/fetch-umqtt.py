#!/usr/bin/env python3
"""Installs micropython-lib's umqtt.simple for MicroPython nodes, from its release on PyPI
(`micropython-umqtt.simple`, MIT, published by the MicroPython developers).

    python3 tools/fetch-umqtt.py [--dest DIR] [--sdist FILE]

It writes DIR/umqtt/simple.py (default edge/native/lib, which edge/mp_main.py and the tests
put on MICROPYPATH). Idempotent: nothing is fetched when the installed file is the pinned one.
The release is an upip-era source archive that pip cannot install (it has no setup.py), so
this script does what upip did: look the file up in PyPI's simple index, download it, check
its pinned sha256, and take the module out of it. The archive is cached in
${XDG_CACHE_HOME:-~/.cache}/deparrow; pass --sdist (or put the archive there) to install
offline. On a board with network, `mip install umqtt.simple` is the usual route instead.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "micropython-umqtt-simple"
VERSION = "1.3.4"
FILENAME = f"micropython-umqtt.simple-{VERSION}.tar.gz"
SHA256 = "b6a2520239e3992c63a7de9370ee9b3d9d27819a90359c521f1c0f7ccab8d12f"
MEMBER = f"micropython-umqtt.simple-{VERSION}/umqtt/simple.py"
INDEX = os.environ.get("DEPARROW_PYPI_SIMPLE", "https://pypi.org/simple")


class FetchError(Exception):
    pass


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "deparrow"


def _get(url: str, accept: str | None = None) -> bytes:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            data: bytes = resp.read()
            return data
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise FetchError(f"cannot fetch {url}: {reason}") from None


def download() -> bytes:
    """The release archive, found through PyPI's JSON simple index (PEP 691)."""
    index_url = f"{INDEX.rstrip('/')}/{PROJECT}/"
    try:
        index = json.loads(_get(index_url, "application/vnd.pypi.simple.v1+json"))
        files = index["files"]
    except (ValueError, KeyError, TypeError):
        raise FetchError(f"{index_url} did not answer with a PEP 691 JSON index") from None
    for f in files:
        if isinstance(f, dict) and f.get("filename") == FILENAME and f.get("url"):
            url = urllib.parse.urljoin(index_url, f["url"])
            return _get(url)
    raise FetchError(f"{FILENAME} is not listed at {index_url}")


def extract(archive: bytes) -> bytes:
    digest = hashlib.sha256(archive).hexdigest()
    if digest != SHA256:
        raise FetchError(f"{FILENAME} has sha256 {digest}, expected {SHA256}")
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        member = tar.extractfile(MEMBER)
        if member is None:
            raise FetchError(f"{FILENAME} has no {MEMBER}")
        return member.read()


def install(dest: Path, sdist: Path | None = None) -> Path:
    target = dest / "umqtt" / "simple.py"
    stamp = target.with_suffix(".sha256")
    if target.exists() and stamp.exists() and stamp.read_text().strip() == SHA256:
        return target
    cached = sdist or cache_dir() / FILENAME
    if cached.exists():
        archive = cached.read_bytes()
    elif sdist is not None:
        raise FetchError(f"{sdist} does not exist")
    else:
        print(f"fetch-umqtt: downloading {FILENAME} from {INDEX}", file=sys.stderr)
        archive = download()
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f"{cached.name}.{os.getpid()}.part")
        tmp.write_bytes(archive)
        os.replace(tmp, cached)
    module = extract(archive)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"simple.py.{os.getpid()}.part")  # parallel installs: each its own
    tmp.write_bytes(module)
    os.replace(tmp, target)
    tmp = stamp.with_name(f"{stamp.name}.{os.getpid()}.part")
    tmp.write_text(SHA256 + "\n")
    os.replace(tmp, stamp)
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", type=Path, default=ROOT / "edge" / "native" / "lib")
    ap.add_argument("--sdist", type=Path, default=None, help=f"a local {FILENAME}")
    args = ap.parse_args(argv)
    try:
        target = install(args.dest, args.sdist)
    except FetchError as e:
        print(f"fetch-umqtt: {e}", file=sys.stderr)
        return 69
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# Unpacks wasm3's C core for the dpwasm3 module: the same pinned pywasm3 source package (same
# version, same sha256) that tools/build-wasm3-runner.sh builds wasm3-run from, with the same
# patch (tools/wasm3-core.patch: modules from today's toolchains load).
#
#   firmware/wasm3/fetch-core.sh [DEST]     (default: firmware/wasm3/core)
#
# The sdist is cached in ${XDG_CACHE_HOME:-~/.cache}/deparrow ($PYWASM3_SDIST to use another
# copy); fetching it once needs pip and PyPI. Needs patch (or git).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
DEST=${1:-$HERE/core}
pin() { sed -n "s/^$1=\(.*\)$/\1/p" "$ROOT/tools/build-wasm3-runner.sh"; }
VERSION=$(pin PYWASM3_VERSION)
SHA256=$(pin PYWASM3_SHA256)
[ -n "$VERSION" ] && [ -n "$SHA256" ] || { echo "fetch-core: no pywasm3 pin in tools/build-wasm3-runner.sh" >&2; exit 70; }
PATCH=$ROOT/tools/wasm3-core.patch
command -v patch >/dev/null || command -v git >/dev/null \
  || { echo "fetch-core: neither patch nor git is installed; install patch" >&2; exit 69; }
# What is unpacked in DEST: the sdist and the patch it was patched with.
MARK="$SHA256 $(sha256sum "$PATCH" | cut -d' ' -f1)"
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/deparrow
SDIST=${PYWASM3_SDIST:-$CACHE/pywasm3-$VERSION.tar.gz}

if [ -f "$DEST/wasm3.h" ] && [ "$(cat "$DEST/.pywasm3" 2>/dev/null)" = "$MARK" ]; then
  exit 0
fi
if [ ! -f "$SDIST" ]; then
  PY=${PYTHON:-python3}
  mkdir -p "$(dirname "$SDIST")"
  DL=$(mktemp -d)
  trap 'rm -rf "$DL"' EXIT
  echo "fetch-core: fetching pywasm3 $VERSION (source) from PyPI" >&2
  "$PY" -m pip download -q --no-deps --no-binary :all: -d "$DL" "pywasm3==$VERSION" >&2 || {
    echo "fetch-core: pip could not download pywasm3==$VERSION; put its sdist at $SDIST" >&2
    exit 69
  }
  mv "$DL/pywasm3-$VERSION.tar.gz" "$SDIST"
fi
GOT=$(sha256sum "$SDIST" | cut -d' ' -f1)
[ "$GOT" = "$SHA256" ] || { echo "fetch-core: $SDIST has sha256 $GOT, expected $SHA256; remove it" >&2; exit 65; }
TMP=$(mktemp -d)
tar -xzf "$SDIST" -C "$TMP" "pywasm3-$VERSION/wasm3"
if command -v patch >/dev/null; then
  patch -s -p1 -d "$TMP/pywasm3-$VERSION/wasm3" --no-backup-if-mismatch < "$PATCH"
else  # git apply as patch(1), with no repository around the core to mistake for its own
  (cd "$TMP/pywasm3-$VERSION/wasm3" && GIT_CEILING_DIRECTORIES=$TMP git apply -p1 "$PATCH")
fi
rm -rf "$DEST"
mkdir -p "$(dirname "$DEST")"
mv "$TMP/pywasm3-$VERSION/wasm3" "$DEST"
rm -rf "$TMP"
printf '%s' "$MARK" >"$DEST/.pywasm3"
echo "fetch-core: wasm3 core (pywasm3 $VERSION, patched) in $DEST" >&2

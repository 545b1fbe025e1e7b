#!/usr/bin/env bash
# Builds wasm3-run, the wasm job runner of MicroPython nodes (edge/native/*.c), with
# wasm3's C core taken from the pywasm3 source package on PyPI (the same wasm3 that CPython
# nodes load through pywasm3), patched by tools/wasm3-core.patch so modules from today's
# toolchains load (see that file). Idempotent: returns at once when the binary is up to date.
#
#   tools/build-wasm3-runner.sh [--out PATH] [--force] [--sanitize]
#
# Output: edge/native/bin/wasm3-run (or --out, or $DEPARROW_WASM3_RUN). The pywasm3 sdist is
# kept in ${XDG_CACHE_HOME:-~/.cache}/deparrow; put it there (or point $PYWASM3_SDIST at it)
# to build offline. Needs a C compiler (cc, gcc or clang), patch (or git), and, once, pip to
# fetch the sdist.
# --sanitize: the runner's own files with AddressSanitizer and UBSan, for the fuzz test
# (tests/edge/test_wasm3_module_fuzz.py); wasm3's core keeps its flags (its interpreter does
# signed arithmetic that UBSan would stop every program on).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${DEPARROW_WASM3_RUN:-$ROOT/edge/native/bin/wasm3-run}
FORCE=0
SANITIZE=
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --force) FORCE=1; shift ;;
    --sanitize) SANITIZE="-g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all"; shift ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-wasm3-runner: unknown option $1 (try --help)" >&2; exit 64 ;;
  esac
done

PYWASM3_VERSION=0.5.0
PYWASM3_SHA256=5a47c8a39f7f6ae71b3316b2e5d86c9d0db6e771a65f09a86e4d4aa3a19aefcc
NATIVE=$ROOT/edge/native
SOURCES=("$NATIVE"/wasm3run.c "$NATIVE"/wasm3loop.c "$NATIVE"/module.c "$NATIVE"/wasi.c "$NATIVE"/wasi_fs.c
  "$NATIVE"/textbuf.c)
CORE_PATCH=$ROOT/tools/wasm3-core.patch
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/deparrow
SDIST=${PYWASM3_SDIST:-$CACHE/pywasm3-$PYWASM3_VERSION.tar.gz}
CC=${CC:-cc}
# As pywasm3 builds wasm3 (setup.py), minus its debug switches.
CFLAGS=${WASM3_RUN_CFLAGS:--O3 -g0 -fomit-frame-pointer -fno-stack-check -fno-stack-protector -DNASSERTS}

if command -v sha256sum >/dev/null; then HASH=(sha256sum); else HASH=(shasum -a 256); fi
sha256() { "${HASH[@]}" "$@" | cut -d' ' -f1; }

command -v "$CC" >/dev/null || { echo "build-wasm3-runner: no C compiler ($CC); install gcc or clang, or set CC" >&2; exit 69; }
command -v patch >/dev/null || command -v git >/dev/null \
  || { echo "build-wasm3-runner: neither patch nor git is installed; install patch" >&2; exit 69; }
for f in "${SOURCES[@]}" "$NATIVE/wasm3run.h" "$CORE_PATCH"; do
  [ -f "$f" ] || { echo "build-wasm3-runner: $f is missing" >&2; exit 66; }
done

# Up to date when the same source, wasm3, compiler and flags made it.
STAMP="$(cat "${SOURCES[@]}" "$NATIVE/wasm3run.h" "$CORE_PATCH" "$0" | sha256) $PYWASM3_SHA256 $("$CC" --version 2>/dev/null | head -1) $CFLAGS $SANITIZE"
if [ "$FORCE" = 0 ] && [ -x "$OUT" ] && [ -f "$OUT.stamp" ] && [ "$(cat "$OUT.stamp")" = "$STAMP" ]; then
  exit 0
fi

if [ ! -f "$SDIST" ]; then
  PY=${PYTHON:-python3}
  "$PY" -m pip --version >/dev/null 2>&1 || {
    echo "build-wasm3-runner: need pip (set PYTHON to a python with pip) to fetch pywasm3 $PYWASM3_VERSION," \
      "or put its sdist at $SDIST" >&2
    exit 69
  }
  mkdir -p "$(dirname "$SDIST")"
  DL=$(mktemp -d)
  trap 'rm -rf "$DL"' EXIT
  echo "build-wasm3-runner: fetching pywasm3 $PYWASM3_VERSION (source) from PyPI" >&2
  if ! "$PY" -m pip download -q --no-deps --no-binary :all: -d "$DL" "pywasm3==$PYWASM3_VERSION" >&2; then
    echo "build-wasm3-runner: pip could not download pywasm3==$PYWASM3_VERSION; put its sdist at $SDIST to build offline" >&2
    exit 69
  fi
  mv "$DL/pywasm3-$PYWASM3_VERSION.tar.gz" "$SDIST.part.$$"
  mv "$SDIST.part.$$" "$SDIST"
fi
GOT=$(sha256 "$SDIST")
if [ "$GOT" != "$PYWASM3_SHA256" ]; then
  echo "build-wasm3-runner: $SDIST has sha256 $GOT, expected $PYWASM3_SHA256; remove it and retry" >&2
  exit 65
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK" ${DL:+"$DL"}' EXIT
tar -xzf "$SDIST" -C "$WORK" "pywasm3-$PYWASM3_VERSION/wasm3"
CORE=$WORK/pywasm3-$PYWASM3_VERSION/wasm3
if command -v patch >/dev/null; then
  patch -s -p1 -d "$CORE" --no-backup-if-mismatch < "$CORE_PATCH"
else  # git apply as patch(1), with no repository around $CORE to mistake for its own
  (cd "$CORE" && GIT_CEILING_DIRECTORIES=$WORK git apply -p1 "$CORE_PATCH")
fi

# The interpreter's memory.grow calls ResizeMemory; renamed everywhere but where it is defined,
# those calls reach the runner's deparrow_ResizeMemory, which enforces the job's cap and then
# calls the real one.
compile() {
  local src=$1 extra=()
  [ "$(basename "$src")" = m3_env.c ] || extra=(-DResizeMemory=deparrow_ResizeMemory)
  # shellcheck disable=SC2086
  "$CC" $CFLAGS -w "${extra[@]}" -I"$CORE" -c "$src" -o "$WORK/$(basename "$src" .c).o"
}
pids=()
for f in "$CORE"/*.c; do
  compile "$f" &
  pids+=($!)
  if [ ${#pids[@]} -ge 2 ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
done
for p in "${pids[@]}"; do wait "$p"; done
for f in "${SOURCES[@]}"; do
  # shellcheck disable=SC2086
  "$CC" $CFLAGS $SANITIZE -Wall -Wextra -Wno-unused-parameter -I"$CORE" -c "$f" -o "$WORK/dp_$(basename "$f" .c).o"
done
mkdir -p "$(dirname "$OUT")"
# Several builds at once (parallel test runs) each rename a finished file of their own.
# shellcheck disable=SC2086
"$CC" $SANITIZE -o "$OUT.tmp.$$" "$WORK"/*.o -lm -lpthread
mv "$OUT.tmp.$$" "$OUT"
printf '%s' "$STAMP" > "$OUT.stamp.$$"
mv "$OUT.stamp.$$" "$OUT.stamp"
echo "build-wasm3-runner: built $OUT" >&2

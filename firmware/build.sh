#!/usr/bin/env bash
# Builds DEparrow firmware: MicroPython with the node frozen in and the dpwasm3 wasm engine
# compiled in as a user C module (firmware/wasm3/).
#
#   firmware/build.sh --unix [--arch ARCH] [--source PATH] [--print-path] [--force]
#       MicroPython's unix port, as one `micropython` binary that is a DEparrow node:
#       `micropython -m edge.mp_main --data-dir DIR ...` (firmware/manifest_unix.py).
#       --arch ARCH     x86_64, aarch64 or riscv64 (default: this machine's). Another
#                       architecture is cross-compiled with Debian's gcc-ARCH-linux-gnu
#                       (CROSS_COMPILE=ARCH-linux-gnu-; set CROSS_COMPILE to use another).
#       --source PATH   MicroPython's source: a release tarball cut as ../shared/vendor's is,
#                       or a checkout (default: micropython-1.27.0-src.tar.gz in
#                       $DEPARROW_VENDOR_DIR, else ../shared/vendor beside this repository)
#       --print-path    print where the binary for the current inputs is (or would be), and
#                       build nothing
#       --force         build again even when the cache has it
#     $JOBS: parallel compiler runs (default 2).
#     The binary is cached in ${DEPARROW_FIRMWARE_CACHE:-${XDG_CACHE_HOME:-~/.cache}/deparrow/
#     firmware}/unix-ARCH-HASH/, HASH covering every input (the MicroPython source, firmware/,
#     the frozen edge modules, edge/native's C, the wasm3 pin and patch, the compiler), so a
#     rerun with nothing changed is instant. Its path is the last line on stdout; the build's
#     progress goes to stderr and to build.log beside the binary. Needs gcc, make, python3,
#     patch (tools/install-system-deps.sh) and, once, the pywasm3 sdist (fetch-core.sh).
#
#   firmware/build.sh MICROPYTHON_DIR [BOARD] [PORT]
#       A board's firmware from a MicroPython checkout, in MICROPYTHON_DIR/ports/PORT/build-BOARD/
#       MICROPYTHON_DIR  a clone of https://github.com/micropython/micropython (v1.22 or later,
#                        for esp32 with ESP-IDF set up: `. export.sh`)
#       BOARD            default ESP32_GENERIC_S3
#       PORT             default esp32 (the port directory under ports/: esp32, rp2; unix is
#                        --unix --source MICROPYTHON_DIR)
#     For esp32: firmware.bin, flashed with esptool (docs/firmware.md). This form is not run in
#     CI: ESP-IDF and the Pico SDK cannot be fetched on the CI machines.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
say() { echo "firmware/build.sh: $*" >&2; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
# Parallel jobs: 2 unless $JOBS says more (the test machines have 2 cores, and share them).
JOBS=${JOBS:-2}
# MicroPython's modules a node does without: no mbedTLS, Berkeley DB or libffi sources come
# with the vendored tarball (../shared/vendor/README.md).
UNIX_FLAGS=(MICROPY_PY_SSL=0 MICROPY_PY_BTREE=0 MICROPY_PY_FFI=0
  # dpwasm3 runs a job on a thread of its own with the GIL released, as on the ESP32s
  # (whose port has the GIL): with it, the job's thread and the node's never run Python at once.
  MICROPY_PY_THREAD_GIL=1
  # C's printf is the C library's, as on the ESP32s (ESP-IDF's newlib): dpwasm3's messages
  # are C99 formats (%llu), which MicroPython's own printf, the unix port's default, lacks.
  CFLAGS_EXTRA=-DMICROPY_USE_INTERNAL_PRINTF=0)

# -- a board from a checkout (esp32, rp2) ------------------------------------------------------

board_build() {
  local MP=$1 BOARD=$2 PORT=$3 MODULES
  MP=$(cd "$MP" && pwd)
  [ -f "$MP/py/mpconfig.h" ] && [ -d "$MP/ports/$PORT" ] || {
    say "$MP is not a MicroPython checkout with ports/$PORT"; exit 66; }
  [ -d "$MP/ports/$PORT/boards/$BOARD" ] || {
    say "no board $BOARD in ports/$PORT/boards (see that directory for the names)"; exit 66; }
  if [ "$PORT" = esp32 ] && ! command -v idf.py >/dev/null; then
    say "ESP-IDF is not set up: run '. \$IDF_PATH/export.sh' (the version ports/esp32/README.md names)"
    exit 69
  fi
  "$HERE/wasm3/fetch-core.sh"                       # wasm3's C core into firmware/wasm3/core
  make -C "$MP/mpy-cross" -j"$JOBS"
  make -C "$MP/ports/$PORT" submodules BOARD="$BOARD"
  # CMake ports (esp32, rp2) take the .cmake file; make ports (stm32, ...) the directory.
  case "$PORT" in
    esp32|rp2) MODULES=$HERE/micropython.cmake ;;
    *) MODULES=$HERE ;;
  esac
  make -C "$MP/ports/$PORT" -j"$JOBS" BOARD="$BOARD" \
    FROZEN_MANIFEST="$HERE/manifest.py" USER_C_MODULES="$MODULES"
  say "built: $MP/ports/$PORT/build-$BOARD/"
}

# -- the unix port, cached ---------------------------------------------------------------------

# The files whose content is the firmware, repository-relative: what is frozen (the manifests
# and what they name), what dpwasm3 compiles (firmware/wasm3's C and make file, wasm3's pin
# and patch, edge/native's C) and how (this script). Docs, tests and tools are not inputs.
firmware_inputs() {
  (cd "$ROOT" && {
    ls firmware/build.sh firmware/manifest*.py firmware/deparrow_board.py firmware/wasm3_exec.py \
      firmware/micropython.* firmware/wasm3/micropython.* firmware/wasm3/fetch-core.sh
    find firmware/wasm3 edge/native -maxdepth 1 -type f \( -name '*.c' -o -name '*.h' \)
    find edge/core -maxdepth 1 -type f -name '*.py'
    echo edge/__init__.py edge/mp_main.py edge/executors/__init__.py edge/executors/wasm3_cli.py \
      tools/wasm3-core.patch tools/build-wasm3-runner.sh | tr ' ' '\n'
  } | LC_ALL=C sort -u)
}

source_key() {  # what identifies MicroPython's source
  local src=$1
  if [ -f "$src" ]; then
    sha256sum "$src" | cut -d' ' -f1
  elif [ -d "$src/.git" ] || [ -f "$src/.git" ]; then
    { git -C "$src" rev-parse HEAD; git -C "$src" diff HEAD; } | sha256sum | cut -d' ' -f1
  else  # an unpacked tree: its sources, not what a build left in it
    (cd "$src" && find py extmod shared ports/unix mpy-cross tools lib -type f \
       ! -path '*/build*' ! -name '*.pyc' 2>/dev/null | LC_ALL=C sort | xargs -d '\n' sha256sum) \
      | sha256sum | cut -d' ' -f1
  fi
}

host_arch() { uname -m; }

unix_build() {
  local ARCH=$1 SRC=$2 PRINT=$3 FORCE=$4
  local HOST CROSS CC_ID KEY CACHE OUT WORK MP BUILD LOG
  HOST=$(host_arch)
  case "$ARCH" in
    x86_64|aarch64|riscv64) ;;
    arm64) ARCH=aarch64 ;;
    *) say "--arch takes x86_64, aarch64 or riscv64, not '$ARCH'"; exit 64 ;;
  esac
  CROSS=
  if [ "$ARCH" != "$HOST" ]; then
    CROSS=${CROSS_COMPILE:-$ARCH-linux-gnu-}
    command -v "${CROSS}gcc" >/dev/null || {
      say "no ${CROSS}gcc to cross-compile for $ARCH: install Debian's gcc-$ARCH-linux-gnu"
      say "(apt-get install gcc-$ARCH-linux-gnu), or set CROSS_COMPILE to your toolchain's prefix"
      exit 69; }
  fi
  command -v "${CROSS}gcc" >/dev/null && command -v make >/dev/null || {
    say "needs gcc and make: run tools/install-system-deps.sh (Debian: build-essential)"; exit 69; }
  [ -e "$SRC" ] || {
    say "no MicroPython source at $SRC: give --source (a checkout or micropython-*-src.tar.gz),"
    say "or set DEPARROW_VENDOR_DIR to the folder that holds micropython-1.27.0-src.tar.gz"
    exit 66; }
  SRC=$(cd "$(dirname "$SRC")" && pwd)/$(basename "$SRC")
  CC_ID=$("${CROSS}gcc" -dumpmachine)-$("${CROSS}gcc" -dumpfullversion)
  KEY=$( {
    echo "source $(source_key "$SRC")"
    echo "arch $ARCH cross ${CROSS:-none} cc $CC_ID flags ${UNIX_FLAGS[*]}"
    (cd "$ROOT" && firmware_inputs | xargs -d '\n' sha256sum)
  } | sha256sum | cut -c1-16)
  CACHE=${DEPARROW_FIRMWARE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/deparrow/firmware}
  OUT=$CACHE/unix-$ARCH-$KEY
  if [ "$PRINT" = 1 ]; then
    echo "$OUT/micropython"
    return 0
  fi
  if [ "$FORCE" = 0 ] && [ -x "$OUT/micropython" ]; then
    say "up to date: $OUT/micropython"
    echo "$OUT/micropython"
    return 0
  fi

  mkdir -p "$CACHE/work"
  # One build per source and architecture at a time (a test run and a cross build may
  # start together); the build directories stay for the next, incremental, build.
  if [ -f "$SRC" ]; then
    WORK=$CACHE/work/$(basename "$SRC" .tar.gz)-$(source_key "$SRC" | cut -c1-12)
  else
    WORK=$CACHE/work/checkout-$(echo "$SRC" | sha256sum | cut -c1-12)
  fi
  mkdir -p "$WORK"
  exec 9>"$WORK/.lock-$ARCH"
  flock 9
  if [ "$FORCE" = 0 ] && [ -x "$OUT/micropython" ]; then  # built meanwhile by another
    echo "$OUT/micropython"
    return 0
  fi
  if [ -f "$SRC" ]; then
    MP=$WORK/src
    if [ ! -f "$MP/.unpacked" ]; then
      (
        flock 8
        if [ ! -f "$MP/.unpacked" ]; then
          say "unpacking $SRC"
          rm -rf "$MP" && mkdir -p "$MP"
          tar -xzf "$SRC" -C "$MP" --strip-components=1
          touch "$MP/.unpacked"
        fi
      ) 8>"$WORK/.lock-unpack"
    fi
  else
    MP=$SRC
  fi
  [ -f "$MP/py/mpconfig.h" ] && [ -d "$MP/ports/unix" ] || {
    say "$SRC is not MicroPython's source (no py/mpconfig.h or ports/unix)"; exit 66; }
  [ -f "$MP/lib/micropython-lib/micropython/umqtt.simple/manifest.py" ] || {
    say "$SRC lacks lib/micropython-lib (the frozen manifest needs umqtt.simple from it):"
    say "in a checkout, run 'git submodule update --init lib/micropython-lib'"; exit 66; }

  BUILD=$WORK/build-unix-$ARCH
  # make rebuilds what changed, but not for other flags or another compiler: start afresh then
  local how="${CROSS:-native} $CC_ID ${UNIX_FLAGS[*]}"
  if [ "$(cat "$BUILD/.deparrow-flags" 2>/dev/null)" != "$how" ]; then
    rm -rf "$BUILD"
  fi
  mkdir -p "$BUILD"
  printf '%s' "$how" >"$BUILD/.deparrow-flags"
  LOG=$BUILD/build.log
  local t0=$SECONDS
  say "building MicroPython's unix port for $ARCH in $BUILD (log: $LOG)"
  {
    # wasm3's core, unpacked and patched once per pin beside the build (not in the clone)
    "$HERE/wasm3/fetch-core.sh" "$WORK/wasm3-core"
    # mpy-cross runs here, on this machine, even for a cross build: no CROSS_COMPILE for it
    env -u CROSS_COMPILE make -C "$MP/mpy-cross" -j"$JOBS" BUILD="$WORK/build-mpy-cross"
    MICROPY_MPYCROSS="$WORK/build-mpy-cross/mpy-cross" \
      make -C "$MP/ports/unix" -j"$JOBS" BUILD="$BUILD" ${CROSS:+CROSS_COMPILE="$CROSS"} \
      MICROPY_MPYCROSS="$WORK/build-mpy-cross/mpy-cross" \
      FROZEN_MANIFEST="$HERE/manifest_unix.py" USER_C_MODULES="$HERE" \
      WASM3_CORE="$WORK/wasm3-core" "${UNIX_FLAGS[@]}"
  } >"$LOG" 2>&1 || {
    tail -n 40 "$LOG" >&2
    say "the build failed (whole log: $LOG)"
    exit 1
  }
  local tmp=$OUT.tmp.$$
  rm -rf "$tmp" && mkdir -p "$tmp"
  cp "$BUILD/micropython" "$WORK/build-mpy-cross/mpy-cross" "$LOG" "$tmp/"
  {
    echo "source $SRC"
    echo "arch $ARCH (compiler ${CROSS}gcc, $CC_ID)"
    echo "make ${UNIX_FLAGS[*]} FROZEN_MANIFEST=firmware/manifest_unix.py USER_C_MODULES=firmware"
    echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) in $((SECONDS - t0)) s"
    echo "inputs:"
    (cd "$ROOT" && firmware_inputs | xargs -d '\n' sha256sum)
  } >"$tmp/BUILD_INFO"
  rm -rf "$OUT"
  mv "$tmp" "$OUT"
  say "built in $((SECONDS - t0)) s: $OUT/micropython"
  echo "$OUT/micropython"
}

# -- the command line --------------------------------------------------------------------------

if [ "${1:-}" = -h ] || [ "${1:-}" = --help ] || [ $# -eq 0 ]; then
  usage
  [ $# -gt 0 ]; exit $?
fi
case "$1" in
  --*)
    UNIX=0 ARCH=$(host_arch) SRC= PRINT=0 FORCE=0
    while [ $# -gt 0 ]; do
      case "$1" in
        --unix) UNIX=1; shift ;;
        --arch) ARCH=${2:?--arch needs a value}; shift 2 ;;
        --source) SRC=${2:?--source needs a value}; shift 2 ;;
        --print-path) PRINT=1; shift ;;
        --force) FORCE=1; shift ;;
        *) say "unknown option $1 (try --help)"; exit 64 ;;
      esac
    done
    [ "$UNIX" = 1 ] || { say "say --unix, or give a checkout: MICROPYTHON_DIR [BOARD] [PORT]"; exit 64; }
    VENDOR=${DEPARROW_VENDOR_DIR:-$ROOT/../shared/vendor}
    unix_build "$ARCH" "${SRC:-$VENDOR/micropython-1.27.0-src.tar.gz}" "$PRINT" "$FORCE"
    ;;
  *)
    MP=$1 BOARD=${2:-ESP32_GENERIC_S3} PORT=${3:-esp32}
    if [ "$PORT" = unix ]; then  # the unix port has variants, not boards: the cached build
      unix_build "$(host_arch)" "$MP" 0 0
    else
      board_build "$MP" "$BOARD" "$PORT"
    fi
    ;;
esac

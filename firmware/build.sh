#!/usr/bin/env bash
# Builds DEparrow firmware for a microcontroller board from a MicroPython checkout: the port's
# firmware with the node frozen in (firmware/manifest.py) and the dpwasm3 wasm engine compiled
# in as a user C module (firmware/wasm3/).
#
#   firmware/build.sh MICROPYTHON_DIR [BOARD] [PORT]
#       MICROPYTHON_DIR  a clone of https://github.com/micropython/micropython (v1.22 or later,
#                        with `make -C mpy-cross` and, for esp32, ESP-IDF set up: `. export.sh`)
#       BOARD            default ESP32_GENERIC_S3
#       PORT             default esp32 (the port directory under ports/)
#
# The firmware lands in MICROPYTHON_DIR/ports/PORT/build-BOARD/ (for esp32: firmware.bin,
# flashed with esptool, see docs/firmware.md). This build is not run in CI: MicroPython's
# source and ESP-IDF cannot be fetched on the CI machines. What CI does run: mpy-cross over the
# frozen set, the manifest and package.json checks, the dpwasm3 engine built with gcc and run
# against wasm3-run, and a provisioned virtual board joining a hub (tests/firmware/).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MP=${1:?usage: firmware/build.sh MICROPYTHON_DIR [BOARD] [PORT]}
BOARD=${2:-ESP32_GENERIC_S3}
PORT=${3:-esp32}
say() { echo "firmware/build.sh: $*" >&2; }

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
make -C "$MP/mpy-cross" -j"$(nproc 2>/dev/null || echo 2)"
make -C "$MP/ports/$PORT" submodules BOARD="$BOARD"

# CMake ports (esp32, rp2) take the .cmake file; make ports (unix, stm32) the directory.
case "$PORT" in
  esp32|rp2) MODULES=$HERE/micropython.cmake ;;
  *) MODULES=$HERE ;;
esac
make -C "$MP/ports/$PORT" -j"$(nproc 2>/dev/null || echo 2)" BOARD="$BOARD" \
  FROZEN_MANIFEST="$HERE/manifest.py" USER_C_MODULES="$MODULES"
say "built: $MP/ports/$PORT/build-$BOARD/"

#!/usr/bin/env bash
# Builds the firmware's wasm job engine (dp_engine.c with edge/native's wasm3loop.c, wasi.c
# and module.c, over wasm3's core) as a shared library for this PC, with the flags
# micropython.mk and micropython.cmake give it on a board (keep the three in step). The
# MicroPython binding (modwasm3.c) is left out: it needs MicroPython's source. tests/firmware
# load the library through tests/firmware/host/dpwasm3.py, which has the binding's API.
#
#   firmware/wasm3/build-host.sh OUT.so
#   firmware/wasm3/build-host.sh --check-32bit    compile only, for a 32-bit target (-m32, as
#                                                 the ESP32's are; needs gcc-multilib)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
OUT=${1:?usage: build-host.sh OUT.so | --check-32bit}
ARCH=()
[ "$OUT" = --check-32bit ] && ARCH=(-m32 -fsyntax-only)
CC=${CC:-cc}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# -m32 finds the kernel's asm/ headers through /usr/include/asm, which Debian's gcc-multilib
# provides; it conflicts with the boards' cross compilers (tools/install-image-deps.sh), so
# without it do as it does: x86's asm/ headers serve both widths.
if [ ${#ARCH[@]} -gt 0 ] && ! echo '#include <asm/errno.h>' | "$CC" -m32 -E -x c - >/dev/null 2>&1; then
  MULTIARCH=$("$CC" -print-multiarch 2>/dev/null || true)
  if [ -n "$MULTIARCH" ] && [ -d "/usr/include/$MULTIARCH/asm" ]; then
    mkdir -p "$WORK/m32"
    ln -s "/usr/include/$MULTIARCH/asm" "$WORK/m32/asm"
    ARCH+=(-idirafter "$WORK/m32")
  fi
fi
"$HERE/fetch-core.sh" "$WORK/core"
CORE=$WORK/core
# The engine's hooks into wasm3 (see dp_engine.c, m3_env_real.c, m3_core_real.c).
HOOKS=(-DResizeMemory=deparrow_ResizeMemory -Dd_m3LogNativeStack=1 -Dm3StackCheck=dp_loop_check)
FLAGS=(-O2 -fPIC -fno-strict-aliasing -include "$HERE/dp_port.h" "${HOOKS[@]}"
  -I"$HERE" -I"$ROOT/edge/native" -I"$CORE")
# As strict as MicroPython's unix port builds user modules.
WARN=(-Wall -Werror -Wextra -Wno-unused-parameter -Wpointer-arith -Wno-sign-compare
  -Wno-missing-field-initializers -Wno-unused-function -Wno-unused-variable)
sources=()
for f in "$CORE"/*.c; do
  case "$(basename "$f")" in m3_env.c|m3_core.c) ;; *) sources+=("$f") ;; esac
done
sources+=("$HERE"/dp_engine.c "$HERE"/dp_wasm3loop.c "$HERE"/dp_wasi.c "$HERE"/dp_module.c "$HERE"/dp_textbuf.c
  "$HERE"/m3_env_real.c "$HERE"/m3_core_real.c)
pids=()
for f in "${sources[@]}"; do
  "$CC" "${ARCH[@]}" "${FLAGS[@]}" "${WARN[@]}" -c "$f" -o "$WORK/$(basename "$f" .c).o" &
  pids+=($!)
  if [ ${#pids[@]} -ge 2 ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
done
for p in "${pids[@]}"; do wait "$p"; done
[ ${#ARCH[@]} -eq 0 ] || exit 0
"$CC" -shared -o "$OUT.tmp.$$" "$WORK"/*.o -lm
mv "$OUT.tmp.$$" "$OUT"

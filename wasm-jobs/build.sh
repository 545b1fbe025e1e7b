#!/usr/bin/env bash
# Rebuild every job module from src/ into wasm-jobs/ (or into $OUT).
#
#   wasm-jobs/build.sh            # rewrite the committed modules
#   OUT=/tmp/x wasm-jobs/build.sh # build elsewhere, e.g. to compare with the committed ones
#   WASM_CC=clang-14 ...          # another clang (the bytes may then differ)
#
# The output is byte-for-byte reproducible with the same toolchain (Debian 12: wabt 1.0.32,
# clang/lld 14, wasi-libc): no debug info, and --strip-all drops the name and producers
# sections, the only places a path or version could leak in.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SRC="$HERE/src"
OUT="${OUT:-$HERE}"
CC="${WASM_CC:-clang}" # not $CC: a CI-wide CC=gcc must not leak in

missing=()
need_tool() { # tool debian-package
    command -v "$1" >/dev/null 2>&1 || missing+=("$1 (Debian package: $2)")
}
need_tool wat2wasm wabt
need_tool "$CC" clang
need_tool wasm-ld lld
if command -v "$CC" >/dev/null 2>&1; then
    # clang finds wasi-libc's crt1.o and libc.a through its sysroot, and the compiler
    # builtins (64-bit division helpers and the like) through -print-libgcc-file-name.
    crt1="$("$CC" --target=wasm32-wasi -print-file-name=crt1-command.o)"
    [[ -f "$crt1" ]] || missing+=("wasi-libc crt1-command.o (Debian package: wasi-libc)")
    builtins="$("$CC" --target=wasm32-wasi -print-libgcc-file-name)"
    [[ -f "$builtins" ]] ||
        missing+=("$builtins (Debian package: libclang-rt-14-dev-wasm32, matching clang's version)")
fi
if ((${#missing[@]})); then
    echo "build.sh: cannot build the wasm jobs, missing:" >&2
    printf '  %s\n' "${missing[@]}" >&2
    echo "install with: apt-get install wabt clang lld wasi-libc libclang-rt-14-dev-wasm32" >&2
    exit 1
fi

mkdir -p "$OUT"

# Pure WebAssembly text modules.
for name in fib loop grow trap exit3; do
    wat2wasm "$SRC/$name.wat" -o "$OUT/$name.wasm"
done

# WASI commands in C. write(2) instead of stdio keeps the imports to the few the
# executors implement (see jobs.json "imports").
CFLAGS=(--target=wasm32-wasi -O2 -Wall -Wextra -Werror -I "$SRC")
LDFLAGS=(-Wl,--strip-all)
for name in sieve sha256 hello; do
    "$CC" "${CFLAGS[@]}" "$SRC/$name.c" "${LDFLAGS[@]}" -o "$OUT/$name.wasm"
done
# A WASI command that works on files (opendir, fopen): it uses stdio and wasi-libc's
# preopens, so it imports WASI's filesystem calls and runs only where a job has files.
"$CC" "${CFLAGS[@]}" "$SRC/wordfreq.c" "${LDFLAGS[@]}" -o "$OUT/wordfreq.wasm"

# clang marks its output executable, wat2wasm doesn't; modules are data, not programs.
for name in fib loop grow trap exit3 sieve sha256 hello wordfreq; do
    chmod 644 "$OUT/$name.wasm"
    printf '%-12s %6d bytes\n' "$name.wasm" "$(wc -c <"$OUT/$name.wasm")"
done

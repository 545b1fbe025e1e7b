#!/usr/bin/env bash
# Installs the Debian packages the test suite needs, when they are missing:
#   mosquitto                 the real MQTT broker the tests run against
#   wabt clang lld wasi-libc  rebuild wasm-jobs/ and check the committed modules match
#   libclang-rt-14-dev-wasm32
#   chromium                  the real browser the dashboard tests (tests/web) drive with Playwright
#   socat                     a virtual MicroPython board on a pty (tests/firmware)
#   systemd                   systemd-analyze verify for `edge-run service` units (tests/edge/test_service.py)
#   debootstrap               the local Debian base of the container images (tools/containers)
#   gcc-multilib              the firmware's wasm engine compiled for a 32-bit target (tests/firmware)
#   postgresql-15             the hub's store on PostgreSQL (tests start their own server: initdb, pg_ctl)
#   build-essential patch     MicroPython's unix port with the node frozen in (firmware/build.sh
#                             --unix: gcc, make, libc headers; patch for wasm3's core)
#   nginx                     the load balancer in front of hub replicas (deploy/nginx, tests/test_deploy.py)
#   podman-compose            parses deploy/compose.yaml as podman-compose reads it (tests/test_deploy.py)
set -euo pipefail

need=()
command -v mosquitto >/dev/null || need+=(mosquitto)
command -v mosquitto_pub >/dev/null || need+=(mosquitto-clients)
command -v wat2wasm >/dev/null || need+=(wabt)
command -v clang >/dev/null || need+=(clang)
command -v wasm-ld >/dev/null || need+=(lld)
[ -e /usr/include/wasm32-wasi/stdio.h ] || need+=(wasi-libc)
compgen -G "/usr/lib/llvm-*/lib/clang/*/lib/wasi/libclang_rt.builtins-wasm32.a" >/dev/null \
  || need+=(libclang-rt-14-dev-wasm32)
command -v openssl >/dev/null || need+=(openssl)
command -v curl >/dev/null || need+=(curl)
command -v chromium >/dev/null || need+=(chromium)
command -v socat >/dev/null || need+=(socat)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v debootstrap >/dev/null || need+=(debootstrap)
{ command -v gcc && command -v make && command -v g++; } >/dev/null || need+=(build-essential)
command -v patch >/dev/null || need+=(patch)
compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null || need+=(postgresql-15)
command -v nginx >/dev/null || need+=(nginx)
command -v podman-compose >/dev/null || need+=(podman-compose)
[ -e /usr/include/x86_64-linux-gnu/gnu/stubs-32.h ] || [ "$(uname -m)" != x86_64 ] \
  || need+=(gcc-multilib)

exec "$(dirname "$0")/apt-install.sh" --with-recommends "${need[@]}"

#!/usr/bin/env bash
# Installs bubblewrap (`bwrap`), the sandbox of the native executor (edge/executors/native.py)
# and its tests (tests/edge/test_native_executor.py). Idempotent: does nothing when `bwrap` is
# already on PATH. Needs root (or sudo) to install the Debian package `bubblewrap`; the
# sandbox itself then runs without root as long as the kernel allows unprivileged user
# namespaces (Debian 12 does by default), which this script checks at the end.
set -euo pipefail

say() { echo "install-bubblewrap: $*" >&2; }

if ! command -v bwrap >/dev/null; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null; then
      SUDO=sudo
    else
      say "error: need root (or sudo) to install the Debian package bubblewrap"
      exit 1
    fi
  fi
  say "installing the Debian package bubblewrap"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends bubblewrap >/dev/null
fi

# A sandbox that cannot start is worse than none found: say why now, not at the first job.
if ! out="$(bwrap --unshare-all --die-with-parent --ro-bind / / true 2>&1)"; then
  say "error: bwrap is installed but cannot create a sandbox here: $out"
  say "hint: unprivileged user namespaces may be off (sysctl kernel.unprivileged_userns_clone=1" \
    "or user.max_user_namespaces > 0)"
  exit 1
fi
say "$(bwrap --version) works"

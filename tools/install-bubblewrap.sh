#!/usr/bin/env bash
# Installs bubblewrap (`bwrap`), the sandbox of the native executor (edge/executors/native.py)
# and its tests (tests/edge/test_native_executor.py). Idempotent: does nothing when `bwrap` is
# already on PATH. Needs root (or sudo) to install the Debian package `bubblewrap`; the
# sandbox itself then runs without root as long as the kernel allows unprivileged user
# namespaces (Debian 12 does by default), which this script checks at the end.
set -euo pipefail

say() { echo "install-bubblewrap: $*" >&2; }

if ! command -v bwrap >/dev/null; then
  "$(dirname "$0")/apt-install.sh" bubblewrap
fi

# A sandbox that cannot start is worse than none found: say why now, not at the first job.
if ! out="$(bwrap --unshare-all --die-with-parent --ro-bind / / true 2>&1)"; then
  say "error: bwrap is installed but cannot create a sandbox here: $out"
  say "hint: unprivileged user namespaces may be off (sysctl kernel.unprivileged_userns_clone=1" \
    "or user.max_user_namespaces > 0)"
  exit 1
fi
say "$(bwrap --version) works"

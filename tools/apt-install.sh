#!/usr/bin/env bash
# tools/apt-install.sh [--with-recommends] PACKAGE...
# Installs Debian packages for the other installers (install-system-deps.sh, install-podman.sh,
# install-bubblewrap.sh, install-image-deps.sh): as root, or through sudo, or fails saying so.
# `make test` runs those installers one after another: the package index is refreshed once for
# all of them (again only when the last refresh is over an hour old).
set -euo pipefail

recommends=(--no-install-recommends)
if [ "${1:-}" = --with-recommends ]; then
  recommends=()
  shift
fi
[ $# -gt 0 ] || exit 0

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null; then
    SUDO=sudo
  else
    echo "error: need root (or sudo) to install the Debian packages: $*" >&2
    exit 1
  fi
fi
echo "installing Debian packages: $*" >&2
export DEBIAN_FRONTEND=noninteractive
stamp="${TMPDIR:-/tmp}/deparrow-apt-index-refreshed"
if [ -z "$(find "$stamp" -mmin -60 2>/dev/null)" ]; then
  $SUDO apt-get update -qq
  touch "$stamp"
fi
$SUDO apt-get install -y -qq "${recommends[@]}" "$@" >/dev/null

#!/usr/bin/env bash
# Builds the local Debian base image the DEparrow container images start FROM, without a
# registry: debootstrap a minimal Debian 12 (bookworm) with Python, then `podman import` it.
# Idempotent and cached: does nothing when the image exists (--force rebuilds it).
#
#   tools/containers/build-base.sh [--force]
#
# Image: $DEPARROW_BASE_IMAGE (default localhost/deparrow/debian-base:bookworm).
# Mirror: $DEBIAN_MIRROR (default http://deb.debian.org/debian). Needs root, debootstrap and
# podman (tools/install-podman.sh); the first build downloads ~40 MB of packages (~1-2 min).
set -euo pipefail

IMAGE=${DEPARROW_BASE_IMAGE:-localhost/deparrow/debian-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
FORCE=0
case "${1:-}" in
  --force) FORCE=1 ;;
  -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  "") ;;
  *) echo "build-base: unknown option $1 (try --help)" >&2; exit 64 ;;
esac
say() { echo "build-base: $*" >&2; }

command -v podman >/dev/null || { say "podman is missing: run tools/install-podman.sh"; exit 69; }
if [ "$FORCE" = 0 ] && podman image exists "$IMAGE"; then
  exit 0
fi
[ "$(id -u)" -eq 0 ] || { say "must run as root (debootstrap needs it)"; exit 77; }
if ! command -v debootstrap >/dev/null; then
  say "installing debootstrap"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi

ROOTFS=$(mktemp -d /var/tmp/deparrow-base.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT
say "debootstrap bookworm (minbase + python3) from $MIRROR into $ROOTFS"
if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1; then
  say "debootstrap failed; its log ($ROOTFS.log) ends with:"
  tail -n 20 "$ROOTFS.log" >&2
  exit 1
fi
rm -f "$ROOTFS.log"
# An image, not a machine: no apt caches, no host-specific files.
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
: >"$ROOTFS/etc/hostname"
tar -C "$ROOTFS" -c . | podman import --quiet \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$IMAGE" >/dev/null
say "built $IMAGE ($(podman image inspect --format '{{.Size}}' "$IMAGE") bytes)"

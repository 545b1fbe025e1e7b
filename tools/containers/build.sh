#!/usr/bin/env bash
# Builds the DEparrow container images with podman, from this checkout, with no registry:
#
#   tools/containers/build.sh hub|node [TAG]     (default tag localhost/deparrow/KIND:latest)
#
# Makes the Debian base first if needed (build-base.sh, cached), then builds from a clean
# context: the checkout's files as git sees them (tracked and new, not ignored), so local
# venvs and build output never reach the image. Layers are cached: a rebuild after a source
# change recompiles nothing but the project's own wheel. $DEPARROW_BUILD_CA: the CA bundle pip
# uses in the build (default: this machine's, /etc/ssl/certs/ca-certificates.crt).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
KIND=${1:?usage: tools/containers/build.sh hub|node [TAG]}
case "$KIND" in hub|node) ;; *) echo "build.sh: KIND is hub or node, not $KIND" >&2; exit 64 ;; esac
TAG=${2:-localhost/deparrow/$KIND:latest}

"$HERE/build-base.sh"
CONTEXT=$(mktemp -d)
trap 'rm -rf "$CONTEXT"' EXIT
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done \
  | tar --null -T - -cf -) | tar -C "$CONTEXT" -xf -
# pip in the build trusts what this machine trusts (a TLS-inspecting proxy's CA, say).
CA=${DEPARROW_BUILD_CA:-/etc/ssl/certs/ca-certificates.crt}
secret=()
[ -s "$CA" ] && secret=(--secret "id=cacert,src=$CA")
podman build --quiet --layers "${secret[@]}" -f "$HERE/$KIND.Dockerfile" -t "$TAG" "$CONTEXT" >/dev/null
echo "built $TAG" >&2

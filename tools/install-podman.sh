#!/usr/bin/env bash
# Makes a Docker-API container engine answer on this machine, for the Docker executor and its
# tests (edge/executors/docker.py, tests/edge/test_docker_executor.py). Idempotent; run as root
# (or with sudo). Each step is skipped when it is already done:
#   1. installs the Debian packages podman, runc and busybox-static;
#   2. writes /etc/containers/containers.conf.d/deparrow.conf: runc as the OCI runtime and
#      default ulimits, the settings podman needs to run containers as root here;
#   3. starts `podman system service` on $DEPARROW_PODMAN_SOCKET (default
#      /run/podman/podman.sock) unless something already answers there, and waits for it;
#   4. builds the local test image deparrow/busybox:latest (no registry is reachable, so it is
#      a `podman import` of a rootfs holding a static busybox).
# The service keeps running after this script ends; its log is next to the socket
# (podman-service.log). Stop it by the PID in podman-service.pid.
set -euo pipefail

SOCKET="${DEPARROW_PODMAN_SOCKET:-/run/podman/podman.sock}"
IMAGE="${DEPARROW_TEST_IMAGE:-localhost/deparrow/busybox:latest}"
CONF_DIR=/etc/containers/containers.conf.d
CONF="$CONF_DIR/deparrow.conf"
RUN_DIR="$(dirname "$SOCKET")"
LOG="$RUN_DIR/podman-service.log"
PIDFILE="$RUN_DIR/podman-service.pid"

say() { echo "install-podman: $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null; then
    exec sudo --preserve-env=DEPARROW_PODMAN_SOCKET,DEPARROW_TEST_IMAGE "$0" "$@"
  fi
  say "error: must run as root (or with sudo): it installs packages and starts a root service"
  exit 1
fi

# 1. packages --------------------------------------------------------------------------------
need=()
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
# the test image needs a static busybox (Debian's `busybox` package is a dynamic one)
[ "$(dpkg-query -W -f='${Status}' busybox-static 2>/dev/null)" = "install ok installed" ] \
  || need+=(busybox-static)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
  "$(dirname "$0")/apt-install.sh" "${need[@]}"
fi

# 2. containers.conf --------------------------------------------------------------------------
want_conf='# Written by DEparrow tools/install-podman.sh.
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
runtime = "runc"'
if [ "$(cat "$CONF" 2>/dev/null)" != "$want_conf" ]; then
  say "writing $CONF (runtime runc, default ulimits)"
  mkdir -p "$CONF_DIR"
  printf '%s\n' "$want_conf" >"$CONF"
  restart=1
else
  restart=0
fi

# 3. the Docker-API service --------------------------------------------------------------------
answers() { curl -sf --max-time 3 --unix-socket "$SOCKET" http://d/_ping 2>/dev/null | grep -q OK; }

ours_running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

if [ "$restart" = 1 ] && ours_running; then
  say "restarting the podman service (pid $(cat "$PIDFILE")) to load the new settings"
  kill "$(cat "$PIDFILE")"
  for _ in $(seq 50); do ours_running || break; sleep 0.1; done
fi
if ! answers; then
  mkdir -p "$RUN_DIR"
  rm -f "$SOCKET"
  say "starting: podman system service --time=0 unix://$SOCKET (log: $LOG)"
  # Started in $RUN_DIR, not wherever this script was run from: conmon (podman 4.3) drops
  # a file named `oom` into its working directory when a container is OOM-killed.
  (cd "$RUN_DIR" && exec setsid nohup podman system service --time=0 "unix://$SOCKET" \
    </dev/null >"$LOG" 2>&1) &
  echo $! >"$PIDFILE"
  for _ in $(seq 300); do
    answers && break
    if ! ours_running; then
      say "error: podman system service exited; its log ($LOG) ends with:"
      tail -n 20 "$LOG" >&2
      exit 1
    fi
    sleep 0.1
  done
  if ! answers; then
    say "error: podman system service does not answer on $SOCKET after 30 s; see $LOG"
    exit 1
  fi
fi
say "Docker API answers on unix://$SOCKET"

# 4. the test image --------------------------------------------------------------------------
if podman image exists "$IMAGE"; then
  say "image $IMAGE present"
else
  say "building image $IMAGE from /bin/busybox (busybox-static)"
  root="$(mktemp -d)"
  trap 'rm -rf "$root"' EXIT
  mkdir -p "$root"/{bin,etc,tmp,proc,sys,dev,root}
  chmod 1777 "$root/tmp"
  cp /bin/busybox "$root/bin/busybox"
  for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
  done
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' \
    >"$root/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
  tar -C "$root" -c . | podman import --quiet \
    --change 'ENV PATH=/bin' --change 'CMD ["/bin/sh"]' - "$IMAGE" >/dev/null
  say "built $IMAGE"
fi

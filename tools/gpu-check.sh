#!/usr/bin/env bash
# The GPU path end to end, on a machine with an NVIDIA GPU (the test suite has none):
#   1. a hub on embedded defaults in a temporary data dir, on a free port;
#   2. a node owner and a user (`deparrow user create --json`), one node enrolled with
#      `deparrow node token` and started with `edge-run --config` (native and docker jobs on,
#      always running);
#   3. a native GPU job, `nvidia-smi -L` with resources.gpu 1, submitted as docs/jobs.md shows
#      (POST /api/v1/jobs), and, where a container engine can give GPUs (Docker with the NVIDIA
#      Container Toolkit, or Docker 25+ / Podman 5.4+ with a CDI spec), a docker GPU job running
#      `nvidia-smi -L` in nvidia/cuda:12.4.1-base-ubuntu22.04;
#   4. each job must complete with a GPU line on its stdout, and the node owner's wallet
#      (`deparrow wallet history --json`) must show its pay: CPU plus 50 credits per GPU-hour,
#      pro rata by the started second (docs/economy.md).
# The last line is exactly one of
#   gpu-check: PASS ...          exit 0
#   gpu-check: FAIL <why>        exit 1
#   gpu-check: SKIP no GPU       exit 2 (no nvidia-smi, or NVML finds no GPU: nothing to check)
# A docker part that cannot run here (no engine, no toolkit or CDI spec, the image cannot be
# pulled) is skipped and said so, not failed. The hub, the node and their logs are in a
# temporary folder, kept (and named) when the check fails. Env: DEPARROW, EDGE_RUN (the
# commands, default: this checkout's .venv, else PATH), GPU_CHECK_IMAGE, GPU_CHECK_TIMEOUT.
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
IMAGE="${GPU_CHECK_IMAGE:-nvidia/cuda:12.4.1-base-ubuntu22.04}"
JOB_TIMEOUT="${GPU_CHECK_TIMEOUT:-120}"  # seconds a job may run (and is held for)
NODE_NAME=gpu-check-node
TMP=""
HUB_PID=""
NODE_PID=""
DONE=0

say() { echo "gpu-check: $*"; }

stop() {  # a child we started, by its PID: SIGTERM, then SIGKILL after 10 s
  local pid="$1" i
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}

finish() {  # the one final line, then the exit code
  local verdict="$1"; shift
  DONE=1
  stop "$NODE_PID"
  stop "$HUB_PID"
  if [ -n "$TMP" ]; then
    if [ "$verdict" = FAIL ]; then
      say "logs kept in $TMP (hub.log, $NODE_NAME.log)"
    else
      rm -rf "$TMP"
    fi
  fi
  case "$verdict" in
    PASS) echo "gpu-check: PASS $*"; exit 0 ;;
    SKIP) echo "gpu-check: SKIP $*"; exit 2 ;;
    *) echo "gpu-check: FAIL $*"; exit 1 ;;
  esac
}
fail() {
  if [ "$BASHPID" != "$$" ]; then  # in a $(...): say why, and let the script itself fail
    echo "gpu-check: $*" >&2
    exit 1
  fi
  finish FAIL "$@"
}
trap 'fail "unexpected error at line $LINENO: $BASH_COMMAND"' ERR
trap 'rc=$?; [ "$DONE" = 1 ] || fail "stopped unexpectedly (exit code $rc)"' EXIT
trap 'fail "interrupted"' INT TERM

# -- 0. is there a GPU? ---------------------------------------------------------------------
if ! command -v nvidia-smi >/dev/null 2>&1; then
  say "no NVIDIA GPU here (nvidia-smi not found): nothing to check"
  finish SKIP "no GPU"
fi
if ! LIST="$(timeout 60 nvidia-smi -L 2>&1)" || ! grep -q '^GPU [0-9]' <<<"$LIST"; then
  say "no NVIDIA GPU here (NVML finds none: $(head -n 1 <<<"$LIST")): nothing to check"
  finish SKIP "no GPU"
fi
say "this machine: $(grep -c '^GPU [0-9]' <<<"$LIST") GPU(s); $(head -n 1 <<<"$LIST")"

# -- the tools: this checkout's venv, else PATH ---------------------------------------------
tool() {  # tool NAME ENV_VALUE: the command's path
  if [ -n "$2" ]; then echo "$2"
  elif [ -x "$ROOT/.venv/bin/$1" ]; then echo "$ROOT/.venv/bin/$1"
  else command -v "$1"
  fi
}
DEPARROW="$(tool deparrow "${DEPARROW:-}")" ||
  fail "deparrow not found (pip install deparrow, or make venv in $ROOT)"
EDGE_RUN="$(tool edge-run "${EDGE_RUN:-}")" ||
  fail "edge-run not found (pip install deparrow, or make venv in $ROOT)"
PY="$(dirname "$DEPARROW")/python"
[ -x "$PY" ] || PY="$(command -v python3)" || fail "python3 not found"

# py CODE [ARGS...]: Python with the JSON on stdin as `d` (json and sys imported)
py() { local code="$1"; shift; "$PY" -c "import json, sys; d = json.load(sys.stdin)
$code" "$@"; }

TMP="$(mktemp -d /tmp/deparrow-gpu-check-XXXXXX)"
chmod 755 "$TMP"  # the native jobs' user (nobody, under a root node) passes through it
PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
HUB="http://127.0.0.1:$PORT"

# -- 1. the hub -----------------------------------------------------------------------------
say "starting a hub on $HUB (data in $TMP/hub)"
"$DEPARROW" hub --data-dir "$TMP/hub" --port "$PORT" --broker-port 0 --heartbeat 1 \
  >"$TMP/hub.log" 2>&1 &
HUB_PID=$!
dp() { "$DEPARROW" --hub "$HUB" --token "$1" "${@:2}"; }  # dp TOKEN ARGS...
deadline=$((SECONDS + 60))
until [ -s "$TMP/hub/admin-token" ] && dp "$(cat "$TMP/hub/admin-token")" status >/dev/null 2>&1
do
  kill -0 "$HUB_PID" 2>/dev/null || fail "the hub exited: $(tail -n 5 "$TMP/hub.log" | tr '\n' ' ')"
  [ "$SECONDS" -lt "$deadline" ] || fail "the hub did not answer within 60 s"
  sleep 0.2
done
ADMIN="$(cat "$TMP/hub/admin-token")"

OWNER="$(dp "$ADMIN" user create gpu-owner --json | py 'print(d["token"])')"
USER_TOKEN="$(dp "$ADMIN" user create gpu-user --json | py 'print(d["token"])')"

# -- 2. can a container engine give GPUs here? ----------------------------------------------
DOCKER_PREFS='{"enabled": true}'
DOCKER_SKIP=""
ENGINE_URL="" ENGINE_CLI="" STYLE=""
if [ -S /var/run/docker.sock ] && command -v docker >/dev/null 2>&1; then
  ENGINE_URL="unix:///var/run/docker.sock" ENGINE_CLI=docker
elif [ -S /run/podman/podman.sock ] && command -v podman >/dev/null 2>&1; then
  ENGINE_URL="unix:///run/podman/podman.sock" ENGINE_CLI=podman
fi
if [ -n "${DOCKER_HOST:-}" ] && [ -n "$ENGINE_CLI" ]; then ENGINE_URL="$DOCKER_HOST"; fi
CDI_NAMES=""
if command -v nvidia-ctk >/dev/null 2>&1; then
  CDI_NAMES="$(nvidia-ctk cdi list 2>/dev/null | grep -o 'nvidia\.com/gpu=[^ ]*' || true)"
fi
if [ -z "$ENGINE_CLI" ]; then
  DOCKER_SKIP="no Docker or Podman service answers on its socket"
elif [ "$ENGINE_CLI" = docker ] && command -v nvidia-container-runtime-hook >/dev/null 2>&1; then
  STYLE=nvidia  # Docker Engine registers its "nvidia" device driver when the hook is there
elif [ -z "$CDI_NAMES" ]; then
  DOCKER_SKIP="$ENGINE_CLI has neither the NVIDIA Container Toolkit's hook nor a CDI spec for nvidia.com/gpu (nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml)"
elif ! grep -q 'nvidia\.com/gpu=GPU-' <<<"$CDI_NAMES"; then
  DOCKER_SKIP="the CDI spec names no GPU by UUID, as the node asks for them (nvidia-ctk cdi generate --device-name-strategy=uuid)"
else
  STYLE=cdi
  if [ "$ENGINE_CLI" = podman ]; then
    VERSION="$(podman version --format '{{.Server.Version}}' 2>/dev/null || podman --version | awk '{print $3}')"
    if ! printf '5.4\n%s\n' "$VERSION" | sort -V -C; then
      DOCKER_SKIP="Podman $VERSION ignores device requests over its Docker API (5.4 takes CDI ones)"
      STYLE=""
    fi
  fi
fi
if [ -n "$STYLE" ]; then
  say "pulling $IMAGE with $ENGINE_CLI (GPU style: $STYLE)"
  case "${IMAGE%%/*}" in  # a short name is Docker Hub's (Podman would ask which registry)
    *.* | *:* | localhost) FULL="$IMAGE" ;;
    *) FULL="docker.io/$IMAGE" ;;
  esac
  if timeout 900 "$ENGINE_CLI" pull "$FULL" >"$TMP/pull.log" 2>&1; then
    DOCKER_PREFS="{\"enabled\": true, \"url\": \"$ENGINE_URL\", \"gpu\": \"$STYLE\"}"
  else
    DOCKER_SKIP="$IMAGE could not be pulled: $(tail -n 1 "$TMP/pull.log")"
  fi
fi
[ -z "$DOCKER_SKIP" ] || say "docker GPU job skipped: $DOCKER_SKIP"

# -- 3. the node ----------------------------------------------------------------------------
# gpu_only_when_idle off: the check must not wait on whoever sits at this machine
cat >"$TMP/prefs.json" <<EOF
{"always_run": true, "native": {"enabled": true}, "docker": $DOCKER_PREFS,
 "idle": {"gpu_only_when_idle": false}}
EOF
ENROLL="$(dp "$OWNER" node token --json | py 'print(d["token"])')"
say "starting node $NODE_NAME ($(cat "$TMP/prefs.json" | tr -d '\n'))"
"$EDGE_RUN" --hub "$HUB" --token "$ENROLL" --name "$NODE_NAME" --data-dir "$TMP/node" \
  --config "$TMP/prefs.json" --always-run --dashboard-port 0 -v >"$TMP/$NODE_NAME.log" 2>&1 &
NODE_PID=$!
ENGINES=""
deadline=$((SECONDS + 90))
while [ -z "$ENGINES" ]; do
  kill -0 "$NODE_PID" 2>/dev/null ||
    fail "the node exited: $(tail -n 5 "$TMP/$NODE_NAME.log" | tr '\n' ' ')"
  [ "$SECONDS" -lt "$deadline" ] || fail "the node did not come online within 90 s"
  sleep 0.5
  ENGINES="$(dp "$OWNER" node list --json | py '
for n in d:
    if n["name"] == sys.argv[1] and n["state"] == "idle":
        print(",".join(n["engines"]))' "$NODE_NAME")"
done
say "node online, engines: $ENGINES"
case ",$ENGINES," in *,native,*) ;; *)
  fail "the node offers no native jobs: $(grep -m 1 'native jobs off' "$TMP/$NODE_NAME.log" || echo '?')" ;;
esac
if [ -z "$DOCKER_SKIP" ]; then
  case ",$ENGINES," in *,docker,*) ;; *)
    DOCKER_SKIP="the node runs no docker jobs: $(grep -m 1 'docker jobs off' "$TMP/$NODE_NAME.log" || echo '?')"
    say "docker GPU job skipped: $DOCKER_SKIP" ;;
  esac
fi

# -- 4. the jobs ----------------------------------------------------------------------------
JWT="$("$PY" - "$HUB" "$USER_TOKEN" <<'EOF'
import json, sys, urllib.request
req = urllib.request.Request(sys.argv[1] + "/api/v1/auth/token", method="POST",
                             data=json.dumps({"token": sys.argv[2]}).encode(),
                             headers={"Content-Type": "application/json"})
print(json.load(urllib.request.urlopen(req, timeout=30))["jwt"])
EOF
)"

submit() {  # submit native | submit docker: POST /api/v1/jobs with resources.gpu 1; the job id
  "$PY" - "$HUB" "$JWT" "$1" "$IMAGE" "$JOB_TIMEOUT" <<'EOF'
import json, sys, urllib.error, urllib.request
hub, jwt, kind, image, timeout = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
if kind == "native":
    # nvidia-smi (NVML), then whether CUDA itself starts in the sandbox, where python3 is
    probe = "import ctypes; print('cuInit', ctypes.CDLL('libcuda.so.1').cuInit(0))"
    script = f'nvidia-smi -L; s=$?; ! command -v python3 >/dev/null || python3 -c "{probe}"; exit $s'
    engine = {"type": "native", "command": ["sh", "-c", script]}
else:
    engine = {"type": "docker", "image": image, "command": ["nvidia-smi", "-L"]}
spec = {"name": "gpu-check-" + kind, "engine": engine, "timeout": timeout,
        "resources": {"cpu": 1, "memory_mb": 2048, "gpu": 1}}
req = urllib.request.Request(hub + "/api/v1/jobs", method="POST", data=json.dumps(spec).encode(),
                             headers={"Content-Type": "application/json",
                                      "Authorization": "Bearer " + jwt})
try:
    print(json.load(urllib.request.urlopen(req, timeout=30))["id"])
except urllib.error.HTTPError as e:
    print(f"refused: HTTP {e.code} {e.read().decode(errors='replace')}")
EOF
}

NATIVE_JOB="$(submit native)"
case "$NATIVE_JOB" in j_*) ;; *) fail "the native GPU job was $NATIVE_JOB" ;; esac
say "submitted native GPU job $NATIVE_JOB"
DOCKER_JOB=""
if [ -z "$DOCKER_SKIP" ]; then
  DOCKER_JOB="$(submit docker)"
  case "$DOCKER_JOB" in j_*) ;; *) fail "the docker GPU job was $DOCKER_JOB" ;; esac
  say "submitted docker GPU job $DOCKER_JOB"
fi

wait_job() {  # wait_job ID: until it ends (or the timeout and two minutes pass); its JSON
  local id="$1" view state deadline=$((SECONDS + JOB_TIMEOUT + 120))
  while :; do
    view="$(dp "$USER_TOKEN" job get "$id" --json)"
    state="$(py 'print(d["state"])' <<<"$view")"
    case "$state" in completed | failed | cancelled) echo "$view"; return 0 ;; esac
    if [ "$SECONDS" -ge "$deadline" ]; then echo "$view"; return 0; fi
    sleep 1
  done
}

check_job() {  # check_job WHAT ID: completed, exit 0, a GPU line; prints the GPU line(s)
  local what="$1" id="$2" view
  view="$(wait_job "$id")"
  py "$(cat <<'EOF'
r = d.get("result") or {}
lines = [line for line in (r.get("stdout") or "").splitlines() if line.startswith("GPU ")]
if d["state"] != "completed" or r.get("exit_code") != 0 or not lines:
    why = r.get("error") or d.get("reason") or (r.get("stderr") or "").strip()[-300:]
    print(f"{d['state']}, exit code {r.get('exit_code')}: {why or 'no GPU line on stdout'}")
    sys.exit(1)
# cuInit's CUresult: 0 is CUDA_SUCCESS (2: out of memory, 100: no device, 304: OS call failed)
cuda = [line for line in (r.get("stdout") or "").splitlines() if line.startswith("cuInit ")]
print("; ".join(lines + cuda))
EOF
)" <<<"$view" >"$TMP/$what.check" || fail "the $what GPU job $id $(cat "$TMP/$what.check")"
  say "$what GPU job $id completed: $(cat "$TMP/$what.check")"
  if grep -q 'cuInit [1-9]' "$TMP/$what.check"; then
    say "warning: CUDA does not start in the $what job ($(grep -o 'cuInit [0-9]*' "$TMP/$what.check")): NVML works, CUDA programs would not"
  fi
}

check_job native "$NATIVE_JOB"
[ -z "$DOCKER_JOB" ] || check_job docker "$DOCKER_JOB"

# -- 5. the owner's pay ---------------------------------------------------------------------
sleep 1  # the result's settlement and the wallet are one transaction; this is slack only
PAY_CODE="$(cat <<'EOF'
# economy.node_pay: the job's milli-CPUs at 10 credits/hour plus each GPU at 50 credits/hour,
# each part rounded down to the micro-credit, for the same started seconds
from decimal import Decimal

timeout, out = int(sys.argv[1]), []
for job in sys.argv[2:]:
    paid = [
        i for i in d["items"]
        if ("hold:" + job in i.get("counterparties", []) or job in i.get("reason", ""))
        and Decimal(i["amount"]) > 0
    ]
    if not paid:
        print(f"no pay for job {job} in the node owner's wallet history")
        sys.exit(1)
    amount = paid[0]["amount"]
    micro = int(Decimal(amount) * 1_000_000)
    for s in range(1, timeout + 1):
        cpu, gpu = 1000 * s * 10 * 10**6 // (1000 * 3600), s * 50 * 10**6 // 3600
        if cpu + gpu == micro:
            out.append(f"{job} paid {amount} = CPU {cpu / 1e6:.6f} + GPU {gpu / 1e6:.6f} for {s} s")
            break
    else:
        print(
            f"job {job} paid the node owner {amount} credits: no CPU + GPU pay for any whole "
            f"number of seconds up to {timeout} (a second of 1 CPU is 0.002777, with 1 GPU "
            "0.016665)"
        )
        sys.exit(1)
print("; ".join(out))
EOF
)"
# shellcheck disable=SC2086  # no docker job: no argument
PAY="$(dp "$OWNER" wallet history --json --limit 200 |
  py "$PAY_CODE" "$JOB_TIMEOUT" "$NATIVE_JOB" $DOCKER_JOB)" || fail "$PAY"
say "node owner's wallet: $PAY"

DOCKER_PART="docker: ${DOCKER_SKIP:+skipped ($DOCKER_SKIP)}"
[ -n "$DOCKER_SKIP" ] || DOCKER_PART="docker ($STYLE): $(cat "$TMP/docker.check")"
finish PASS "native: $(cat "$TMP/native.check"); $DOCKER_PART; GPU pay: $PAY"

#!/usr/bin/env bash
# The CPU serving image, tested for real: build deploy/Dockerfile, then check that it runs as a
# non-root user, serves the shipped model, classifies a digit photo correctly, and exits 0 on
# SIGTERM (docker stop) after draining. (The CUDA image needs an NVIDIA base and GPU; its checks
# belong to the GPU check.)
#
#   sudo deploy/test-image.sh          # on a Debian/Ubuntu machine; about 5 minutes the first time
#
# What it needs, and installs with apt when missing: Docker (docker.io) and debootstrap. Where no
# Docker daemon runs, it starts one without networking of its own (--bridge=none
# --iptables=false): every container here uses the host network and loopback addresses only.
# Where the base images cannot be pulled (no registry), it makes local stand-ins under the same
# tags from Debian bookworm (whose Python is 3.11) with debootstrap. Exit 0: the image works.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=resserve:cpu-test
PORT=${RESSERVE_TEST_PORT:-18801}
METRICS_PORT=$((PORT + 1))
HTTP_PORT=$((PORT + 2))
WORK=$(mktemp -d)
log() { echo "test-image: $*" >&2; }
# whether the test container's log has the text $1: the log is read whole first (grep -q leaves at
# its match, and the SIGPIPE docker logs then gets fails the pipeline under pipefail)
logged() { grep -qF -- "$1" <<< "$(docker logs resserve-image-test 2>&1)"; }
cleanup() {
  docker rm -f resserve-image-test resserve-quota-test >/dev/null 2>&1 || true
  [ -n "${DOCKERD_PID:-}" ] && kill "$DOCKERD_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# Docker and debootstrap -------------------------------------------------------------------------
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
  log "installing docker.io and debootstrap"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap >/dev/null
fi
DOCKER=/usr/bin/docker  # the daemon's own client (a newer one elsewhere on PATH may not speak its API)
[ -x "$DOCKER" ] || DOCKER=docker
docker() { "$DOCKER" "$@"; }
if ! docker info >/dev/null 2>&1; then
  log "starting dockerd (no bridge, no iptables)"
  dockerd --bridge=none --iptables=false >"$WORK/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { cat "$WORK/dockerd.log" >&2; exit 1; }
fi

# Base images: pulled where a registry answers, else local stand-ins from Debian ------------------
stand_in() {  # TAG: a Debian bookworm root with python3, pip and venv, as `python` and `pip` too
  local tag=$1 root="$WORK/rootfs"
  log "making a local stand-in for $tag with debootstrap"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$root" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
  ln -sf python3 "$root/usr/bin/python"
  ln -sf pip3 "$root/usr/bin/pip"
  rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"  # the host's trust (proxies)
  tar -C "$root" -c . | docker import - "$tag" >/dev/null
  rm -rf "$root"
}
base_of() { sed -n 's/^FROM \([^ ]*\).*/\1/p' "$1" | head -1; }
base=$(base_of deploy/Dockerfile)
if ! docker image inspect "$base" >/dev/null 2>&1; then
  timeout 60 docker pull -q "$base" >/dev/null 2>&1 || stand_in "$base"
fi

# Build ---------------------------------------------------------------------------------------
log "building $IMAGE from deploy/Dockerfile"
docker build -q --network host -f deploy/Dockerfile -t "$IMAGE" . >/dev/null
log "image size: $(docker image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "%.0f MB", $1 / 1e6}')"

# Run: non-root, serves, classifies, drains on SIGTERM ------------------------------------------
user=$(docker run --rm --entrypoint id "$IMAGE" -u)
[ "$user" = 10001 ] || { log "runs as uid $user, not 10001"; exit 1; }
# a CPU quota (docker run --cpus, a pod's CPU limit) is what the server counts, not the host's CPUs
refusal=$(timeout 60 docker run --rm --name resserve-quota-test --cpus 1 "$IMAGE" --threads 2 2>&1 >/dev/null || true)
[[ "$refusal" == *"--threads 2 is more than the 1 CPUs this server may use"* ]] \
  || { log "with --cpus 1, --threads 2 was not refused: $refusal"; exit 1; }
# workers need a writable /tmp (their metrics files): without one, one line, not a traceback
refusal=$(timeout 60 docker run --rm --read-only "$IMAGE" --workers 2 2>&1 >/dev/null || true)
[[ "$refusal" == "error: the workers write their metrics to a temporary directory, and none can"* ]] \
  || { log "--workers 2 on a read-only filesystem without /tmp: $refusal"; exit 1; }
# a volume of packages that the image's user may not read in part: one line naming the file
mkdir "$WORK/models" && cp -r serve/models/resnet-mnist "$WORK/models/" && chmod -R a+rX "$WORK/models"
chmod 600 "$WORK/models/resnet-mnist/model.onnx"
refusal=$(timeout 60 docker run --rm -v "$WORK/models:/models:ro" "$IMAGE" /models 2>&1 >/dev/null || true)
[[ "$refusal" == *"error: cannot read /models/resnet-mnist/model.onnx: Permission denied" ]] \
  || { log "a package with an unreadable model.onnx: $refusal"; exit 1; }
# the otel extra is in the image: --trace-mode opentelemetry works there
docker run --rm --entrypoint python "$IMAGE" -c \
  "from resserve.serve.settings import otel_installed; assert otel_installed(), 'no otel extra in the image'"
# as deploy/k8s runs it: a read-only root filesystem with a small /tmp (the workers' metrics files)
# and a 2 GiB memory limit, which holds one worker at its in-flight budgets' worst, not these two
docker run -d --name resserve-image-test --network host --read-only --tmpfs /tmp:size=64m --memory 2g "$IMAGE" \
  --host 127.0.0.1 --port "$PORT" --metrics-port "$METRICS_PORT" --http-port "$HTTP_PORT" --drain-seconds 1 \
  --workers 2 >/dev/null
for _ in $(seq 120); do
  logged " ready: " && break
  sleep 0.5
done
logged " ready: " || { docker logs resserve-image-test >&2; exit 1; }
logged "WARNING resserve.serve: 2 workers, each may hold up to 1.6 GB" \
  || { log "no warning that 2 workers may exceed the 2 GiB memory limit"; docker logs resserve-image-test >&2; exit 1; }
# the log is the server's: no other library's info lines (OpenVINO's telemetry's, for a user with no home)
if docker logs resserve-image-test 2>&1 | grep -v " resserve\."; then
  log "log lines not from resserve (above)"; exit 1
fi

python3 - "$WORK/digit.png" <<'PY'
import sys
from PIL import Image, ImageDraw
page = Image.new("L", (240, 320), 235)  # a photo-like page: dark ink on light paper
ImageDraw.Draw(page).ellipse((50, 40, 190, 280), outline=20, width=22)  # a zero
page.save(sys.argv[1])
PY
answer=$(resserve classify "$WORK/digit.png" --server "127.0.0.1:$PORT" --json)
echo "$answer" | python3 -c 'import json, sys; assert json.load(sys.stdin)[0]["digit"] == 0, "not classified as 0"'
resserve health --server "127.0.0.1:$PORT" --service resserve.readiness >/dev/null
# HTTP: readiness, the page, and the same photo through POST /v1/classify
python3 - "$WORK/digit.png" "http://127.0.0.1:$HTTP_PORT" <<'PY'
import json, sys, urllib.request
digit, url = open(sys.argv[1], "rb").read(), sys.argv[2]
assert urllib.request.urlopen(url + "/v2/health/ready", timeout=10).status == 200
assert b"Draw a digit" in urllib.request.urlopen(url + "/", timeout=10).read()
request = urllib.request.Request(url + "/v1/classify", data=digit, headers={"Content-Type": "image/png"})
assert json.load(urllib.request.urlopen(request, timeout=10))["results"][0]["digit"] == 0, "HTTP: not classified as 0"
PY
# one /metrics for both workers, counting the answers above
python3 - "http://127.0.0.1:$METRICS_PORT/metrics" <<'PY'
import sys, urllib.request
lines = urllib.request.urlopen(sys.argv[1], timeout=10).read().decode().splitlines()
answered = sum(float(line.rsplit(" ", 1)[1]) for line in lines  # gRPC's OK, HTTP's 200
               if line.startswith("resserve_requests_total{") and ('code="OK"' in line or 'code="200"' in line))
assert answered == 2, f"/metrics counts {answered} answered classify requests, not the 2 sent"
PY

docker stop -t 30 resserve-image-test >/dev/null
code=$(docker inspect resserve-image-test --format '{{.State.ExitCode}}')
logged "stopped; requests answered" || { docker logs resserve-image-test >&2; exit 1; }
[ "$code" = 0 ] || { log "exit code $code after SIGTERM"; exit 1; }
log "ok: built with the otel extra, runs as uid 10001, counts the CPUs of its CPU quota, refuses in one line" \
  "workers without a writable /tmp and a file it cannot read; on a read-only filesystem with 2 workers (and a" \
  "warning that they may outgrow its 2 GiB memory limit) it" \
  "classified a photo of a 0 over gRPC and HTTP, served the page and its metrics (and only its own log lines)," \
  "drained and exited 0 on SIGTERM"

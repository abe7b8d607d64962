#!/usr/bin/env bash
# Stage the GPU check for the GPU machine: ../shared/gpu/stage.sh (onnxruntime-gpu in parts, MNIST,
# on-gpu.sh), with the serving dependencies that machine lacks in place of the few wheels it
# stages by default, and Triton's perf_analyzer. Run from the project root, then the commands it
# prints, in order (device `run`, each with its `carry` paths), the last one the check itself.
#
# The GPU machine has Python 3.12, numpy, pillow, typer, rich and prometheus-client, and no
# network (../shared/gpu/README.md). Everything else `resserve serve` and tests/gpu/check.py import
# (grpcio and its health and reflection services, protobuf, pydantic, aiohttp, orjson, with their
# own dependencies) is resolved here from pyproject.toml for that Python and carried as wheels;
# on-gpu.sh installs them ahead of the machine's own packages.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
shared=${RESSERVE_SHARED_GPU:-$root/../shared/gpu}
PRESENT="numpy pillow typer prometheus-client"  # on the GPU machine already; numpy alone is 16 MB
# One command takes at most 64 MiB, the checkout (~5 MiB) included: base/ (~30 MiB with these
# wheels and MNIST) leaves part 0 about 25 MB, and the other parts 60 MB each (checked below).
export FIRST_BYTES=${FIRST_BYTES:-25000000} PART_BYTES=${PART_BYTES:-60000000}
"$shared/stage.sh"

requirements=$(python3 - "$PRESENT" <<'PY'
import re, sys, tomllib
present = set(sys.argv[1].split())
for requirement in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    if re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower() not in present:
        print(requirement)
PY
)
wheels=.gpu/base/wheels
rm -rf "$wheels" && mkdir -p "$wheels"
mapfile -t requirements <<< "$requirements"
pip download -q --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$wheels" "${requirements[@]}"
# what the resolver pulled in that the machine has (typing-extensions and the like stay: they are small)
for name in $PRESENT; do rm -f "$wheels/${name//-/_}"-*.whl; done
echo "tests/gpu/stage.sh: serving wheels for Python 3.12 in $wheels ($(ls "$wheels" | wc -l) wheels, $(du -sh "$wheels" | cut -f1));" \
     "base/ is $(du -sh .gpu/base | cut -f1) (at most 64 MiB travels with one command, part0 included)"

# Triton's perf_analyzer, so the workers sweep's thousands of requests a second are not bounded by
# a Python load generator: with the system libraries it links that the GPU machine may lack (libb64
# surely; it has no apt), in .gpu/perf-analyzer, carried by the check's own command (it does not
# fit beside part 0). The check loads from Python alone where perf_analyzer does not start.
rm -rf .gpu/perf-analyzer
bash tests/install-perf-analyzer.sh .gpu/perf-analyzer >/dev/null
for library in libb64.so.0d libssl.so.3 libcrypto.so.3; do
  cp "$(ldconfig -p | awk -v name="$library" '$1 == name {print $NF; exit}')" .gpu/perf-analyzer/lib/perf_analyzer/
done
echo "tests/gpu/stage.sh: perf_analyzer in .gpu/perf-analyzer ($(du -sh .gpu/perf-analyzer | cut -f1)); the check, carrying it:"
echo "  run: source /tmp/gpu-stage/base/on-gpu.sh && export PATH=\$PWD/.gpu/perf-analyzer/bin:\$PATH && python3 tests/gpu/check.py --out \"\$OUT/gpu-check.json\""

# what travels with each command: the checkout (tracked and untracked files git does not ignore)
# and the paths it carries, at most 64 MiB
tree=$(git ls-files -z -co --exclude-standard | du -cb --files0-from=- | tail -1 | cut -f1)
for carried in ".gpu/base .gpu/p0" .gpu/p[1-9]* .gpu/perf-analyzer; do
  bytes=$(( tree + $(du -cb $carried | tail -1 | cut -f1) ))  # word splitting: the first holds two paths
  if (( bytes > 64 * 1024 * 1024 )); then
    echo "tests/gpu/stage.sh: the checkout with $carried is $((bytes >> 20)) MiB, over the 64 MiB one command takes:" \
         "lower FIRST_BYTES or PART_BYTES" >&2
    exit 1
  fi
done

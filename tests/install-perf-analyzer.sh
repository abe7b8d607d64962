#!/usr/bin/env bash
# Triton's own load generator, perf_analyzer (C++), into PREFIX/bin (default: the active
# virtualenv's): what tests/serve/test_perf_analyzer.py runs against a real server, and a load
# generator for docs/benchmarks.md that costs the server's CPUs far less than a Python one.
#
#   bash tests/install-perf-analyzer.sh [PREFIX]
#
# perf_analyzer is not on PyPI on its own: the last tritonclient wheel that carried the binary is
# 2.41.0 (hash-pinned below). It links the CUDA runtime even when no GPU is used (libcudart.so.12,
# from NVIDIA's wheel on PyPI, kept beside it in PREFIX/lib/perf_analyzer) and libb64 (Debian: apt
# install libb64-0d). The wheels are only unpacked here, never installed: the virtualenv keeps its
# own tritonclient.
set -euo pipefail

prefix="${1:-${VIRTUAL_ENV:?activate the virtualenv perf_analyzer goes into, or name a PREFIX}}"
home="$prefix/lib/perf_analyzer"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

cat > "$work/requirements.txt" <<'EOF'
tritonclient==2.41.0 --hash=sha256:cf4ed5df836fa99937678a9fd852f86ba05c7b83656dd0a540e20afdb9ab4629
nvidia-cuda-runtime-cu12==12.9.79 --hash=sha256:25bba2dfb01d48a9b59ca474a1ac43c6ebf7011f1b0b8cc44f54eb6ac48a96c3
EOF
python3 -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
  --require-hashes -r "$work/requirements.txt" -d "$work"

mkdir -p "$home"
python3 - "$work" "$home" <<'EOF'
import sys, zipfile
from pathlib import Path

work, home = Path(sys.argv[1]), Path(sys.argv[2])
wanted = {"tritonclient-2.41.0.data/data/bin/perf_analyzer": "perf_analyzer",
          "nvidia/cuda_runtime/lib/libcudart.so.12": "libcudart.so.12"}
for wheel in work.glob("*.whl"):
    with zipfile.ZipFile(wheel) as archive:
        for member, name in wanted.items():
            if member in archive.namelist():
                (home / name).write_bytes(archive.read(member))
missing = [name for name in wanted.values() if not (home / name).exists()]
if missing:
    sys.exit(f"install-perf-analyzer: the wheels did not hold {', '.join(missing)}")
EOF
chmod +x "$home/perf_analyzer"

mkdir -p "$prefix/bin"
# the libraries beside the binary, found from wherever PREFIX is moved to (tests/gpu/stage.sh)
cat > "$prefix/bin/perf_analyzer" <<'EOF'
#!/bin/sh
# Triton's perf_analyzer 2.41.0, installed by tests/install-perf-analyzer.sh
home="$(dirname "$(readlink -f "$0")")/../lib/perf_analyzer"
LD_LIBRARY_PATH="$home${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$home/perf_analyzer" "$@"
EOF
chmod +x "$prefix/bin/perf_analyzer"

if ! "$prefix/bin/perf_analyzer" --version >/dev/null 2>&1; then
  echo "install-perf-analyzer: perf_analyzer does not start: $("$prefix/bin/perf_analyzer" --version 2>&1 | head -1)" >&2
  echo "(it needs Debian's libb64: apt install libb64-0d)" >&2
  exit 1
fi
echo "installed $("$prefix/bin/perf_analyzer" --version 2>&1) as $prefix/bin/perf_analyzer"

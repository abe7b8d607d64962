#!/bin/sh
# Install the serving side of resserve from a wheel: the core and the extras named (a runtime:
# [cpu] or [gpu]; the core alone has no ONNX Runtime), no torch.
# The training commands stay in the wheel (they are small and torch-free until run) and answer
# "needs the training extra" in one line; nothing is deleted, so pip's record stays true and
# `pip uninstall` / upgrades work.
# Used by the Dockerfiles and by the container-equivalent smoke test (tests/deploy/).
#   usage: install-serving.sh WHEEL[EXTRAS] [MORE_PIP_ARGS...]   e.g. resserve-0.1.0-py3-none-any.whl[cpu,openvino]
#   (MORE_PIP_ARGS: pip options, or more requirements such as a pinned onnxruntime-gpu)
set -eu
wheel="$1"; shift
pip install "$@" "$wheel"
pip check
python -c "import resserve.serve.server, resserve.serve.package as p; p.load_package()"  # torch-free import check

#!/bin/sh
# Install the serving side of resserve from a wheel: no torch, no training code.
# Used by the Dockerfiles and by the container-equivalent smoke test (tests/deploy/).
#   usage: install-serving.sh WHEEL[EXTRAS] [EXTRA_PIP_ARGS...]   e.g. resserve-0.1.0-py3-none-any.whl[openvino]
set -eu
wheel="$1"; shift
pip install "$@" "$wheel"
# The wheel also carries resserve.train; the serving image does not need it (and `resserve`
# drops the training commands when it is absent).
python -c "import os, shutil, resserve.train as t; shutil.rmtree(os.path.dirname(t.__file__))"
python -c "import resserve.serve.server, resserve.serve.package as p; p.load_package()"  # torch-free import check

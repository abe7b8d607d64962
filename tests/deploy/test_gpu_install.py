"""The GPU install path, as far as a machine without a GPU can follow it: what pip resolves for
``resserve[gpu]`` (the real index, a dry run) is the CUDA build of ONNX Runtime without the CPU
wheel beside it, with the CUDA runtime and cuDNN of the CUDA major that deploy/Dockerfile.cuda's
base image carries; this machine's own (CPU) ONNX Runtime names that install when asked for CUDA;
and both wheels in one directory are refused, while the GPU wheel first on PYTHONPATH is not."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, from PyPI (the dev extra installs it there)
    import tomli as tomllib

from resserve.serve.backends.base import BackendError
from resserve.serve.backends.onnxruntime import cuda_unavailable_reason, providers_for

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "deploy" / "Dockerfile.cuda").read_text()


def gpu_extra_pin() -> str:
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    (requirement,) = extra
    return re.fullmatch(r"onnxruntime-gpu\[cuda,cudnn\]==(\S+)", requirement).group(1)


def test_the_cuda_image_installs_the_onnxruntime_gpu_of_the_gpu_extra():
    assert re.search(r"^ARG ONNXRUNTIME_GPU=(\S+)$", DOCKERFILE, re.M).group(1) == gpu_extra_pin()
    assert '[otel]" "onnxruntime-gpu==${ONNXRUNTIME_GPU}"' in DOCKERFILE  # the pin is what is installed


@pytest.mark.slow
def test_pip_resolves_the_gpu_extra_to_the_cuda_build_of_the_image_cuda_major(tmp_path):
    report = tmp_path / "report.json"
    subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                    "--report", str(report), f"{ROOT}[gpu]"], check=True, capture_output=True, timeout=600)
    resolved = {item["metadata"]["name"].lower(): item["metadata"]["version"]
                for item in json.loads(report.read_text())["install"]}
    assert resolved["onnxruntime-gpu"] == gpu_extra_pin()
    assert "onnxruntime" not in resolved  # no CPU wheel to clash with the CUDA one
    base_cuda_major = re.search(r"^FROM nvidia/cuda:(\d+)\.", DOCKERFILE, re.M).group(1)
    assert resolved["nvidia-cuda-runtime"].split(".")[0] == base_cuda_major, (
        f"onnxruntime-gpu {gpu_extra_pin()} is built for CUDA {resolved['nvidia-cuda-runtime']}: "
        f"deploy/Dockerfile.cuda's base carries CUDA {base_cuda_major}")
    assert f"nvidia-cudnn-cu{base_cuda_major}" in resolved and "nvidia-cublas" in resolved


def test_asking_the_cpu_build_for_cuda_names_the_gpu_extra():
    with pytest.raises(BackendError) as error:
        providers_for("cuda")
    assert str(error.value) == f"--device cuda: {cuda_unavailable_reason()}"
    assert "pip install 'resserve[gpu]'" in str(error.value) and "pip uninstall -y onnxruntime" in str(error.value)
    assert providers_for("auto") == ["CPUExecutionProvider"]  # auto falls back to the CPU


def dist_info(directory: Path, name: str) -> None:
    """What pip leaves of an installed wheel that importlib.metadata reads: its METADATA."""
    info = directory / f"{name.replace('-', '_')}-1.31.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.31.1\n")


def import_with_path(directory: Path) -> subprocess.CompletedProcess:
    code = ("from resserve.serve.backends.onnxruntime import import_onnxruntime, cuda_unavailable_reason\n"
            "import_onnxruntime(); print(cuda_unavailable_reason())")
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(directory)},
                          capture_output=True, text=True, timeout=60)


def test_both_wheels_in_one_directory_is_refused_with_the_fix(tmp_path):
    dist_info(tmp_path, "onnxruntime")
    dist_info(tmp_path, "onnxruntime-gpu")
    result = import_with_path(tmp_path)
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].endswith(
        "BackendError: onnxruntime and onnxruntime-gpu are both installed (two wheels of one module); "
        "pip uninstall -y onnxruntime onnxruntime-gpu, then pip install 'resserve[gpu]' (or [cpu])")


def test_the_gpu_wheel_on_pythonpath_beside_the_cpu_wheel_is_not_a_clash(tmp_path):
    """As on a GPU machine whose system Python has the CPU wheel and onnxruntime-gpu is put first
    on PYTHONPATH (../shared/gpu/on-gpu.sh): the first on the path is imported, nothing is mixed."""
    dist_info(tmp_path, "onnxruntime-gpu")
    result = import_with_path(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("onnxruntime-gpu has no usable CUDA execution provider here "
                                     "(it needs an NVIDIA GPU with a driver for CUDA 13)")

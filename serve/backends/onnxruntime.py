"""ONNX Runtime: the default backend, on the CPU or on CUDA (onnxruntime-gpu)."""

from __future__ import annotations

from functools import cache
from importlib import metadata
from types import ModuleType

import numpy as np

from resserve.serve.backends.base import BackendError, ModelSource, Outputs, describe, usable_cpus

INSTALL_HINT = "pip install 'resserve[cpu]' (or 'resserve[gpu]' for NVIDIA GPUs)"
# onnxruntime and onnxruntime-gpu are two wheels of one module: installed together, whichever came
# last owns the files, and uninstalling either breaks the other.
CLASH_HINT = ("onnxruntime and onnxruntime-gpu are both installed (two wheels of one module); "
              "pip uninstall -y onnxruntime onnxruntime-gpu, then pip install 'resserve[gpu]' (or [cpu])")
GPU_HINT = "install the CUDA build in its place: pip uninstall -y onnxruntime && pip install 'resserve[gpu]'"


def installed_wheels() -> set[str]:
    """Which ONNX Runtime distributions pip installed (onnxruntime, onnxruntime-gpu)."""
    found = set()
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            metadata.distribution(name)
            found.add(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def import_onnxruntime() -> ModuleType:
    """The onnxruntime module, or a one-line error that names the install."""
    if len(installed_wheels()) > 1:
        raise BackendError(CLASH_HINT)
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendError(f"ONNX Runtime is not installed: {INSTALL_HINT}") from exc
    return onnxruntime


def cuda_unavailable_reason() -> str:
    """Why this ONNX Runtime cannot run on CUDA, with the fix."""
    if "onnxruntime-gpu" not in installed_wheels():
        return f"this ONNX Runtime is the CPU build; {GPU_HINT}"
    return ("onnxruntime-gpu has no usable CUDA execution provider here "
            "(it needs an NVIDIA GPU with a driver for CUDA 13)")


@cache
def _preload_cuda_libraries() -> None:
    """Load the CUDA runtime, cuBLAS and cuDNN that the gpu extra installed from PyPI (the nvidia-*
    wheels), so the CUDA provider finds them without LD_LIBRARY_PATH; libraries already on the
    loader's path (a CUDA base image) are used as they are."""
    import_onnxruntime().preload_dlls(cuda=True, cudnn=True, msvc=False)


# cuDNN's convolution algorithm search on the first call at each input shape. EXHAUSTIVE finds
# the fastest kernels but cost 0.6-1.1 s per new batch size on an H100 (HEURISTIC 89-155 ms,
# DEFAULT 34-69 ms with 2-3x slower steady state): with shape buckets warmed before ready
# (serve/batcher.py) it is paid at startup, so the server keeps the fastest kernels
# (--cuda-conv-search, serve/settings.py ConvSearch).


def providers_for(device: str, conv_search: str = "EXHAUSTIVE") -> list:
    """Execution providers for ``device`` (cpu | cuda | auto: CUDA where this ONNX Runtime has
    it), CUDA with ``conv_search`` as its cuDNN algorithm search."""
    ort = import_onnxruntime()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        if device == "cuda":
            raise BackendError(f"--device cuda: {cuda_unavailable_reason()}")
        return ["CPUExecutionProvider"]
    _preload_cuda_libraries()
    return [("CUDAExecutionProvider", {"cudnn_conv_algo_search": conv_search}), "CPUExecutionProvider"]


class OnnxRuntimeBackend:
    """One ONNX Runtime session on ``device`` (cpu | cuda | auto)."""

    name = "onnxruntime"
    precision = "fp32"

    def __init__(self, model: ModelSource, device: str = "cpu", threads: int | None = None,
                 conv_search: str = "EXHAUSTIVE") -> None:
        ort = import_onnxruntime()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or usable_cpus()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # warnings and above only; errors surface as exceptions
        requested = providers_for(device, conv_search)
        try:
            self.session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                                providers=requested)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise BackendError(f"ONNX Runtime cannot load {describe(model)}: {str(exc).splitlines()[0]}") from exc
        active = self.session.get_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in active:
            raise BackendError(f"--device cuda: ONNX Runtime could not start CUDA for {describe(model)} "
                               f"(active: {active})")
        self.device = "cuda" if "CUDAExecutionProvider" in active else "cpu"
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def infer(self, batch: np.ndarray) -> Outputs:
        outputs = self.session.run(self.output_names, {self.input_name: batch})
        return dict(zip(self.output_names, outputs))

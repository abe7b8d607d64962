"""Inference backends over a model package's artifacts: ONNX Runtime, OpenVINO and TorchScript.

A backend takes a float32 batch [N,1,28,28] in [0,1] and returns the package's outputs by
name. Export verification, the benchmarks and the server all run artifacts through these
classes, so what export verified is what gets served.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import numpy as np

from resserve.serve.errors import ResserveError

OUTPUT_NAMES = ("logits", "probabilities")


class BackendError(ResserveError):
    """An artifact that cannot be loaded or run."""


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def onnxruntime_providers(device: str) -> list[str]:
    """Execution providers for ``device`` (cpu | cuda | auto), CUDA first where asked for."""
    import onnxruntime as ort

    if device not in ("cpu", "cuda", "auto"):
        raise BackendError(f"device must be cpu, cuda or auto, got {device!r}")
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        if device == "cuda":
            raise BackendError("--device cuda: this ONNX Runtime has no CUDA execution provider "
                               "(install the gpu extra, onnxruntime-gpu, on a machine with an NVIDIA driver)")
        return ["CPUExecutionProvider"]
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


class OnnxRuntimeBackend:
    """One ONNX Runtime session on ``device`` (cpu | cuda | auto: CUDA where there is one)."""

    name = "onnxruntime"
    precision = "fp32"

    def __init__(self, path: Path, device: str = "cpu", threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or usable_cpus()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # warnings and above only; errors surface as exceptions
        requested = onnxruntime_providers(device)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=requested)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise BackendError(f"ONNX Runtime cannot load {path}: {str(exc).splitlines()[0]}") from exc
        active = self.session.get_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in active:
            raise BackendError(f"--device cuda: ONNX Runtime could not start CUDA for {path.name} (active: {active})")
        self.device = "cuda" if "CUDAExecutionProvider" in active else "cpu"
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, {self.input_name: batch})
        return dict(zip(self.output_names, outputs))


class TorchScriptBackend:
    """A TorchScript module on the CPU (or CUDA); needs torch, which serving does not require."""

    name = "torchscript"
    precision = "fp32"

    def __init__(self, path: Path, device: str = "cpu", threads: int | None = None) -> None:
        try:
            import torch
        except ImportError as exc:
            raise BackendError("the TorchScript backend needs torch: pip install 'resserve[train]'") from exc
        self.torch = torch
        if threads:
            torch.set_num_threads(threads)
        if device == "cuda" and not torch.cuda.is_available():
            raise BackendError("--device cuda: torch sees no CUDA device")
        self.device = "cuda" if device in ("cuda", "auto") and torch.cuda.is_available() else "cpu"
        try:
            with warnings.catch_warnings():  # torch.jit is deprecated in 2.14; the format is what users asked for
                warnings.simplefilter("ignore", FutureWarning)
                self.module = torch.jit.load(str(path), map_location=torch.device(self.device)).eval()
        except RuntimeError as exc:
            raise BackendError(f"torch cannot load {path}: {str(exc).splitlines()[0]}") from exc

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        with self.torch.inference_mode():
            outputs = self.module(self.torch.from_numpy(batch).to(self.device))
        return {name: out.cpu().numpy() for name, out in zip(OUTPUT_NAMES, outputs)}


OPENVINO_HINT = "the OpenVINO backend needs the openvino extra: pip install 'resserve[openvino]'"


def openvino_cpu_capabilities() -> set[str] | None:
    """OpenVINO's CPU optimization capabilities ("BF16" on AMX / AVX512-BF16 CPUs); None without OpenVINO."""
    try:
        import openvino as ov
    except ImportError:
        return None
    return set(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


class OpenVinoBackend:
    """An ONNX artifact compiled by OpenVINO for the CPU, in fp32 or bf16 (AMX on recent Xeons).

    Two compilations of the same network: one with a dynamic batch on every usable CPU, and one
    for a single image, with a static shape and one thread. A 28x28 image is too little work to
    split: handing it between threads and re-planning a dynamic shape cost more than the
    convolutions (measured here: bf16 batch-1 latency 0.51 ms this way, 0.90 ms through the
    dynamic model on 2 threads; docs/benchmarks.md). Each compiled model keeps one reused infer
    request; a lock keeps them safe if threads share the backend (the batcher runs one batch at
    a time anyway).
    """

    name = "openvino"

    def __init__(self, path: Path, precision: str = "fp32", threads: int | None = None) -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise BackendError(OPENVINO_HINT) from exc
        if precision not in ("fp32", "bf16"):
            raise BackendError(f"OpenVINO precision must be fp32 or bf16, got {precision!r}")
        self.precision, self.device = precision, "cpu"
        core = ov.Core()
        try:
            model = core.read_model(str(path))
            batched = self._compile(core, model, threads or usable_cpus())
            single_model = model.clone()  # the file is read once
            shape = single_model.input(0).get_partial_shape()
            shape[0] = 1
            single_model.reshape({single_model.input(0): shape})
            single = self._compile(core, single_model, 1)
        except RuntimeError as exc:
            raise BackendError(f"OpenVINO cannot compile {path}: {str(exc).splitlines()[0]}") from exc
        self.output_names = [o.get_any_name() for o in batched.outputs]  # the same in both compilations
        self.batched_request, self.single_request = batched.create_infer_request(), single.create_infer_request()
        self.lock = threading.Lock()

    def _compile(self, core, model, threads: int):
        config = {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "bf16" if self.precision == "bf16" else "f32",
            "INFERENCE_NUM_THREADS": threads,
            "NUM_STREAMS": 1,
        }
        return core.compile_model(model, "CPU", config)

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        request = self.single_request if len(batch) == 1 else self.batched_request
        with self.lock:
            result = request.infer({0: batch})
            return {name: np.array(result[index], dtype=np.float32) for index, name in enumerate(self.output_names)}


def batched_infer(backend, images: np.ndarray, batch_size: int = 1000) -> dict[str, np.ndarray]:
    """Run float32 images [N,1,28,28] through ``backend`` in chunks; outputs concatenated."""
    chunks = [backend.infer(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}


def open_backend(path: Path, format: str, device: str = "cpu", threads: int | None = None,
                 runtime: str = "onnxruntime", precision: str = "fp32"):
    """The backend for an artifact of ``format`` (onnx | torchscript); ONNX runs on ``runtime``."""
    if format == "onnx" and runtime == "openvino":
        return OpenVinoBackend(path, precision, threads)
    if format == "onnx":
        return OnnxRuntimeBackend(path, device, threads)
    if format == "torchscript":
        return TorchScriptBackend(path, device, threads)
    raise BackendError(f"no backend for artifact format {format!r}")

"""Inference backends over a model package's artifacts: ONNX Runtime and TorchScript.

A backend takes a float32 batch [N,1,28,28] in [0,1] and returns the package's outputs by
name. Export verification, the benchmarks and the server all run artifacts through these
classes, so what export verified is what gets served.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from resserve.serve.errors import ResserveError

OUTPUT_NAMES = ("logits", "probabilities")


class BackendError(ResserveError):
    """An artifact that cannot be loaded or run."""


def usable_cpus() -> int:
    """CPUs this process may run on (cgroup/affinity aware where the OS tells)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class OnnxRuntimeBackend:
    """One ONNX Runtime session; ``providers`` picks CPU or CUDA execution."""

    def __init__(self, path: Path, providers: list[str] | None = None, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or usable_cpus()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # warnings and above only; errors surface as exceptions
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise BackendError(f"ONNX Runtime cannot load {path}: {str(exc).splitlines()[0]}") from exc
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, {self.input_name: batch})
        return dict(zip(self.output_names, outputs))


class TorchScriptBackend:
    """A TorchScript module on the CPU (or CUDA); needs torch, which serving does not require."""

    def __init__(self, path: Path, device: str = "cpu", threads: int | None = None) -> None:
        try:
            import torch
        except ImportError as exc:
            raise BackendError("the TorchScript backend needs torch: pip install 'resserve[train]'") from exc
        self.torch = torch
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        try:
            with warnings.catch_warnings():  # torch.jit is deprecated in 2.14; the format is what users asked for
                warnings.simplefilter("ignore", FutureWarning)
                self.module = torch.jit.load(str(path), map_location=self.device).eval()
        except RuntimeError as exc:
            raise BackendError(f"torch cannot load {path}: {str(exc).splitlines()[0]}") from exc

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        with self.torch.inference_mode():
            outputs = self.module(self.torch.from_numpy(batch).to(self.device))
        return {name: out.cpu().numpy() for name, out in zip(OUTPUT_NAMES, outputs)}


def batched_infer(backend, images: np.ndarray, batch_size: int = 1000) -> dict[str, np.ndarray]:
    """Run float32 images [N,1,28,28] through ``backend`` in chunks; outputs concatenated."""
    chunks = [backend.infer(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}

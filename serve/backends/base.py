"""What every inference backend is: the ``Backend`` protocol, its errors, and the CPUs it may use.

A backend takes a float32 batch [N,1,28,28] in [0,1] and returns the package's outputs by
name. Export verification, the benchmarks and the server all run artifacts through backends,
so what export verified is what gets served.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from resserve.serve.cgroups import cpu_quota
from resserve.serve.errors import ResserveError

Outputs = dict[str, np.ndarray]
# An artifact as verified bytes (the server: what was hashed is what is loaded) or a file path
# (export, benchmarks and tests, which read artifacts they just wrote).
ModelSource = bytes | Path


@dataclass(frozen=True)
class CudaOptions:
    """How ONNX Runtime runs on CUDA (the CPU ignores them): ``conv_search``, cuDNN's algorithm
    search (EXHAUSTIVE, HEURISTIC or DEFAULT); ``graphs``, one captured CUDA graph per shape
    bucket; ``tf32``, TF32 for fp32 convolutions and matrix products on Ampere and later GPUs
    (1.5-1.7x at batch 256-1024 on an H200, logits up to 1.7e-2 from fp32's; off, fp32 is fp32)."""

    conv_search: str = "EXHAUSTIVE"
    graphs: bool = True
    tf32: bool = False


class BackendError(ResserveError):
    """An artifact that cannot be loaded or run."""


class Backend(Protocol):
    """An artifact ready to run. ``name``, ``device`` and ``precision`` are what the server reports."""

    name: str  # onnxruntime | openvino | torchscript
    device: str  # cpu | cuda
    precision: str  # fp32 | tf32 | bf16 | int8

    def infer(self, batch: np.ndarray) -> Outputs:
        """float32 [N,1,28,28] in [0,1] -> {output name: [N,...]}; thread-safe for one caller at a time."""
        ...

    def specialize(self, batch_sizes: tuple[int, ...]) -> None:
        """The batch sizes most batches will have from now on (the batcher's shape buckets; () for
        any): a backend that prepares per shape (CUDA graphs) does so here, before the warm-up."""
        ...


def describe(model: ModelSource) -> str:
    """How an error message names ``model``."""
    return str(model) if isinstance(model, Path) else f"the verified artifact ({len(model):,} bytes)"


def runnable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (whole CPUs of it,
    at least one: a thread per CPU of a 1.5-CPU quota would be throttled)."""
    cpus, quota = runnable_cpus(), cpu_quota()
    return cpus if quota is None else min(cpus, max(1, int(quota)))


def infer_in_chunks(infer: Callable[[np.ndarray], Outputs], images: np.ndarray, chunk: int) -> Outputs:
    """Run ``images`` through ``infer`` at most ``chunk`` at a time; outputs concatenated in order."""
    if len(images) <= chunk:
        return infer(images)
    parts = [infer(images[i:i + chunk]) for i in range(0, len(images), chunk)]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

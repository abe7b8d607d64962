"""The in-process limit: a model's runtime called directly in the benchmark's process, what a
server on that runtime can approach at best; and ``resserve bench model``'s runners (every way
of running one network, timed alike)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from resserve.serve.backends import open_backend
from resserve.serve.backends.base import CudaOptions, usable_cpus
from resserve.serve.bench.clients import stand_in_images
from resserve.serve.bench.report import InProcessResult
from resserve.serve.package import ModelPackage
from resserve.serve.runtime import RuntimeChoice
from resserve.serve.timing import images_per_second, median_seconds

Runner = Callable[[np.ndarray], object]  # runs one batch of model inputs
IN_PROCESS_SECONDS = 2.0  # each batch size's throughput in process, at most: as long as a level is measured, or this


@dataclass(frozen=True)
class RunnerResult:
    """One runner: a row of ``bench model``'s table."""

    config: str  # e.g. "ONNX Runtime fp32"
    batch1_latency_ms: float
    images_per_second: dict[int, float]  # by batch size


def measure_runners(runners: dict[str, Runner], images: np.ndarray, batch_sizes: tuple[int, ...], seconds: float,
                    on_runner: Callable[[str], None] = lambda name: None) -> list[RunnerResult]:
    """Batch-1 latency and throughput at each batch size of every runner, in this process, one
    after another."""
    rows = []
    for name, run in runners.items():
        on_runner(name)
        one = images[:1]
        latency = median_seconds(lambda: run(one), repeats=500, max_seconds=seconds)
        throughput = {}
        for size in batch_sizes:
            batch = np.ascontiguousarray(np.resize(images, (size, *images.shape[1:])))
            throughput[size] = round(images_per_second(lambda: run(batch), size, seconds), 1)
        rows.append(RunnerResult(name, round(latency * 1e3, 3), throughput))
    return rows


def cuda_runners(onnx: bytes, batch_sizes: tuple[int, ...]) -> dict[str, Runner]:
    """ONNX Runtime's CUDA provider on the fp32 artifact: plain, and with a captured CUDA graph at
    batch 1 and each of ``batch_sizes`` (as a server captures one per shape bucket), in fp32 and
    with TF32 (--cuda-tf32)."""
    plain = open_backend(onnx, "onnx", "onnxruntime", "cuda", cuda=CudaOptions(graphs=False))
    runners = {"ONNX Runtime fp32, CUDA": plain.infer}
    for precision, options in (("fp32", CudaOptions()), ("tf32", CudaOptions(tf32=True))):
        graphs = open_backend(onnx, "onnx", "onnxruntime", "cuda", cuda=options)
        graphs.specialize((1, *batch_sizes))
        runners[f"ONNX Runtime {precision}, CUDA graphs"] = graphs.infer
    return runners


def in_process_limit(package: ModelPackage, batch_sizes: list[int], runtime: str = "onnxruntime fp32",
                     threads: int | None = None, seconds: float = IN_PROCESS_SECONDS) -> list[InProcessResult]:
    """``runtime`` ("backend precision", as a server reports it) on the same artifact in this
    process, at each batch size, its throughput timed for ``seconds``: the ceiling a server on that
    runtime can approach."""
    choice = RuntimeChoice(*runtime.split(), reason="what the server reported")
    artifact = package.find(choice.artifact_format, choice.artifact_precision)
    backend = open_backend(package.read_verified(artifact), artifact.format, choice.backend, "cpu", choice.precision,
                           threads)
    rows = []
    for size in sorted(set(batch_sizes)):
        batch = stand_in_images(size)
        rows.append(InProcessResult(size, median_seconds(lambda: backend.infer(batch), repeats=50) * 1e3,
                                    images_per_second(lambda: backend.infer(batch), size, seconds)))
    return rows


def machine_description() -> str:
    """The CPU and how many of its CPUs this process may use: what a report was measured on."""
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = "unknown CPU"
    return f"{model}, {usable_cpus()} CPUs"

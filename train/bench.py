"""In-process benchmarks of the train side.

``resserve bench train``: training throughput of the lecture ResNet, our fast path against a
naive loop; both run the same model, optimizer, loss and real MNIST batches in one process, one
after the other; only the memory format and the autocast precision differ.

``resserve bench model``: batch-1 latency and batch-64/256 throughput of one network run
eagerly (unfolded and folded), as TorchScript, through ONNX Runtime fp32 and int8, and through
OpenVINO fp32 and bf16 where it is installed; with ``--device cuda`` also ONNX Runtime's CUDA
provider, plain and with CUDA graphs, and batch 1024.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from resserve.serve.backends import open_backend
from resserve.serve.backends.base import usable_cpus
from resserve.serve.backends.openvino import OpenVinoBackend, openvino_cpu_capabilities
from resserve.serve.bench.limits import Runner, RunnerResult, measure_runners
from resserve.serve.bench.report import print_unsqueezed
from resserve.serve.package import ModelPackage
from resserve.train.checkpoint import load_checkpoint
from resserve.train.data import MNIST
from resserve.train.fold import fold_for_inference
from resserve.train.models import build_model, lecture_config
from resserve.train.training import batches, cpu_has_fast_bf16, library_versions, to_input


@dataclass(frozen=True)
class TrainingConfigResult:
    config: str
    images_per_second: float


@dataclass(frozen=True)
class TrainingBenchmark:
    """``bench train``'s results: images/s of the naive loop and of ``resserve train``'s."""

    model: str
    batch_size: int
    steps: int
    threads: int  # torch's
    rows: list[TrainingConfigResult]
    speedup: float  # resserve train's images/s over the naive loop's
    torch: str


@dataclass(frozen=True)
class ModelBenchmark:
    """``bench model``'s results: every runner of one network, and the ratios the docs quote."""

    model: str  # the package's name
    rows: list[RunnerResult]
    ratios: dict[str, float]  # e.g. onnx_fp32_over_eager_unfolded_batch64
    threads: dict[str, int]  # torch's and ONNX Runtime's
    versions: dict[str, str]  # of the libraries measured


def _images_per_second(mnist: MNIST, steps: int, warmup: int, batch_size: int,
                       channels_last: bool, bf16: bool) -> float:
    torch.manual_seed(0)
    model = build_model(lecture_config()).train()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    generator = torch.Generator().manual_seed(0)
    stream = batches(mnist.train, batch_size, generator)
    started, seen = 0.0, 0
    for step in range(warmup + steps):
        if step == warmup:
            started, seen = time.perf_counter(), 0
        images, labels = next(stream)
        x = to_input(images).contiguous(memory_format=memory_format)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(labels)
    return seen / (time.perf_counter() - started)


def benchmark_training(mnist: MNIST, steps: int, warmup: int, batch_size: int) -> TrainingBenchmark:
    """Images/s of the naive loop (fp32, NCHW) and of what ``resserve train`` does on this CPU."""
    fast_bf16 = cpu_has_fast_bf16()
    naive = _images_per_second(mnist, steps, warmup, batch_size, channels_last=False, bf16=False)
    fast = _images_per_second(mnist, steps, warmup, batch_size, channels_last=True, bf16=fast_bf16)
    return TrainingBenchmark(
        model="resnet (lecture, 117,802 parameters)", batch_size=batch_size, steps=steps,
        threads=torch.get_num_threads(),
        rows=[TrainingConfigResult("naive: fp32, NCHW, eager", round(naive, 1)),
              TrainingConfigResult(f"resserve train: {'bf16 autocast' if fast_bf16 else 'fp32'}, channels_last",
                                   round(fast, 1))],
        speedup=round(fast / naive, 2), torch=torch.__version__)


def print_training_benchmark(results: TrainingBenchmark) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("configuration", "images/s", title=f"Training throughput, {results.model}, "
                  f"batch {results.batch_size}, {results.threads} threads")
    for row in results.rows:
        table.add_row(row.config, f"{row.images_per_second:.1f}")
    print_unsqueezed(table)
    Console().print(f"speedup: {results.speedup:.2f}x")


# ----------------------------------------------------------------------------------------------
# resserve bench model: one network, every way of running it in-process


def _torch_runner(module: torch.nn.Module):
    def run(batch: np.ndarray) -> None:
        with torch.inference_mode():
            module(torch.from_numpy(batch))
    return run


def model_runners(checkpoint: Path | None, package: ModelPackage) -> dict[str, Runner]:
    """Name -> run(batch) for eager unfolded/folded (when the checkpoint is at hand) and each artifact."""
    runners: dict[str, Runner] = {}
    if checkpoint is not None:
        network = load_checkpoint(checkpoint).build()
        runners["eager, unfolded (PyTorch)"] = _torch_runner(network)
        runners["eager, BN folded (PyTorch)"] = _torch_runner(fold_for_inference(network))
    labels = {("torchscript", "fp32"): "TorchScript fp32", ("onnx", "fp32"): "ONNX Runtime fp32",
              ("onnx", "int8"): "ONNX Runtime int8"}
    for artifact in package.artifacts:
        model = package.read_verified(artifact)
        runners[labels[(artifact.format, artifact.precision)]] = open_backend(model, artifact.format).infer
    capabilities = openvino_cpu_capabilities()
    if capabilities is not None:
        onnx = package.read_verified(package.find("onnx"))
        for precision in ("fp32", "bf16") if "BF16" in capabilities else ("fp32",):
            runners[f"OpenVINO {precision}"] = OpenVinoBackend(onnx, precision).infer
    return runners


def benchmark_model(model: str, runners: dict[str, Runner], images: np.ndarray,
                    batch_sizes: tuple[int, ...] = (64, 256), seconds: float = 2.0,
                    on_runner: Callable[[str], None] = lambda name: None) -> ModelBenchmark:
    """Batch-1 latency and throughput at each batch size, for every runner, in this one process;
    ``model``: the package's name."""
    rows = measure_runners(runners, images, batch_sizes, seconds, on_runner)
    at_64 = {row.config: row.images_per_second[64] for row in rows if 64 in row.images_per_second}
    ratios = {}
    for key, faster, slower in (("onnx_fp32_over_eager_unfolded_batch64", "ONNX Runtime fp32", "eager, unfolded (PyTorch)"),
                                ("openvino_bf16_over_onnx_fp32_batch64", "OpenVINO bf16", "ONNX Runtime fp32"),
                                ("int8_over_onnx_fp32_batch64", "ONNX Runtime int8", "ONNX Runtime fp32")):
        if faster in at_64 and slower in at_64:
            ratios[key] = round(at_64[faster] / at_64[slower], 2)
    return ModelBenchmark(model, rows, ratios, threads={"torch": torch.get_num_threads(), "onnxruntime": usable_cpus()},
                          versions=library_versions())


def print_model_benchmark(results: ModelBenchmark) -> None:
    from rich.console import Console
    from rich.table import Table

    sizes = list(results.rows[0].images_per_second)
    table = Table("configuration", "batch 1 latency (ms)", *(f"batch {size} images/s" for size in sizes),
                  title=f"In-process inference, {results.model}")
    for row in results.rows:
        table.add_row(row.config, f"{row.batch1_latency_ms:.3f}", *(f"{row.images_per_second[size]:.0f}" for size in sizes))
    print_unsqueezed(table)
    console = Console()
    for name, value in results.ratios.items():
        console.print(f"{name}: {value:.2f}x")

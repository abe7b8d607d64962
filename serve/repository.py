"""The models a server holds: each a verified package, a warmed-up backend and its batcher."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from resserve.serve.backends import Backend, open_backend
from resserve.serve.backends.openvino import openvino_cpu_capabilities
from resserve.serve.batcher import BatchStats, DynamicBatcher
from resserve.serve.errors import ModelNotFound, ResserveError
from resserve.serve.metrics import Metrics
from resserve.serve.package import ModelPackage, load_package
from resserve.serve.runtime import choose_runtime
from resserve.serve.settings import BackendChoice, ServerSettings
from resserve.serve.statistics import ModelStatistics

log = logging.getLogger("resserve.serve")

# Triton's platform names, by backend
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "openvino": "openvino", "torchscript": "pytorch_libtorch"}


@dataclass
class ServedModel:
    package: ModelPackage
    backend: Backend
    batcher: DynamicBatcher
    statistics: ModelStatistics  # fed by the batcher's callback, which _load_one wires up

    @property
    def name(self) -> str:
        return self.package.name

    @property
    def version(self) -> str:
        return self.package.version

    @property
    def platform(self) -> str:
        return PLATFORMS[self.backend.name]


class ModelRepository:
    def __init__(self, models: list[ServedModel]) -> None:
        self.models = {m.name: m for m in models}
        self.default = models[0].name

    def get(self, name: str = "", version: str = "") -> ServedModel:
        """The model called ``name`` ('' for the default) at ``version`` ('' for the current one)."""
        model = self.models.get(name or self.default)
        if model is None:
            raise ModelNotFound(f"unknown model {name!r}; this server has {', '.join(sorted(self.models))}")
        if version and version != model.version:
            raise ModelNotFound(f"model {model.name!r} has version {model.version}, not {version!r}")
        return model


def _load_one(package: ModelPackage, settings: ServerSettings, capabilities: set[str] | None,
              executor: Executor, metrics: Metrics) -> ServedModel:
    manifest = package.manifest
    choice = choose_runtime(settings.backend, settings.precision, settings.device, manifest, capabilities)
    artifact = package.find(choice.artifact_format, "fp32")
    model_bytes = package.read_verified(artifact)  # a sha256 mismatch refuses to start
    started = time.monotonic()
    backend = open_backend(model_bytes, artifact.format, choice.backend, settings.device, choice.precision,
                           settings.inference_threads, settings.cuda_conv_search.value, settings.cuda_graphs,
                           settings.thread_spinning)
    log.info("model %s runs on %s in %s: %s", package.name, choice.backend, choice.precision, choice.reason)
    if settings.device == "auto" and backend.device == "cpu":
        log.info("--device auto: no CUDA available to %s, running %s on the CPU", backend.name, package.name)
    batching = settings.batching.for_device(backend.device)
    backend.specialize(batching.buckets)
    warm = np.zeros((batching.max_batch_size, 1, 28, 28), dtype=np.float32)
    for size in batching.shapes():  # with buckets, every shape a batch can take: nothing compiles after ready
        backend.infer(warm[:size])
    name, statistics = package.name, ModelStatistics()

    def record(stats: BatchStats) -> None:
        statistics.record_batch(stats)
        metrics.batch_size.labels(name).observe(stats.size)
        metrics.inference_time.labels(name).observe(stats.infer_seconds)
        for seconds in stats.queue_seconds:
            metrics.queue_time.labels(name).observe(seconds)
        metrics.queue_depth.labels(name).set(batcher.queue_depth)  # a value, not a function: workers share it

    batcher = DynamicBatcher(backend.infer, batching, executor, on_batch=record)
    metrics.model_info.labels(name, package.version, backend.name, backend.device, backend.precision).set(1)
    log.info("loaded model %s version %s: %s on %s (%s, %s), warmed up at batch %s in %.2f s", name,
             package.version, artifact.file, backend.name, backend.device, backend.precision,
             ",".join(map(str, batching.shapes())), time.monotonic() - started)
    return ServedModel(package, backend, batcher, statistics)


def read_packages(settings: ServerSettings) -> list[ModelPackage]:
    """The packages to serve, their manifests read and checked (nothing loaded yet)."""
    packages = [load_package(p) for p in settings.packages] or [load_package()]
    names = [p.name for p in packages]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ResserveError(f"two packages are called {', '.join(duplicates)}; export one with --name")
    return packages


def load_repository(packages: list[ModelPackage], settings: ServerSettings, executor: Executor,
                    metrics: Metrics) -> ModelRepository:
    """Verify, load and warm every package's artifact."""
    wants_openvino = settings.backend in (BackendChoice.AUTO, BackendChoice.OPENVINO)
    capabilities = openvino_cpu_capabilities() if wants_openvino else None
    return ModelRepository([_load_one(p, settings, capabilities, executor, metrics) for p in packages])

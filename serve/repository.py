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
from resserve.serve.package import ModelPackage, load_package, package_paths
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

    @property
    def info_labels(self) -> tuple[str, str, str, str, str]:
        """Its labels in ``resserve_model_info``."""
        return self.name, self.version, self.backend.name, self.backend.device, self.backend.precision


class ModelRepository:
    """The served models by name, each at one or more versions. A request that names no version
    gets the latest (the highest number), as under Triton's version policy ``all``; one that
    names no model gets the first loaded of those given at start. Models unloaded through the API
    (serve/control.py) are known by name, and refused as such."""

    def __init__(self, models: list[ServedModel], names: tuple[str, ...] = ()) -> None:
        self.names = names or tuple(dict.fromkeys(m.name for m in models))  # every model, in the order given
        rank = {name: index for index, name in enumerate(self.names)}
        self.models = tuple(sorted(models, key=lambda m: rank[m.name]))  # every version loaded, in that order
        self._versions: dict[str, list[ServedModel]] = {}  # name -> its versions, latest first
        for model in self.models:
            self._versions.setdefault(model.name, []).append(model)
        for versions in self._versions.values():
            versions.sort(key=lambda m: version_order(m.version), reverse=True)
        self.default = next((name for name in self.names if name in self._versions), "")

    @property
    def unloaded(self) -> list[str]:
        """The models known but not loaded: unloaded through the API, in the order given."""
        return [name for name in self.names if name not in self._versions]

    def __contains__(self, name: str) -> bool:
        return name in self._versions

    def versions(self, name: str) -> list[ServedModel]:
        """Every version of the model called ``name`` ('' for the default), latest first."""
        name = name or self.default
        versions = self._versions.get(name)
        if versions is None:
            raise ModelNotFound(self._missing(name))
        return list(versions)

    def _missing(self, name: str) -> str:
        if name in self.unloaded:
            return (f"model {name!r} is unloaded; RepositoryModelLoad (POST /v2/repository/models/{name}/load) "
                    "loads it again")
        has = ", ".join(sorted(self._versions)) or "no model loaded"
        return f"unknown model {name!r}; this server has {has}" if name else f"this server has {has}"

    def get(self, name: str = "", version: str = "") -> ServedModel:
        """The model called ``name`` ('' for the default) at ``version`` ('' for the latest)."""
        versions = self.versions(name)
        if not version:
            return versions[0]
        for model in versions:
            if model.version == version:
                return model
        served = ", ".join(m.version for m in reversed(versions))
        raise ModelNotFound(f"model {versions[0].name!r} has {'versions' if len(versions) > 1 else 'version'} "
                            f"{served}, not {version!r}")

    def with_versions(self, name: str, models: list[ServedModel]) -> ModelRepository:
        """This repository with the versions of ``name`` replaced by ``models``: a model loaded
        again, or unloaded (none)."""
        kept = [m for m in self.models if m.name != name]
        names = self.names if name in self.names else (*self.names, name)  # a package renamed in place
        return ModelRepository(kept + models, names)

    def select(self, name: str = "", version: str = "") -> list[ServedModel]:
        """What a statistics request asks for: every model (no name), every version of one (no version), or one."""
        if not name:
            return list(self.models)
        return [self.get(name, version)] if version else self.versions(name)


def version_order(version: str) -> int:
    """Versions of one model served together are whole numbers (``read_packages`` checks it)."""
    return int(version) if version.isdecimal() else 0


def _load_one(package: ModelPackage, settings: ServerSettings, capabilities: set[str] | None,
              executor: Executor, metrics: Metrics) -> ServedModel:
    manifest = package.manifest
    choice = choose_runtime(settings.backend, settings.precision, settings.device, manifest, capabilities)
    artifact = package.find(choice.artifact_format, choice.artifact_precision)
    model_bytes = package.read_verified(artifact)  # a sha256 mismatch refuses to start
    started, device = time.monotonic(), choice.device(settings.device)
    backend = open_backend(model_bytes, artifact.format, choice.backend, device, choice.precision,
                           settings.inference_threads, settings.cuda, settings.thread_spinning)
    log.info("model %s runs on %s in %s: %s", package.name, choice.backend, choice.precision, choice.reason)
    if device == "auto" and backend.device == "cpu":
        log.info("--device auto: no CUDA available to %s, running %s on the CPU", backend.name, package.name)
    batching = settings.batching.for_device(backend.device)
    backend.specialize(batching.buckets)
    warm_up(backend, batching.shapes(), executor)
    name, version = package.name, package.version
    triton = metrics.triton.of(name, version)
    statistics = ModelStatistics(on_request=triton.request)

    def record(stats: BatchStats) -> None:
        statistics.record_batch(stats)
        triton.batch(stats)
        metrics.batch_size.labels(name, version).observe(stats.size)
        metrics.inference_time.labels(name, version).observe(stats.infer_seconds)
        for seconds in stats.queue_seconds:
            metrics.queue_time.labels(name, version).observe(seconds)
        metrics.set_queue_depth(name, version, batcher.queue_depth)  # a value, not a function: workers share it

    batcher = DynamicBatcher(backend.infer, batching, executor, on_batch=record)
    model = ServedModel(package, backend, batcher, statistics)
    metrics.model_info.labels(*model.info_labels).set(1)
    # on the CPU, the threads its share of the usable CPUs gave: what a container's CPU quota allowed
    count = settings.inference_threads
    threads = f", {count} thread{'s' * (count != 1)}" if backend.device == "cpu" else ""
    log.info("loaded model %s version %s: %s on %s (%s, %s%s), warmed up at batch %s in %.2f s", name,
             version, artifact.file, backend.name, backend.device, backend.precision, threads,
             ",".join(map(str, batching.shapes())), time.monotonic() - started)
    return model


def warm_up(backend: Backend, shapes: tuple[int, ...], executor: Executor) -> None:
    """Run each of ``shapes`` (with buckets, every shape a batch can take) before the model takes
    a request: here first, where cuDNN's algorithm search, CUDA graphs' capture and ONNX Runtime's
    memory plans are paid, then once more on the inference thread that will serve them, since
    ONNX Runtime's CUDA provider keeps its handles and captured graphs per thread (there, the
    first batch of each bucket cost 10-25 ms on an H200 when only the loading thread had run it)."""
    warm = np.zeros((max(shapes), 1, 28, 28), dtype=np.float32)

    def run_each() -> None:
        for size in shapes:
            backend.infer(warm[:size])

    run_each()
    executor.submit(run_each).result()


def read_packages(settings: ServerSettings) -> list[ModelPackage]:
    """The packages to serve, those in folders of packages as they are now, their manifests read and
    checked (nothing loaded yet): one name may come at several versions, whole numbers so that one
    of them is the latest."""
    packages = [load_package(p) for p in package_paths(settings.packages)] or [load_package()]
    paths: dict[tuple[str, str], list[str]] = {}  # (name, version) -> the packages that are it
    for package in packages:
        paths.setdefault((package.name, package.version), []).append(str(package.path))
    twice = [f"{name} version {version} ({' and '.join(where)})" for (name, version), where in sorted(paths.items())
             if len(where) > 1]
    if twice:
        raise ResserveError(f"two packages are {'; '.join(twice)}: export one with another --name or --version")
    for name in dict.fromkeys(p.name for p in packages):
        versions = [version for named, version in paths if named == name]
        numbered = all(v.isdecimal() for v in versions) and len({int(v) for v in versions}) == len(versions)
        if len(versions) > 1 and not numbered:
            raise ResserveError(f"model {name} comes at versions {', '.join(versions)}: versions served side by side "
                                "must be distinct whole numbers (export --version 2), so the latest answers requests "
                                "that name no version")
    return packages


def load_repository(packages: list[ModelPackage], settings: ServerSettings, executor: Executor,
                    metrics: Metrics, unloaded: frozenset[str] = frozenset()) -> ModelRepository:
    """Verify, load and warm every package's artifact, but those of the models ``unloaded``
    through the API (a worker restarted after an unload)."""
    wants_openvino = settings.backend in (BackendChoice.AUTO, BackendChoice.OPENVINO)
    capabilities = openvino_cpu_capabilities() if wants_openvino else None
    return ModelRepository([_load_one(p, settings, capabilities, executor, metrics) for p in packages
                            if p.name not in unloaded], tuple(dict.fromkeys(p.name for p in packages)))

"""OpenVINO: ONNX artifacts compiled for the CPU, in fp32 or bf16 (AMX on recent Xeons)."""

from __future__ import annotations

import threading

import numpy as np

from resserve.serve.backends.base import BackendError, ModelSource, Outputs, describe, usable_cpus

OPENVINO_HINT = "the OpenVINO backend needs the openvino extra: pip install 'resserve[openvino]'"


def openvino_cpu_capabilities() -> set[str] | None:
    """OpenVINO's CPU optimization capabilities ("BF16" on AMX / AVX512-BF16 CPUs); None without OpenVINO."""
    try:
        import openvino as ov
    except ImportError:
        return None
    return set(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


class OpenVinoBackend:
    """Two compilations of the same network: one with a dynamic batch on every usable CPU, and one
    for a single image, with a static shape and one thread.

    A 28x28 image is too little work to split: handing it between threads and re-planning a
    dynamic shape cost more than the convolutions (measured here: bf16 batch-1 latency 0.51 ms
    this way, 0.90 ms through the dynamic model on 2 threads; docs/benchmarks.md). Each compiled
    model keeps one reused infer request; a lock keeps them safe if threads share the backend
    (the batcher runs one batch at a time anyway).
    """

    name = "openvino"
    device = "cpu"

    def __init__(self, model: ModelSource, precision: str = "fp32", threads: int | None = None) -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise BackendError(OPENVINO_HINT) from exc
        if precision not in ("fp32", "bf16"):
            raise BackendError(f"OpenVINO precision must be fp32 or bf16, got {precision!r}")
        self.precision = precision
        core = ov.Core()
        try:
            network = core.read_model(model if isinstance(model, bytes) else str(model))
            batched = self._compile(core, network, threads or usable_cpus())
            single_network = network.clone()  # the artifact is read once
            shape = single_network.input(0).get_partial_shape()
            shape[0] = 1
            single_network.reshape({single_network.input(0): shape})
            single = self._compile(core, single_network, 1)
        except RuntimeError as exc:
            raise BackendError(f"OpenVINO cannot compile {describe(model)}: {str(exc).splitlines()[0]}") from exc
        self.output_names = [o.get_any_name() for o in batched.outputs]  # the same in both compilations
        self.batched_request, self.single_request = batched.create_infer_request(), single.create_infer_request()
        self.lock = threading.Lock()

    def _compile(self, core, network, threads: int):
        config = {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "bf16" if self.precision == "bf16" else "f32",
            "INFERENCE_NUM_THREADS": threads,
            "NUM_STREAMS": 1,
        }
        return core.compile_model(network, "CPU", config)

    def specialize(self, batch_sizes: tuple[int, ...]) -> None:
        """Nothing to prepare per batch size."""

    def infer(self, batch: np.ndarray) -> Outputs:
        request = self.single_request if len(batch) == 1 else self.batched_request
        with self.lock:
            result = request.infer({0: batch})
            return {name: np.array(result[index], dtype=np.float32) for index, name in enumerate(self.output_names)}

"""ONNX Runtime: the default backend, on the CPU or on CUDA (onnxruntime-gpu)."""

from __future__ import annotations

import logging
import os
from functools import cache
from importlib import metadata
from types import ModuleType

import numpy as np

from resserve.serve.backends.base import BackendError, CudaOptions, ModelSource, Outputs, describe, usable_cpus

log = logging.getLogger("resserve.serve")

INSTALL_HINT = "pip install 'resserve[cpu]' (or 'resserve[gpu]' for NVIDIA GPUs)"
# onnxruntime and onnxruntime-gpu are two wheels of one module: installed into the same
# site-packages, whichever came last owns the files, and uninstalling either breaks the other.
CLASH_HINT = ("onnxruntime and onnxruntime-gpu are both installed (two wheels of one module); "
              "pip uninstall -y onnxruntime onnxruntime-gpu, then pip install 'resserve[gpu]' (or [cpu])")
GPU_HINT = "install the CUDA build in its place: pip uninstall -y onnxruntime && pip install 'resserve[gpu]'"


def installed_wheels() -> dict[str, str]:
    """The ONNX Runtime distributions on the path (onnxruntime, onnxruntime-gpu) and the directory
    each is installed in."""
    found = {}
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            found[name] = str(metadata.distribution(name).locate_file(""))
        except metadata.PackageNotFoundError:
            pass
    return found


@cache
def import_onnxruntime() -> ModuleType:
    """The onnxruntime module, or a one-line error that names the install. Both wheels in one
    directory is a broken install; in two (one on PYTHONPATH) the first on the path wins cleanly.

    ONNX Runtime's official Linux builds collect usage telemetry (a persistent device ID and an
    event cache under ~/.cache/Microsoft, uploaded to Microsoft) unless ORT_DISABLE_TELEMETRY=1 is
    set before it starts. A server should not report home by default: it is set here, before the
    import, unless the user set ORT_DISABLE_TELEMETRY themselves (0 allows it). Cached: the
    distributions on the path are read once per process, not at every session."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    wheels = installed_wheels()
    if len(wheels) > 1 and len(set(wheels.values())) == 1:
        raise BackendError(CLASH_HINT)
    try:
        import onnxruntime
    except ImportError as exc:
        if not wheels:
            raise BackendError(f"ONNX Runtime is not installed: {INSTALL_HINT}") from exc
        raise BackendError(_broken_install(next(iter(wheels)), exc)) from exc
    return onnxruntime


def _broken_install(wheel: str, exc: ImportError) -> str:
    """Installed, but it does not import: most often a wheel built for another numpy major (it
    prints why above), which a newer ONNX Runtime mends."""
    detail = f": {exc}" if str(exc) else " (the lines above say why)"
    return (f"{wheel} {metadata.version(wheel)} is installed but cannot be imported{detail}; a newer one "
            f"usually mends that: pip install -U {wheel}")


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
# TF32 off unless asked for (--cuda-tf32): the CUDA provider's default rounds fp32 convolutions'
# inputs to TF32 on Ampere and later, which moved logits by up to 1.7e-2 from the CPU's on an H200
# (the GPU check's parity): an artifact reported as fp32 runs in fp32.


def providers_for(device: str, cuda: CudaOptions = CudaOptions()) -> list:
    """Execution providers for ``device`` (cpu | cuda | auto: CUDA where this ONNX Runtime has
    it), CUDA with ``cuda``'s algorithm search and TF32 choice."""
    ort = import_onnxruntime()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        if device == "cuda":
            raise BackendError(f"--device cuda: {cuda_unavailable_reason()}")
        return ["CPUExecutionProvider"]
    _preload_cuda_libraries()
    options = {"cudnn_conv_algo_search": cuda.conv_search, "use_tf32": "1" if cuda.tf32 else "0"}
    return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]


class StaticShapeSession:
    """A session for one batch size, its input and outputs bound once to buffers on the device
    (IO binding). Where its providers enable CUDA graphs (``enable_cuda_graph``), ONNX Runtime
    records the whole network as a CUDA graph after a first run and replays it after that: one
    launch instead of one per kernel, which is most of a small batch's time on a GPU (issue 14's
    in-process trial on an H100, host copies included: batch 1 1.09 -> 0.56 ms, batch 64 2.34 ->
    1.49 ms). A replayed graph reads and writes the same addresses, hence the
    fixed buffers; the batch size is fixed in the session too, so every shape computation is
    folded away and no node falls back to the CPU. Buffers are filled from pageable host memory:
    the copies are at most a few MB, and pinned (host-accessible) memory comes only through ONNX
    Runtime's newer execution-provider device API, not yet tried on a GPU here."""

    def __init__(self, ort: ModuleType, model: bytes | str, options, providers: list, batch_dimension: str,
                 batch_size: int, device: str) -> None:
        options.add_free_dimension_override_by_name(batch_dimension, batch_size)
        self.session = ort.InferenceSession(model, options, providers=providers)
        self.binding = self.session.io_binding()
        buffer = lambda shape: ort.OrtValue.ortvalue_from_shape_and_type([batch_size, *shape[1:]], np.float32, device, 0)
        (spec,) = self.session.get_inputs()
        self.input = buffer(spec.shape)
        self.binding.bind_ortvalue_input(spec.name, self.input)
        self.outputs = {o.name: buffer(o.shape) for o in self.session.get_outputs()}
        for name, value in self.outputs.items():
            self.binding.bind_ortvalue_output(name, value)
        for _ in range(2):  # ONNX Runtime captures the graph after a first plain run: both happen here
            self.session.run_with_iobinding(self.binding)

    def infer(self, batch: np.ndarray) -> Outputs:
        self.input.update_inplace(np.ascontiguousarray(batch, dtype=np.float32))
        self.session.run_with_iobinding(self.binding)
        # copies: the buffers are overwritten by the next batch, while these outputs travel on
        return {name: np.array(value.numpy()) for name, value in self.outputs.items()}


class OnnxRuntimeBackend:
    """An ONNX Runtime session on ``device`` (cpu | cuda | auto); on CUDA, as ``cuda`` says, and
    once the batch sizes are fixed (``specialize``), one captured CUDA graph per size.

    ``thread_spinning``: ONNX Runtime's intra-op threads spin while idle (its default), so the next
    batch starts without waking them; off, they sleep, and CPU use follows load. ``precision``: what
    the artifact is (fp32, or int8 for export's quantized one), as reported; it runs as it is, but
    for fp32 on CUDA with TF32, reported as tf32."""

    name = "onnxruntime"

    def __init__(self, model: ModelSource, device: str = "cpu", threads: int | None = None,
                 cuda: CudaOptions = CudaOptions(), thread_spinning: bool = True, precision: str = "fp32") -> None:
        self.ort = import_onnxruntime()
        self.model = model if isinstance(model, bytes) else str(model)
        self.threads, self.cuda, self.thread_spinning = threads, cuda, thread_spinning
        providers = providers_for(device, cuda)
        try:
            self.session = self.ort.InferenceSession(self.model, self.session_options(), providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise BackendError(f"ONNX Runtime cannot load {describe(model)}: {str(exc).splitlines()[0]}") from exc
        active = self.session.get_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in active:
            raise BackendError(f"--device cuda: ONNX Runtime could not start CUDA for {describe(model)} "
                               f"(active: {active}; it needs an NVIDIA driver for CUDA 13)")
        self.device = "cuda" if "CUDAExecutionProvider" in active else "cpu"
        self.precision = "tf32" if self.device == "cuda" and cuda.tf32 and precision == "fp32" else precision
        self.input_name = self.session.get_inputs()[0].name
        self.batch_dimension = self.session.get_inputs()[0].shape[0]  # its symbolic name ("batch")
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.static: dict[int, StaticShapeSession] = {}

    def session_options(self):
        options = self.ort.SessionOptions()
        options.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.threads or usable_cpus()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # warnings and above only; errors surface as exceptions
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.thread_spinning else "0")
        return options

    def specialize(self, batch_sizes: tuple[int, ...]) -> None:
        """On CUDA with ``cuda.graphs``: a captured-graph session for each of ``batch_sizes`` (the
        batcher's shape buckets); other sizes keep running on the dynamic session. A size whose
        graph cannot be captured runs without one, and the log says why."""
        if self.device != "cuda" or not self.cuda.graphs:
            return
        cuda, options = providers_for("cuda", self.cuda)[0]
        providers = [(cuda, {**options, "enable_cuda_graph": "1"}), "CPUExecutionProvider"]
        for size in batch_sizes:
            try:
                self.static[size] = StaticShapeSession(self.ort, self.model, self.session_options(), providers,
                                                       self.batch_dimension, size, "cuda")
            except Exception as exc:  # noqa: BLE001 - onnxruntime's untyped errors; the dynamic session stays
                log.warning("no CUDA graph for batch %d, running it without one: %s", size, str(exc).splitlines()[0])
        if self.static:
            log.info("CUDA graphs for batch %s", ",".join(map(str, self.static)))

    def infer(self, batch: np.ndarray) -> Outputs:
        static = self.static.get(len(batch))
        if static is not None:
            return static.infer(batch)
        outputs = self.session.run(self.output_names, {self.input_name: batch})
        return dict(zip(self.output_names, outputs))

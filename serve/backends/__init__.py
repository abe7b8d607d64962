"""Inference backends. A new backend is one module here that meets ``Backend`` (base.py) and one
line in ``open_backend``; the runtime choice (serve/runtime.py) decides when it is used."""

from __future__ import annotations

from resserve.serve.backends.base import Backend, BackendError, CudaOptions, ModelSource


def open_backend(model: ModelSource, format: str, runtime: str = "onnxruntime", device: str = "cpu",
                 precision: str = "fp32", threads: int | None = None, cuda: CudaOptions = CudaOptions(),
                 thread_spinning: bool = True) -> Backend:
    """The backend for an artifact of ``format`` (onnx | torchscript); ONNX runs on ``runtime``
    (``cuda``: how ONNX Runtime runs on CUDA; ``thread_spinning``: idle inference threads spin, in
    ONNX Runtime and TorchScript; OpenVINO's sleep between batches either way).

    Each backend module is imported only when chosen, so a server never loads a runtime it does
    not use (torch above all)."""
    if format == "onnx" and runtime == "openvino":
        from resserve.serve.backends.openvino import OpenVinoBackend

        return OpenVinoBackend(model, precision, threads)
    if format == "onnx":
        from resserve.serve.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(model, device, threads, cuda, thread_spinning, precision)
    if format == "torchscript":
        from resserve.serve.backends.torchscript import TorchScriptBackend

        return TorchScriptBackend(model, device, threads, thread_spinning)
    raise BackendError(f"no backend for artifact format {format!r}")

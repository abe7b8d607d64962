"""TorchScript: needs torch, which the serving install does not bring."""

from __future__ import annotations

import io
import os
import warnings

import numpy as np

from resserve.serve.backends.base import BackendError, ModelSource, Outputs, describe

TORCH_HINT = "the TorchScript backend needs torch: pip install 'resserve[train]'"
GRAPH_OUTPUTS = ("logits", "probabilities")  # what every exported graph returns, in order (train/export.py)


class TorchScriptBackend:
    """A TorchScript module on the CPU (or CUDA). TorchScript keeps no output names: they are the graph's, in order.

    ``thread_spinning`` off: torch's OpenMP threads sleep between batches (OMP_WAIT_POLICY=PASSIVE,
    unless the user set it), so CPU use follows load. OpenMP reads it when torch loads, so it
    holds where this backend is the first to import torch, as in a server."""

    name = "torchscript"
    precision = "fp32"

    def __init__(self, model: ModelSource, device: str = "cpu", threads: int | None = None,
                 thread_spinning: bool = True) -> None:
        if not thread_spinning:
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        try:
            import torch
        except ImportError as exc:
            raise BackendError(TORCH_HINT) from exc
        self.torch = torch
        if threads:
            torch.set_num_threads(threads)
        if device == "cuda" and not torch.cuda.is_available():
            raise BackendError("--device cuda: torch sees no CUDA device")
        self.device = "cuda" if device in ("cuda", "auto") and torch.cuda.is_available() else "cpu"
        source = io.BytesIO(model) if isinstance(model, bytes) else str(model)
        try:
            with warnings.catch_warnings():  # torch.jit is deprecated in 2.14; the format is what users asked for
                warnings.simplefilter("ignore", FutureWarning)
                self.module = torch.jit.load(source, map_location=torch.device(self.device)).eval()
        except RuntimeError as exc:
            raise BackendError(f"torch cannot load {describe(model)}: {str(exc).splitlines()[0]}") from exc

    def specialize(self, batch_sizes: tuple[int, ...]) -> None:
        """Nothing to prepare per batch size."""

    def infer(self, batch: np.ndarray) -> Outputs:
        with self.torch.inference_mode():
            outputs = self.module(self.torch.from_numpy(batch).to(self.device))
        return {name: out.cpu().numpy() for name, out in zip(GRAPH_OUTPUTS, outputs)}

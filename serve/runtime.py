"""Which backend and precision run a model: the choice behind ``--backend`` and ``--precision``.

``auto`` picks OpenVINO in bf16 where OpenVINO is installed, the CPU reports BF16 among its
optimization capabilities (AMX or AVX512-BF16) and the package's manifest shows that bf16
loses at most 0.1 accuracy points on the MNIST test set; otherwise ONNX Runtime in fp32.
Reduced precision is never used against the manifest's accuracy guard: a request for it falls
back to fp32 and says why.
"""

from __future__ import annotations

from dataclasses import dataclass

from resserve.serve.backends import OPENVINO_HINT
from resserve.serve.errors import ResserveError

BACKENDS = ("auto", "onnxruntime", "openvino", "torchscript")
PRECISIONS = ("auto", "fp32", "bf16")
MAX_BF16_LOSS = 0.001  # accuracy fraction: 0.1 points


@dataclass(frozen=True)
class RuntimeChoice:
    backend: str  # onnxruntime | openvino | torchscript
    precision: str  # fp32 | bf16
    reason: str  # why, for the log

    @property
    def artifact_format(self) -> str:
        return "torchscript" if self.backend == "torchscript" else "onnx"


def bf16_guard(manifest: dict) -> tuple[bool, str]:
    """Whether the manifest allows bf16, and the evidence."""
    measured = (manifest.get("reduced_precision") or {}).get("bf16")
    if not measured or "accuracy_loss" not in measured:
        return False, "the package has no bf16 accuracy measurement (export it where OpenVINO is installed)"
    loss = measured["accuracy_loss"]
    if loss > MAX_BF16_LOSS:
        return False, f"bf16 loses {loss * 100:.2f} accuracy points on MNIST test (allowed {MAX_BF16_LOSS * 100:.1f})"
    return True, f"bf16 loses {loss * 100:.2f} accuracy points on MNIST test"


def choose_runtime(backend: str, precision: str, device: str, manifest: dict,
                   capabilities: set[str] | None) -> RuntimeChoice:
    """``capabilities``: OpenVINO's CPU capabilities, or None where OpenVINO is not installed."""
    if backend not in BACKENDS:
        raise ResserveError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if precision not in PRECISIONS:
        raise ResserveError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if backend in ("onnxruntime", "torchscript"):
        if precision == "bf16":
            raise ResserveError(f"--precision bf16 needs --backend openvino (or auto), not {backend}")
        return RuntimeChoice(backend, "fp32", f"--backend {backend}")
    if backend == "openvino":
        if capabilities is None:
            raise ResserveError(OPENVINO_HINT)
        if device == "cuda":
            raise ResserveError("--backend openvino runs on the CPU; use --device cpu or --backend onnxruntime")
        if precision == "fp32":
            return RuntimeChoice("openvino", "fp32", "--backend openvino --precision fp32")
        return _openvino_bf16_or_fp32(manifest, capabilities)
    # auto
    if device == "cuda":
        return RuntimeChoice("onnxruntime", "fp32", "--device cuda: ONNX Runtime's CUDA provider")
    if capabilities is None:
        return RuntimeChoice("onnxruntime", "fp32", "OpenVINO is not installed")
    if precision == "fp32":
        return RuntimeChoice("onnxruntime", "fp32", "--precision fp32")
    choice = _openvino_bf16_or_fp32(manifest, capabilities)
    if choice.precision == "bf16":
        return choice
    return RuntimeChoice("onnxruntime", "fp32", choice.reason)


def _openvino_bf16_or_fp32(manifest: dict, capabilities: set[str]) -> RuntimeChoice:
    if "BF16" not in capabilities:
        return RuntimeChoice("openvino", "fp32", "this CPU reports no BF16 support (needs AMX or AVX512-BF16)")
    allowed, evidence = bf16_guard(manifest)
    return RuntimeChoice("openvino", "bf16" if allowed else "fp32", evidence)

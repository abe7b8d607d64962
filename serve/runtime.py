"""Which backend and precision run a model: the choice behind ``--backend`` and ``--precision``.

``auto`` picks OpenVINO in bf16 where OpenVINO is installed, the CPU reports BF16 among its
optimization capabilities (AMX or AVX512-BF16) and the package's manifest shows that bf16
loses at most 0.1 accuracy points on the MNIST test set; otherwise ONNX Runtime in fp32.
``--precision int8`` runs the package's int8 artifact (``export --quantize int8``, kept only when
it loses at most 0.1 points) on ONNX Runtime on the CPU. Reduced precision is never used against
the manifest's accuracy guard: a request for it falls back to fp32 and says why. The settings
arrive validated (serve/settings.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from resserve.serve.backends.openvino import OPENVINO_HINT
from resserve.serve.errors import ResserveError
from resserve.serve.manifest import Manifest
from resserve.serve.settings import BackendChoice, Device, Precision

MAX_BF16_LOSS = 0.001  # accuracy fraction: 0.1 points


@dataclass(frozen=True)
class RuntimeChoice:
    backend: str  # onnxruntime | openvino | torchscript
    precision: str  # fp32 | bf16 | int8
    reason: str  # why, for the log

    @property
    def artifact_format(self) -> str:
        return "torchscript" if self.backend == BackendChoice.TORCHSCRIPT else "onnx"

    @property
    def artifact_precision(self) -> str:
        """int8 is an artifact of its own; bf16 is the fp32 artifact, compiled in bf16 by OpenVINO."""
        return "int8" if self.precision == "int8" else "fp32"

    def device(self, asked: Device) -> str:
        """Where to run: int8 on the CPU, whatever ``--device auto`` would find; else as asked."""
        return "cpu" if self.precision == "int8" else str(asked)


def accuracy_change(precision: str, loss: float) -> str:
    """What ``precision`` costs in accuracy, as a log line says it ("gains" where export measured it
    above fp32, as bf16's rounding sometimes is on one or two of the 10,000 test images)."""
    points = round(loss * 100, 2)  # a difference of float accuracies can be -1e-17: "loses 0.00"
    return f"{precision} {'gains' if points < 0 else 'loses'} {abs(points):.2f} accuracy points on MNIST test"


def bf16_guard(manifest: Manifest) -> tuple[bool, str]:
    """Whether the manifest allows bf16, and the evidence."""
    measured = manifest.bf16()
    if measured is None or measured.accuracy_loss is None:
        return False, "the package has no bf16 accuracy measurement (export it where OpenVINO is installed)"
    loss = measured.accuracy_loss
    if loss > MAX_BF16_LOSS:
        return False, f"{accuracy_change('bf16', loss)} (allowed {MAX_BF16_LOSS * 100:.1f})"
    return True, accuracy_change("bf16", loss)


def int8_guard(manifest: Manifest) -> tuple[bool, str]:
    """Whether the package has an int8 artifact, which export keeps only within the accuracy
    guard, and the evidence."""
    report = manifest.int8
    if report is None:
        return False, "the package has no int8 artifact (export it with --quantize int8)"
    loss = accuracy_change("int8", report.accuracy_loss)
    if manifest.find("onnx", "int8") is None:
        return False, f"{loss}: more than export allows, so the package has no int8 artifact"
    return True, loss


def choose_runtime(backend: BackendChoice, precision: Precision, device: Device, manifest: Manifest,
                   capabilities: set[str] | None) -> RuntimeChoice:
    """``capabilities``: OpenVINO's CPU capabilities, or None where OpenVINO is not installed."""
    if precision == Precision.INT8:
        return _onnxruntime_int8_or_fp32(manifest)
    if backend in (BackendChoice.ONNXRUNTIME, BackendChoice.TORCHSCRIPT):
        return RuntimeChoice(str(backend), "fp32", f"--backend {backend}")
    if backend == BackendChoice.OPENVINO:
        if capabilities is None:
            raise ResserveError(OPENVINO_HINT)
        if precision == Precision.FP32:
            return RuntimeChoice("openvino", "fp32", "--backend openvino --precision fp32")
        return _openvino_bf16_or_fp32(manifest, capabilities)
    # auto
    if device == Device.CUDA:
        return RuntimeChoice("onnxruntime", "fp32", "--device cuda: ONNX Runtime's CUDA provider")
    if capabilities is None:
        return RuntimeChoice("onnxruntime", "fp32", "OpenVINO is not installed")
    if precision == Precision.FP32:
        return RuntimeChoice("onnxruntime", "fp32", "--precision fp32")
    choice = _openvino_bf16_or_fp32(manifest, capabilities)
    if choice.precision == "bf16":
        return choice
    return RuntimeChoice("onnxruntime", "fp32", choice.reason)


def _onnxruntime_int8_or_fp32(manifest: Manifest) -> RuntimeChoice:
    allowed, evidence = int8_guard(manifest)
    return RuntimeChoice("onnxruntime", "int8" if allowed else "fp32", evidence)


def _openvino_bf16_or_fp32(manifest: Manifest, capabilities: set[str]) -> RuntimeChoice:
    if "BF16" not in capabilities:
        return RuntimeChoice("openvino", "fp32", "this CPU reports no BF16 support (needs AMX or AVX512-BF16)")
    allowed, evidence = bf16_guard(manifest)
    return RuntimeChoice("openvino", "bf16" if allowed else "fp32", evidence)

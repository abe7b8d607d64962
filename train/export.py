"""``resserve export``: a checkpoint becomes a verified model package.

    checkpoint --fold BN, resolve stochastic depth, drop blocks--> inference network
        --torch.onnx.export (dynamo) / torch.jit.trace--> artifacts
        --run on real MNIST against the eager, unfolded network--> parity figures
        --[int8: quantize, keep if it loses <= 0.1 points]--> manifest.json
        --rename--> the package directory (atomic: a failed export leaves nothing behind)

The graph contract: input ``input`` float32 [N,1,28,28] in [0,1], white ink on black;
outputs ``logits`` and ``probabilities`` float32 [N,10]; normalization is inside the graph.
What a package serves is its manifest: all or some of the outputs, and an FP32 input range of
[0, 1] or [0, 255] (``--outputs``, ``--input-range``; the server adapts the range).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from resserve.serve.backends import Backend, open_backend
from resserve.serve.backends.base import infer_in_chunks
from resserve.serve.backends.onnxruntime import OnnxRuntimeBackend, import_onnxruntime
from resserve.serve.backends.openvino import OpenVinoBackend, openvino_cpu_capabilities
from resserve.serve.manifest import (
    FILE_NAME as MANIFEST, INPUT_SHAPE, Accuracy, Artifact, DroppedBlocks, Int8Report, LatencyChange, Manifest,
    ModelSummary, ParityReference, Preprocessing, ReducedPrecisionReport, SourceCheckpoint, SplitAccuracy, TensorSpec,
)
from resserve.serve.package import sha256_of
from resserve.serve.runtime import MAX_BF16_LOSS
from resserve.serve.timing import images_per_second, median_seconds
from resserve.train.checkpoint import load_checkpoint
from resserve.train.config import ExportError, ExportOptions
from resserve.train.data import MNIST, Split
from resserve.train.files import check_package_destination
from resserve.train.fold import choose_blocks_to_drop, drop_blocks, fold_for_inference
from resserve.train.models import MNIST_MEAN, MNIST_STD, ResNet, count_parameters
from resserve.train.progress import Stages, no_stages
from resserve.train.training import evaluate, library_versions, predict_logits

ARTIFACT_FILES = {"onnx": "model.onnx", "torchscript": "model.ts"}
INT8_FILE = "model.int8.onnx"
# largest |logit difference| allowed between an fp32 artifact and eager, as a fraction of the largest
# |logit| (at least 1): fp32 rounding grows with the values summed, and logits of a deep network
# that no normalization reins in reach 10^4 and more (a pre-activation ResNet-50 at initialization)
FP32_TOLERANCE = 1e-4
INT8_MAX_LOSS = 0.001  # an int8 artifact may lose at most 0.1 accuracy points
CALIBRATION_IMAGES = 512
# images per backend call while verifying: a chunk's activations (16x28x28 floats an image) stay
# under the allocator's heap limit (train/allocator.py); at 1000, torch page-faults its way to a
# third of the speed
VERIFY_CHUNK = 256


class InferenceModel(nn.Module):
    """The exported graph: [N,1,28,28] in [0,1] -> (logits [N,10], probabilities [N,10])."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: A002 - the graph's input name
        logits = self.network(input)
        return logits, torch.softmax(logits, dim=1)


# ----------------------------------------------------------------------------------------------
# Writing artifacts


def write_onnx(model: InferenceModel, path: Path, opset: int) -> None:
    import onnx

    example = torch.rand(2, 1, 28, 28)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset,
                                    input_names=["input"], output_names=["logits", "probabilities"],
                                    dynamic_shapes={"input": {0: batch}}, verbose=False)
        program.save(str(path))
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph, full_check=True)
    leftovers = {n.op_type for n in graph.graph.node} & {"BatchNormalization", "Dropout", "RandomUniform",
                                                         "RandomUniformLike", "Bernoulli", "RandomNormal"}
    if leftovers:
        raise ExportError(f"the ONNX graph still holds {', '.join(sorted(leftovers))}")


def write_torchscript(model: InferenceModel, path: Path) -> None:
    # torch.jit is deprecated in PyTorch 2.14 but users asked for the format: keep its warnings quiet
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, torch.rand(2, 1, 28, 28), check_trace=False)
        traced.save(str(path))


# ----------------------------------------------------------------------------------------------
# Verification


def as_input(split: Split) -> np.ndarray:
    """uint8 [N,28,28] -> the package's float32 [N,1,28,28] in [0,1]."""
    return split.images[:, None].astype(np.float32) / 255.0


@dataclass(frozen=True)
class Parity:
    """How an artifact's outputs compare with the eager network's on the test set (the figures of
    the manifest's ``Artifact`` and ``ReducedPrecisionReport``)."""

    max_abs_logit_diff: float
    test_accuracy: float
    prediction_agreement: float  # the fraction of test images with the same predicted digit


@dataclass(frozen=True)
class Verifier:
    """The eager, unfolded network's logits on real test images: what every artifact must match."""

    images: np.ndarray  # float32 [N,1,28,28]
    labels: np.ndarray  # int64 [N]
    reference_logits: np.ndarray  # float32 [N,10]
    stages: Stages = no_stages  # progress of each pass over the images

    @classmethod
    def for_network(cls, network: nn.Module, split: Split, stages: Stages = no_stages) -> "Verifier":
        advance = stages("reference: the eager network", len(split))
        return cls(as_input(split), split.labels, predict_logits(network, split.images, on_chunk=advance).numpy(),
                   stages)

    @property
    def accuracy(self) -> float:
        return float((self.reference_logits.argmax(1) == self.labels).mean())

    @property
    def fp32_allowed(self) -> float:
        """The largest |logit difference| an fp32 artifact may have: ``FP32_TOLERANCE`` of the
        reference's largest |logit|, or of 1 when they are all smaller."""
        return FP32_TOLERANCE * max(1.0, float(np.abs(self.reference_logits).max()))

    def check(self, backend: Backend, stage: str = "verifying") -> Parity:
        advance = self.stages(stage, len(self.images))

        def infer(batch: np.ndarray) -> dict[str, np.ndarray]:
            outputs = backend.infer(batch)
            advance(len(batch))
            return outputs

        logits = infer_in_chunks(infer, self.images, VERIFY_CHUNK)["logits"]
        return Parity(max_abs_logit_diff=float(np.abs(logits - self.reference_logits).max()),
                      test_accuracy=float((logits.argmax(1) == self.labels).mean()),
                      prediction_agreement=float((logits.argmax(1) == self.reference_logits.argmax(1)).mean()))


def _require_fp32_parity(format: str, parity: Parity, verifier: Verifier) -> None:
    if parity.max_abs_logit_diff > verifier.fp32_allowed or parity.test_accuracy != verifier.accuracy:
        raise ExportError(
            f"{format} artifact does not match the eager model: max |logit diff| "
            f"{parity.max_abs_logit_diff:.2e} (allowed {verifier.fp32_allowed:.2e}: {FP32_TOLERANCE:.0e} of the "
            f"largest |logit|, at least 1), test accuracy {parity.test_accuracy:.4f} vs {verifier.accuracy:.4f}")


def _artifact_entry(path: Path, format: str, precision: str, parity: Parity) -> Artifact:
    return Artifact(file=path.name, format=format, precision=precision, sha256=sha256_of(path),
                    bytes=path.stat().st_size, **asdict(parity))


# ----------------------------------------------------------------------------------------------
# Steps


@dataclass(frozen=True)
class BlockDrop:
    """What dropping blocks did, but for the test accuracy after: the export's verification pass
    runs the same eager network on the test set, so it measures that once for both."""

    indices: list[int]
    method: str
    before: SplitAccuracy
    validation_accuracy_after: float
    latency_ms: LatencyChange

    def record(self, test_accuracy_after: float) -> DroppedBlocks:
        after = SplitAccuracy(validation_accuracy=self.validation_accuracy_after, test_accuracy=test_accuracy_after)
        return DroppedBlocks(indices=self.indices, method=self.method, before=self.before, after=after,
                             eager_batch64_latency_ms=self.latency_ms)


def _drop_blocks(network: ResNet, count: int, validation: Split, test: Split, log: Callable[[str], None]
                 ) -> tuple[ResNet, BlockDrop | None]:
    """Drop ``count`` blocks; measure accuracy before and after and the eager latency gain."""
    if count == 0:
        return network, None
    folded = fold_for_inference(network)
    log(f"choosing {count} blocks to drop ...")
    indices, method = choose_blocks_to_drop(
        folded, count, lambda candidate: evaluate(candidate, validation).accuracy,
        on_block=lambda i, acc: log(f"  without block {i}: validation accuracy {acc:.4f}"))
    pruned = drop_blocks(network, indices)
    batch = torch.rand(64, 1, 28, 28)
    folded_pruned = fold_for_inference(pruned)
    with torch.inference_mode():
        seconds_before = median_seconds(lambda: folded(batch), repeats=10)
        seconds_after = median_seconds(lambda: folded_pruned(batch), repeats=10)
    before = SplitAccuracy(validation_accuracy=evaluate(network, validation).accuracy,
                           test_accuracy=evaluate(network, test).accuracy)
    latency = LatencyChange(before=round(seconds_before * 1e3, 2), after=round(seconds_after * 1e3, 2))
    return pruned, BlockDrop(indices, method, before, evaluate(pruned, validation).accuracy, latency)


def _int8(staging: Path, fp32_onnx: Path, verifier: Verifier, calibration: Split, log) -> Int8Report:
    """Quantize, measure accuracy and throughput against fp32; keep the file only if it qualifies."""
    from resserve.train.quantize import quantize_int8

    path = quantize_int8(fp32_onnx, staging / INT8_FILE, as_input(calibration.head(CALIBRATION_IMAGES)))
    int8_backend, fp32_backend = OnnxRuntimeBackend(path, precision="int8"), OnnxRuntimeBackend(fp32_onnx)
    parity = verifier.check(int8_backend, "verifying int8")
    batch = verifier.images[:64]
    speed = {name: images_per_second(lambda b=backend: b.infer(batch), 64)
             for name, backend in (("int8", int8_backend), ("fp32", fp32_backend))}
    loss = verifier.accuracy - parity.test_accuracy
    entry = Int8Report(**_artifact_entry(path, "onnx", "int8", parity).model_dump(),
                       kept=loss <= INT8_MAX_LOSS, accuracy_loss=loss, calibration_images=CALIBRATION_IMAGES,
                       batch64_images_per_second={k: round(v, 1) for k, v in speed.items()})
    log(f"int8: test accuracy {parity.test_accuracy:.4f} (fp32 {verifier.accuracy:.4f}), "
        f"{speed['int8']:,.0f} vs fp32's {speed['fp32']:,.0f} images/s at batch 64 here "
        f"({speed['int8'] / speed['fp32']:.2f}x): "
        + ("kept" if entry.kept else f"dropped (loses more than {INT8_MAX_LOSS * 100:.1f} points)"))
    if not entry.kept:
        path.unlink()
    return entry


def _bf16(fp32_onnx: Path, verifier: Verifier, log) -> ReducedPrecisionReport:
    """The accuracy guard for reduced precision: bf16 (OpenVINO) against the eager network."""
    capabilities = openvino_cpu_capabilities()
    if capabilities is None or "BF16" not in capabilities:
        reason = "OpenVINO is not installed" if capabilities is None else "this CPU reports no BF16 support"
        log(f"bf16: not measured ({reason})")
        return ReducedPrecisionReport(measured=False, reason=reason)
    parity = verifier.check(OpenVinoBackend(fp32_onnx, "bf16"), "measuring bf16")
    loss = verifier.accuracy - parity.test_accuracy
    log(f"bf16 (OpenVINO): test accuracy {parity.test_accuracy:.4f} (fp32 {verifier.accuracy:.4f}), "
        f"{parity.prediction_agreement * 100:.2f}% same predictions, max |logit diff| {parity.max_abs_logit_diff:.3f}")
    return ReducedPrecisionReport(measured=True, runtime="openvino", **asdict(parity), accuracy_loss=loss,
                                  allowed=loss <= MAX_BF16_LOSS)


def _publish(staging: Path, out: Path) -> None:
    """Swap the finished package in with renames: readers see the old or the new, never half."""
    staging.chmod(0o755)
    if out.exists():
        retired = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, retired)
        os.rename(staging, out)
        shutil.rmtree(retired)
    else:
        os.rename(staging, out)


WRITERS = {"onnx": lambda model, path, opts: write_onnx(model, path, opts.opset),
           "torchscript": lambda model, path, opts: write_torchscript(model, path)}


def export_package(checkpoint: Path, out: Path, options: ExportOptions, mnist: MNIST,
                   log: Callable[[str], None] = print, stages: Stages = no_stages) -> Manifest:
    """Export ``checkpoint`` to the package directory ``out``; returns the manifest."""
    options.validate()
    name = options.model_name(checkpoint)
    source = load_checkpoint(checkpoint)
    check_package_destination(out)
    network = source.build()
    train_split, validation = mnist.train_validation()
    network, drop = _drop_blocks(network, options.drop_blocks, validation, mnist.test, log)
    folded = InferenceModel(fold_for_inference(network)).eval()
    verifier = Verifier.for_network(network, mnist.test, stages)
    dropped = drop.record(verifier.accuracy) if drop else None
    if dropped:
        latency = dropped.eager_batch64_latency_ms
        log(f"dropping blocks {dropped.indices} ({dropped.method}): test accuracy "
            f"{dropped.before.test_accuracy:.4f} -> {dropped.after.test_accuracy:.4f}, "
            f"batch-64 latency {latency.before:.1f} -> {latency.after:.1f} ms")

    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        raise ExportError(f"cannot write to {out.parent}: {exc.strerror}") from exc
    try:
        artifacts, backends = [], {}
        for format in options.formats:
            path = staging / ARTIFACT_FILES[format]
            WRITERS[format](folded, path, options)
            backends[format] = open_backend(path, format)
            parity = verifier.check(backends[format], f"verifying {format}")
            _require_fp32_parity(format, parity, verifier)
            log(f"{format}: max |logit diff| {parity.max_abs_logit_diff:.1e}, "
                f"test accuracy {parity.test_accuracy:.4f} (eager {verifier.accuracy:.4f})")
            artifacts.append(_artifact_entry(path, format, "fp32", parity))
        onnx_path = staging / ARTIFACT_FILES["onnx"]
        reduced = {"bf16": _bf16(onnx_path, verifier, log)} if "onnx" in options.formats else {}
        int8 = _int8(staging, onnx_path, verifier, train_split, log) if options.quantize else None
        if int8 and int8.kept:
            artifacts.append(Artifact(**int8.model_dump(include=set(Artifact.model_fields))))
        # the verified artifact (identical predictions on the test set) is the fast way to the validation split
        fastest = backends.get("onnx") or backends[options.formats[0]]
        validation_logits = infer_in_chunks(fastest.infer, as_input(validation), VERIFY_CHUNK)["logits"]
        validation_accuracy = float((validation_logits.argmax(1) == validation.labels).mean())
        manifest = _manifest(name, options, checkpoint, source, network, folded, artifacts, int8, reduced, dropped,
                             validation_accuracy, verifier)
        (staging / MANIFEST).write_text(manifest.to_json())
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _manifest(name: str, options: ExportOptions, checkpoint: Path, source, network: ResNet, folded: nn.Module,
              artifacts: list[Artifact], int8: Int8Report | None, reduced: dict[str, ReducedPrecisionReport],
              dropped: DroppedBlocks | None, validation_accuracy: float, verifier: Verifier) -> Manifest:
    import onnx

    onnxruntime = import_onnxruntime()
    labels = tuple(str(digit) for digit in range(10))
    return Manifest(
        name=name,
        version=options.version,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        source_checkpoint=SourceCheckpoint(file=checkpoint.name, sha256=sha256_of(checkpoint)),
        model=ModelSummary(arch=source.config.arch, config=source.config.to_dict(),
                           params=count_parameters(network), params_after_folding=count_parameters(folded)),
        inputs=(TensorSpec(name="input", datatype="FP32", shape=INPUT_SHAPE),),
        outputs=tuple(TensorSpec(name=name, datatype="FP32", shape=(-1, len(labels))) for name in options.outputs),
        preprocessing=Preprocessing(layout="NCHW", range=(0.0, float(options.input_range)),
                                    polarity="white ink on black (MNIST)",
                                    normalization=f"inside the graph: (x - {MNIST_MEAN}) / {MNIST_STD}"),
        labels=labels,
        artifacts=tuple(artifacts),
        accuracy=Accuracy(validation=validation_accuracy, test=verifier.accuracy, test_images=len(verifier.labels)),
        parity=ParityReference(reference="eager, unfolded PyTorch network in fp32 on the MNIST test set",
                               fp32_tolerance=FP32_TOLERANCE),
        int8=int8,
        reduced_precision=reduced,
        dropped_blocks=dropped,
        versions={**library_versions(), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                  "opset": options.opset},
    )

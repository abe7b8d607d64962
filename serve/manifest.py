"""The model package's manifest: the one contract between ``resserve export`` and the server.

``resserve export`` builds a ``Manifest`` and writes it as ``manifest.json``; every reader (the
server, the runtime choice, the KServe metadata, the Triton repository writer, the tests) gets
the same typed object back. Reading is strict: a missing field, an unknown field, a wrong type
or an artifact path that leaves the package is refused with one line naming the field, before
anything is loaded. Plain Python and pydantic only: no torch, no train code.

Schema versions: ``format_version`` is bumped when a field changes meaning or is removed. A
package of a newer version is refused (upgrade resserve); one of an older version is refused
with the command that re-exports it.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from resserve.serve.errors import ResserveError, describe_validation_error

PACKAGE_FORMAT = "resserve-model-package"
FORMAT_VERSION = 1
FILE_NAME = "manifest.json"

MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"  # safe in URLs, metrics labels and file names
MODEL_VERSION = r"^[0-9A-Za-z_.-]{1,64}$"  # a folder of a Triton repository, a URL segment
INPUT_SHAPE = (-1, 1, 28, 28)  # a batch of 28x28 grayscale images: what every front door feeds a model
Sha256 = Field(pattern=r"^[0-9a-f]{64}$")
Fraction = Field(ge=0.0, le=1.0)


class ManifestError(ResserveError):
    """A manifest that this resserve cannot use, with the field at fault."""


class _Record(BaseModel):
    """Immutable, and strict about fields: a typo in a key is an error, not a silent default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Record):
    name: str = Field(min_length=1)
    datatype: Literal["FP32", "UINT8"]
    shape: tuple[int, ...] = Field(min_length=1)  # -1: any size (the batch dimension)


class Artifact(_Record):
    """One file of the package, loaded only after its sha256 matches, and how its outputs
    compared with the eager PyTorch network on the MNIST test set."""

    file: str
    format: Literal["onnx", "torchscript"]
    precision: Literal["fp32", "int8"]
    sha256: str = Sha256
    bytes: int = Field(ge=0)
    max_abs_logit_diff: float = Field(ge=0.0)
    test_accuracy: float = Fraction
    prediction_agreement: float = Fraction

    @field_validator("file")
    @classmethod
    def _inside_the_package(cls, file: str) -> str:
        """A plain file name: ``../x``, ``/etc/x`` or ``sub/x`` would reach outside the package."""
        if not file or file in (".", "..") or "/" in file or "\\" in file or "\0" in file:
            raise ValueError(f"{file!r} is not a file name inside the package")
        return file


class Int8Report(Artifact):
    """The int8 candidate: kept as an artifact only when it loses at most 0.1 accuracy points."""

    kept: bool
    accuracy_loss: float
    calibration_images: int = Field(ge=1)
    batch64_images_per_second: dict[str, float]


class ReducedPrecisionReport(_Record):
    """The accuracy guard of a reduced precision (bf16 on OpenVINO): served only when ``allowed``."""

    measured: bool
    reason: str | None = None  # why it was not measured
    runtime: str | None = None
    max_abs_logit_diff: float | None = None
    test_accuracy: float | None = None
    prediction_agreement: float | None = None
    accuracy_loss: float | None = None
    allowed: bool = False


class SourceCheckpoint(_Record):
    file: str
    sha256: str = Sha256


class ModelSummary(_Record):
    arch: str
    config: dict[str, Any]  # train/config.py's ModelConfig, as exported (documentation for serving)
    params: int = Field(ge=0)
    params_after_folding: int = Field(ge=0)


class Preprocessing(_Record):
    layout: Literal["NCHW"]
    range: tuple[float, float]
    polarity: str
    normalization: str


class Accuracy(_Record):
    validation: float = Fraction
    test: float = Fraction
    test_images: int = Field(ge=1)


class ParityReference(_Record):
    reference: str
    fp32_tolerance: float = Field(gt=0.0)  # of the reference's largest |logit| (at least 1): max |logit diff| allowed


class SplitAccuracy(_Record):
    """A network's accuracy on the validation split and on the test set."""

    validation_accuracy: float = Fraction
    test_accuracy: float = Fraction


class LatencyChange(_Record):
    before: float = Field(ge=0.0)
    after: float = Field(ge=0.0)


class DroppedBlocks(_Record):
    """``export --drop-blocks``: which blocks went, chosen how, and what it cost and saved."""

    indices: list[int]
    method: str
    before: SplitAccuracy
    after: SplitAccuracy
    eager_batch64_latency_ms: LatencyChange


class Manifest(_Record):
    format: Literal["resserve-model-package"] = PACKAGE_FORMAT
    format_version: int = FORMAT_VERSION
    name: str = Field(pattern=MODEL_NAME)
    version: str = Field(pattern=MODEL_VERSION)
    created: str
    source_checkpoint: SourceCheckpoint
    model: ModelSummary
    inputs: tuple[TensorSpec, ...] = Field(min_length=1)
    outputs: tuple[TensorSpec, ...] = Field(min_length=1)
    preprocessing: Preprocessing
    labels: tuple[str, ...]
    artifacts: tuple[Artifact, ...] = Field(min_length=1)
    accuracy: Accuracy
    parity: ParityReference
    int8: Int8Report | None = None
    reduced_precision: dict[str, ReducedPrecisionReport] = Field(default_factory=dict)
    dropped_blocks: DroppedBlocks | None = None
    versions: dict[str, str | int]

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        """What the manifest says of its tensors is what clients read in the model's metadata and
        config (and size their requests by), so it must be what the server feeds and answers."""
        for kind, specs in (("inputs", self.inputs), ("outputs", self.outputs)):
            names = [spec.name for spec in specs]
            if len(set(names)) != len(names):
                raise ValueError(f"{kind} repeat a tensor name: {names}")
        files = [artifact.file for artifact in self.artifacts]
        if len(set(files)) != len(files):
            raise ValueError(f"artifacts repeat a file: {files}")
        if [spec.shape for spec in self.inputs] != [INPUT_SHAPE]:
            raise ValueError(f"the server feeds one input of shape {list(INPUT_SHAPE)}; the manifest declares "
                             f"{[list(spec.shape) for spec in self.inputs]}")
        scores = (-1, len(self.labels))
        for spec in self.outputs:
            if spec.shape != scores:
                raise ValueError(f"output {spec.name!r} has shape {list(spec.shape)}; with {len(self.labels)} labels "
                                 f"it must be {list(scores)}, a score per label")
        return self

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.outputs]

    def find(self, format: str, precision: str = "fp32") -> Artifact | None:
        return next((a for a in self.artifacts if a.format == format and a.precision == precision), None)

    def bf16(self) -> ReducedPrecisionReport | None:
        """The bf16 accuracy guard, where export measured one."""
        report = self.reduced_precision.get("bf16")
        return report if report is not None and report.measured else None

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_none=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, source: str = FILE_NAME) -> "Manifest":
        """Parse and check ``text``; any problem is one ManifestError line naming ``source`` and the field."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{source} is not valid JSON: {exc}") from None
        except RecursionError:  # arrays or objects nested thousands deep: no manifest is
            raise ManifestError(f"{source} is not a manifest: its JSON is nested too deeply") from None
        _check_format(data, source)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ManifestError(f"{source}: {describe_validation_error(exc)}") from None


def check_model_name(name: str) -> None:
    if not re.fullmatch(MODEL_NAME, name):
        raise ManifestError(f"model name {name!r} must be 1-128 letters, digits, '_', '.' or '-', "
                            "starting with a letter or digit")


def check_model_version(version: str) -> None:
    if not re.fullmatch(MODEL_VERSION, version):
        raise ManifestError(f"model version {version!r} must be 1-64 letters, digits, '_', '.' or '-'")


def _check_format(data: object, source: str) -> None:
    if not isinstance(data, dict) or data.get("format") != PACKAGE_FORMAT:
        raise ManifestError(f"{source} is not a resserve model package manifest (no \"format\": \"{PACKAGE_FORMAT}\")")
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ManifestError(f"{source}: field format_version: must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ManifestError(f"{source} has format version {version}, newer than this resserve reads "
                            f"({FORMAT_VERSION}): upgrade resserve to serve it")
    if version < FORMAT_VERSION:
        raise ManifestError(f"{source} has format version {version}, older than this resserve reads "
                            f"({FORMAT_VERSION}): re-export it with `resserve export CHECKPOINT --out DIR`")

"""Write a Triton Inference Server model repository entry for a model package's ONNX artifact.

Layout: ``REPO/<name>/config.pbtxt`` and ``REPO/<name>/<version>/model.onnx``, so a user who
outgrows one resserve process runs the same verified artifact on Triton unchanged.
"""

from __future__ import annotations

import re
from pathlib import Path

from google.protobuf import text_format

from resserve.serve.batcher import BatchingConfig
from resserve.serve.errors import ResserveError
from resserve.serve.kserve import LABELS_FILE, triton_model_config
from resserve.serve.package import ModelPackage

MAX_BATCH_SIZE = 1024
TRITON_VERSION = re.compile(r"[1-9][0-9]*")  # Triton skips version folders named otherwise, silently


def check_triton_version(version: str) -> None:
    """A version Triton loads: resserve takes "v2" or "0", which Triton would skip, leaving no model."""
    if not TRITON_VERSION.fullmatch(version):
        raise ResserveError(f"--triton-repo needs a version Triton reads, a whole number from 1 without leading "
                            f"zeros (Triton skips a version folder named {version!r}): give --version N")


def render_config(package: ModelPackage) -> str:
    """config.pbtxt: the same ModelConfig that `resserve serve` answers, for Triton's ONNX Runtime backend."""
    config = triton_model_config(package.manifest, "onnxruntime_onnx", BatchingConfig(max_batch_size=MAX_BATCH_SIZE))
    return text_format.MessageToString(config)


def write_triton_repository(package: ModelPackage, repository: Path) -> Path:
    """Add (or replace) this package's model in ``repository``; returns the model directory."""
    artifact = package.find("onnx", "fp32")
    model_dir = Path(repository) / package.name
    version_dir = model_dir / package.version
    version_dir.mkdir(parents=True, exist_ok=True)
    (version_dir / "model.onnx").write_bytes(package.read_verified(artifact))
    (model_dir / "config.pbtxt").write_text(render_config(package))
    (model_dir / LABELS_FILE).write_text("".join(f"{label}\n" for label in package.manifest.labels))
    return model_dir

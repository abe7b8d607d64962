"""Write a Triton Inference Server model repository entry for a model package's ONNX artifact.

Layout: ``REPO/<name>/config.pbtxt`` and ``REPO/<name>/<version>/model.onnx``, so a user who
outgrows one resserve process runs the same verified artifact on Triton unchanged.
"""

from __future__ import annotations

from pathlib import Path

from resserve.serve.batcher import BatchingConfig
from resserve.serve.manifest import TensorSpec
from resserve.serve.package import ModelPackage

MAX_BATCH_SIZE = 1024


def _tensor(spec: TensorSpec) -> str:
    dims = ", ".join(str(d) for d in spec.shape[1:])  # Triton leaves out the batch dimension
    return f'  {{\n    name: "{spec.name}"\n    data_type: TYPE_{spec.datatype}\n    dims: [ {dims} ]\n  }}'


def render_config(package: ModelPackage) -> str:
    manifest = package.manifest
    return "\n".join([
        f'name: "{package.name}"',
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {MAX_BATCH_SIZE}",
        "input [\n" + ",\n".join(_tensor(spec) for spec in manifest.inputs) + "\n]",
        "output [\n" + ",\n".join(_tensor(spec) for spec in manifest.outputs) + "\n]",
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {BatchingConfig.max_queue_delay_us}\n}}",
        "",
    ])


def write_triton_repository(package: ModelPackage, repository: Path) -> Path:
    """Add (or replace) this package's model in ``repository``; returns the model directory."""
    artifact = package.find("onnx", "fp32")
    model_dir = Path(repository) / package.name
    version_dir = model_dir / package.version
    version_dir.mkdir(parents=True, exist_ok=True)
    (version_dir / "model.onnx").write_bytes(package.read_verified(artifact))
    (model_dir / "config.pbtxt").write_text(render_config(package))
    return model_dir

"""Checkpoints: tensors + model config + metrics, read back without running any pickled code.

A checkpoint is a plain dict written by ``torch.save`` and read by
``torch.load(weights_only=True)``, whose unpickler admits only tensors and primitive
containers. Anything else (a truncated file, another program's file, a pickled callable) is
refused with a one-line ``CheckpointError``.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from resserve.train.config import ConfigError, ModelConfig
from resserve.train.files import CheckpointError, atomic_file, existing_checkpoint
from resserve.train.models import ResNet, build_model
from resserve.train.record import TrainingRecord

FORMAT = "resserve-checkpoint"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    metrics: TrainingRecord | None = None  # None: saved from the Python API without a training run

    def build(self) -> ResNet:
        """The network with these weights, in eval mode."""
        model = build_model(self.config)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise CheckpointError(f"weights do not fit the {self.config.arch} config: {first}") from exc
        return model.eval()


def save_checkpoint(path: Path, model: nn.Module, config: ModelConfig, metrics: TrainingRecord | None = None) -> Path:
    """Write atomically, so an interrupted save never leaves a half checkpoint at ``path``."""
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "metrics": metrics.to_dict() if metrics else None,
    }
    with atomic_file(path) as f:
        torch.save(payload, f)
    return Path(path)


def load_checkpoint(path: Path) -> Checkpoint:
    """Read and validate a checkpoint; refuses anything that is not one, in one line."""
    path = existing_checkpoint(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" in str(exc):  # weights_only stopped a class or callable it would have imported
            raise CheckpointError(f"{path} carries pickled objects other than tensors; refused "
                                  "(a resserve checkpoint holds only tensors, numbers and strings)") from exc
        raise CheckpointError(f"{path} is truncated or not a PyTorch file") from exc
    except Exception as exc:  # noqa: BLE001 - unpickling arbitrary bytes can raise almost anything
        raise CheckpointError(f"{path} is truncated or not a PyTorch file") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a resserve checkpoint")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {payload.get('format_version')}, "
                              f"this resserve reads {FORMAT_VERSION}")
    missing = [key for key in ("config", "state_dict") if key not in payload]
    if missing or not isinstance(payload["state_dict"], dict):
        raise CheckpointError(f"{path} is a resserve checkpoint without a valid {(missing or ['state_dict'])[0]}")
    try:
        config = ModelConfig.from_dict(payload["config"])
    except (ConfigError, TypeError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{path} has an invalid model config: {exc}") from exc
    return Checkpoint(config, payload["state_dict"], _training_record(path, payload.get("metrics")))


def _training_record(path: Path, metrics: dict | None) -> TrainingRecord | None:
    if metrics is None:
        return None
    try:
        return TrainingRecord.from_dict(metrics)
    except (ConfigError, TypeError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{path} has invalid training metrics: {exc}") from exc


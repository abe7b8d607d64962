"""Checkpoints: tensors + model config + metrics, read back without running any pickled code.

A checkpoint is a plain dict written by ``torch.save`` and read by
``torch.load(weights_only=True)``, whose unpickler admits only tensors and primitive
containers. Anything else (a truncated file, another program's file, a pickled callable) is
refused with a one-line ``CheckpointError``.
"""

from __future__ import annotations

import io
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
        """The network with these weights, in eval mode.

        The config is matched against the weights on the meta device first, where no memory is
        allocated: a checkpoint is a file from anywhere, and its config alone could otherwise ask
        for any amount of memory (a million blocks, a 20001x20001 kernel) before a shape is checked.
        """
        if self.config.depth > len(self.state_dict):  # every block has weights; bounds the meta build too
            raise CheckpointError(f"weights do not fit the {self.config.arch} config: it has {self.config.depth} "
                                  f"blocks, the checkpoint {len(self.state_dict)} tensors")
        with torch.device("meta"):
            self._load_into(build_model(self.config), assign=True)  # assign: no copy into meta tensors
        return self._load_into(build_model(self.config)).eval()

    def _load_into(self, model: ResNet, assign: bool = False) -> ResNet:
        try:
            model.load_state_dict(self.state_dict, assign=assign)
        except RuntimeError as exc:
            raise CheckpointError(f"weights do not fit the {self.config.arch} config: {_first_problem(exc)}") from exc
        return model


def _first_problem(exc: RuntimeError, limit: int = 200) -> str:
    """The first of the problems ``load_state_dict`` lists (under a heading line), cut to one short line."""
    lines = str(exc).strip().splitlines()
    problem = lines[min(1, len(lines) - 1)].strip()
    return problem if len(problem) <= limit else problem[:limit] + "..."


def save_checkpoint(path: Path, model: nn.Module, config: ModelConfig, metrics: TrainingRecord | None = None) -> Path:
    """Write atomically, so an interrupted save never leaves a half checkpoint at ``path``."""
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "state_dict": cpu_state(model),
        "metrics": metrics.to_dict() if metrics else None,
    }
    write_tensors(path, payload)
    return Path(path)


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as a file keeps them: on the CPU, detached, contiguous."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def write_tensors(path: Path, payload: dict) -> None:
    """``torch.save`` of ``payload`` to ``path``, atomically. Serialized in memory first: torch's
    zip writer reports a failed write (a full disk) as a RuntimeError of its own, and a write
    of the bytes as an OSError that says what happened."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with atomic_file(path) as f:
        f.write(buffer.getbuffer())


def read_tensors_only(path: Path) -> object:
    """What ``torch.save`` wrote to ``path``, unpickled with ``weights_only=True`` (tensors,
    numbers, strings and containers of them; no code runs); anything else is one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" in str(exc):  # weights_only stopped a class or callable it would have imported
            raise CheckpointError(f"{path} carries pickled objects other than tensors; refused "
                                  "(a resserve file holds only tensors, numbers and strings)") from exc
        raise CheckpointError(f"{path} is truncated or not a PyTorch file") from exc
    except Exception as exc:  # noqa: BLE001 - unpickling arbitrary bytes can raise almost anything
        raise CheckpointError(f"{path} is truncated or not a PyTorch file") from exc


def read_format(path: Path, format: str, version: int, what: str) -> dict:
    """The dict ``write_tensors`` wrote to ``path`` as ``format``, version ``version`` (``what``
    names it in the one-line refusal of anything else)."""
    payload = read_tensors_only(path)
    if not isinstance(payload, dict) or payload.get("format") != format:
        raise CheckpointError(f"{path} is not a resserve {what}")
    if payload.get("format_version") != version:
        raise CheckpointError(f"{path} has {what} format {payload.get('format_version')}, "
                              f"this resserve reads {version}")
    return payload


def load_checkpoint(path: Path) -> Checkpoint:
    """Read and validate a checkpoint; refuses anything that is not one, in one line."""
    path = existing_checkpoint(path)
    payload = read_format(path, FORMAT, FORMAT_VERSION, "checkpoint")
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


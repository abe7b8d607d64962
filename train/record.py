"""What a training run measured: kept in its checkpoint, written beside it as NAME.metrics.json,
and rendered as its model card. No torch, so the record reads anywhere.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from resserve.train.config import ModelConfig, TrainConfig


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of training; the validation figures are None when no images were held out."""

    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float | None
    val_accuracy: float | None
    seconds: float
    images_per_second: float


@dataclass(frozen=True)
class TrainingRecord:
    """A finished run: the network, the recipe, where it ran, and how well the kept epoch does."""

    arch: str
    model_config: ModelConfig
    params: int
    command: str | None  # the command line that trained it; None from the Python API
    train_images: int
    best_epoch: int  # the epoch kept: best validation accuracy, or the last without validation
    val_accuracy: float | None
    test_accuracy: float
    test_loss: float
    train_seconds: float
    data_source: str
    device: str
    precision: str
    train_config: TrainConfig
    versions: dict[str, str]
    history: list[EpochRecord]

    def to_dict(self) -> dict:
        """Plain numbers, strings, lists and dicts: what a checkpoint and a JSON file hold."""
        return {**asdict(self), "model_config": self.model_config.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> TrainingRecord:
        """The record ``to_dict`` wrote; TypeError or ValueError (from the configs) for anything else."""
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown fields {', '.join(sorted(unknown))}")
        return cls(**{**data,
                      "model_config": ModelConfig.from_dict(data["model_config"]),
                      "train_config": TrainConfig(**data["train_config"]),
                      "history": [EpochRecord(**epoch) for epoch in data["history"]]})

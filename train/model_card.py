"""A model card beside every checkpoint: how it was made and how well it does, from its metrics."""

from __future__ import annotations

from pathlib import Path

from resserve.train.record import TrainingRecord


def card_path(checkpoint: Path) -> Path:
    return Path(checkpoint).with_suffix(".card.md")


def render_model_card(record: TrainingRecord) -> str:
    cfg = record.train_config
    versions = ", ".join(f"{name} {version}" for name, version in record.versions.items())
    epochs = "\n".join(
        f"| {e.epoch} | {e.train_loss:.4f} | {e.train_accuracy:.4f} | {_accuracy(e.val_accuracy)} | {e.seconds:.0f} |"
        for e in record.history)
    selected = "best validation accuracy" if record.val_accuracy is not None else "the last: no validation split"
    trained = (f"{cfg.epochs} epochs" if len(record.history) == cfg.epochs
               else f"{cfg.epochs} epochs, stopped after {len(record.history)}")
    validation = (f"last {cfg.validation_size:,} of the training set for validation" if cfg.validation_size
                  else "no validation split")
    return f"""# Model card: {record.arch} on MNIST

| | |
|---|---|
| architecture | `{record.arch}`, {record.params:,} parameters |
| model config | `{record.model_config.to_dict()}` |
| command | `{record.command or '(python API)'}` |
| data | MNIST from {record.data_source}: {record.train_images:,} training images, {validation}, 10,000 test images |
| recipe | SGD (Nesterov, momentum {cfg.momentum}), one-cycle lr peak {cfg.lr}, weight decay {cfg.weight_decay}, batch {cfg.batch_size}, {trained}, ±{cfg.shift} px translations, seed {cfg.seed} |
| hardware | {record.device}, {record.precision} autocast for training; evaluation in fp32 |
| wall time | {record.train_seconds / 60:.1f} min |
| selected epoch | {record.best_epoch} ({selected}) |
| **validation accuracy** | {_accuracy(record.val_accuracy)} |
| **test accuracy** | {record.test_accuracy:.4f} (loss {record.test_loss:.4f}) |
| libraries | {versions} |

Input: float32 [N,1,28,28], intensities in [0,1], white digit on black (MNIST convention); the
network normalizes internally. Output: logits [N,10].

Intended use: digit classification of MNIST-like images, and as the reference model of the
resserve export/serve pipeline. Not evaluated on other handwriting distributions.

## Training history

| epoch | train loss | train accuracy | validation accuracy | seconds |
|---|---|---|---|---|
{epochs}
"""


def _accuracy(value: float | None) -> str:
    return "none" if value is None else f"{value:.4f}"

"""A model card beside every checkpoint: how it was made and how well it does, from its metrics."""

from __future__ import annotations

from pathlib import Path


def card_path(checkpoint: Path) -> Path:
    return Path(checkpoint).with_suffix(".card.md")


def render_model_card(metrics: dict) -> str:
    cfg = metrics["train_config"]
    versions = ", ".join(f"{name} {version}" for name, version in metrics["versions"].items())
    epochs = "\n".join(
        f"| {h['epoch']} | {h['train_loss']:.4f} | {h['train_accuracy']:.4f} | "
        f"{h['val_accuracy'] if h['val_accuracy'] is None else format(h['val_accuracy'], '.4f')} | {h['seconds']:.0f} |"
        for h in metrics["history"])
    return f"""# Model card: {metrics['arch']} on MNIST

| | |
|---|---|
| architecture | `{metrics['arch']}`, {metrics['params']:,} parameters |
| model config | `{metrics['model_config']}` |
| command | `{metrics.get('command', '(python API)')}` |
| data | MNIST from {metrics['data_source']}: {metrics['train_images']:,} training images, last {cfg['validation_size']:,} of the training set for validation, 10,000 test images |
| recipe | SGD (Nesterov, momentum {cfg['momentum']}), one-cycle lr peak {cfg['lr']}, weight decay {cfg['weight_decay']}, batch {cfg['batch_size']}, {cfg['epochs']} epochs, ±{cfg['shift']} px translations, seed {cfg['seed']} |
| hardware | {metrics['device']}, {metrics['precision']} autocast for training; evaluation in fp32 |
| wall time | {metrics['train_seconds'] / 60:.1f} min |
| selected epoch | {metrics['best_epoch']} (best validation accuracy) |
| **validation accuracy** | {metrics['val_accuracy']:.4f} |
| **test accuracy** | {metrics['test_accuracy']:.4f} (loss {metrics['test_loss']:.4f}) |
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

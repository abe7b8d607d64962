"""The training recipe, the loop and evaluation.

Recipe (the defaults of ``TrainConfig``): SGD with Nesterov momentum 0.9, weight decay 5e-4 on
weights (not on BN or biases), a one-cycle learning-rate schedule peaking at 0.1, batch 128,
random +-2 px translations. On CPUs with bf16 support (AVX512-BF16/AMX) the forward and
backward passes run under bf16 autocast with channels_last tensors, which is about 2x faster
than fp32 NCHW here; evaluation always runs in fp32, the precision that export ships.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from resserve.serve.errors import ResserveError
from resserve.train.checkpoint import save_checkpoint
from resserve.train.config import ModelConfig, TrainConfig
from resserve.train.data import MNIST, Split
from resserve.train.model_card import card_path, render_model_card
from resserve.train.models import build_model, count_parameters


# ----------------------------------------------------------------------------------------------
# Hardware choices


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ResserveError("--device cuda asked for, but torch sees no CUDA device")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: where bf16 autocast pays off on the CPU."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def resolve_precision(requested: str, device: torch.device) -> str:
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def library_versions() -> dict[str, str]:
    """Plain strings (torch.__version__ is a class the safe checkpoint loader refuses)."""
    import torchvision

    return {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "numpy": np.__version__}


# ----------------------------------------------------------------------------------------------
# Data on the device


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N,28,28] -> float32 [N,1,28,28] in [0,1], the contract of every model."""
    return images.unsqueeze(1).float().div_(255.0)


def random_shift(images: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image [N,28,28] by its own random (dy, dx) in [-shift, shift], zero fill."""
    if shift == 0:
        return images
    n, h, w = images.shape
    padded = F.pad(images, (shift, shift, shift, shift))
    dy = torch.randint(0, 2 * shift + 1, (n, 1, 1), generator=generator)
    dx = torch.randint(0, 2 * shift + 1, (n, 1, 1), generator=generator)
    rows = dy + torch.arange(h).view(1, h, 1)
    cols = dx + torch.arange(w).view(1, 1, w)
    return padded[torch.arange(n).view(n, 1, 1), rows, cols]


def batches(split: Split, batch_size: int, generator: torch.Generator | None = None
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images [B,28,28], int64 labels [B]); shuffled when a generator is given."""
    images, labels = torch.from_numpy(split.images), torch.from_numpy(split.labels)
    order = torch.randperm(len(split), generator=generator) if generator is not None else torch.arange(len(split))
    for start in range(0, len(split), batch_size):
        index = order[start:start + batch_size]
        yield images[index], labels[index]


# ----------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class Evaluation:
    accuracy: float
    loss: float
    confusion: np.ndarray  # [10,10], rows: true digit, columns: predicted digit

    @property
    def per_class_accuracy(self) -> list[float]:
        return (np.diag(self.confusion) / self.confusion.sum(axis=1).clip(min=1)).tolist()


@torch.no_grad()
def predict_logits(model: nn.Module, images: np.ndarray, batch_size: int = 1000,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """fp32 logits [N,10] of uint8 images [N,28,28], in eval mode."""
    model.eval()
    chunks = []
    for start in range(0, len(images), batch_size):
        x = to_input(torch.from_numpy(images[start:start + batch_size])).to(device)
        chunks.append(model(x.contiguous(memory_format=torch.channels_last)).float().cpu())
    return torch.cat(chunks)


def evaluate(model: nn.Module, split: Split, device: torch.device | str = "cpu") -> Evaluation:
    logits = predict_logits(model, split.images, device=device)
    labels = torch.from_numpy(split.labels)
    predicted = logits.argmax(1)
    confusion = np.zeros((10, 10), dtype=np.int64)
    np.add.at(confusion, (split.labels, predicted.numpy()), 1)
    return Evaluation(
        accuracy=float((predicted == labels).float().mean()),
        loss=float(F.cross_entropy(logits, labels)),
        confusion=confusion,
    )


# ----------------------------------------------------------------------------------------------
# Training


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD + Nesterov; weight decay only on conv/linear weights, as is standard for BN nets."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps: int
                   ) -> torch.optim.lr_scheduler.LRScheduler:
    """One cycle over ``steps`` steps: 20% warm-up to ``cfg.lr``, then cosine decay."""
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=steps, pct_start=0.2)


def train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig,
               optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
               generator: torch.Generator, device: torch.device, precision: str) -> tuple[float, int]:
    """One SGD step on uint8 images [B,28,28]; returns (batch loss, correct predictions)."""
    x = to_input(random_shift(images, cfg.shift, generator)).to(device)
    x = x.contiguous(memory_format=torch.channels_last)
    labels = labels.to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(x)
        loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return float(loss.detach()), int((logits.argmax(1) == labels).sum())


def train_one_epoch(model: nn.Module, split: Split, cfg: TrainConfig, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, generator: torch.Generator,
                    device: torch.device, precision: str, on_batch) -> tuple[float, float]:
    """One pass over ``split``; returns (mean loss, accuracy) as seen during training."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for images, labels in batches(split, cfg.batch_size, generator):
        loss, batch_correct = train_step(model, images, labels, cfg, optimizer, scheduler, generator,
                                         device, precision)
        total_loss += loss * len(labels)
        correct += batch_correct
        seen += len(labels)
        on_batch(len(labels), total_loss / seen, correct / seen)
    return total_loss / seen, correct / seen


def _progress(enabled: bool) -> Progress:
    """A bar per epoch with loss, accuracy, images/s and ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(),
        TextColumn("{task.completed}/{task.total} img"),
        TextColumn("loss {task.fields[loss]:.4f} acc {task.fields[acc]:.4f} {task.fields[rate]:.0f} img/s"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        disable=not enabled,
    )


def train(model_config: ModelConfig, cfg: TrainConfig, mnist: MNIST, out: Path,
          log=print, show_progress: bool = True, command: str | None = None) -> dict:
    """Train, keep the epoch with the best validation accuracy, test it, save it; returns metrics.

    Writes ``out`` (checkpoint), ``out.metrics.json`` and a model card ``out.card.md``.
    """
    cfg.validate()
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    train_split, val_split = mnist.train_validation(cfg.validation_size)
    if cfg.train_limit:
        train_split = train_split.head(cfg.train_limit)

    model = build_model(model_config).to(device).to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg)
    steps = cfg.epochs * -(-len(train_split) // cfg.batch_size)
    scheduler = make_scheduler(optimizer, cfg, steps)
    log(f"training {model_config.arch} ({count_parameters(model):,} parameters) on {len(train_split):,} "
        f"MNIST images from {mnist.source}; device {device}, precision {precision}")

    history, best, started = [], None, time.monotonic()
    with _progress(show_progress) as progress:
        for epoch in range(1, cfg.epochs + 1):
            task = progress.add_task(f"epoch {epoch}/{cfg.epochs}", total=len(train_split), loss=0.0, acc=0.0, rate=0.0)
            epoch_start, done = time.monotonic(), [0]

            def on_batch(n: int, loss: float, acc: float) -> None:
                done[0] += n
                rate = done[0] / max(time.monotonic() - epoch_start, 1e-9)
                progress.update(task, advance=n, loss=loss, acc=acc, rate=rate)

            train_loss, train_acc = train_one_epoch(model, train_split, cfg, optimizer, scheduler,
                                                    generator, device, precision, on_batch)
            seconds = time.monotonic() - epoch_start
            val = evaluate(model, val_split, device) if len(val_split) else None
            record = {"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_acc,
                      "val_loss": val.loss if val else None, "val_accuracy": val.accuracy if val else None,
                      "seconds": round(seconds, 1), "images_per_second": round(len(train_split) / seconds, 1)}
            history.append(record)
            log(f"epoch {epoch}: train loss {train_loss:.4f} acc {train_acc:.4f}"
                + (f", validation acc {val.accuracy:.4f}" if val else "") + f" ({seconds:.0f} s)")
            if best is None or (val and val.accuracy >= best[0]):
                best = (val.accuracy if val else 0.0, epoch,
                        {k: v.detach().clone() for k, v in model.state_dict().items()})

    model.load_state_dict(best[2])
    test = evaluate(model, mnist.test, device)
    metrics = {
        "arch": model_config.arch,
        "model_config": model_config.to_dict(),
        "params": count_parameters(model),
        "command": command,
        "train_images": len(train_split),
        "best_epoch": best[1],
        "val_accuracy": history[best[1] - 1]["val_accuracy"],
        "test_accuracy": test.accuracy,
        "test_loss": test.loss,
        "train_seconds": round(time.monotonic() - started, 1),
        "data_source": mnist.source,
        "device": str(device),
        "precision": precision,
        "train_config": asdict(cfg),
        "versions": library_versions(),
        "history": history,
    }
    log(f"test accuracy {test.accuracy:.4f} (epoch {best[1]}, best on validation); saved {out}")
    save_checkpoint(out, model.cpu(), model_config, metrics)
    Path(out).with_suffix(".metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    card_path(out).write_text(render_model_card(metrics))
    return metrics


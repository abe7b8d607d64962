"""The training recipe, the loop and evaluation.

Recipe (the defaults of ``TrainConfig``): SGD with Nesterov momentum 0.9, weight decay 5e-4 on
weights (not on BN or biases), a one-cycle learning-rate schedule peaking at 0.1, batch 128,
random +-2 px translations. On CPUs with bf16 support (AVX512-BF16/AMX) the forward and
backward passes run under bf16 autocast with channels_last tensors, which is about 2x faster
than fp32 NCHW here; evaluation always runs in fp32, the precision that export ships.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import nn

from resserve.serve.app import TERMINATED_EXIT_CODE, Terminated
from resserve.serve.errors import ResserveError
from resserve.serve.outputs import check_writable
from resserve.train.allocator import keep_freed_tensor_memory
from resserve.train.checkpoint import save_checkpoint
from resserve.train.config import ModelConfig, TrainConfig
from resserve.train.data import MNIST, Split
from resserve.train.evaluation import Evaluation
from resserve.train.files import CheckpointError
from resserve.train.fold import fold_for_inference
from resserve.train.memory import check_training_fits
from resserve.train.model_card import card_path, render_model_card
from resserve.train.models import build_model, count_parameters
from resserve.train.progress import progress_bar
from resserve.train.record import EpochRecord, TrainingRecord
from resserve.train.resume import ResumeFile, ResumeState


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
# Evaluation: the one evaluator of `resserve eval`, `resserve train`, export and the experiments


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def predict_logits(model: nn.Module, images: np.ndarray, precision: str = "fp32", batch_size: int = 500,
                   on_chunk: Callable[[int], None] = lambda images: None) -> torch.Tensor:
    """Logits [N,10] (as fp32, on the CPU) of uint8 images [N,28,28], in eval mode on the model's device.

    ``precision`` "bf16" runs under bf16 autocast: about 3x faster on AMX CPUs, for the many
    evaluations of the experiments; export's parity checks use fp32, the precision it ships.
    """
    keep_freed_tensor_memory()  # else page faults cost as much as the convolutions
    model.eval()
    device = _device_of(model)
    chunks = []
    for start in range(0, len(images), batch_size):
        x = to_input(torch.from_numpy(images[start:start + batch_size])).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            chunks.append(model(x.contiguous(memory_format=torch.channels_last)).float().cpu())
        on_chunk(len(x))
    return torch.cat(chunks)


def evaluate(model: nn.Module, split: Split, precision: str = "fp32", folded: bool = False,
             on_chunk: Callable[[int], None] = lambda images: None) -> Evaluation:
    """Accuracy, loss and confusion on ``split``; ``folded`` folds BatchNorm first (same function, fewer ops).
    ``on_chunk`` hears how many images each step evaluated (for a progress bar)."""
    network = fold_for_inference(model) if folded else model
    logits = predict_logits(network, split.images, precision, on_chunk=on_chunk)
    return Evaluation.of(logits.argmax(1).numpy(), split.labels,
                         float(F.cross_entropy(logits, torch.from_numpy(split.labels))))


# ----------------------------------------------------------------------------------------------
# Training: the one loop of `resserve train` and the experiments


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
               generator: torch.Generator, precision: str) -> tuple[float, int]:
    """One SGD step on uint8 images [B,28,28]; returns (batch loss, correct predictions)."""
    device = _device_of(model)
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


def endless_batches(split: Split, batch_size: int, generator: torch.Generator
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled batches, epoch after epoch."""
    while True:
        yield from batches(split, batch_size, generator)


@dataclass
class Interval:
    """What training saw between two marks: the numbers a mark's callback logs or plots."""

    step: int  # the step the interval ends at
    images_seen: int  # since the start of training
    images: int = 0  # in this interval
    loss_sum: float = 0.0
    correct: int = 0
    started: float = field(default_factory=time.monotonic)

    def add(self, images: int, loss: float, correct: int) -> None:
        """One step: ``loss`` is the batch's mean loss over ``images``."""
        self.images += images
        self.loss_sum += loss * images
        self.correct += correct

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.images, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.images, 1)

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started


class TrainingDiverged(ResserveError):
    """The loss stopped being a number: every later step would be wasted, so training stops."""


class TrainingInterrupted(ResserveError):
    """Ctrl-C during training, after the best epoch so far was saved: exits as an interrupt does."""

    exit_code = 130


class TrainingTerminated(TrainingInterrupted):
    """SIGTERM during training, after the best epoch so far was saved: exits as a terminated process does."""

    exit_code = TERMINATED_EXIT_CODE


@dataclass
class Loop:
    """What the training loop carries from step to step (saved at each epoch's end: train/resume.py)."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator  # shuffling and augmentation
    step: int = 0  # steps done
    seen: int = 0  # images trained on

    @classmethod
    def start(cls, model: nn.Module, cfg: TrainConfig, steps: int) -> Loop:
        """A loop at step 0 of ``steps``, seeded by ``cfg.seed``."""
        generator = torch.Generator().manual_seed(cfg.seed)
        optimizer = make_optimizer(model, cfg)
        return cls(optimizer, make_scheduler(optimizer, cfg, steps), generator)


def fit(model: nn.Module, split: Split, cfg: TrainConfig, steps: int, precision: str, marks: set[int],
        on_mark: Callable[[Interval], None], progress: Progress, description: str, loop: Loop | None = None) -> None:
    """Train ``model`` for ``steps`` steps of the recipe over shuffled epochs of ``split``, from
    ``loop`` (a resumed run's) or from the start.

    At each step in ``marks``, ``on_mark`` gets the interval since the previous mark (it may
    evaluate: the model is put back in training mode after it), with ``loop`` at that step.
    Raises ``TrainingDiverged`` at the first step whose loss is NaN or infinite.
    """
    loop = loop or Loop.start(model, cfg, steps)
    stream = endless_batches(split, cfg.batch_size, loop.generator)
    task = progress.add_task(description, total=steps, completed=loop.step)
    interval, seen = Interval(loop.step, loop.seen), loop.seen
    model.train()
    for step in range(loop.step + 1, steps + 1):
        images, labels = next(stream)
        loss, correct = train_step(model, images, labels, cfg, loop.optimizer, loop.scheduler, loop.generator,
                                   precision)
        if not math.isfinite(loss):
            raise TrainingDiverged(f"training diverged: the loss became {loss} at step {step:,} of {steps:,} "
                                   f"(a lower learning rate than {cfg.lr:g} usually trains)")
        seen += len(labels)
        interval.add(len(labels), loss, correct)
        progress.update(task, advance=1, status=f"loss {interval.loss:.4f} acc {interval.accuracy:.4f} "
                                                f"{interval.images / max(interval.seconds, 1e-9):.0f} img/s")
        if step in marks:
            interval.step, interval.images_seen = step, seen
            loop.step, loop.seen = step, seen
            on_mark(interval)
            model.train()
            interval = Interval(step, seen)


def _capture(model_config: ModelConfig, cfg: TrainConfig, model: nn.Module, loop: Loop, best: BestEpoch,
             history: list[EpochRecord], seconds: float) -> ResumeState:
    """The run after its last finished epoch, to go on from (train/resume.py)."""
    random = {"batches": loop.generator.get_state(), "torch": torch.get_rng_state()}
    if _device_of(model).type == "cuda":  # stochastic depth draws there
        random["cuda"] = torch.cuda.get_rng_state()
    return ResumeState(model_config=model_config, train_config=cfg, seconds=seconds, model=model.state_dict(),
                       optimizer=loop.optimizer.state_dict(), scheduler=loop.scheduler.state_dict(), random=random,
                       best_epoch=best.epoch, best_accuracy=best.accuracy, best_model=best.state, history=history)


def _go_on_from(resume_file: ResumeFile, model_config: ModelConfig, cfg: TrainConfig, model: nn.Module, loop: Loop,
                best: BestEpoch, history: list[EpochRecord]) -> float:
    """Put ``model``, ``loop`` (but its step), ``best`` and ``history`` where the stopped run in
    ``resume_file`` left them; the seconds it had trained."""
    saved = ResumeState.load(resume_file.path)
    saved.check_same_run(model_config, cfg, resume_file.path)
    try:
        model.load_state_dict(saved.model)
        loop.optimizer.load_state_dict(saved.optimizer)
        loop.scheduler.load_state_dict(saved.scheduler)
        loop.generator.set_state(saved.random["batches"])
        torch.set_rng_state(saved.random["torch"])
        if "cuda" in saved.random and _device_of(model).type == "cuda":
            torch.cuda.set_rng_state(saved.random["cuda"])
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:  # torch's loaders: what does not fit
        raise CheckpointError(f"{resume_file.path} does not fit this run ({str(exc).splitlines()[0][:200]}); "
                              "delete it to start afresh") from None
    best.accuracy, best.epoch, best.state = saved.best_accuracy, saved.best_epoch, saved.best_model
    history.extend(saved.history)
    resume_file.epoch = len(history)
    return saved.seconds


@dataclass
class BestEpoch:
    """The epoch with the best validation accuracy so far, and its weights."""

    accuracy: float = -1.0
    epoch: int = 0
    state: dict = field(default_factory=dict)

    def offer(self, accuracy: float, epoch: int, model: nn.Module) -> None:
        if accuracy >= self.accuracy:  # ties: the later epoch, trained longer
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.accuracy, self.epoch, self.state = accuracy, epoch, state  # at once: Ctrl-C may come any time


def train(model_config: ModelConfig, cfg: TrainConfig, mnist: MNIST, out: Path, log=print,
          show_progress: bool = True, command: str | None = None, resume: bool = False) -> TrainingRecord:
    """Train, keep the epoch with the best validation accuracy (the last without validation), test it, save it.

    Writes ``out`` (checkpoint), ``out.metrics.json`` and a model card ``out.card.md``, and after
    every epoch ``out.resume.pt`` (train/resume.py), from which ``resume`` goes on (when it is
    there). Interrupted (Ctrl-C, SIGTERM) or diverged after an epoch, it saves the best epoch so
    far, then raises ``TrainingInterrupted`` (``TrainingTerminated``) or ``TrainingDiverged``.
    """
    cfg.validate()
    check_writable(out)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    train_split, val_split = mnist.train_validation(cfg.validation_size)
    if cfg.train_limit is not None:
        train_split = train_split.head(cfg.train_limit)
    check_training_fits(model_config, min(cfg.batch_size, len(train_split)), device)

    model = build_model(model_config).to(device).to(memory_format=torch.channels_last)
    steps_per_epoch = -(-len(train_split) // cfg.batch_size)
    loop = Loop.start(model, cfg, cfg.epochs * steps_per_epoch)
    history: list[EpochRecord] = []
    best, resume_file, trained_before = BestEpoch(), ResumeFile(out, log), 0.0
    if resume and resume_file.path.exists():
        trained_before = _go_on_from(resume_file, model_config, cfg, model, loop, best, history)
        loop.step, loop.seen = len(history) * steps_per_epoch, len(history) * len(train_split)
        log(f"resuming from {resume_file.path}: {len(history)} of {cfg.epochs} epochs done")
    elif resume:
        log(f"nothing to resume at {resume_file.path}: starting afresh")
    elif resume_file.path.exists():
        log(f"replacing {resume_file.path}, a stopped run's state, as this one trains (--resume would have "
            "continued it)")
    log(f"training {model_config.arch} ({count_parameters(model):,} parameters) on {len(train_split):,} "
        f"MNIST images from {mnist.source}; device {device}, precision {precision}")
    started = time.monotonic()

    def end_of_epoch(interval: Interval) -> None:
        epoch, seconds = interval.step // steps_per_epoch, interval.seconds
        val = evaluate(model, val_split) if len(val_split) else None
        history.append(EpochRecord(
            epoch=epoch, train_loss=interval.loss, train_accuracy=interval.accuracy,
            val_loss=val.loss if val else None, val_accuracy=val.accuracy if val else None,
            seconds=round(seconds, 1), images_per_second=round(interval.images / seconds, 1)))
        best.offer(val.accuracy if val else 0.0, epoch, model)  # without validation: ties, so the last
        resume_file.write(_capture(model_config, cfg, model, loop, best, history,
                                   trained_before + time.monotonic() - started))
        log(f"epoch {epoch}: train loss {interval.loss:.4f} acc {interval.accuracy:.4f}"  # after: it can be resumed
            + (f", validation acc {val.accuracy:.4f}" if val else "") + f" ({seconds:.0f} s)")

    stopped: BaseException | None = None
    try:
        with progress_bar(show_progress, "steps") as progress:
            fit(model, train_split, cfg, cfg.epochs * steps_per_epoch, precision,
                {epoch * steps_per_epoch for epoch in range(1, cfg.epochs + 1)}, end_of_epoch, progress,
                f"{model_config.arch}-{model_config.blocks}, {cfg.epochs} epochs", loop)
    except (KeyboardInterrupt, Terminated, TrainingDiverged) as exc:  # Ctrl-C, SIGTERM, NaN: keep the finished epochs
        if not best.state:
            if isinstance(exc, TrainingDiverged):
                raise TrainingDiverged(f"{exc}; no epoch had finished, so nothing was saved") from None
            if isinstance(exc, Terminated):
                raise TrainingTerminated("terminated (SIGTERM) before the first epoch finished; "
                                         "nothing was saved") from None
            raise
        stopped = exc
        log(f"stopped after {len(history)} of {cfg.epochs} epochs: keeping the best of them (Ctrl-C or SIGTERM "
            "again to drop it)")

    model.load_state_dict(best.state)
    test = evaluate(model, mnist.test)
    record = TrainingRecord(
        arch=model_config.arch, model_config=model_config, params=count_parameters(model), command=command,
        train_images=len(train_split), best_epoch=best.epoch, val_accuracy=history[best.epoch - 1].val_accuracy,
        test_accuracy=test.accuracy, test_loss=test.loss,
        train_seconds=round(trained_before + time.monotonic() - started, 1),
        data_source=mnist.source, device=str(device), precision=precision, train_config=cfg,
        versions=library_versions(), history=history)
    try:
        save_checkpoint(out, model.cpu(), model_config, record)
        Path(out).with_suffix(".metrics.json").write_text(json.dumps(record.to_dict(), indent=2) + "\n")
        card_path(out).write_text(render_model_card(record))
    except OSError as exc:
        raise ResserveError(f"cannot write {out}: {exc.strerror or exc}{resume_file.how_to_resume}") from None
    log(f"test accuracy {test.accuracy:.4f} (epoch {best.epoch}"
        + (", best on validation" if len(val_split) else ", the last: no validation split") + f"); saved {out}")
    if isinstance(stopped, (KeyboardInterrupt, Terminated)):
        kind, what = (TrainingTerminated, "terminated (SIGTERM)") if isinstance(stopped, Terminated) else (
            TrainingInterrupted, "interrupted")
        raise kind(f"{what} after {len(history)} of {cfg.epochs} epochs; saved the best of them (epoch {best.epoch}) "
                   f"to {out}{resume_file.how_to_resume}")
    resume_file.path.unlink(missing_ok=True)  # finished, or diverged (resuming would diverge again)
    if stopped is not None:
        raise TrainingDiverged(f"{stopped}; saved the best epoch before it (epoch {best.epoch}, of {len(history)} "
                               f"finished) to {out}")
    return record

"""Training and evaluation at a fixed budget: how the experiments compare networks.

Every network an experiment trains gets the project's recipe (``TrainConfig``: SGD with
Nesterov momentum, one-cycle schedule, +-2 px shifts, bf16 autocast where the CPU has it) for
the same number of training images, so differences come from the architecture alone.

Evaluation folds BatchNorm and runs under the training precision at batch 256: about 3x faster
than fp32 eager on this CPU, which matters when one experiment evaluates hundreds of networks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from resserve.train.config import ModelConfig, TrainConfig
from resserve.train.data import MNIST, Split
from resserve.train.experiments.settings import Budget
from resserve.train.fold import fold_for_inference
from resserve.train.models import ResNet, build_model, count_parameters
from resserve.train.training import (batches, make_optimizer, make_scheduler, resolve_device, resolve_precision,
                                     to_input, train_step)

Log = Callable[[str], None]


@dataclass
class TrainedNetwork:
    model: ResNet
    curve: list[dict]  # per point: images seen, train error and loss since the last point, validation error
    seconds: float

    def summary(self) -> dict:
        return {"params": count_parameters(self.model), "seconds": round(self.seconds, 1),
                "final_train_error": self.curve[-1]["train_error"], "final_val_error": self.curve[-1]["val_error"],
                "curve": self.curve}


@torch.no_grad()
def accuracy(model: ResNet, split: Split, precision: str, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` in eval mode on ``split`` (BN folded: same function, fewer ops)."""
    folded = fold_for_inference(model)
    device = next(folded.parameters()).device
    correct = 0
    for images, labels in batches(split, batch_size):
        x = to_input(images).to(device).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            correct += int((folded(x).argmax(1).cpu() == labels).sum())
    return correct / len(split)


def endless_batches(split: Split, batch_size: int, generator: torch.Generator
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled batches, epoch after epoch."""
    while True:
        yield from batches(split, batch_size, generator)


class Trainer:
    """Trains networks for an experiment: one recipe, one budget, one data split, one device."""

    def __init__(self, mnist: MNIST, recipe: TrainConfig, budget: Budget, log: Log, show_progress: bool) -> None:
        recipe.validate()
        self.recipe, self.budget, self.log, self.show_progress = recipe, budget, log, show_progress
        self.device = resolve_device(recipe.device)
        self.precision = resolve_precision(recipe.precision, self.device)
        self.train_split, validation = mnist.train_validation(recipe.validation_size)
        self.validation = validation.head(budget.val_images)

    def build(self, config: ModelConfig) -> ResNet:
        """A freshly initialized network, seeded so every experiment run starts the same."""
        torch.manual_seed(self.recipe.seed)
        return self.place(build_model(config))

    def place(self, model: ResNet) -> ResNet:
        """``model`` on this trainer's device, in the memory format it trains and evaluates in."""
        return model.to(self.device).to(memory_format=torch.channels_last)

    def train(self, config: ModelConfig, name: str) -> TrainedNetwork:
        """Train one network for the budget, recording error curves on the way."""
        model = self.build(config)
        generator = torch.Generator().manual_seed(self.recipe.seed)
        steps = math.ceil(self.budget.train_images / self.recipe.batch_size)
        optimizer = make_optimizer(model, self.recipe)
        scheduler = make_scheduler(optimizer, self.recipe, steps)
        marks = {math.ceil(steps * (i + 1) / self.budget.curve_points) for i in range(self.budget.curve_points)}
        stream = endless_batches(self.train_split, self.recipe.batch_size, generator)
        curve, seen, loss_sum, correct, interval = [], 0, 0.0, 0, 0
        started = time.monotonic()
        with progress_bar(self.show_progress, "steps") as progress:
            task = progress.add_task(name, total=steps)
            for step in range(1, steps + 1):
                model.train()
                images, labels = next(stream)
                loss, batch_correct = train_step(model, images, labels, self.recipe, optimizer, scheduler,
                                                 generator, self.device, self.precision)
                seen, interval = seen + len(labels), interval + len(labels)
                loss_sum, correct = loss_sum + loss * len(labels), correct + batch_correct
                if step in marks:
                    curve.append({"images": seen, "train_error": 1 - correct / interval,
                                  "train_loss": loss_sum / interval,
                                  "val_error": 1 - accuracy(model, self.validation, self.precision)})
                    loss_sum, correct, interval = 0.0, 0, 0
                progress.advance(task)
        trained = TrainedNetwork(model.eval(), curve, time.monotonic() - started)
        self.log(f"{name}: {seen:,} images in {trained.seconds:.0f} s, train error {curve[-1]['train_error']:.4f}, "
                 f"validation error {curve[-1]['val_error']:.4f}")
        return trained


def progress_bar(enabled: bool, unit: str) -> Progress:
    """A transient bar per task on stderr: done/total ``unit``, elapsed, ETA."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                    TextColumn(f"{{task.completed}}/{{task.total}} {unit}"), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), disable=not enabled, transient=True,
                    console=Console(stderr=True))

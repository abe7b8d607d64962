"""Training at a fixed budget: how the experiments compare networks.

Every network an experiment trains gets the project's recipe (``TrainConfig``: SGD with
Nesterov momentum, one-cycle schedule, +-2 px shifts, bf16 autocast where the CPU has it) for
the same number of training images, so differences come from the architecture alone.

The loop and the evaluator are train/training.py's, shared with ``resserve train``. Evaluation
here folds BatchNorm and runs under the training precision: about 3x faster than fp32 eager on
this CPU, which matters when one experiment evaluates hundreds of networks.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from resserve.train.config import ModelConfig, TrainConfig
from resserve.train.data import MNIST, Split
from resserve.train.experiments.finished import FinishedNetworks
from resserve.train.experiments.settings import Budget
from resserve.train.memory import check_training_fits
from resserve.train.models import ResNet, build_model, count_parameters
from resserve.train.progress import progress_bar
from resserve.train.training import Interval, evaluate, fit, resolve_device, resolve_precision

Log = Callable[[str], None]


@dataclass(frozen=True)
class CurvePoint:
    """One point of a network's error curves."""

    images: int  # training images seen so far
    train_error: float  # over the training batches since the previous point
    train_loss: float  # likewise
    val_error: float  # on the budget's validation images, at this point


@dataclass(frozen=True)
class TrainingRun:
    """What an experiment reports of one network it trained: its size, time and curves."""

    params: int
    seconds: float
    final_train_error: float
    final_val_error: float
    curve: list[CurvePoint]

    @classmethod
    def from_dict(cls, data: dict) -> TrainingRun:
        """The run ``asdict`` gave (as FinishedNetworks keeps it)."""
        return cls(**{**data, "curve": [CurvePoint(**point) for point in data["curve"]]})


@dataclass
class TrainedNetwork:
    model: ResNet
    run: TrainingRun


class Trainer:
    """Trains networks for an experiment: one recipe, one budget, one data split, one device."""

    def __init__(self, mnist: MNIST, recipe: TrainConfig, budget: Budget, finished: FinishedNetworks, log: Log,
                 show_progress: bool) -> None:
        recipe.validate()
        self.recipe, self.budget, self.log, self.show_progress = recipe, budget, log, show_progress
        self.finished = finished
        self.device = resolve_device(recipe.device)
        self.precision = resolve_precision(recipe.precision, self.device)
        self.train_split, validation = mnist.train_validation(recipe.validation_size)
        self.validation = validation.head(budget.val_images)

    def build(self, config: ModelConfig) -> ResNet:
        """A freshly initialized network, seeded so every experiment run starts the same."""
        check_training_fits(config, min(self.recipe.batch_size, self.budget.train_images), self.device,
                            remedy="fewer blocks (--depths)")
        torch.manual_seed(self.recipe.seed)
        return self.place(build_model(config))

    def place(self, model: ResNet) -> ResNet:
        """``model`` on this trainer's device, in the memory format it trains and evaluates in."""
        return model.to(self.device).to(memory_format=torch.channels_last)

    def accuracy(self, model: ResNet, split: Split, fold: bool = True) -> float:
        """Top-1 accuracy, BN folded, in the training precision: fast enough for hundreds of evaluations.
        ``fold`` False takes ``model`` as folded already (fold_for_inference), as a lesion study's are."""
        return evaluate(model, split, self.precision, folded=fold).accuracy

    def train(self, config: ModelConfig, name: str) -> TrainedNetwork:
        """Train one network for the budget, recording error curves on the way (or take it from
        the stopped run this one resumes, where it had finished)."""
        model = self.build(config)
        run = self.finished.find(name, config, self.recipe, self.budget, model, TrainingRun.from_dict)
        if run is not None:
            self.log(f"{name}: finished in the stopped run, train error {run.final_train_error:.4f}, "
                     f"validation error {run.final_val_error:.4f}")
            return TrainedNetwork(model.eval(), run)
        steps = math.ceil(self.budget.train_images / self.recipe.batch_size)
        marks = {math.ceil(steps * (i + 1) / self.budget.curve_points) for i in range(self.budget.curve_points)}
        curve: list[CurvePoint] = []

        def record(interval: Interval) -> None:
            curve.append(CurvePoint(images=interval.images_seen, train_error=1 - interval.accuracy,
                                    train_loss=interval.loss, val_error=1 - self.accuracy(model, self.validation)))

        started = time.monotonic()
        with progress_bar(self.show_progress, "steps") as progress:
            fit(model, self.train_split, self.recipe, steps, self.precision, marks, record, progress, name)
        last = curve[-1]
        run = TrainingRun(params=count_parameters(model), seconds=round(time.monotonic() - started, 1),
                          final_train_error=last.train_error, final_val_error=last.val_error, curve=curve)
        self.finished.keep(name, config, self.recipe, self.budget, model, asdict(run))
        self.log(f"{name}: {last.images:,} images in {run.seconds:.0f} s, "  # after: it can be resumed
                 f"train error {last.train_error:.4f}, validation error {last.val_error:.4f}")
        return TrainedNetwork(model.eval(), run)

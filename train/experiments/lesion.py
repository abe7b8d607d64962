"""Lesion: delete residual blocks from trained networks at test time (Veit et al. 2016).

A residual network behaves like an ensemble of many paths of different lengths: deleting one
block removes only the paths through it, so accuracy barely moves, and it degrades smoothly as
more blocks go. A plain network has a single path: deleting any block breaks it (about chance).
docs/experiments.md shows where this holds for the lecture ResNet and where it does not.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable

import numpy as np
from rich.progress import Progress

from resserve.serve.errors import ResserveError
from resserve.train.config import ModelConfig
from resserve.train.data import Split
from resserve.train.experiments.runs import Trainer
from resserve.train.experiments.settings import LesionSettings
from resserve.train.fold import fold_for_inference, remove_blocks, shape_preserving_blocks
from resserve.train.models import ResNet
from resserve.train.progress import progress_bar


def plain_config(residual: ResNet) -> ModelConfig:
    """The same network without skip connections (and without the tricks that need them)."""
    return replace(residual.config, arch="plain", survival_prob=1.0, zero_init_residual=False)


def check_residual(model: ResNet) -> None:
    if model.config.arch in ("plain", "crelu"):
        raise ResserveError(f"the lesion study compares a residual network with a plain one; "
                            f"MODEL is a {model.config.arch} network (give a resnet, preact or highway checkpoint)")
    if not shape_preserving_blocks(model):
        raise ResserveError("MODEL has no block that keeps the tensor shape, so none can be deleted")


def check_plain(plain: ResNet, residual: ResNet) -> None:
    if plain.config.arch != "plain" or len(shape_preserving_blocks(plain)) != len(shape_preserving_blocks(residual)):
        raise ResserveError(f"--plain must be a plain network with as many deletable blocks as MODEL "
                            f"({len(shape_preserving_blocks(residual))}); got a {plain.config.arch} network "
                            f"with {len(shape_preserving_blocks(plain))}")


@dataclass(frozen=True)
class RandomDeletions:
    """Test accuracy with ``k`` blocks deleted, over several random draws of which ``k``."""

    k: int
    mean: float
    min: float
    max: float
    accuracies: list[float]  # one per draw


@dataclass(frozen=True)
class LesionedNetwork:
    arch: str
    blocks: int
    origin: str  # "given", or how it was trained here
    deletable_blocks: list[int]  # the blocks that keep the tensor shape (0-based)
    intact: float  # test accuracy with no block deleted
    intact_on_random_subset: float  # the same on the images behind the random deletions
    single: list[float]  # test accuracy with each deletable block deleted alone, in order
    random: list[RandomDeletions]  # k = 1, 2, ... deletable blocks


@dataclass(frozen=True)
class LesionResults:
    residual: LesionedNetwork
    plain: LesionedNetwork


def run(settings: LesionSettings, trainer: Trainer, residual: ResNet, plain: ResNet | None, test: Split) -> LesionResults:
    """Single-block and random k-block deletions for both networks, on the MNIST test split.

    Without ``plain``, a plain network of MODEL's shape is trained for the settings' budget.
    """
    plain_origin = "given"
    if plain is None:
        trained = trainer.train(plain_config(residual), f"plain-{residual.config.blocks}")
        plain, plain_origin = trained.model, f"trained here for {trained.run.curve[-1].images:,} images"
    networks = {}
    with progress_bar(trainer.show_progress, "evaluations") as progress:
        for name, model, origin in (("residual", residual, "given"), ("plain", plain, plain_origin)):
            network = _lesion(fold_for_inference(model), origin, settings, partial(trainer.accuracy, fold=False), test,
                              progress, name, trainer.recipe.seed)  # folded once, not once per lesion
            trainer.log(f"{name} ({model.config.arch}-{model.config.blocks}): intact {network.intact:.4f}, "
                        f"one block deleted: mean {np.mean(network.single):.4f}, worst {min(network.single):.4f}")
            networks[name] = network
    return LesionResults(**networks)


def _lesion(model: ResNet, origin: str, settings: LesionSettings, accuracy: Callable[[ResNet, Split], float],
            test: Split, progress: Progress, name: str, seed: int) -> LesionedNetwork:
    blocks = shape_preserving_blocks(model)
    full, subset = test.head(settings.test_images), test.head(settings.random_test_images)
    task = progress.add_task(name, total=1 + len(blocks) * (1 + settings.draws))
    single = []
    for index in blocks:
        single.append(accuracy(remove_blocks(model, [index]), full))
        progress.advance(task)
    draws = random.Random(seed)  # which k blocks go in each draw
    by_k = []
    for k in range(1, len(blocks) + 1):
        scores = []
        for _ in range(settings.draws):
            scores.append(accuracy(remove_blocks(model, draws.sample(blocks, k)), subset))
            progress.advance(task)
        by_k.append(RandomDeletions(k, float(np.mean(scores)), min(scores), max(scores), scores))
    intact = accuracy(model, full)
    progress.advance(task)
    return LesionedNetwork(model.config.arch, model.config.blocks, origin, blocks, intact,
                           intact_on_random_subset=accuracy(model, subset), single=single, random=by_k)


def draw(plt, results: LesionResults):
    """Left: accuracy with each single block deleted. Right: with k random blocks deleted."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True, layout="constrained")
    for (name, network), color in zip((("residual", results.residual), ("plain", results.plain)),
                                      ("tab:blue", "tab:red")):
        label = f"{name} ({network.arch}-{network.blocks})"
        left.plot([i + 1 for i in network.deletable_blocks], [100 * a for a in network.single], "o-",
                  color=color, label=label, markersize=3)
        left.axhline(100 * network.intact, color=color, linestyle=":", linewidth=1)
        ks = [row.k for row in network.random]
        right.plot(ks, [100 * row.mean for row in network.random], "o-", color=color, label=label, markersize=3)
        right.fill_between(ks, [100 * row.min for row in network.random], [100 * row.max for row in network.random],
                           color=color, alpha=0.2)
    for axis in (left, right):
        axis.axhline(10, color="gray", linestyle="--", linewidth=1, label="chance")
        axis.grid(alpha=0.3)
        axis.legend()
    left.set(title="one block deleted (dotted: intact)", xlabel="deleted block", ylabel="test accuracy (%)")
    right.set(title="k random blocks deleted (band: min-max over draws)", xlabel="blocks deleted (k)")
    return figure

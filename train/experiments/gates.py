"""Gates: what a trained highway network's transform gates do, and what stochastic depth buys.

Highway blocks (Srivastava et al. 2015) compute y = T(x) H(x) + (1 - T(x)) x with the gate T
biased to about 0.05 at initialization. After training, the mean T per block shows which blocks
learned to transform and which still mostly carry their input.

Stochastic depth (Huang et al. 2016) drops whole residual branches during training with a
probability rising linearly to 1 - p_L at the last block; here the lecture ResNet is trained
with and without it for the same number of images, and both are tested on the MNIST test set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from resserve.train.config import ModelConfig
from resserve.train.data import Split
from resserve.train.experiments.report import plain_log_ticks
from resserve.train.experiments.runs import Trainer, TrainingRun
from resserve.train.experiments.settings import GatesSettings
from resserve.train.models import HighwayBlock, ResNet
from resserve.train.training import batches, to_input


@torch.no_grad()
def mean_transform_gates(model: ResNet, split: Split) -> list[float]:
    """Mean of T = sigmoid(gate(x)) over all positions, channels and images, per highway block."""
    sums: dict[int, float] = {}

    def recorder(index: int):
        def record(module, inputs, output: torch.Tensor) -> None:  # output: gate logits [N,C,H,W]
            sums[index] = sums.get(index, 0.0) + float(torch.sigmoid(output.float()).mean(dim=(1, 2, 3)).sum())
        return record

    handles = [block.gate.register_forward_hook(recorder(index))
               for index, block in enumerate(model.resblocks) if isinstance(block, HighwayBlock)]
    try:
        model.eval()
        for images, _ in batches(split, 256):
            model(to_input(images).to(next(model.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
    return [sums[index] / len(split) for index in sorted(sums)]


@dataclass(frozen=True)
class HighwayResult:
    blocks: int
    gate_bias: float  # the gate's initial bias
    gate_at_init: float  # sigmoid(gate_bias): what T is at initialization before any input
    mean_gate_at_init: list[float]  # mean T per block on test images, at initialization
    mean_gate: list[float]  # and after training
    test_accuracy: float
    training: TrainingRun


@dataclass(frozen=True)
class StochasticDepthResult:
    survival_prob: float  # p_L; 1.0 is no stochastic depth
    test_accuracy: float
    training: TrainingRun


@dataclass(frozen=True)
class GatesResults:
    highway: HighwayResult
    stochastic_depth: dict[str, StochasticDepthResult]  # "without" and "with"


def run(settings: GatesSettings, trainer: Trainer, test: Split) -> GatesResults:
    """Train a highway network and a ResNet with and without stochastic depth; measure each."""
    gate_split, test = test.head(settings.gate_images), test.head(settings.test_images)
    highway_config = ModelConfig(arch="highway", blocks=settings.blocks)
    at_init = mean_transform_gates(trainer.build(highway_config), gate_split)
    highway = trainer.train(highway_config, f"highway-{settings.blocks}")
    gates = mean_transform_gates(highway.model, gate_split)
    trainer.log(f"highway-{settings.blocks}: mean transform gate per block from {min(gates):.3f} to {max(gates):.3f} "
                f"(initialization: {np.mean(at_init):.3f})")
    depth = {}
    for name, survival in (("without", 1.0), ("with", settings.survival_prob)):
        trained = trainer.train(ModelConfig(blocks=settings.blocks, survival_prob=survival),
                                f"resnet-{settings.blocks} {name} stochastic depth")
        depth[name] = StochasticDepthResult(survival, trainer.accuracy(trained.model, test), trained.run)
        trainer.log(f"resnet-{settings.blocks} {name} stochastic depth: test accuracy {depth[name].test_accuracy:.4f}")
    bias = highway_config.highway_gate_bias
    return GatesResults(
        HighwayResult(settings.blocks, gate_bias=bias, gate_at_init=1 / (1 + math.exp(-bias)), mean_gate_at_init=at_init,
                      mean_gate=gates, test_accuracy=trainer.accuracy(highway.model, test), training=highway.run),
        depth)


def draw(plt, results: GatesResults):
    """Left: mean transform gate per highway block. Right: validation error with and without stochastic depth."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    highway = results.highway
    blocks = range(1, len(highway.mean_gate) + 1)
    left.bar(blocks, highway.mean_gate, color="tab:green", label="after training")
    left.plot(blocks, highway.mean_gate_at_init, "k.", label="at initialization")
    left.set(title=f"highway-{highway.blocks}: mean transform gate T (test accuracy "
                   f"{100 * highway.test_accuracy:.2f}%)", xlabel="block", ylabel="mean T")
    left.legend()
    for (name, network), color in zip(results.stochastic_depth.items(), ("tab:blue", "tab:orange")):
        curve = network.training.curve
        right.plot([p.images for p in curve], [100 * p.val_error for p in curve], "o-", color=color,
                   label=f"{name} stochastic depth (p_L={network.survival_prob}): "
                         f"test accuracy {100 * network.test_accuracy:.2f}%")
    right.set(title="ResNet: validation error, same budget", xlabel="training images", ylabel="error (%)", yscale="log")
    plain_log_ticks(plt, right)
    right.legend(fontsize=8)
    for axis in (left, right):
        axis.grid(alpha=0.3)
    return figure

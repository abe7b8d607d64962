"""Depth: plain versus residual networks of increasing depth, same recipe, same budget.

The MNIST counterpart of He et al. 2015, figure 1 and 6: without skip connections a deeper
network reaches a *higher* training error than a shallower one (degradation: an optimization
problem, not overfitting); with them, depth stops hurting.
"""

from __future__ import annotations

from dataclasses import dataclass

from resserve.train.config import ModelConfig
from resserve.train.experiments.runs import Trainer, TrainingRun
from resserve.train.experiments.report import plain_log_ticks, shades
from resserve.train.experiments.settings import DepthSettings

ARCHS = ("plain", "resnet")


@dataclass(frozen=True)
class DepthNetwork:
    arch: str  # one of ARCHS
    blocks: int
    conv_layers: int  # 2 per block and the stem's
    training: TrainingRun


@dataclass(frozen=True)
class DepthResults:
    networks: list[DepthNetwork]
    # per architecture: the deepest network's final training error minus the shallowest's;
    # positive means depth made training worse
    degradation: dict[str, float]


def run(settings: DepthSettings, trainer: Trainer) -> DepthResults:
    """Train every (architecture, depth) pair; returns curves and final errors per network."""
    networks = []
    for arch in ARCHS:
        for blocks in settings.depths:
            trained = trainer.train(ModelConfig(arch=arch, blocks=blocks), f"{arch}-{blocks}")
            networks.append(DepthNetwork(arch, blocks, conv_layers=2 * blocks + 1, training=trained.run))
    return DepthResults(networks, _degradation(networks))


def _degradation(networks: list[DepthNetwork]) -> dict[str, float]:
    result = {}
    for arch in ARCHS:
        by_depth = sorted((n for n in networks if n.arch == arch), key=lambda n: n.blocks)
        result[arch] = by_depth[-1].training.final_train_error - by_depth[0].training.final_train_error
    return result


def draw(plt, results: DepthResults):
    """One panel per architecture: training error (dashed) and validation error (solid) per depth."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True, layout="constrained")
    depths = sorted({n.blocks for n in results.networks})
    colors = shades(plt, len(depths))
    for axis, arch in zip(axes, ARCHS):
        for network in (n for n in results.networks if n.arch == arch):
            curve = network.training.curve
            images = [p.images for p in curve]
            color = colors[depths.index(network.blocks)]
            axis.plot(images, [100 * p.train_error for p in curve], "--", color=color)
            axis.plot(images, [100 * p.val_error for p in curve], "-", color=color,
                      label=f"{network.blocks} blocks ({network.conv_layers} conv)")
        axis.set(title=f"{arch}: training (dashed) and validation (solid) error", xlabel="training images",
                 yscale="log")
        plain_log_ticks(plt, axis)
        axis.grid(alpha=0.3, which="both")
        axis.legend()
    axes[0].set_ylabel("error (%)")
    return figure

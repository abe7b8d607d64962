"""Depth: plain versus residual networks of increasing depth, same recipe, same budget.

The MNIST counterpart of He et al. 2015, figure 1 and 6: without skip connections a deeper
network reaches a *higher* training error than a shallower one (degradation: an optimization
problem, not overfitting); with them, depth stops hurting.
"""

from __future__ import annotations

from resserve.train.config import ModelConfig
from resserve.train.experiments.runs import Trainer
from resserve.train.experiments.report import shades
from resserve.train.experiments.settings import DepthSettings

ARCHS = ("plain", "resnet")


def run(settings: DepthSettings, trainer: Trainer) -> dict:
    """Train every (architecture, depth) pair; returns curves and final errors per network."""
    networks = []
    for arch in ARCHS:
        for blocks in settings.depths:
            trained = trainer.train(ModelConfig(arch=arch, blocks=blocks), f"{arch}-{blocks}")
            networks.append({"arch": arch, "blocks": blocks, "conv_layers": 2 * blocks + 1, **trained.summary()})
    return {"networks": networks, "degradation": _degradation(networks)}


def _degradation(networks: list[dict]) -> dict:
    """Final training error of the deepest network minus the shallowest's, per architecture:
    positive means depth made training worse."""
    result = {}
    for arch in ARCHS:
        by_depth = sorted((n for n in networks if n["arch"] == arch), key=lambda n: n["blocks"])
        result[arch] = by_depth[-1]["final_train_error"] - by_depth[0]["final_train_error"]
    return result


def draw(plt, results: dict):
    """One panel per architecture: training error (dashed) and validation error (solid) per depth."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True, layout="constrained")
    depths = sorted({n["blocks"] for n in results["networks"]})
    colors = shades(plt, len(depths))
    for axis, arch in zip(axes, ARCHS):
        for network in (n for n in results["networks"] if n["arch"] == arch):
            images = [p["images"] for p in network["curve"]]
            color = colors[depths.index(network["blocks"])]
            axis.plot(images, [100 * p["train_error"] for p in network["curve"]], "--", color=color)
            axis.plot(images, [100 * p["val_error"] for p in network["curve"]], "-", color=color,
                      label=f"{network['blocks']} blocks ({network['conv_layers']} conv)")
        axis.set(title=f"{arch}: training (dashed) and validation (solid) error", xlabel="training images",
                 yscale="log")
        percent = plt.matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")  # 92, not 9.2x10^1
        axis.yaxis.set_major_formatter(percent)
        axis.yaxis.set_minor_formatter(percent)
        axis.grid(alpha=0.3, which="both")
        axis.legend()
    axes[0].set_ylabel("error (%)")
    return figure

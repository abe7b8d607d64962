"""Shattered gradients at initialization (Balduzzi et al. 2017).

Walk a straight line from one MNIST image to another (256 points) and take the derivative of
one logit along it: g(t) = d f_c(x(t)) / dt = grad f_c(x(t)) . (b - a). In a deep plain network
g looks like white noise (neighbouring points' gradients are unrelated: lag-1 autocorrelation
near 0); in a residual network it stays correlated, like brown noise; with CReLU and
looks-linear initialization the network is exactly linear at start, so g is constant.

BatchNorm statistics are estimated once on real training images and then frozen, so BN
normalizes as in training while each point's gradient depends on that point alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from resserve.train.config import ModelConfig
from resserve.train.data import Split
from resserve.train.experiments.report import shades
from resserve.train.experiments.settings import ShatteredSettings
from resserve.train.models import ResNet, build_model
from resserve.train.training import to_input

ARCHS = ("plain", "resnet", "crelu")


def autocorrelation(signal: np.ndarray, max_lag: int) -> np.ndarray:
    """Normalized autocorrelation at lags 0..max_lag (1 at lag 0).

    A constant signal (an affine network along the line) has no variance to normalize by; it
    is perfectly correlated with itself at every lag, so it gets 1 everywhere.
    """
    centered = signal - signal.mean()
    variance = float(centered @ centered) / len(signal)
    if variance <= 1e-12 * max(float(signal.mean()) ** 2, 1e-30):
        return np.ones(max_lag + 1)
    n = len(signal)
    return np.array([float(centered[: n - k] @ centered[k:]) / (n * variance) for k in range(max_lag + 1)])


def calibrated(config: ModelConfig, calibration: torch.Tensor, seed: int) -> ResNet:
    """A network at initialization whose BN running statistics are those of ``calibration``."""
    torch.manual_seed(seed)
    model = build_model(config)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: one pass gives the batch statistics
    model.train()
    with torch.no_grad():
        model(calibration)
    return model.eval()


def line_gradient(model: ResNet, start: torch.Tensor, end: torch.Tensor, logit: int, points: int) -> np.ndarray:
    """g(t) at ``points`` evenly spaced t in [0, 1] for inputs [1,28,28]."""
    t = torch.linspace(0, 1, points).view(-1, 1, 1, 1)
    x = (start + t * (end - start)).requires_grad_(True)  # [points,1,28,28]
    (grad,) = torch.autograd.grad(model(x)[:, logit].sum(), x)
    return (grad * (end - start)).flatten(1).sum(1).double().numpy()


@dataclass(frozen=True)
class LineGradients:
    """One network at initialization: how correlated its gradient is along lines between images."""

    arch: str
    blocks: int
    lag1_autocorrelation: float  # near 0: white noise (shattered); near 1: smooth
    autocorrelation: list[float]  # at lags 0..max_lag, mean over the lines
    first_line_gradient: list[float]  # g(t) along the first line, for the figure


@dataclass(frozen=True)
class ShatteredResults:
    networks: list[LineGradients]


def run(settings: ShatteredSettings, train: Split, log) -> ShatteredResults:
    """Gradients along ``lines`` image pairs for every (architecture, depth), at initialization."""
    rng = np.random.default_rng(settings.seed)
    calibration = to_input(torch.from_numpy(train.images[: settings.calibration_images]))
    pairs = rng.choice(np.arange(settings.calibration_images, len(train)), size=(settings.lines, 2), replace=False)
    networks = []
    for arch in ARCHS:
        for blocks in settings.depths:
            model = calibrated(ModelConfig(arch=arch, blocks=blocks), calibration, settings.seed)
            gradients, correlations = [], []
            for a, b in pairs:
                start, end = to_input(torch.from_numpy(train.images[[a, b]]))
                gradient = line_gradient(model, start, end, int(train.labels[b]), settings.points)
                gradients.append(gradient)
                correlations.append(autocorrelation(gradient, settings.max_lag))
            mean_acf = np.mean(correlations, axis=0)
            networks.append(LineGradients(arch, blocks, float(mean_acf[1]), mean_acf.tolist(), gradients[0].tolist()))
            log(f"{arch}-{blocks}: lag-1 autocorrelation of the gradient {mean_acf[1]:+.3f}")
    return ShatteredResults(networks)


def draw(plt, results: ShatteredResults):
    """Top: the gradient along the first line (scaled to unit range). Bottom: its autocorrelation."""
    figure, axes = plt.subplots(2, len(ARCHS), figsize=(13, 6.5), sharex="row", sharey="row", layout="constrained")
    depths = sorted({n.blocks for n in results.networks})
    colors = shades(plt, len(depths))
    for column, arch in enumerate(ARCHS):
        for network in (n for n in results.networks if n.arch == arch):
            color, label = colors[depths.index(network.blocks)], f"{network.blocks} blocks"
            gradient = np.asarray(network.first_line_gradient)
            axes[0, column].plot(np.linspace(0, 1, len(gradient)), depths.index(network.blocks) + _unit_range(gradient),
                                 color=color, linewidth=0.8, label=label)
            axes[1, column].plot(network.autocorrelation, color=color, label=label)
        axes[0, column].set(title=f"{arch}: d logit / dt along a line", xlabel="t (image a -> image b)")
        axes[1, column].set(title=f"{arch}: autocorrelation (mean of lines)", xlabel="lag (points)")
        axes[1, column].axhline(0, color="gray", linewidth=0.8)
        axes[1, column].legend(fontsize=8)
    axes[0, 0].set_ylabel("gradient (rescaled, offset by depth)")
    axes[1, 0].set_ylabel("autocorrelation")
    for axis in axes.flat:
        axis.grid(alpha=0.3)
    return figure


def _unit_range(signal: np.ndarray) -> np.ndarray:
    """``signal`` mapped onto [0, 1]; a constant one (up to float rounding) sits flat at 0.5."""
    spread = float(np.ptp(signal))
    if spread <= 1e-6 * float(np.abs(signal).max()):
        return np.full_like(signal, 0.5)
    return (signal - signal.min()) / spread

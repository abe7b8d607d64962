"""The size of each experiment: plain dataclasses, no torch (the CLI reads its defaults here).

The defaults fit in 15 minutes each on a 2-core CPU with bf16 (measured: docs/experiments.md);
``quick()`` sizes run in seconds and only check that everything works: their numbers mean
nothing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    """What each network an experiment trains gets."""

    train_images: int  # training images seen (the training split repeats when this exceeds it)
    curve_points: int = 1  # points on the error curves, evenly spaced over training
    val_images: int = 2_000  # validation images behind each curve point


@dataclass(frozen=True)
class DepthSettings:
    depths: tuple[int, ...] = (4, 12, 25, 50)  # residual blocks (2 convolutions each)
    train_images: int = 20_000
    curve_points: int = 10
    val_images: int = 2_000

    @classmethod
    def quick(cls) -> "DepthSettings":
        return cls(depths=(2, 4), train_images=512, curve_points=2, val_images=256)

    @property
    def budget(self) -> Budget:
        return Budget(self.train_images, self.curve_points, self.val_images)


@dataclass(frozen=True)
class LesionSettings:
    plain_train_images: int = 20_000  # budget of the plain network trained for comparison
    test_images: int = 10_000  # behind each single-block deletion
    random_test_images: int = 2_000  # behind each random k-block deletion
    draws: int = 5  # random sets of k blocks per k

    @classmethod
    def quick(cls) -> "LesionSettings":
        return cls(plain_train_images=256, test_images=128, random_test_images=64, draws=1)

    @property
    def budget(self) -> Budget:
        return Budget(self.plain_train_images, curve_points=1, val_images=min(2_000, self.test_images))


@dataclass(frozen=True)
class ShatteredSettings:
    depths: tuple[int, ...] = (1, 4, 12, 25, 50)
    points: int = 256  # along each line
    lines: int = 16  # image pairs; autocorrelations are averaged over them
    max_lag: int = 64
    calibration_images: int = 1_000  # BN statistics at init
    seed: int = 0

    @classmethod
    def quick(cls) -> "ShatteredSettings":
        return cls(depths=(1, 8), lines=2, max_lag=16, calibration_images=128)


@dataclass(frozen=True)
class GatesSettings:
    blocks: int = 25  # the lecture's depth, for every network here
    train_images: int = 40_000
    survival_prob: float = 0.5  # p_L, Huang et al.'s choice
    gate_images: int = 2_000  # test images behind each mean gate value
    test_images: int = 10_000  # behind each network's test accuracy
    curve_points: int = 4

    @classmethod
    def quick(cls) -> "GatesSettings":
        return cls(blocks=3, train_images=512, gate_images=128, test_images=512, curve_points=1)

    @property
    def budget(self) -> Budget:
        return Budget(self.train_images, self.curve_points)

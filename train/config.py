"""The configurations of a network, of a training run and of an export: plain dataclasses, no torch.

They are the one source of defaults: the CLI reads its option defaults from here, checkpoints
store ``ModelConfig`` so a model rebuilds from its checkpoint alone, and the model card records
both.
"""

from __future__ import annotations

import math
import typing
from dataclasses import asdict, dataclass
from pathlib import Path

from resserve.serve.errors import ResserveError
from resserve.serve.manifest import check_model_name, check_model_version

ARCHITECTURES: dict[str, str] = {
    "resnet": "He et al. 2015 ResBlocks (the lecture model)",
    "plain": "the same network without skip connections (degradation baseline)",
    "preact": "He et al. 2016 pre-activation identity-mapping blocks",
    "highway": "Srivastava et al. 2015 gated blocks, gate biased so T ~ 0 at start",
    "crelu": "plain CReLU blocks with looks-linear initialization (Balduzzi et al. 2017)",
}


FORMATS = ("onnx", "torchscript")  # the artifacts an export writes
OUTPUTS = ("logits", "probabilities")  # what every exported graph computes, in order
INPUT_RANGES = (1, 255)  # the largest pixel value a package's served FP32 input takes
DEFAULT_OPSET = 18
# Residual blocks in one network at most. He et al.'s deepest network (1,202 layers) had 600; one of
# 30,000 took minutes to build before anything could be said about it.
MAX_DEPTH = 1_000


class ConfigError(ResserveError):
    """A model configuration that cannot describe a network."""


def check_depth(blocks: int, stages: int = 1) -> None:
    """One line where ``stages`` stages of ``blocks`` blocks each are more than MAX_DEPTH blocks."""
    if blocks * stages > MAX_DEPTH:
        per_stage = f" ({blocks:,} per stage x {stages} stages)" if stages > 1 else ""
        raise ConfigError(f"a network has at most {MAX_DEPTH:,} residual blocks (He et al.'s deepest, 1,202 layers, "
                          f"had 600), got {blocks * stages:,}{per_stage}")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a network; stored in every checkpoint.

    ``widths`` lists the channels of each stage; stage s > 0 starts with a stride-2 block.
    ``blocks`` counts blocks per stage. The lecture model is the default.
    """

    arch: str = "resnet"
    blocks: int = 25
    widths: tuple[int, ...] = (16,)
    kernel_size: int = 3
    shortcut: str = "A"  # A: subsample + zero-pad channels, B: 1x1 conv projection
    survival_prob: float = 1.0  # p_L of the linear decay rule; 1.0 disables stochastic depth
    zero_init_residual: bool = False  # zero the last BN of each branch: blocks start as identity
    highway_gate_bias: float = -3.0  # T = sigmoid(-3) ~ 0.05: highway blocks start as carry
    num_classes: int = 10

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        self.validate()

    def validate(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ConfigError(f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHITECTURES)}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ConfigError(f"kernel size must be a positive odd number, got {self.kernel_size}")
        if not self.widths or any(w < 1 for w in self.widths):
            raise ConfigError(f"widths must be positive channel counts, got {list(self.widths)}")
        if self.blocks < 0:
            raise ConfigError(f"the number of blocks must be >= 0, got {self.blocks}")
        check_depth(self.blocks, len(self.widths))
        if len(self.widths) > 1 and self.blocks == 0:
            raise ConfigError("several stages need at least one block per stage to downsample")
        if self.shortcut not in ("A", "B"):
            raise ConfigError(f"shortcut must be 'A' (zero-pad) or 'B' (1x1 projection), got {self.shortcut!r}")
        if not 0.0 < self.survival_prob <= 1.0:
            raise ConfigError(f"survival probability must be in (0, 1], got {self.survival_prob}")
        if self.survival_prob < 1.0 and self.arch not in ("resnet", "preact"):
            raise ConfigError(f"stochastic depth applies to resnet and preact, not {self.arch}")
        if self.num_classes < 2:
            raise ConfigError(f"a classifier needs at least 2 classes, got {self.num_classes}")
        if not math.isfinite(self.highway_gate_bias):
            raise ConfigError(f"the highway gate bias must be a finite number, got {self.highway_gate_bias}")

    @property
    def depth(self) -> int:
        """Number of residual blocks in the whole network (L in the stochastic-depth rule)."""
        return self.blocks * len(self.widths)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["widths"] = list(self.widths)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        """The config a checkpoint stores, each field checked for its type: a checkpoint is a file
        from anywhere, and a float where a count belongs would fail later, deep in torch."""
        if not isinstance(data, dict):
            raise ConfigError(f"a model config is a mapping of its fields, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        unknown = set(data) - set(hints)
        if unknown:
            raise ConfigError(f"unknown model config fields: {', '.join(sorted(map(str, unknown)))}")
        for name, value in data.items():
            _check_field_type(name, value, hints[name])
        return cls(**data)


def _check_field_type(name: str, value: object, hint: object) -> None:
    """``value`` as a checkpoint would hold a field of type ``hint``: an int or a float for a
    float, a list of ints for a tuple, never a bool for a number."""
    kind = typing.get_origin(hint) or hint
    if kind is tuple:
        fits, wanted = isinstance(value, (list, tuple)) and all(map(_is_integer, value)), "a list of integers"
    elif kind is float:
        fits, wanted = _is_integer(value) or isinstance(value, float), "a number"
    elif kind is int:
        fits, wanted = _is_integer(value), "an integer"
    else:
        fits, wanted = isinstance(value, kind), f"a {kind.__name__}"
    if not fits:
        raise ConfigError(f"model config field {name} must be {wanted}, got {value!r}")


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class TrainConfig:
    """The default recipe (see training.py for why)."""

    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    shift: int = 2  # random translation, pixels
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto | bf16 | fp32
    validation_size: int = 5_000
    train_limit: int | None = None  # use only the first N training images (quick runs, tests)

    def validate(self) -> None:
        if self.epochs < 1:
            raise ResserveError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ResserveError(f"batch size must be >= 1 images, got {self.batch_size}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ResserveError(f"learning rate must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ResserveError(f"weight decay must be a finite number >= 0, got {self.weight_decay}")
        check_device(self.device)
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ResserveError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.shift < 0:
            raise ResserveError(f"shift must be >= 0 pixels, got {self.shift}")
        if self.train_limit is not None and self.train_limit < 1:
            raise ResserveError(f"train limit must be >= 1 images, got {self.train_limit}")


def check_device(device: str) -> None:
    """``--device`` of the training commands: auto (CUDA when torch sees it), cpu or cuda."""
    if device not in ("auto", "cpu", "cuda"):
        raise ResserveError(f"device must be auto, cpu or cuda, got {device!r}")


class ExportError(ResserveError):
    """An export that cannot be done or failed its verification."""


@dataclass(frozen=True)
class ExportOptions:
    """What `resserve export` is asked for; ``validate`` answers a bad option before any work."""

    formats: tuple[str, ...] = FORMATS
    opset: int = DEFAULT_OPSET
    drop_blocks: int = 0
    quantize: str | None = None  # None | "int8"
    name: str | None = None  # default: the checkpoint's file stem
    version: str = "1"
    # What the package serves, in its manifest (the graph is the same): a subset of the outputs,
    # and pixel values in [0, 1] or [0, 255] (the server scales the latter; Triton's image clients)
    outputs: tuple[str, ...] = OUTPUTS
    input_range: int = 1

    def validate(self) -> None:
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or not self.formats:
            raise ExportError(f"unknown format {', '.join(unknown) or '(none)'}; choose from {', '.join(FORMATS)}")
        if len(set(self.formats)) < len(self.formats):
            raise ExportError(f"--format names a format twice: {','.join(self.formats)}")
        if self.quantize not in (None, "int8"):
            raise ExportError(f"--quantize supports int8 only, got {self.quantize!r}")
        if self.quantize and "onnx" not in self.formats:
            raise ExportError("--quantize int8 quantizes the ONNX artifact: include onnx in --format")
        if self.drop_blocks < 0:
            raise ExportError(f"--drop-blocks must be >= 0, got {self.drop_blocks}")
        if not self.outputs or len(set(self.outputs)) != len(self.outputs) or set(self.outputs) - set(OUTPUTS):
            raise ExportError(f"--outputs takes some of {', '.join(OUTPUTS)}, each once; got {', '.join(self.outputs) or '(none)'}")
        if self.input_range not in INPUT_RANGES:
            raise ExportError(f"--input-range must be 1 or 255, got {self.input_range}")
        if not 7 <= self.opset <= 23:
            raise ExportError(f"--opset {self.opset} is outside what this exporter supports (7-23)")
        if self.name is not None:
            check_model_name(self.name)
        check_model_version(self.version)

    def model_name(self, checkpoint: Path) -> str:
        """The name the package is served by: ``name`` (checked by ``validate``), or the checkpoint's
        file stem, checked here."""
        if self.name is not None:
            return self.name
        stem = Path(checkpoint).stem
        try:
            check_model_name(stem)
        except ResserveError as exc:
            raise ExportError(f"{exc} (it is the checkpoint's file name: --name sets another)") from None
        return stem


def parse_ints(text: str, option: str, example: str = "16,32,64", distinct: bool = False) -> tuple[int, ...]:
    """'16,32,64' -> (16, 32, 64): positive integers, as the CLI's list options take them;
    ``distinct``: each once (a list of networks to train, where a repeat is a typo, not a wish)."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise ResserveError(f"{option} takes comma-separated positive integers like {example}, got {text!r}")
    if distinct and len(set(values)) < len(values):
        raise ResserveError(f"{option} names a value more than once: {text}")
    return values

"""The lecture's family of residual networks for MNIST, built from one dataclass config.

Every network has the same skeleton as the lecture's ResNet:

    input [N,1,28,28] in [0,1] -> normalize -> conv0 (1x1) -> act -> resblocks -> avg -> act -> fc

and differs only in the block that fills ``resblocks``. ``build_model(config)`` is the single
entry point; the config (``ModelConfig``, train/config.py) names what ``--arch`` accepts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from resserve.train.config import ModelConfig

# MNIST pixel statistics: the network normalizes its [0,1] input itself, so every consumer
# (eval, export, the server) feeds raw intensities.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
IMAGE_SIZE = 28


# ----------------------------------------------------------------------------------------------
# Small building blocks


class Normalize(nn.Module):
    """(x - mean) / std with MNIST constants; no parameters, so the lecture count is unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - MNIST_MEAN) / MNIST_STD


class CReLU(nn.Module):
    """Concatenated ReLU: [relu(x), relu(-x)] along channels, so channels double (Shang 2016)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.relu(x), F.relu(-x)], dim=1)


class ShortcutA(nn.Module):
    """Option A: keep 1/4 of the activations (stride 2) and append zero channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra_channels = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))  # pads the channel dim at the end


def make_shortcut(in_channels: int, out_channels: int, stride: int, kind: str) -> nn.Module:
    """Identity when shapes match, else option A (parameter-free) or B (1x1 conv + BN)."""
    if in_channels == out_channels and stride == 1:
        return nn.Identity()
    if kind == "A":
        return ShortcutA(in_channels, out_channels, stride)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


def stochastic_depth(drop_prob: float) -> nn.Module:
    """torchvision's ``StochasticDepth`` in row mode (each example keeps or drops the branch on its
    own) where a block may be dropped, the identity where it never is. torchvision is imported only
    then: its import takes 1.5 s (``torch._dynamo``, through its detection ops), which evaluating,
    and refusing a bad checkpoint, would otherwise pay for nothing."""
    if drop_prob == 0:
        return nn.Identity()
    from torchvision.ops import StochasticDepth

    return StochasticDepth(drop_prob, mode="row")


def conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Conv2d:
    """k x k convolution with 'same' padding, as in the lecture (bias kept, as there)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=(kernel_size - 1) // 2)


# ----------------------------------------------------------------------------------------------
# Blocks: each maps [N, in_channels, H, W] -> [N, out_channels, H/stride, W/stride]


class ResBlock(nn.Module):
    """He et al. 2015: relu(x + bn2(conv2(relu(bn1(conv1(x)))))); skip=False gives the plain block."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 shortcut: str = "A", drop_prob: float = 0.0, skip: bool = True) -> None:
        super().__init__()
        self.conv1 = conv(in_channels, out_channels, kernel_size, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv(out_channels, out_channels, kernel_size)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = make_shortcut(in_channels, out_channels, stride, shortcut) if skip else None
        self.drop = stochastic_depth(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.drop(self.bn2(self.conv2(y)))
        if self.shortcut is not None:
            y = y + self.shortcut(x)
        return F.relu(y)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2


class PreActBlock(nn.Module):
    """He et al. 2016 identity mapping: x + conv2(relu(bn2(conv1(relu(bn1(x)))))), nothing after the sum."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 shortcut: str = "A", drop_prob: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv(in_channels, out_channels, kernel_size, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv(out_channels, out_channels, kernel_size)
        self.shortcut = make_shortcut(in_channels, out_channels, stride, shortcut)
        self.drop = stochastic_depth(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.relu(self.bn1(x)))
        y = self.conv2(F.relu(self.bn2(y)))
        return self.shortcut(x) + self.drop(y)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2


class HighwayBlock(nn.Module):
    """Srivastava et al. 2015: y = T(x) * H(x) + (1 - T(x)) * x with T a sigmoid gate.

    The gate's bias starts at ``gate_bias`` (about -3), so T ~ 0: the block carries x through
    and gradients pass at first, whatever the depth.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 shortcut: str = "A", gate_bias: float = -3.0) -> None:
        super().__init__()
        self.conv1 = conv(in_channels, out_channels, kernel_size, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv(out_channels, out_channels, kernel_size)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.gate = conv(in_channels, out_channels, kernel_size, stride)
        nn.init.constant_(self.gate.bias, gate_bias)
        self.shortcut = make_shortcut(in_channels, out_channels, stride, shortcut)

    def transform_gate(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.gate(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        t = self.transform_gate(x)
        return t * h + (1.0 - t) * self.shortcut(x)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2


class CReLUBlock(nn.Module):
    """Balduzzi et al. 2017: a plain block with CReLU; takes and returns 2*C channels.

    With looks-linear initialization (see ``looks_linear_``) W.CReLU(x) = W0.x, so a stack of
    these blocks is exactly affine at initialization, whatever the depth.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv(2 * in_channels, out_channels, kernel_size, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv(2 * out_channels, out_channels, kernel_size)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act = CReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N,2C_in,H,W] -> [N,2C_out,H',W']
        y = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(y)))

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2


def looks_linear_(layer: nn.Conv2d | nn.Linear) -> None:
    """Initialize a layer that reads a CReLU output as [W0, -W0], so W.[relu(x), relu(-x)] = W0.x."""
    half = layer.weight.shape[1] // 2
    w0 = torch.empty_like(layer.weight[:, :half])
    nn.init.kaiming_normal_(w0, nonlinearity="linear")  # the network is linear at init
    with torch.no_grad():
        layer.weight.copy_(torch.cat([w0, -w0], dim=1))


# ----------------------------------------------------------------------------------------------
# The network


class ResNet(nn.Module):
    """The lecture's MNIST ResNet skeleton, with the block chosen by ``config.arch``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        is_crelu = config.arch == "crelu"
        widen = 2 if is_crelu else 1  # CReLU doubles the channels it emits
        self.normalize = Normalize()
        self.conv0 = nn.Conv2d(1, config.widths[0], kernel_size=1)
        self.act = CReLU() if is_crelu else nn.ReLU()
        blocks, size, in_channels = [], IMAGE_SIZE, config.widths[0]
        for stage, width in enumerate(config.widths):
            for index in range(config.blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(self._make_block(in_channels, width, stride, len(blocks)))
                in_channels = width
                size = math.ceil(size / stride)
        self.resblocks = nn.Sequential(*blocks)
        # pre-activation blocks leave the last sum un-normalized: He et al. 2016 add BN before pooling
        self.final_bn = nn.BatchNorm2d(in_channels) if config.arch == "preact" else None
        self.avg = nn.AvgPool2d(kernel_size=size)
        self.fc = nn.Linear(widen * in_channels, config.num_classes)
        self._init_weights()

    def _make_block(self, in_channels: int, width: int, stride: int, index: int) -> nn.Module:
        c = self.config
        if c.arch in ("resnet", "plain"):
            return ResBlock(in_channels, width, c.kernel_size, stride, c.shortcut,
                            drop_prob=self.drop_prob(index), skip=c.arch == "resnet")
        if c.arch == "preact":
            return PreActBlock(in_channels, width, c.kernel_size, stride, c.shortcut,
                               drop_prob=self.drop_prob(index))
        if c.arch == "highway":
            return HighwayBlock(in_channels, width, c.kernel_size, stride, c.shortcut, c.highway_gate_bias)
        return CReLUBlock(in_channels, width, c.kernel_size, stride)

    def drop_prob(self, index: int) -> float:
        """Huang et al.'s linear decay: block l (1-based) survives with p_l = 1 - l/L (1 - p_L)."""
        return (index + 1) / self.config.depth * (1.0 - self.config.survival_prob)

    def _init_weights(self) -> None:
        if self.fc.weight.is_meta:  # built for its shapes only (Checkpoint.build): no values to set, and
            return  # initializing meta tensors would import torch._dynamo, 1.3 s
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if self.config.arch == "crelu":
            for module in self.modules():
                if isinstance(module, (nn.Conv2d, nn.Linear)) and module is not self.conv0:
                    looks_linear_(module)
        if self.config.zero_init_residual:
            for block in self.resblocks:
                nn.init.zeros_(block.last_bn().weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv0(self.normalize(x)))  # [N,1,28,28] -> [N,C,28,28] ([N,2C,..] CReLU)
        x = self.resblocks(x)  # [N,C,28,28] (single stage) or [N,C_last,ceil(28/2^s),..]
        if self.final_bn is not None:
            x = F.relu(self.final_bn(x))
        x = F.relu(self.avg(x))  # [N,C,1,1]; a no-op after CReLU blocks, so those stay affine
        return self.fc(x.flatten(1))  # [N,10]


def build_model(config: ModelConfig) -> ResNet:
    """The one constructor: every network of the family comes from its config."""
    return ResNet(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def lecture_config(**overrides) -> ModelConfig:
    """The lecture's MNIST ResNet: 25 blocks, 16 channels, 3x3 kernels, 117,802 parameters."""
    return ModelConfig(**overrides)

"""Turn a trained network into its inference form: BatchNorm folded, stochastic depth resolved,
blocks optionally dropped.

- Every BN that follows a convolution is folded into it with torch's own
  ``fuse_conv_bn_eval`` and replaced by ``nn.Identity``; the forward code is unchanged.
- A BN that precedes a ReLU (the first of a pre-activation block, the final one) has no
  convolution to fold into and becomes ``ChannelAffine`` (x * scale + shift).
- Stochastic depth uses inverted scaling in training (see models.py), so a branch's test-time
  scale is 1: torchvision's ``StochasticDepth`` modules are replaced by ``nn.Identity`` and no
  random op remains.
- Dropped blocks (Veit et al. 2016) become ``nn.Identity``; only blocks that keep the tensor
  shape qualify.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from resserve.serve.errors import ResserveError
from resserve.train.models import CReLUBlock, HighwayBlock, PreActBlock, ResBlock, ResNet

# Per block type: (conv, bn) attribute pairs where the BN directly follows the conv, and BNs
# that sit before a ReLU and cannot fold.
FOLDABLE: dict[type, list[tuple[str, str]]] = {
    ResBlock: [("conv1", "bn1"), ("conv2", "bn2")],
    HighwayBlock: [("conv1", "bn1"), ("conv2", "bn2")],
    CReLUBlock: [("conv1", "bn1"), ("conv2", "bn2")],
    PreActBlock: [("conv1", "bn2")],  # bn2 follows conv1; bn1 precedes a ReLU
}
UNFOLDABLE: dict[type, list[str]] = {PreActBlock: ["bn1"]}


class DropBlocksError(ResserveError):
    """A --drop-blocks request the network cannot satisfy."""


class ChannelAffine(nn.Module):
    """An eval-mode BatchNorm as a per-channel scale and shift: [N,C,H,W] -> [N,C,H,W]."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        self.register_buffer("scale", scale.view(1, -1, 1, 1).clone())
        self.register_buffer("shift", (bn.bias.detach() - bn.running_mean * scale).view(1, -1, 1, 1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def _fold_pair(owner: nn.Module, conv_name: str, bn_name: str) -> None:
    conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
    setattr(owner, conv_name, fuse_conv_bn_eval(conv, bn))
    setattr(owner, bn_name, nn.Identity())


def _fold_shortcut(block: nn.Module) -> None:
    shortcut = getattr(block, "shortcut", None)
    if isinstance(shortcut, nn.Sequential):  # option B: 1x1 conv + BN
        block.shortcut = fuse_conv_bn_eval(shortcut[0], shortcut[1])


def fold_for_inference(model: ResNet) -> ResNet:
    """An eval-mode copy with no BatchNorm and no stochastic depth left; same function."""
    folded = copy.deepcopy(model).eval()
    for block in folded.resblocks:
        for conv_name, bn_name in FOLDABLE.get(type(block), []):  # a dropped block is an Identity
            _fold_pair(block, conv_name, bn_name)
        for bn_name in UNFOLDABLE.get(type(block), []):
            setattr(block, bn_name, ChannelAffine(getattr(block, bn_name)))
        _fold_shortcut(block)
        if hasattr(block, "drop"):  # stochastic depth, or its identity where a block always survives
            block.drop = nn.Identity()  # inverted scaling: the test-time branch scale is 1
    if folded.final_bn is not None:
        folded.final_bn = ChannelAffine(folded.final_bn)
    return folded


# ----------------------------------------------------------------------------------------------
# Dropping blocks at test time


def shape_preserving_blocks(model: ResNet) -> list[int]:
    """Blocks whose output has their input's shape (stride 1, same channels): the ones a lesion
    study can delete and leave a network that still runs."""
    return [i for i, block in enumerate(model.resblocks)
            if block.conv1.stride == (1, 1) and block.conv1.in_channels == block.conv2.in_channels]


def droppable_blocks(model: ResNet) -> list[int]:
    """Blocks that can go at test time: shape-preserving blocks of an architecture with skips."""
    if model.config.arch in ("plain", "crelu"):
        return []  # without a skip path, removing a block removes the only path through it
    return shape_preserving_blocks(model)


def remove_blocks(model: ResNet, indices: list[int]) -> ResNet:
    """A copy with the given shape-preserving blocks replaced by the identity (a lesion).

    The blocks it keeps are ``model``'s own, shared rather than copied: a lesion study makes
    hundreds of these, and copying every block each time was a third of `experiment lesion --quick`.
    """
    allowed = set(shape_preserving_blocks(model))
    if not set(indices) <= allowed:
        raise DropBlocksError(f"blocks {sorted(set(indices) - allowed)} change the tensor shape and cannot be removed")
    pruned = copy.deepcopy(model, memo={id(block): block for block in model.resblocks})
    for index in indices:
        pruned.resblocks[index] = nn.Identity()
    return pruned


def drop_blocks(model: ResNet, indices: list[int]) -> ResNet:
    """A copy with the given blocks replaced by the identity (their skip path alone)."""
    allowed = set(droppable_blocks(model))
    if not set(indices) <= allowed:
        raise DropBlocksError(f"blocks {sorted(set(indices) - allowed)} change the tensor shape and cannot be dropped")
    return remove_blocks(model, indices)


def choose_blocks_to_drop(model: ResNet, count: int, accuracy_of: Callable[[ResNet], float],
                          on_block: Callable[[int, float], None] = lambda i, a: None) -> tuple[list[int], str]:
    """Pick ``count`` blocks to drop and say how.

    Stochastic-depth models: the blocks with the lowest survival probability (training already
    taught the network to do without them). Others: a lesion study (Veit et al. 2016): the
    accuracy of the network with each single block removed, measured by ``accuracy_of`` on
    the validation split; the blocks whose removal costs least go.
    """
    candidates = droppable_blocks(model)
    if count > len(candidates):
        raise DropBlocksError(f"--drop-blocks {count} is more than the {len(candidates)} droppable blocks "
                              f"of this {model.config.arch} network")
    if count == 0:
        return [], "none"
    if count == len(candidates):  # nothing to choose: no lesion study (25 evaluations of the validation split)
        return candidates, "every droppable block"
    if model.config.survival_prob < 1.0:
        by_survival = sorted(candidates, key=lambda i: -model.drop_prob(i))
        return sorted(by_survival[:count]), "lowest survival probability"
    scores = {}
    for index in candidates:
        scores[index] = accuracy_of(drop_blocks(model, [index]))
        on_block(index, scores[index])
    ranked = sorted(candidates, key=lambda i: -scores[i])
    return sorted(ranked[:count]), "single-block lesion on the validation split"

"""Whether a training run fits in memory, asked before anything is allocated.

A network or batch too large for the machine failed deep in torch, with a traceback (an
allocation it could not make: `--channels 100000` asked for 360 GB at once), or allocated until
the kernel's OOM killer ended the process (`--batch-size 60000` of the lecture ResNet). What
training needs at least follows from the network's shapes alone: built on the meta device, it
holds no memory, and one image through it gives every convolution's output size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from resserve.serve.cgroups import memory_headroom
from resserve.serve.errors import ResserveError
from resserve.train.config import ModelConfig
from resserve.train.models import build_model

FP32_BYTES, BF16_BYTES = 4, 2


@dataclass(frozen=True)
class TrainingMemory:
    """Lower bounds, in bytes, of what a training step holds."""

    weights: int  # the parameters, their gradients and SGD's momentum: three fp32 copies
    activations: int  # one batch's convolution outputs, kept for the backward pass, at bf16's 2 bytes

    @property
    def total(self) -> int:
        return self.weights + self.activations


def training_memory(config: ModelConfig, batch_size: int) -> TrainingMemory:
    """What training ``config`` at ``batch_size`` images a step needs at least."""
    with torch.device("meta"):
        network = build_model(config).eval()  # eval: every stochastic-depth block counted
        values: list[int] = []
        hooks = [module.register_forward_hook(lambda _module, _inputs, output: values.append(output.numel()))
                 for module in network.modules() if isinstance(module, nn.Conv2d)]
        network(torch.empty(1, 1, 28, 28))
    for hook in hooks:
        hook.remove()
    parameters = sum(p.numel() for p in network.parameters())
    return TrainingMemory(3 * FP32_BYTES * parameters, BF16_BYTES * batch_size * sum(values))


def free_memory(device: torch.device) -> int | None:
    """Bytes ``device`` can still give: the GPU's free memory, or on the CPU the kernel's estimate
    of what is available, capped by what the process's cgroups (a container's, a pod's) still
    allow (serve/cgroups.py); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        free = int(meminfo["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    headroom = memory_headroom()
    return free if headroom is None else min(free, headroom)


def check_training_fits(config: ModelConfig, batch_size: int, device: torch.device,
                        remedy: str = "lower --batch-size or the network's size") -> None:
    """One line, before anything is allocated, where training cannot fit in ``device``'s memory:
    what it needs and what to change (``remedy``)."""
    need, free = training_memory(config, batch_size), free_memory(device)
    if free is not None and need.total > free:
        raise ResserveError(
            f"training this network needs at least {_size(need.total)} ({_size(need.weights)} for its weights, their "
            f"gradients and momentum; {_size(need.activations)} for a batch of {batch_size:,} images), more than the "
            f"{_size(free)} free on {device.type}: {remedy}")


def _size(size: int) -> str:
    return f"{size / 1e9:,.1f} GB" if size >= 1e9 else f"{size / 1e6:,.0f} MB"

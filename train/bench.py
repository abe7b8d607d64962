"""``resserve bench train``: training throughput of the lecture ResNet, fast path against naive.

Both configurations run the same model, optimizer, loss and real MNIST batches in the same
process, one after the other; only the memory format and the autocast precision differ.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from resserve.train.data import MNIST
from resserve.train.models import build_model, lecture_config
from resserve.train.training import batches, cpu_has_fast_bf16, to_input


def _images_per_second(mnist: MNIST, steps: int, warmup: int, batch_size: int,
                       channels_last: bool, bf16: bool) -> float:
    torch.manual_seed(0)
    model = build_model(lecture_config()).train()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    generator = torch.Generator().manual_seed(0)
    stream = batches(mnist.train, batch_size, generator)
    started, seen = 0.0, 0
    for step in range(warmup + steps):
        if step == warmup:
            started, seen = time.perf_counter(), 0
        images, labels = next(stream)
        x = to_input(images).contiguous(memory_format=memory_format)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(labels)
    return seen / (time.perf_counter() - started)


def benchmark_training(mnist: MNIST, steps: int, warmup: int, batch_size: int) -> dict:
    """Images/s of the naive loop (fp32, NCHW) and of what ``resserve train`` does on this CPU."""
    fast_bf16 = cpu_has_fast_bf16()
    naive = _images_per_second(mnist, steps, warmup, batch_size, channels_last=False, bf16=False)
    fast = _images_per_second(mnist, steps, warmup, batch_size, channels_last=True, bf16=fast_bf16)
    return {
        "model": "resnet (lecture, 117,802 parameters)",
        "batch_size": batch_size, "steps": steps, "threads": torch.get_num_threads(),
        "rows": [
            {"config": "naive: fp32, NCHW, eager", "images_per_second": round(naive, 1)},
            {"config": f"resserve train: {'bf16 autocast' if fast_bf16 else 'fp32'}, channels_last",
             "images_per_second": round(fast, 1)},
        ],
        "speedup": round(fast / naive, 2),
        "torch": torch.__version__,
    }


def print_training_benchmark(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("configuration", "images/s", title=f"Training throughput, {results['model']}, "
                  f"batch {results['batch_size']}, {results['threads']} threads")
    for row in results["rows"]:
        table.add_row(row["config"], f"{row['images_per_second']:.1f}")
    console = Console()
    console.print(table)
    console.print(f"speedup: {results['speedup']:.2f}x")

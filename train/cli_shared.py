"""What every training command shares: starting torch (the train extra, its threads), common options, logging.

Torch-free at import, like the command modules that use it (the root CLI loads them at start).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated, Optional

import typer

from resserve.serve.errors import ResserveError

TRAIN_EXTRA_HINT = "this command needs the training extra: pip install 'resserve[train]'"

DataDir = Annotated[Optional[Path], typer.Option(
    "--data-dir", envvar="RESSERVE_DATA",
    help="Where MNIST is kept and cached [default: ~/.cache/resserve/mnist].")]


def start_torch() -> None:
    """Torch for a command that needs it: one line, not a traceback, when it is missing; and its
    CPU threads no more than the CPUs the process may use. Torch counts the affinity mask only,
    not a container's CPU quota: in a 2-CPU container of a 64-core host it would run a thread per
    host core, in the CPU time of two (the quota throttles them all, at every step)."""
    from resserve.serve.backends.base import usable_cpus

    try:
        import torch
    except ImportError as exc:
        raise ResserveError(TRAIN_EXTRA_HINT) from exc
    if importlib.util.find_spec("torchvision") is None:  # imported where used: it takes 1.5 s (train/models.py)
        raise ResserveError(TRAIN_EXTRA_HINT)
    torch.set_num_threads(min(torch.get_num_threads(), usable_cpus()))


def log(message: str) -> None:
    """Progress and log lines go to stderr; results go to stdout."""
    typer.echo(message, err=True)

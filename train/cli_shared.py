"""What every training command shares: the check for the train extra, common options, logging.

Torch-free at import, like the command modules that use it (the root CLI loads them at start).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from resserve.serve.errors import ResserveError

TRAIN_EXTRA_HINT = "this command needs the training extra: pip install 'resserve[train]'"

DataDir = Annotated[Optional[Path], typer.Option(
    "--data-dir", envvar="RESSERVE_DATA",
    help="Where MNIST is kept and cached [default: ~/.cache/resserve/mnist].")]


def require_train_extra() -> None:
    """One line, not a traceback, when torch is missing."""
    try:
        import torch  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError as exc:
        raise ResserveError(TRAIN_EXTRA_HINT) from exc


def log(message: str) -> None:
    """Progress and log lines go to stderr; results go to stdout."""
    typer.echo(message, err=True)

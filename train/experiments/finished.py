"""The networks an experiment has trained so far, kept so that a stopped run goes on from them.

An experiment at its default size trains networks for up to 15 minutes. Each one it finishes is
written to ``OUT/NAME.resume/`` (weights and what the report needs of its training), so that a
run stopped by Ctrl-C, SIGTERM or a crash is continued by the same command with ``--resume``,
which takes the networks finished there instead of training them again; they are the networks
the uninterrupted run would have trained (each starts from the same seed). The folder goes when
the report is written. Files are tensors, numbers and strings, written atomically and read with
``weights_only=True``, as checkpoints are.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable, TypeVar

import torch

from resserve.train.checkpoint import cpu_state, read_format, write_tensors
from resserve.train.config import ModelConfig, TrainConfig
from resserve.train.experiments.settings import Budget
from resserve.train.files import CheckpointError
from resserve.train.resume import check_same_options

FORMAT = "resserve-experiment-network"
FORMAT_VERSION = 1
Run = TypeVar("Run")


class FinishedNetworks:
    """``OUT/NAME.resume/``: one file per finished network, named after it (``plain-12.pt``)."""

    def __init__(self, out: Path, experiment: str, resume: bool, log: Callable[[str], None]) -> None:
        self.folder, self.resume, self.log = Path(out) / f"{experiment}.resume", resume, log
        present = sorted(self.folder.glob("*.pt")) if self.folder.is_dir() else []
        self.kept = len(present) if resume else 0  # networks in the folder: the stopped run's and this one's
        self.failed = False
        if resume:
            self.log(f"resuming from {self.folder}: {_networks(len(present))} finished there" if present
                     else f"nothing to resume at {self.folder}: starting afresh")
        elif present:
            self.log(f"replacing {self.folder}, {_networks(len(present))} of a stopped run, as this one trains "
                     f"(--resume would have gone on from {_them(len(present))})")
            shutil.rmtree(self.folder, ignore_errors=True)

    def find(self, name: str, config: ModelConfig, recipe: TrainConfig, budget: Budget, model: torch.nn.Module,
             read_run: Callable[[dict], Run]) -> Run | None:
        """When resuming a run that finished the network ``name``: its weights loaded into
        ``model`` (built from ``config``) and its training as ``read_run`` reads what ``keep``
        was given. A network trained with other options, or a damaged file, is one line."""
        path = self.folder / f"{name}.pt"
        if not (self.resume and path.is_file()):
            return None
        payload = read_format(path, FORMAT, FORMAT_VERSION, "finished experiment network")
        if not {"options", "state", "run"} <= payload.keys():
            raise CheckpointError(f"{path} is a damaged finished network; delete it to train that network again")
        check_same_options(payload["options"], _options(config, recipe, budget), path)
        try:
            model.load_state_dict(payload["state"])
            return read_run(payload["run"])
        except (RuntimeError, TypeError, KeyError) as exc:
            raise CheckpointError(f"{path} is a damaged finished network ({str(exc).splitlines()[0][:200]}); "
                                  "delete it to train that network again") from None

    def keep(self, name: str, config: ModelConfig, recipe: TrainConfig, budget: Budget, model: torch.nn.Module,
             run: dict) -> None:
        """Write the network just finished; a write that fails (a full disk) is said once and the
        experiment goes on: it can still finish, and only resuming is lost."""
        payload = {"format": FORMAT, "format_version": FORMAT_VERSION,
                   "options": _options(config, recipe, budget), "state": cpu_state(model), "run": run}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_tensors(self.folder / f"{name}.pt", payload)
            self.kept += 1
        except OSError as exc:
            if not self.failed:
                self.log(f"cannot write {self.folder} ({exc.strerror or exc}): the experiment goes on, but the "
                         "networks it finishes now are not kept for --resume")
            self.failed = True

    def done(self) -> None:
        """The report is written: the networks are in it, the folder is not needed."""
        shutil.rmtree(self.folder, ignore_errors=True)

    @property
    def how_to_resume(self) -> str:
        """What a message about a stopped experiment adds."""
        if not self.kept:
            return "; no finished network was kept" if self.failed else "; no network had finished"
        return (f"; {_networks(self.kept)} finished, kept in {self.folder}: the same command with --resume "
                f"goes on from {_them(self.kept)}")


def _options(config: ModelConfig, recipe: TrainConfig, budget: Budget) -> dict:
    """What a network's training depends on, as the file keeps it: resuming needs the same."""
    return {**config.to_dict(), **asdict(recipe), **asdict(budget)}


def _networks(count: int) -> str:
    return f"{count} network{'s' if count != 1 else ''}"


def _them(count: int) -> str:
    return "them" if count > 1 else "it"

"""Where a training run stood after its last finished epoch, so that a run that was stopped
(Ctrl-C, SIGTERM from a scheduler that preempts it, a crash, a lost machine) goes on from there
with ``resserve train --resume`` rather than from the start.

``resserve train`` writes it beside the checkpoint after every epoch, as ``OUT.resume.pt``, and
removes it when the run ends. It holds what the loop carries (weights, SGD momentum, the one-cycle
schedule's step, the random streams of shuffling, augmentation and stochastic depth) and what
the run has found (the best epoch so far and its weights, the history), so that the resumed run
trains as the uninterrupted one would have. Tensors, numbers and strings only, written atomically
and read with ``weights_only=True``, as checkpoints are.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch

from resserve.train.checkpoint import read_format, write_tensors
from resserve.train.config import ConfigError, ModelConfig, TrainConfig
from resserve.train.files import CheckpointError
from resserve.train.record import EpochRecord

FORMAT = "resserve-resume"
FORMAT_VERSION = 1
# where the run may change between a stop and its resumption: a rescheduled job lands on another machine
MAY_DIFFER = {"device"}


def resume_path(out: Path) -> Path:
    """The resume state of the run writing the checkpoint ``out``: model.pt -> model.resume.pt."""
    return Path(out).with_suffix(".resume.pt")


@dataclass
class ResumeState:
    """A run after its finished epochs (``history``)."""

    model_config: ModelConfig
    train_config: TrainConfig
    seconds: float  # trained so far
    model: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    # generator states: "batches" (shuffling, shifts), "torch" (stochastic depth), "cuda" (it, on a GPU)
    random: dict[str, torch.Tensor]
    best_epoch: int
    best_accuracy: float
    best_model: dict[str, torch.Tensor]
    history: list[EpochRecord]

    def save(self, path: Path) -> None:
        payload = {**{f.name: getattr(self, f.name) for f in fields(self)}, "format": FORMAT,
                   "format_version": FORMAT_VERSION, "model_config": self.model_config.to_dict(),
                   "train_config": asdict(self.train_config), "history": [asdict(e) for e in self.history]}
        write_tensors(path, payload)

    @classmethod
    def load(cls, path: Path) -> ResumeState:
        """The state ``save`` wrote; anything else is refused in one line."""
        try:
            payload = read_format(path, FORMAT, FORMAT_VERSION, "resume state")
        except CheckpointError as exc:
            raise CheckpointError(f"{exc}; delete it to start afresh") from None
        try:
            data = {f.name: payload[f.name] for f in fields(cls)}
            return cls(**{**data, "model_config": ModelConfig.from_dict(data["model_config"]),
                          "train_config": TrainConfig(**data["train_config"]),
                          "history": [EpochRecord(**epoch) for epoch in data["history"]]})
        except KeyError as exc:
            raise CheckpointError(f"{path} is a damaged resume state (no {exc.args[0]}); "
                                  "delete it to start afresh") from None
        except (TypeError, ConfigError) as exc:
            raise CheckpointError(f"{path} is a damaged resume state ({exc}); delete it to start afresh") from None

    def check_same_run(self, model_config: ModelConfig, train_config: TrainConfig, path: Path) -> None:
        """A run resumes with the options it was started with: other ones would train another network."""
        check_same_options({**self.model_config.to_dict(), **asdict(self.train_config)},
                           {**model_config.to_dict(), **asdict(train_config)}, path)


def check_same_options(saved: dict, given: dict, path: Path) -> None:
    """``path``, a stopped run's state saved with the options ``saved``, is refused in one line
    when ``given`` (this run's) differ from them where it matters."""
    differing = [f"{name} {saved[name]!r}, not {given.get(name)!r}" for name in saved
                 if name not in MAY_DIFFER and saved[name] != given.get(name)]
    if differing:
        raise CheckpointError(f"{path} is of a run with other options ({'; '.join(differing)}): resume with the "
                              "options it was started with, or delete it to start afresh")


class ResumeFile:
    """``OUT.resume.pt`` as a run writes it, after each epoch. A write that fails (a full disk) is
    said once and the run goes on: it can still finish, and only resuming is lost."""

    def __init__(self, out: Path, log: Callable[[str], None]) -> None:
        self.path, self.log = resume_path(out), log
        self.epoch = 0  # the epoch the file holds
        self.failed = False

    def write(self, state: ResumeState) -> None:
        try:
            state.save(self.path)
            self.epoch = len(state.history)
        except OSError as exc:
            if not self.failed:
                self.log(f"cannot write {self.path} ({exc.strerror or exc}): training goes on, " + (
                    f"and if stopped, resumes after epoch {self.epoch}" if self.epoch
                    else "but cannot be resumed if stopped"))
            self.failed = True

    @property
    def how_to_resume(self) -> str:
        """What a message about a stopped run adds, if it can be resumed."""
        return f"; the same command with --resume goes on after epoch {self.epoch}" if self.epoch else ""

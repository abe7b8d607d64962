"""What the supervisor and a worker say to each other over the worker's pipe.

Worker to supervisor: ``Loaded``, ``Ready``, ``Failed``, ``Stopped``, ``SettingsChanged``,
``TurnWanted``, ``TurnOver`` (with the change made in the turn), ``Followed`` (a change made
through another worker made here too). Supervisor to worker: ``Listen``, ``SettingsChanged``,
``Turn``, ``MadeEverywhere`` (the change of its turn), and each ``Change`` made through another
worker: a ``ModelChange``, ``RegionRegistered`` or ``RegionUnregistered``. Each is pickled by the
pipe, so both sides read the same types, never a tuple of strings.
"""

from __future__ import annotations

from dataclasses import dataclass

from resserve.serve.sharedmemory import Region
from resserve.serve.state import ModelAction, SharedSettings


@dataclass(frozen=True)
class Loaded:
    """The worker's models are loaded and warmed: it waits for ``Listen``."""


@dataclass(frozen=True)
class Listen:
    """Listen now: every worker has loaded (or, for one restarted, this one has)."""


@dataclass(frozen=True)
class Ready:
    """The worker listens and is ready."""


@dataclass(frozen=True)
class Failed:
    """The worker could not start: ``reason`` is the one line the user is to read."""

    reason: str


@dataclass(frozen=True)
class Stopped:
    """The worker has drained: the answers it gave, by status code name."""

    answered: dict[str, int]


@dataclass(frozen=True)
class SettingsChanged:
    """Log or trace settings changed through a worker's API (worker to supervisor), or to take on
    (supervisor to every worker)."""

    settings: SharedSettings


@dataclass(frozen=True)
class ModelChange:
    """A model loaded or unloaded through another worker's API: make the same change here."""

    action: ModelAction
    name: str


@dataclass(frozen=True)
class RegionRegistered:
    """A client registered a shared memory region through another worker's API: open it here too."""

    region: Region


@dataclass(frozen=True)
class RegionUnregistered:
    """A client unregistered the shared memory region ``name`` ("": every region) through another
    worker's API."""

    name: str


Change = ModelChange | RegionRegistered | RegionUnregistered  # what workers make in turns, one at a time


@dataclass(frozen=True)
class TurnWanted:
    """The worker asks for a turn to make a change (one worker at a time)."""


@dataclass(frozen=True)
class Turn:
    """The worker's turn to make a change, given by the supervisor."""


@dataclass(frozen=True)
class TurnOver:
    """The worker's turn is over: ``made`` is the change it made, None when it failed there."""

    made: Change | None


@dataclass(frozen=True)
class Followed:
    """The ``change`` made through another worker is made here too (or failed here, and said so)."""

    change: Change


@dataclass(frozen=True)
class MadeEverywhere:
    """The change of this worker's turn is made in every worker that serves: its client may be answered."""


ToSupervisor = Loaded | Ready | Failed | Stopped | SettingsChanged | TurnWanted | TurnOver | Followed
ToWorker = Listen | SettingsChanged | Change | Turn | MadeEverywhere

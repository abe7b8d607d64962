"""A worker process: a whole server (serve/server.py) on the shared ports, reporting to the
supervisor and hearing from it over its pipe (the ``Coordinator`` of serve/server.py)."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
from collections import Counter, deque
from multiprocessing.connection import Connection
from typing import Awaitable, Callable

from resserve.serve.errors import ResserveError, ShuttingDown
from resserve.serve.logs import LogSettings, configure_logging
from resserve.serve.server import Follow, answer_counts, serve
from resserve.serve.settings import ServerSettings
from resserve.serve.sharedmemory import Region, SharedMemory
from resserve.serve.state import ModelAction, SharedSettings, T
from resserve.serve.tracing import TraceSettings
from resserve.serve.workers.messages import (Change, Failed, Followed, Listen, Loaded, MadeEverywhere, ModelChange,
                                             Ready, RegionRegistered, RegionUnregistered, SettingsChanged, Stopped,
                                             ToSupervisor, ToWorker, Turn, TurnOver, TurnWanted)

log = logging.getLogger("resserve.serve")

PR_SET_PDEATHSIG = 1


class PipeCoordinator:
    """A worker's side of the supervisor's pipe."""

    def __init__(self, pipe: Connection, unloaded: frozenset[str], regions: tuple[Region, ...]) -> None:
        self.pipe = pipe
        self.unloaded = unloaded
        self._regions = regions  # registered through the API before this worker started
        self._follow: Follow | None = None
        self._shared_memory: SharedMemory | None = None
        self._following: set[asyncio.Task] = set()  # model changes under way (a reference keeps each alive)
        self._turns: deque[asyncio.Future] = deque()  # changes through this worker's API, awaiting their turn
        self._everywhere: asyncio.Future | None = None  # the change of this worker's turn, being made in the others

    async def loaded(self, follow: Follow, shared_memory: SharedMemory) -> None:
        self._follow, self._shared_memory = follow, shared_memory
        for region in self._regions:
            self._register(region)
        try:
            self.pipe.send(Loaded())
            while not isinstance(message := await asyncio.to_thread(self.pipe.recv), Listen):  # every worker has loaded
                self._take(message)
        except (OSError, EOFError):  # the supervisor is gone before this worker served: nothing to drain
            os._exit(0)
        asyncio.get_running_loop().add_reader(self.pipe.fileno(), self._receive)

    def _receive(self) -> None:
        """A message from the supervisor while serving."""
        try:
            self._take(self.pipe.recv())
        except (OSError, EOFError):  # the supervisor is gone: PR_SET_PDEATHSIG brings the SIGTERM
            asyncio.get_running_loop().remove_reader(self.pipe.fileno())
            self._made_everywhere()  # no one is left to say so: the change is made here

    def _take(self, message: ToWorker) -> None:
        """A change made through another worker (or, for log settings, through this one too), or
        this worker's turn to change models."""
        match message:
            case SettingsChanged(settings):
                settings.apply()
            case ModelChange(action, name):
                task = asyncio.get_running_loop().create_task(
                    self._follow(action, name, lambda: self._send(Followed(message))))
                self._following.add(task)
                task.add_done_callback(self._following.discard)
            case Turn():
                self._turns.popleft().set_result(None)
            case MadeEverywhere():
                self._made_everywhere()
            case RegionRegistered(region):
                self._register(region)
                self._send(Followed(message))
            case RegionUnregistered(name):
                self._shared_memory.unregister(name)
                self._send(Followed(message))

    def _register(self, region: Region) -> None:
        try:
            self._shared_memory.register(region)
        except ResserveError as exc:  # the client was answered by the other worker
            log.error("shared memory region %s, registered through another worker, is not here: %s",
                      region.name[:128], exc)

    def share_settings(self, settings: SharedSettings) -> None:
        self._send(SettingsChanged(settings))

    async def change_model(self, action: ModelAction, name: str, make: Callable[[], Awaitable[T]]) -> T:
        return await self._in_turn(ModelChange(action, name), make)

    async def register_region(self, region: Region, make: Callable[[], Awaitable[None]]) -> None:
        await self._in_turn(RegionRegistered(region), make)

    async def unregister_region(self, name: str, make: Callable[[], Awaitable[None]]) -> None:
        await self._in_turn(RegionUnregistered(name), make)

    async def _in_turn(self, change: Change, make: Callable[[], Awaitable[T]]) -> T:
        """One worker changes models or shared memory regions at a time: the supervisor gives the
        turns, passes each change made on to the other workers, and once every worker that serves
        has made it too, tells this one (whose client is answered then, so that what it does next,
        through any connection, finds every worker alike) and gives the next turn. So a change made
        through another worker is made here when this one's turn comes, and every worker makes
        every change in the order of the turns."""
        turn = asyncio.get_running_loop().create_future()
        self._turns.append(turn)
        if not self._send(TurnWanted()):
            self._turns.remove(turn)
            raise ShuttingDown("the server is shutting down")
        await turn  # the caller shields this: a turn given is always handed back
        made = None
        try:
            result = await make()
            made = change
        finally:
            self._everywhere = asyncio.get_running_loop().create_future()
            if not self._send(TurnOver(made)) or made is None:
                self._made_everywhere()
        await self._everywhere  # the client is answered once every worker serves as this one does
        return result

    def _made_everywhere(self) -> None:
        if self._everywhere is not None and not self._everywhere.done():
            self._everywhere.set_result(None)

    def _send(self, message: ToSupervisor) -> bool:
        try:
            self.pipe.send(message)
            return True
        except OSError:  # the supervisor is gone: this worker drains and exits
            return False

    def ready(self) -> None:
        self.pipe.send(Ready())

    def stopped(self, answered: Counter) -> None:
        if not self._send(Stopped(dict(answered))):  # the supervisor is gone (it was killed): say it here
            log.info("stopped; requests answered: %s", answer_counts(answered))


def _follow_the_supervisor() -> None:
    """Signals come from the supervisor only: a process group of its own, so a terminal's Ctrl-C
    or a group-wide SIGTERM is not delivered twice (a second signal cuts the drain short); and
    SIGTERM (a drain, then exit) when the supervisor dies, however it dies (Linux)."""
    os.setpgid(0, 0)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the supervisor refuses --workers there anyway
        pass


def worker_main(settings: ServerSettings, index: int, pipe: Connection, logs: LogSettings, traces: TraceSettings,
                unloaded: frozenset[str], regions: tuple[Region, ...]) -> None:
    """A worker process: a whole server on the shared ports, coordinated over ``pipe``, logging
    as ``logs`` say, without the models ``unloaded`` and with the shared memory ``regions`` (the
    state of the moment: each may have changed through the API since the server started)."""
    _follow_the_supervisor()
    configure_logging(logs, worker=index)
    traces.apply()
    try:
        asyncio.run(serve(settings, PipeCoordinator(pipe, unloaded, regions)))
    except ResserveError as exc:  # the supervisor says it, once, for the first worker that fails to start
        pipe.send(Failed(str(exc)))
        sys.exit(exc.exit_code)

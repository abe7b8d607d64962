"""Loading and unloading models while the server serves (Triton's model repository extension,
for the models in the packages and folders of packages given at start).

Unloading a model stops serving it: its requests are refused as unloaded, those already taken
finish. Loading it reads its packages again from the paths given at start (a folder's packages as
they are now), verified as at start, and warms them before they take a request; the versions
served until then keep serving and are retired once the new ones are in place, so a package
re-exported in place, or exported into a folder, is served without a restart and without a
refused request. A client names a model, never a path: the server reads only the packages and
folders it was started with. Under --workers, a change made through one worker is made in every
worker (the supervisor passes it on, serve/workers/); --poll-seconds makes changes through here
too (serve/polling.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from typing import Callable

from resserve.serve.errors import ModelNotFound
from resserve.serve.heap import freeze_long_lived
from resserve.serve.repository import ServedModel, load_repository, read_packages
from resserve.serve.state import ModelAction, ServerState

log = logging.getLogger("resserve.serve")

RETIRE_POLL_SECONDS = 0.01


class ModelControl:
    """Loads and unloads the models of one server process, one change at a time."""

    def __init__(self, state: ServerState, executor: Executor) -> None:
        self.state = state
        self.executor = executor  # the inference thread the batchers run on
        self._one_at_a_time = asyncio.Lock()
        # model -> why its last load failed here, until one succeeds or it is unloaded: one entry at
        # most per model a package holds (a load of a name no package holds fails before it is kept)
        self._failed_loads: dict[str, str] = {}

    async def load(self, name: str) -> None:
        """Load (again) every version of the model called ``name`` from its packages, in every worker."""
        await asyncio.shield(self._change("load", name))  # a client that goes away leaves no change half made

    async def unload(self, name: str) -> None:
        """Stop serving the model called ``name`` (every version), in every worker."""
        await asyncio.shield(self._change("unload", name))

    async def follow(self, action: ModelAction, name: str, made: Callable[[], None]) -> None:
        """A change made through another worker, made here too (a failure is this worker's to
        log); ``made()`` once it serves so, before the versions replaced finish what they took."""
        replaced: list[ServedModel] = []
        try:
            replaced = await self._make(action, name)
        except Exception as exc:  # noqa: BLE001 - the other worker answers its client
            log.error("%s of model %s, made through another worker, failed here: %s", action, name, exc)
        finally:
            made()
        await self._retire(replaced)

    async def _change(self, action: ModelAction, name: str) -> None:
        replaced = await self.state.peers.change_model(action, name, lambda: self._make(action, name))
        await self._retire(replaced)

    async def _make(self, action: ModelAction, name: str) -> list[ServedModel]:
        """Load or unload here; returns the versions replaced, to retire."""
        async with self._one_at_a_time:
            return await (self._load if action == "load" else self._unload)(name)

    async def _load(self, name: str) -> list[ServedModel]:
        settings = self.state.settings
        packages = [p for p in await asyncio.to_thread(read_packages, settings) if p.name == name]
        if not packages:
            raise ModelNotFound(self._no_package(name))
        try:
            loaded = await asyncio.to_thread(load_repository, packages, settings, self.executor, self.state.metrics)
        except Exception as exc:
            self._failed_loads[name] = str(exc)
            raise
        for model in loaded.models:
            model.batcher.start()
        log.info("serving model %s at version %s from now on", name, ", ".join(m.version for m in loaded.models))
        return self._replace(name, list(loaded.models))

    def why_not_served(self, name: str, unloaded: bool) -> str:
        """Why the model ``name`` (``unloaded`` through the API), or a version of it that a package
        holds, is not served: the reason the repository index gives, naming the error of the last
        load where it failed, as Triton's index does."""
        failure = self._failed_loads.get(name)
        return f"the last load failed: {failure}" if failure else "unloaded" if unloaded else "not loaded"

    def _no_package(self, name: str) -> str:
        repository, where = self.state.models(), "of the packages, and folders of them, this server was started with"
        if name in repository:  # its package removed, or renamed: a failed load changes nothing
            return (f"no package holds model {name!r} now ({where}); the versions served until now stay served: "
                    "unload it to stop serving it")
        return f"no package holds model {name!r} ({where}); it has {', '.join(repository.names)}"

    async def _unload(self, name: str) -> list[ServedModel]:
        repository = self.state.models()
        if name not in repository.names:
            raise ModelNotFound(f"unknown model {name!r}; this server has {', '.join(repository.names)}")
        replaced = self._replace(name, [])
        if replaced:
            log.info("unloaded model %s", name)
        return replaced

    def _replace(self, name: str, models: list[ServedModel]) -> list[ServedModel]:
        """Serve ``models`` as the versions of ``name`` from now on; returns the versions replaced."""
        repository = self.state.models()
        replaced = [m for m in repository.models if m.name == name]
        self.state.repository = repository.with_versions(name, models)
        self._failed_loads.pop(name, None)
        return replaced

    async def _retire(self, models: list[ServedModel]) -> None:
        """Let replaced versions finish the requests they have taken (up to the grace period), then
        stop their batchers; their metrics say they are no longer loaded."""
        deadline = time.monotonic() + self.state.settings.grace_seconds
        while any(m.statistics.in_flight for m in models) and time.monotonic() < deadline:
            await asyncio.sleep(RETIRE_POLL_SECONDS)
        current = {m.info_labels for m in self.state.models().models}
        for model in models:
            await model.batcher.close()  # what is queued still runs
            if model.info_labels not in current:
                self.state.metrics.model_info.labels(*model.info_labels).set(0)
                self.state.metrics.set_queue_depth(model.name, model.version, 0)
        # once this change's frames are gone, so that what it replaced can be collected
        asyncio.get_running_loop().call_soon(freeze_long_lived)

"""Following the packages on disk (``--poll-seconds``), as Triton's model control mode POLL.

Every few seconds the server looks at the packages it was given (folders of them read anew): a
model whose packages changed (a version added, removed, re-exported in place or copied over) is
loaded again, and one that no package holds any more is unloaded, through ``ModelControl``, so
under --workers in every worker (the first worker alone looks). So a deployment's pods that share
a volume of packages serve what is put there without a call to each.

A package is seen as its path and its files' names, sizes and modification times: stat calls and
the manifests, no artifact is read until a load verifies it. What a look finds counts once the next
look finds the same: a package being copied in or removed file by file (``cp -r``, ``rm -r``)
changes between looks, and loading it half way would fail. While a package does not read (its
manifest half copied in), or a folder holds none (a volume being remounted), nothing is changed: a
load would fail on it, and an unload would take away what is only briefly out of sight. A change
that fails (a package that does not verify) is logged, and made again at the next change of what
the packages hold.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from resserve.serve.control import ModelControl
from resserve.serve.package import readable_packages
from resserve.serve.state import ServerState

log = logging.getLogger("resserve.serve")

# a package as seen: its path, and each of its files' name, size and modification time (ns)
PackageState = tuple[str, tuple[tuple[str, int, int], ...]]


@dataclass(frozen=True)
class Listing:
    """What the packages hold at one look: each model's packages, and what does not read."""

    models: dict[str, frozenset[PackageState]] = field(default_factory=dict)
    unreadable: tuple[str, ...] = ()  # why, for each package or folder that does not read

    def changed_since(self, before: Listing) -> set[str]:
        """The models whose packages differ from ``before``: added, changed or gone."""
        return {name for name in self.models.keys() | before.models.keys()
                if self.models.get(name) != before.models.get(name)}


def look(paths: tuple[Path, ...]) -> Listing:
    """The packages ``paths`` name now (blocking: file system calls)."""
    packages, unreadable = readable_packages(paths)
    models: dict[str, set[PackageState]] = {}
    for package in packages:
        try:
            models.setdefault(package.name, set()).add(_state(package.path))
        except OSError as exc:  # removed since its manifest was read
            unreadable.append(f"cannot read {package.path}: {exc.strerror}")
    return Listing({name: frozenset(states) for name, states in models.items()}, tuple(unreadable))


def _state(path: Path) -> PackageState:
    files = []
    for entry in sorted(os.scandir(path), key=lambda entry: entry.name):
        if entry.is_file(follow_symlinks=False):
            stat = entry.stat(follow_symlinks=False)
            files.append((entry.name, stat.st_size, stat.st_mtime_ns))
    return str(path), tuple(files)


async def follow_packages(control: ModelControl, state: ServerState, seconds: float, seen: Listing) -> None:
    """Look at the packages every ``seconds`` and make the model changes they call for, forever.
    ``seen``: a look taken before the models served were read, so that what changed while they
    loaded is found by the first looks (a look taken after could take it for what was loaded)."""
    paths = state.settings.packages
    held = seen.unreadable  # what held changes back at the last look, said once
    failed: set[str] = set()  # models whose last change failed: made again at the next change
    last = seen  # the previous look: what a look finds counts once the next one finds the same
    while True:
        await asyncio.sleep(seconds)
        now = await asyncio.to_thread(look, paths)
        if now != last:  # a package being copied in or removed, perhaps: what it holds is not final yet
            last = now
            continue
        if now.unreadable:
            if now.unreadable != held:
                log.warning("the packages changed, but %s: no model is loaded or unloaded until it reads",
                            "; ".join(now.unreadable))
                state.metrics.poll_changes.labels("held").inc()
            held = now.unreadable
            continue
        held = ()
        if now.models != seen.models:
            changed, seen = now.changed_since(seen) | failed, now
            failed = {name for name in sorted(changed) if not await _make(control, state, now, name)}


async def _make(control: ModelControl, state: ServerState, now: Listing, name: str) -> bool:
    """Load ``name`` from its packages, or unload it where none holds it; False if that failed."""
    action = "load" if name in now.models else "unload"
    if action == "unload" and name not in state.models():
        return True  # its packages went before it was ever loaded, or after it was unloaded
    log.info("the packages of model %s changed: %sing it", name, action)
    counted = state.metrics.poll_changes
    try:
        await (control.load if action == "load" else control.unload)(name)
    except Exception as exc:  # noqa: BLE001 - logged; what was served stays served
        log.error("the packages of model %s changed, but it could not be %sed: %s", name, action, exc)
        counted.labels("failed").inc()
        return False
    counted.labels("ok").inc()
    return True

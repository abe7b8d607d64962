"""Files a running server reads again when they change: its TLS pair (serve/tls.py) and its token
files (serve/auth.py). Kubernetes updates a mounted Secret's files in place (cert-manager renews a
certificate into one; an operator revokes a leaked token by editing one), and a server that read
them once went on with what they held at start until it was restarted.

The server looks every ``ROTATION_CHECK_SECONDS`` (serve/server.py). A change is read whole and
checked as at start; files that fail the checks (half written, gone for a moment, a key that is not
the certificate's, a token file left empty) are logged and counted, and what was read before stays
in use: a rotation never opens a server nor takes one down.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Generic, TypeVar

from prometheus_client import Counter

from resserve.serve.errors import ResserveError

log = logging.getLogger("resserve.serve")

# how often the files are looked at: a stat of each, so often that a revoked token stops working
# within seconds of the file changing (Kubernetes itself takes a minute or so to update a mounted Secret)
ROTATION_CHECK_SECONDS = 2.0
# the most of a TLS or token file that is read: a certificate chain is a few KB, a thousand tokens 50 KB
MAX_SECRET_FILE_BYTES = 2**20

Read = TypeVar("Read")


def read_secret_file(path: Path, what: str) -> bytes:
    """A TLS or token file's bytes, refused in one line (naming it as ``what``) where it cannot be
    read or is larger than any such file: a path to /dev/zero or to a big file by mistake was read
    until memory ran out."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_SECRET_FILE_BYTES + 1)
    except OSError as exc:
        raise ResserveError(f"cannot read {what} {path}: {exc.strerror}") from None
    if len(data) > MAX_SECRET_FILE_BYTES:
        raise ResserveError(f"{what} {path} is over {MAX_SECRET_FILE_BYTES // 2**20} MiB: no certificate, key or "
                            "token file is that large")
    return data


def _stamp(paths: tuple[Path | None, ...]) -> tuple:
    """What changes when a file is replaced: each file's inode, size and modification time,
    through symlinks (Kubernetes updates a mounted Secret by relinking the folder its files are in)."""
    stamps = []
    for path in paths:
        try:
            status = os.stat(path) if path else None
        except OSError:  # gone for a moment, mid-rotation
            status = None
        stamps.append(status and (status.st_ino, status.st_size, status.st_mtime_ns))
    return tuple(stamps)


class WatchedFiles(ABC, Generic[Read]):
    """``paths``, read again by ``renew`` when they change; ``reloads`` counts each change by
    result (ok, refused). Subclasses say what the files are and how they are read and used."""

    what: str  # "the TLS files", for the log
    kept: str  # what goes on when a change is refused, for the log

    def __init__(self, paths: tuple[Path | None, ...], reloads: Counter) -> None:
        self.paths, self.reloads = paths, reloads
        self._stamp = _stamp(paths)  # before the first read: a change during it is seen at the next look

    @abstractmethod
    def _read(self) -> Read:
        """The files' contents, checked as at start; ResserveError or OSError when they do not pass."""

    @abstractmethod
    def _use(self, read: Read) -> str:
        """Put ``read`` in use; returns what changed, for the log."""

    def renew(self) -> bool:
        """Read the files again if they changed since the last look; True when what they now hold is in use."""
        stamp = _stamp(self.paths)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            read = self._read()
        except (ResserveError, OSError) as exc:  # OSError: a file gone between the stamp and the read
            log.warning("%s changed, but %s; %s", self.what, exc, self.kept)
            self.reloads.labels("refused").inc()
            return False
        log.info("%s changed: %s", self.what, self._use(read))
        self.reloads.labels("ok").inc()
        return True

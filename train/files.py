"""Files that other processes read are written whole or not at all."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


def _readable_mode() -> int:
    """0o666 less the umask, as open() would create it (temporary files start at 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_file(path: Path) -> Iterator[IO[bytes]]:
    """Write a temporary file beside ``path``; rename it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with tmp:
            yield tmp
        os.chmod(tmp.name, _readable_mode())
        os.replace(tmp.name, path)
    except BaseException:
        os.unlink(tmp.name)
        raise

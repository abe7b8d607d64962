"""Files a command will write, checked before its work starts: a report or a checkpoint path
that cannot be written is answered in one line at once, not after minutes of measuring or hours
of training. Shared by the serving and the training commands (train/ may use serve/, not back)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from resserve.serve.errors import ResserveError


def check_writable(path: Path, example: str = "model.pt") -> None:
    """Fail now, in one line, if a file cannot be written at ``path`` (its folder is made if missing).

    ``example``: the file name suggested when ``path`` is a directory."""
    path = Path(path)
    if path.is_dir():
        raise ResserveError(f"{path} is a directory; give a file name such as {path / example}")
    _probe(path.parent, f"cannot write {path}")


def check_writable_folder(folder: Path, what: str) -> None:
    """Fail now, in one line, if files cannot be written in ``folder`` (made if missing); ``what`` names it."""
    _probe(Path(folder), f"cannot write {what} {folder}")


def _probe(folder: Path, failure: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".resserve-", suffix=".probe"):
            pass
    except FileExistsError:  # mkdir's "File exists" would not say which file is in the way
        raise ResserveError(f"{failure}: {folder} is a file, not a folder") from None
    except OSError as exc:
        raise ResserveError(f"{failure}: {exc.strerror or exc}") from None

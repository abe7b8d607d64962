"""The files of the training commands: checked before any work (torch-free, so a wrong path or
an unwritable one is answered at once), and written whole or not at all."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from resserve.serve.errors import ResserveError
from resserve.serve.manifest import FILE_NAME as MANIFEST
from resserve.train.config import ExportError

SHIPPED_MODEL = Path(__file__).parent / "weights" / "resnet-mnist.pt"


class CheckpointError(ResserveError):
    """A file that cannot be used as a resserve checkpoint."""


def existing_checkpoint(path: Path) -> Path:
    """``path``, refused in one line when no file is there (naming a package or a folder given for one)."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        raise CheckpointError(f"{path} is a model package (from resserve export); this takes the checkpoint it was "
                              "exported from (from resserve train, such as model.pt)")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; give a checkpoint file in it, such as {path / 'model.pt'}")
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    return path


def resolve_model_path(path: Path | None) -> Path:
    """The given checkpoint, or the shipped lecture ResNet when none is given; it must exist."""
    if path is None:
        if not SHIPPED_MODEL.is_file():
            raise CheckpointError(f"the shipped model is missing from this install ({SHIPPED_MODEL})")
        return SHIPPED_MODEL
    return existing_checkpoint(path)


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


def check_package_destination(out: Path) -> None:
    """``out`` can take a model package: absent, empty, or a package (replaced); its parent writable."""
    if out.exists() and not (out / MANIFEST).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not a model package; refusing to overwrite it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create {out.parent}: {exc.strerror}") from exc
    if not os.access(out.parent, os.W_OK):
        raise ExportError(f"cannot write to {out.parent}: permission denied")


def prepare_output(out: Path) -> Path:
    """The output directory, created if missing; a clear error if it is a file."""
    if out.exists() and not out.is_dir():
        raise ResserveError(f"--out {out} is a file; give a directory for the JSON and PNG")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ResserveError(f"cannot create --out {out}: {exc.strerror}") from exc
    return out

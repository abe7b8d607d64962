"""resserve.serve: the torch-free side of resserve: the root CLI, model packages, the gRPC server."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("resserve")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

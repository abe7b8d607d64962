"""Shared fixtures: real MNIST (fetched once, then cached) and the installed `resserve` command."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

RESSERVE = Path(sys.executable).parent / "resserve"


def run_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the installed console script as a user would; returns the finished process."""
    return subprocess.run([str(RESSERVE), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def mnist():
    from resserve.train.data import load_mnist

    return load_mnist()

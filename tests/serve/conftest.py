"""Fixtures for the serving tests: a real server on a loopback port."""

import pytest

from helpers import ServerProcess


@pytest.fixture(scope="module")
def server():
    """The shipped model, default settings."""
    with ServerProcess() as process:
        yield process

"""Shared fixtures: real MNIST (fetched once, then cached)."""

import pytest


@pytest.fixture(scope="session")
def mnist():
    from resserve.train.data import load_mnist

    return load_mnist()

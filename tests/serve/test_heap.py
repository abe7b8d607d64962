"""The server's long-lived objects kept out of the collector's full passes (serve/heap.py)."""

import gc
import weakref

from resserve.serve.heap import freeze_long_lived


class Node:
    """An object in a reference cycle: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.itself = self


def test_what_is_frozen_is_left_out_until_the_next_freeze_collects_it():
    try:
        node = Node()
        alive = weakref.ref(node)
        freeze_long_lived()
        assert gc.get_freeze_count() > 0
        del node
        gc.collect()
        assert alive() is not None  # frozen: the full pass left it alone
        freeze_long_lived()  # a model change: thawed, collected, frozen again
        assert alive() is None
    finally:
        gc.unfreeze()

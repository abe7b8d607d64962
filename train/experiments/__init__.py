"""``resserve experiment``: the lecture's claims about residual networks, measured on MNIST.

One module per experiment (depth, lesion, shattered, gates), each with a ``Settings``
dataclass whose ``default()`` fits in 15 minutes on a 2-core CPU and whose ``quick()`` runs in
seconds; ``runs`` trains and evaluates networks at a fixed budget, ``report`` writes the JSON
and PNG every experiment leaves in ``--out``.
"""

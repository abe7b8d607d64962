"""``resserve experiment``: the lecture's claims about residual networks, measured on MNIST.

One module per experiment (depth, lesion, shattered, gates) with ``run`` and ``draw``; their
sizes live in ``settings`` (defaults fit in 15 minutes on a 2-core CPU with bf16, ``quick()``
runs in seconds); ``runs`` trains and evaluates networks at a fixed budget; ``report`` writes the
JSON and PNG every experiment leaves in ``--out``; ``cli`` is the command.
"""

"""resserve.train: MNIST, the residual model family, training, evaluation (needs the [train] extra)."""

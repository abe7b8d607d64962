"""What ``resserve eval`` measures and prints, torch-free: the numbers of an evaluation on MNIST's
test set (``Evaluation``), whether of a checkpoint (train/training.py's ``evaluate``) or of the
model a running server serves (``evaluate_served``: the serving install has no torch), and the
report of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from resserve.serve.client import Client
from resserve.serve.client.base import REQUEST_IMAGES
from resserve.train.data import Split


@dataclass
class Evaluation:
    accuracy: float
    loss: float
    confusion: np.ndarray  # [10,10], rows: true digit, columns: predicted digit

    @classmethod
    def of(cls, predicted: np.ndarray, labels: np.ndarray, loss: float) -> Evaluation:
        """The evaluation of the digits ``predicted`` for the true ``labels``, with their mean cross-entropy."""
        confusion = np.zeros((10, 10), dtype=np.int64)
        np.add.at(confusion, (labels, predicted), 1)
        return cls(accuracy=float((predicted == labels).mean()), loss=loss, confusion=confusion)

    @property
    def per_class_accuracy(self) -> list[float]:
        return (np.diag(self.confusion) / self.confusion.sum(axis=1).clip(min=1)).tolist()


def evaluate_served(client: Client, split: Split, model: str, version: str,
                    on_chunk: Callable[[int], None] = lambda images: None) -> tuple[Evaluation, tuple[str, str]]:
    """``split`` classified by the server ``client`` talks to, as 28x28 pixels through its Classify
    API (what it serves end to end: batching, runtime, precision), ``REQUEST_IMAGES`` a request;
    also the model and version that answered."""
    probabilities, answered = [], ("", "")
    for start in range(0, len(split), REQUEST_IMAGES):
        results = client.classify_pixels(split.images[start:start + REQUEST_IMAGES], model, version)
        probabilities.extend(result.probabilities for result in results)
        answered = (results[0].model, results[0].model_version)
        on_chunk(len(results))
    p = np.asarray(probabilities, dtype=np.float64)
    truth = p[np.arange(len(split)), split.labels].clip(min=np.finfo(np.float32).tiny)  # fp32 probabilities
    return Evaluation.of(p.argmax(axis=1), split.labels, float(-np.log(truth).mean())), answered


@dataclass(frozen=True)
class EvaluationReport:
    """What ``resserve eval`` prints; ``--json`` writes these fields as one object."""

    model: str
    arch: str | None  # None for a served model whose server does not say (one older than ModelConfig's "arch")
    params: int | None
    test_accuracy: float
    test_loss: float
    per_class_accuracy: list[float]  # by true digit
    confusion_matrix: list[list[int]]  # row: true digit, column: predicted
    data_source: str  # where MNIST came from (train/data.py)

    @classmethod
    def of(cls, model: str, evaluation: Evaluation, data_source: str, arch: str | None = None,
           params: int | None = None) -> EvaluationReport:
        return cls(model=model, arch=arch, params=params, test_accuracy=evaluation.accuracy,
                   test_loss=evaluation.loss, per_class_accuracy=evaluation.per_class_accuracy,
                   confusion_matrix=evaluation.confusion.tolist(), data_source=data_source)

    def print(self) -> None:
        """The accuracy, then the confusion matrix with each digit's accuracy, in 80 columns."""
        from rich import box
        from rich.console import Console
        from rich.table import Table

        console = Console()
        console.print(f"{self.model}: {self.arch}, {self.params:,} parameters" if self.arch else self.model)
        console.print(f"test accuracy [bold]{self.test_accuracy:.4f}[/bold] "
                      f"(loss {self.test_loss:.4f}) on MNIST from {self.data_source}")
        # rows are the true digit, columns the predicted one
        table = Table("", *(str(d) for d in range(10)), "acc %", title="Confusion matrix (row: true, column: predicted)",
                      box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        for digit, (row, accuracy) in enumerate(zip(self.confusion_matrix, self.per_class_accuracy)):
            table.add_row(str(digit), *(str(v) for v in row), f"{accuracy * 100:.2f}")
        console.print(table)

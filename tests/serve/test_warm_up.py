"""A model's shapes are run before it takes a request, on the thread that will serve them too:
ONNX Runtime's CUDA provider keeps its handles and captured graphs per thread (serve/repository.py)."""

import threading
from concurrent.futures import ThreadPoolExecutor

from resserve.serve.backends import open_backend
from resserve.serve.package import load_package
from resserve.serve.repository import warm_up


class Recorded:
    """A real ONNX Runtime backend whose batches are noted with the thread that ran them."""

    def __init__(self) -> None:
        package = load_package()
        self.backend = open_backend(package.read_verified(package.find("onnx")), "onnx", "onnxruntime", "cpu", "fp32")
        self.runs: list[tuple[int, int]] = []

    def infer(self, batch):
        self.runs.append((threading.get_ident(), len(batch)))
        return self.backend.infer(batch)


def test_every_shape_runs_on_the_loading_thread_and_on_the_inference_thread():
    recorded = Recorded()
    with ThreadPoolExecutor(max_workers=1) as inference:
        serving = inference.submit(threading.get_ident).result()
        warm_up(recorded, (1, 4, 64), inference)
    loading = threading.get_ident()
    assert recorded.runs == [(loading, 1), (loading, 4), (loading, 64), (serving, 1), (serving, 4), (serving, 64)]

"""How many MNIST test digits the shipped model reads right as the synthetic phone photos that
test_preprocess.py makes (plain, ruled and squared paper, a sheet on a desk, chalk on a board),
200 of each by default: the figures in docs/serving.md. The tests check 40 of each.

    python tests/serve/photo_accuracy.py [COUNT]
"""

import sys
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent)]
from test_preprocess import _chalked, _on_a_desk, _photographed, _ruled, _shipped_model  # noqa: E402

from resserve.serve.preprocess import encoded_to_input  # noqa: E402
from resserve.train.data import load_mnist  # noqa: E402

SIDE = 280
PAPERS = {"plain paper": None, "faint ruled paper": _ruled((SIDE, SIDE), 40, 170),
          "dark ruled paper": _ruled((SIDE, SIDE), 30, 100),
          "dark ruled paper, 2 degrees off square": _ruled((SIDE, SIDE), 30, 100, tilt=-0.035),
          "squared paper, 3 degrees off square": _ruled((SIDE, SIDE), 28, 150, columns=True, tilt=0.052)}
DESKS = {"plain paper on a desk": ("plain paper", 0), "plain paper on a desk, at 4 degrees": ("plain paper", 4),
         "dark ruled paper on a desk, at 3 degrees": ("dark ruled paper", 3)}


def main(count: int) -> None:
    mnist, model = load_mnist(), _shipped_model()
    even = np.ones((SIDE, SIDE))

    def photo(i: int, paper: str) -> bytes:
        return _photographed(mnist.test.images[i], even, seed=i, paper=PAPERS[paper])

    cases = {paper: (lambda i, paper=paper: photo(i, paper)) for paper in PAPERS}
    cases |= {name: (lambda i, paper=paper, tilt=tilt: _on_a_desk(photo(i, paper), seed=i, tilt=tilt))
              for name, (paper, tilt) in DESKS.items()}
    cases["a bold white digit on a dark board"] = lambda i: _chalked(mnist.test.images[i], seed=i)
    for name, make in cases.items():
        inputs = np.stack([encoded_to_input(make(i)) for i in range(count)])
        right = (model.infer(inputs)["logits"].argmax(axis=1) == mnist.test.labels[:count]).sum()
        print(f"{name:40s} {right:4d} of {count}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)

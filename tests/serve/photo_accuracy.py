"""How many MNIST test digits the shipped model reads right as the synthetic phone photos that
test_preprocess.py makes (plain, ruled and squared paper, a sheet on a desk, all of it or running
out of the photo, shadows, chalk on a board), 200 of each by default, and what reading them costs
(decoded pixels to the model's 28x28, best of three passes): the figures in docs/serving.md. The
tests check 40 of each.

    python tests/serve/photo_accuracy.py [COUNT]
"""

import sys
import timeit
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent)]
from test_preprocess import _chalked, _on_a_desk, _photographed, _png, _ruled, _shadowed, _shipped_model  # noqa: E402

from resserve.serve.preprocess import decode, to_mnist  # noqa: E402
from resserve.train.data import load_mnist  # noqa: E402

SIDE = 280
PAPERS = {"plain paper": None, "faint ruled paper": _ruled((SIDE, SIDE), 40, 170),
          "dark ruled paper": _ruled((SIDE, SIDE), 30, 100),
          "dark ruled paper, 2 degrees off square": _ruled((SIDE, SIDE), 30, 100, tilt=-0.035),
          "squared paper, 3 degrees off square": _ruled((SIDE, SIDE), 28, 150, columns=True, tilt=0.052)}
DESKS = {"plain paper on a desk": ("plain paper", 0, ()), "plain paper on a desk, at 4 degrees": ("plain paper", 4, ()),
         "dark ruled paper on a desk, at 3 degrees": ("dark ruled paper", 3, ()),
         "plain paper running out at the bottom": ("plain paper", 2, ("bottom",)),
         "dark ruled paper running out at a corner": ("dark ruled paper", 2, ("right", "bottom")),
         "plain paper running out on three sides": ("plain paper", 2, ("left", "right", "bottom"))}
LIGHTS = {"a dim photo, the paper at 40% bright": np.full((SIDE, SIDE), 0.4),
          "a sharp shadow past the digit": _shadowed(edge=0.85), "a sharp shadow over the digit": _shadowed(edge=0.6),
          "a soft shadow, 70% of the light gone": _shadowed(fading=0.7),
          "a sharp shadow on three sides": _shadowed(lit=0.5),
          "a flash's light, corners near black": np.clip(1 - 1.5 * ((np.indices((SIDE, SIDE)) / SIDE - 0.5) ** 2).sum(0),
                                                         0.1, 1)}


def main(count: int) -> None:
    mnist, model = load_mnist(), _shipped_model()
    even = np.ones((SIDE, SIDE))

    def photo(i: int, paper: str) -> bytes:
        return _photographed(mnist.test.images[i], even, seed=i, paper=PAPERS[paper])

    cases = {paper: (lambda i, paper=paper: photo(i, paper)) for paper in PAPERS}
    cases |= {name: (lambda i, paper=paper, tilt=tilt, out=out: _on_a_desk(photo(i, paper), i, tilt, runs_out=out))
              for name, (paper, tilt, out) in DESKS.items()}
    cases |= {name: (lambda i, light=light: _photographed(mnist.test.images[i], light, seed=i))
              for name, light in LIGHTS.items()}
    cases["a bold white digit on a dark board"] = lambda i: _chalked(mnist.test.images[i], seed=i)
    print(f"{'photo':40s} {'right':>13s} {'ms/image':>9s}")
    for name, make in cases.items():
        _report(name, [decode(make(i)) for i in range(count)], mnist.test.labels[:count], model)
    for name, ink in (("MNIST's test set as 28x28 PNGs", lambda image: image),
                      ("the same, black on white", lambda image: 255 - image)):
        _report(name, [decode(_png(ink(image))) for image in mnist.test.images], mnist.test.labels, model)


def _report(name: str, pixels: list[np.ndarray], labels: np.ndarray, model) -> None:
    """One line: how many of ``pixels`` (decoded images) the model reads as ``labels``, and the
    milliseconds per image from them to the model's 28x28, best of three passes."""
    seconds = min(timeit.repeat(lambda: [to_mnist(image) for image in pixels], number=1, repeat=3))
    inputs = np.stack([to_mnist(image)[None] for image in pixels])
    logits = np.concatenate([model.infer(inputs[start:start + 500])["logits"] for start in range(0, len(inputs), 500)])
    right = (logits.argmax(axis=1) == labels).sum()
    print(f"{name:40s} {right:6d} of {len(pixels)} {seconds / len(pixels) * 1000:9.2f}")

if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)

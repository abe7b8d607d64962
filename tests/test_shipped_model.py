"""The shipped lecture ResNet: its checkpoint, its card, and its exported package agree."""

import subprocess
import sys

import numpy as np

from resserve.serve.backends.base import infer_in_chunks
from resserve.serve.backends.onnxruntime import OnnxRuntimeBackend
from resserve.serve.package import load_package, sha256_of
from resserve.train.checkpoint import SHIPPED_MODEL, load_checkpoint
from resserve.train.export import ExportOptions, as_input, export_package
from resserve.train.model_card import card_path
from resserve.train.models import count_parameters, lecture_config


def test_shipped_checkpoint_is_the_lecture_resnet_with_its_card():
    checkpoint = load_checkpoint(SHIPPED_MODEL)
    assert checkpoint.config == lecture_config()
    assert count_parameters(checkpoint.build()) == 117_802
    assert checkpoint.metrics["test_accuracy"] >= 0.995
    card = card_path(SHIPPED_MODEL).read_text()
    assert f"{checkpoint.metrics['test_accuracy']:.4f}" in card
    assert "resserve train" in card


def test_shipped_package_was_exported_from_the_shipped_checkpoint():
    package = load_package()
    assert package.manifest.source_checkpoint.sha256 == sha256_of(SHIPPED_MODEL)
    assert package.manifest.accuracy.test >= 0.995
    for artifact in package.artifacts:
        package.read_verified(artifact)  # every sha256 matches


def test_reexporting_the_shipped_checkpoint_reproduces_the_shipped_package(tmp_path, mnist):
    fresh_manifest = export_package(SHIPPED_MODEL, tmp_path / "again", ExportOptions(formats=("onnx",)), mnist,
                                    log=lambda _: None)
    shipped_package = load_package()
    # export verified the fresh artifact against the eager network on all 10,000 test images
    assert fresh_manifest.accuracy.test == shipped_package.manifest.accuracy.test
    fresh = OnnxRuntimeBackend(tmp_path / "again" / "model.onnx")
    shipped = OnnxRuntimeBackend(shipped_package.read_verified(shipped_package.find("onnx")))
    images = as_input(mnist.test.head(2000))
    fresh_logits = infer_in_chunks(fresh.infer, images, 1000)["logits"]
    shipped_logits = infer_in_chunks(shipped.infer, images, 1000)["logits"]
    assert np.abs(fresh_logits - shipped_logits).max() <= 1e-4
    assert np.array_equal(fresh_logits.argmax(1), shipped_logits.argmax(1))


def test_the_shipped_package_serves_without_torch(mnist, tmp_path):
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from resserve.serve.package import load_package\n"
        "from resserve.serve.backends.onnxruntime import OnnxRuntimeBackend\n"
        "p = load_package()\n"
        "b = OnnxRuntimeBackend(p.read_verified(p.find('onnx')))\n"
        "print(' '.join(map(str, b.infer(np.load(sys.argv[1]))['logits'].argmax(1))))\n"
    )
    images = tmp_path / "images.npy"
    np.save(images, as_input(mnist.test.head(16)))
    result = subprocess.run([sys.executable, "-c", code, str(images)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    predicted = [int(d) for d in result.stdout.split()]
    assert sum(p == t for p, t in zip(predicted, mnist.test.labels[:16])) >= 15

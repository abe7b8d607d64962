"""The shipped lecture ResNet: its checkpoint, its card, and its exported package agree."""

import dataclasses
import io
import subprocess
import sys

import numpy as np
import pytest
import tritonclient.grpc as triton
from PIL import Image
from tritonclient.grpc import model_config_pb2

from resserve.serve.backends.base import infer_in_chunks
from resserve.serve.backends.onnxruntime import OnnxRuntimeBackend
from resserve.serve.package import load_package, sha256_of
from resserve.train.checkpoint import load_checkpoint
from resserve.train.files import SHIPPED_MODEL
from helpers import ServerProcess
from resserve.train.config import ExportOptions
from resserve.train.export import as_input, export_package
from resserve.train.model_card import card_path
from resserve.train.models import count_parameters, lecture_config


def test_shipped_checkpoint_is_the_lecture_resnet_with_its_card():
    checkpoint = load_checkpoint(SHIPPED_MODEL)
    assert checkpoint.config == lecture_config()
    assert count_parameters(checkpoint.build()) == 117_802
    assert checkpoint.metrics.test_accuracy >= 0.995
    card = card_path(SHIPPED_MODEL).read_text()
    assert f"{checkpoint.metrics.test_accuracy:.4f}" in card
    assert "resserve train" in card


def test_shipped_package_was_exported_from_the_shipped_checkpoint():
    package = load_package()
    assert package.manifest.source_checkpoint.sha256 == sha256_of(SHIPPED_MODEL)
    assert package.manifest.accuracy.test >= 0.995
    for artifact in package.artifacts:
        package.read_verified(artifact)  # every sha256 matches


VERIFIED_IMAGES = 2000  # of the 10,000 export verifies on (all: 44 s here, these: 19 s; served tests take all)


@pytest.fixture(scope="module")
def image_client_package(tmp_path_factory, mnist):
    """The shipped checkpoint re-exported as Triton's image clients want it: one output, pixel values
    0-255; verified on the first VERIFIED_IMAGES test images."""
    out = tmp_path_factory.mktemp("export") / "mnist-image"
    options = ExportOptions(formats=("onnx",), name="mnist-image", outputs=("probabilities",), input_range=255)
    subset = dataclasses.replace(mnist, test=mnist.test.head(VERIFIED_IMAGES))
    return out, export_package(SHIPPED_MODEL, out, options, subset, log=lambda _: None)


def test_reexporting_the_shipped_checkpoint_reproduces_the_shipped_package(image_client_package, mnist):
    out, fresh_manifest = image_client_package
    shipped_package = load_package()
    fresh = OnnxRuntimeBackend(out / "model.onnx")
    shipped = OnnxRuntimeBackend(shipped_package.read_verified(shipped_package.find("onnx")))
    subset = mnist.test.head(VERIFIED_IMAGES)
    images = as_input(subset)
    fresh_logits = infer_in_chunks(fresh.infer, images, 1000)["logits"]
    shipped_logits = infer_in_chunks(shipped.infer, images, 1000)["logits"]
    assert np.abs(fresh_logits - shipped_logits).max() <= 1e-4
    assert np.array_equal(fresh_logits.argmax(1), shipped_logits.argmax(1))
    # what export measured, against the eager network, is what the shipped artifact scores there
    assert fresh_manifest.accuracy.test == float((shipped_logits.argmax(1) == subset.labels).mean())


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


def test_tritons_image_client_protocol_classifies_digits_with_the_single_output_package(image_client_package, mnist):
    """What Triton's grpc_image_client.py does, step by step (docs/serving.md runs the script itself)."""
    out, manifest = image_client_package
    assert manifest.output_names == ["probabilities"] and manifest.preprocessing.range == (0.0, 255.0)
    with ServerProcess(str(out)) as server:
        client = triton.InferenceServerClient(server.target)
        metadata, config = client.get_model_metadata("mnist-image"), client.get_model_config("mnist-image").config
        assert len(metadata.inputs) == 1 and len(metadata.outputs) == 1 and metadata.outputs[0].datatype == "FP32"
        assert config.input[0].format == model_config_pb2.ModelInput.FORMAT_NCHW and config.max_batch_size > 0
        for image, label in zip(mnist.test.images[:20], mnist.test.labels[:20]):
            png = io.BytesIO()
            Image.fromarray(image).save(png, format="PNG")
            pixels = np.array(Image.open(png).convert("L").resize((28, 28), Image.BILINEAR)).astype(np.float32)
            tensor = triton.InferInput(metadata.inputs[0].name, [1, 1, 28, 28], "FP32")
            tensor.set_data_from_numpy(pixels[None, None])  # 0-255, as the client's --scaling NONE sends
            wanted = triton.InferRequestedOutput(metadata.outputs[0].name, class_count=3)
            best = client.infer("mnist-image", [tensor], outputs=[wanted]).as_numpy("probabilities")[0][0]
            score, index, name = best.decode().split(":")
            assert int(index) == label and name == str(label) and 0.0 < float(score) <= 1.0

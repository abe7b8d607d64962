"""--backend/--precision: auto takes OpenVINO bf16 only where the CPU and the accuracy guard allow,
int8 only where export kept an int8 artifact; OpenVINO matches ONNX Runtime in fp32 and agrees
with it in bf16 on real MNIST."""

import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import run_cli
from resserve.serve.backends.base import CudaOptions, infer_in_chunks
from resserve.serve.backends.onnxruntime import OnnxRuntimeBackend, StaticShapeSession
from resserve.serve.backends.openvino import OpenVinoBackend, openvino_cpu_capabilities
from resserve.serve.errors import ResserveError
from resserve.serve.manifest import ReducedPrecisionReport
from resserve.serve.package import load_package
from resserve.serve.runtime import choose_runtime
from resserve.serve.settings import ServerSettings


def with_bf16_loss(loss: float | None):
    """The shipped manifest, with the bf16 measurement export would have written (None: none)."""
    reports = {} if loss is None else {"bf16": ReducedPrecisionReport(measured=True, accuracy_loss=loss, allowed=True)}
    return load_package().manifest.model_copy(update={"reduced_precision": reports})


def without_int8():
    """The shipped manifest as a package exported without --quantize int8 has it."""
    manifest = load_package().manifest
    fp32_only = tuple(a for a in manifest.artifacts if a.precision == "fp32")
    return manifest.model_copy(update={"int8": None, "artifacts": fp32_only})


def int8_not_kept():
    """The shipped manifest as export writes it when int8 loses too much: measured, not kept."""
    manifest = without_int8()
    return manifest.model_copy(update={"int8": load_package().manifest.int8.model_copy(
        update={"kept": False, "accuracy_loss": 0.004})})


GOOD = with_bf16_loss(0.0002)
LOSSY = with_bf16_loss(0.003)
UNMEASURED = with_bf16_loss(None)
AMX = {"FP32", "BF16", "INT8"}
OLD_CPU = {"FP32", "INT8"}


@pytest.mark.parametrize("backend, precision, device, manifest, capabilities, expected", [
    ("auto", "auto", "cpu", GOOD, AMX, ("openvino", "bf16")),
    ("auto", "auto", "cpu", GOOD, None, ("onnxruntime", "fp32")),  # OpenVINO not installed
    ("auto", "auto", "cpu", GOOD, OLD_CPU, ("onnxruntime", "fp32")),  # no BF16 on this CPU
    ("auto", "auto", "cpu", LOSSY, AMX, ("onnxruntime", "fp32")),  # the accuracy guard says no
    ("auto", "auto", "cpu", UNMEASURED, AMX, ("onnxruntime", "fp32")),  # no measurement in the manifest
    ("auto", "fp32", "cpu", GOOD, AMX, ("onnxruntime", "fp32")),
    ("auto", "auto", "cuda", GOOD, AMX, ("onnxruntime", "fp32")),
    ("openvino", "auto", "cpu", GOOD, AMX, ("openvino", "bf16")),
    ("openvino", "bf16", "cpu", LOSSY, AMX, ("openvino", "fp32")),  # falls back, with a reason
    ("openvino", "fp32", "cpu", GOOD, AMX, ("openvino", "fp32")),
    ("onnxruntime", "auto", "cpu", GOOD, AMX, ("onnxruntime", "fp32")),
    ("torchscript", "fp32", "cpu", GOOD, AMX, ("torchscript", "fp32")),
    ("auto", "int8", "cpu", GOOD, AMX, ("onnxruntime", "int8")),  # the shipped package keeps int8
    ("onnxruntime", "int8", "auto", GOOD, None, ("onnxruntime", "int8")),
    ("auto", "int8", "cpu", without_int8(), AMX, ("onnxruntime", "fp32")),  # falls back, with a reason
    ("auto", "int8", "cpu", int8_not_kept(), AMX, ("onnxruntime", "fp32")),
])
def test_runtime_choice(backend, precision, device, manifest, capabilities, expected):
    choice = choose_runtime(backend, precision, device, manifest, capabilities)
    assert (choice.backend, choice.precision) == expected
    assert choice.reason


def test_the_fallback_reason_names_the_accuracy_loss():
    assert "loses 0.30 accuracy points" in choose_runtime("openvino", "bf16", "cpu", LOSSY, AMX).reason
    assert "loses 0.40 accuracy points" in choose_runtime("auto", "int8", "cpu", int8_not_kept(), AMX).reason
    assert "--quantize int8" in choose_runtime("auto", "int8", "cpu", without_int8(), AMX).reason
    # bf16 measured above fp32 (one test image more right) is said as a gain, not as a negative loss
    assert choose_runtime("auto", "auto", "cpu", with_bf16_loss(-0.0001), AMX).reason == (
        "bf16 gains 0.01 accuracy points on MNIST test")


def test_int8_loads_the_int8_artifact_on_the_cpu_whatever_auto_would_find():
    choice = choose_runtime("auto", "int8", "auto", GOOD, AMX)
    assert (choice.artifact_format, choice.artifact_precision, choice.device("auto")) == ("onnx", "int8", "cpu")
    fp32 = choose_runtime("auto", "fp32", "auto", GOOD, AMX)
    assert (fp32.artifact_precision, fp32.device("auto")) == ("fp32", "auto")


def test_openvino_asked_for_where_it_is_not_installed_names_the_install():
    with pytest.raises(ResserveError, match=re.escape("pip install 'resserve[openvino]'")):
        choose_runtime("openvino", "auto", "cpu", GOOD, None)


@pytest.mark.parametrize("settings, message", [
    ({"backend": "tensorrt"}, "--backend must be one of auto, onnxruntime, openvino, torchscript, got 'tensorrt'"),
    ({"precision": "fp8"}, "--precision must be one of auto, fp32, bf16, int8, got 'fp8'"),
    ({"device": "tpu"}, "--device must be one of cpu, cuda, auto, got 'tpu'"),
    ({"cuda_conv_search": "FAST"}, "--cuda-conv-search must be one of EXHAUSTIVE, HEURISTIC, DEFAULT, got 'FAST'"),
    # choices that cannot go together: refused before the server listens, not when it loads a model
    ({"backend": "openvino", "device": "cuda"}, "--backend openvino runs on the CPU; use --device cpu or --backend onnxruntime"),
    ({"backend": "onnxruntime", "precision": "bf16"}, "--precision bf16 needs --backend openvino (or auto), not onnxruntime"),
    ({"backend": "openvino", "precision": "int8"},
     "--precision int8 runs on ONNX Runtime: use --backend onnxruntime (or auto), not openvino"),
    ({"backend": "torchscript", "precision": "int8"}, "not torchscript"),
    ({"device": "cuda", "precision": "int8"}, "--precision int8 runs on the CPU: use --device cpu (or auto)"),
])
def test_choices_are_checked_once_where_settings_are_made(settings, message):
    with pytest.raises(ResserveError, match=re.escape(message)):
        ServerSettings(**settings)


@pytest.fixture(scope="module")
def shipped_onnx():
    package = load_package()
    return package.read_verified(package.find("onnx"))


def test_openvino_fp32_matches_onnxruntime(shipped_onnx, mnist):
    images = mnist.test.images[:2000, None].astype(np.float32) / 255
    ort = infer_in_chunks(OnnxRuntimeBackend(shipped_onnx).infer, images, 1000)["logits"]
    ov = infer_in_chunks(OpenVinoBackend(shipped_onnx, "fp32").infer, images, 1000)["logits"]
    assert np.abs(ov - ort).max() <= 1e-4


@pytest.mark.skipif("BF16" not in (openvino_cpu_capabilities() or set()), reason="this CPU has no BF16 support")
def test_openvino_bf16_agrees_with_fp32_on_real_mnist(shipped_onnx, mnist):
    images = mnist.test.images[:, None].astype(np.float32) / 255
    fp32 = infer_in_chunks(OnnxRuntimeBackend(shipped_onnx).infer, images, 1000)["logits"].argmax(1)
    bf16 = infer_in_chunks(OpenVinoBackend(shipped_onnx, "bf16").infer, images, 1000)["logits"].argmax(1)
    assert (fp32 == bf16).mean() >= 0.999
    assert load_package().manifest.bf16().allowed


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-4), ("bf16", 0.5)])
def test_openvino_single_images_match_onnxruntime_like_batches_do(shipped_onnx, mnist, precision, tolerance):
    """Batch 1 runs through its own static-shape, one-thread compilation: it must agree too."""
    if precision == "bf16" and "BF16" not in (openvino_cpu_capabilities() or set()):
        pytest.skip("this CPU has no BF16 support")
    images = mnist.test.images[:64, None].astype(np.float32) / 255
    reference = OnnxRuntimeBackend(shipped_onnx).infer(images)
    backend = OpenVinoBackend(shipped_onnx, precision)
    singles = [backend.infer(images[i:i + 1]) for i in range(len(images))]
    assert all(set(s) == {"logits", "probabilities"} and s["logits"].shape == (1, 10) for s in singles)
    logits = np.concatenate([s["logits"] for s in singles])
    assert np.abs(logits - reference["logits"]).max() <= tolerance
    assert (logits.argmax(1) == reference["logits"].argmax(1)).all()
    assert np.abs(backend.infer(images)["logits"] - reference["logits"]).max() <= tolerance


@pytest.mark.parametrize("size", [1, 8, 64])
def test_sessions_bound_to_one_batch_size_match_the_dynamic_session(shipped_onnx, mnist, size):
    """The CUDA-graph sessions' mechanics, on the CPU (no graph here): batch size fixed in the
    session, input and outputs bound once; each answer is the network's, and is not overwritten
    by the next batch through the reused buffers."""
    backend = OnnxRuntimeBackend(shipped_onnx)
    bound = StaticShapeSession(backend.ort, backend.model, backend.session_options(), ["CPUExecutionProvider"],
                               backend.batch_dimension, size, "cpu")
    images = mnist.test.images[:2 * size, None].astype(np.float32) / 255
    first, second = bound.infer(images[:size]), bound.infer(images[size:])
    for answer, batch in ((first, images[:size]), (second, images[size:])):
        reference = backend.infer(batch)
        assert set(answer) == set(reference) and answer["logits"].shape == (size, 10)
        assert np.abs(answer["logits"] - reference["logits"]).max() <= 1e-5
    assert (first["logits"].argmax(1) == mnist.test.labels[:size]).mean() >= 0.9


def test_only_cuda_specializes_per_batch_size(shipped_onnx):
    backend = OnnxRuntimeBackend(shipped_onnx, "auto")  # no CUDA here: the CPU
    backend.specialize((1, 8, 64))
    assert backend.device == "cpu" and backend.static == {}


def test_tf32_is_for_cuda_alone_on_the_cpu_the_model_runs_and_is_reported_as_fp32(shipped_onnx):
    assert ServerSettings(cuda_tf32=True).cuda == CudaOptions(tf32=True)  # --cuda-tf32 reaches the backend so
    backend = OnnxRuntimeBackend(shipped_onnx, "auto", cuda=CudaOptions(tf32=True))  # no CUDA here: the CPU
    images = np.random.default_rng(0).random((8, 1, 28, 28), dtype=np.float32)
    assert backend.device == "cpu" and backend.precision == "fp32"
    assert np.array_equal(backend.infer(images)["logits"], OnnxRuntimeBackend(shipped_onnx).infer(images)["logits"])


def test_onnxruntime_threads_that_do_not_spin_take_no_cpu_between_batches(shipped_onnx):
    """--no-thread-spinning: between batches ONNX Runtime's threads sleep; spinning (its default),
    they keep about a core busy waiting for the next one."""
    images = np.zeros((1, 1, 28, 28), np.float32)

    def idle_cpu_seconds(spinning: bool) -> float:
        backend, idle = OnnxRuntimeBackend(shipped_onnx, threads=2, thread_spinning=spinning), 0.0
        for _ in range(10):
            backend.infer(images)
            before = time.process_time()
            time.sleep(0.05)
            idle += time.process_time() - before
        return idle

    assert idle_cpu_seconds(False) < 0.05 < idle_cpu_seconds(True)  # 0.5 s of gaps


def test_torchscript_threads_that_do_not_spin_take_no_cpu_between_batches():
    """The same for TorchScript, whose OpenMP threads read the setting when torch loads: in a
    fresh process, as in a server (torch spinning took about 0.1 s of CPU in these gaps)."""
    code = ("import time, numpy as np\n"
            "from resserve.serve.backends import open_backend\n"
            "from resserve.serve.package import load_package\n"
            "package = load_package()\n"
            "backend = open_backend(package.read_verified(package.find('torchscript')), 'torchscript', 'torchscript',\n"
            "                       threads=2, thread_spinning=False)\n"
            "idle = 0.0\n"
            "for _ in range(10):\n"
            "    backend.infer(np.zeros((1, 1, 28, 28), np.float32))\n"
            "    before = time.process_time(); time.sleep(0.05); idle += time.process_time() - before\n"
            "print(idle)")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) < 0.02  # 0.5 s of gaps


@pytest.mark.parametrize("setting, allowed", [(None, False), ("0", True)])
def test_onnxruntime_telemetry_is_off_unless_the_user_allows_it(tmp_path, setting, allowed):
    """ONNX Runtime's Linux builds (from 1.29; Python 3.10 gets 1.23, without) keep a device ID and
    an event cache for Microsoft under ~/.cache/Microsoft; resserve opts out before ONNX Runtime
    starts, unless told otherwise."""
    # ONNX Runtime also stays quiet where it sees a CI job (CI=true, as .ci/run runs): without those
    # markers, as on a user's machine
    ignored = {"ORT_DISABLE_TELEMETRY", "CI", "TF_BUILD", "GITHUB_ACTIONS", "JENKINS_URL", "GITLAB_CI"}
    env = {k: v for k, v in os.environ.items() if k not in ignored} | {
        "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / ".cache")}
    if setting is not None:
        env["ORT_DISABLE_TELEMETRY"] = setting
    code = ("from pathlib import Path; import numpy as np\n"
            "from resserve.serve.backends.onnxruntime import OnnxRuntimeBackend\n"
            "from resserve.serve.package import load_package\n"
            "package = load_package(); backend = OnnxRuntimeBackend(package.read_verified(package.find('onnx')))\n"
            "backend.infer(np.zeros((1, 1, 28, 28), np.float32))\n"
            "import onnxruntime; print(onnxruntime.__version__)")
    ran = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True, timeout=120)
    has_telemetry = tuple(int(part) for part in ran.stdout.split()[-1].split(".")[:2]) >= (1, 29)
    assert (tmp_path / ".cache" / "Microsoft").exists() == (allowed and has_telemetry)


def test_an_onnxruntime_that_is_installed_but_does_not_import_is_named_with_the_fix(tmp_path):
    """As with a wheel built for another numpy major: not 'not installed', which would send the
    user to install what they have."""
    module = tmp_path / "onnxruntime"
    module.mkdir()
    (module / "__init__.py").write_text("raise ImportError('built for numpy 1.x')\n")
    info = tmp_path / "onnxruntime-1.18.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime\nVersion: 1.18.1\n")
    result = run_cli("serve", "--backend", "onnxruntime", "--port", "0", "--http-port", "0", "--metrics-port", "0",
                     env={"PYTHONPATH": str(tmp_path)}, timeout=120)
    assert (result.returncode, result.stderr.strip().splitlines()[-1]) == (
        1, "error: onnxruntime 1.18.1 is installed but cannot be imported: built for numpy 1.x; a newer one "
           "usually mends that: pip install -U onnxruntime")

"""Container-equivalent smoke test: the wheel installed the way the Dockerfile does it (serving
side only, no torch) serves the packaged model, and pip's record of the install stays true."""

import io
import json
import os
import subprocess
import sys
import urllib.request
import venv
from pathlib import Path

from PIL import Image

from helpers import ServerProcess
from resserve.serve.client import DigitClient
from resserve.serve.package import load_package
from resserve.serve.runtime import MAX_BF16_LOSS

ROOT = Path(__file__).resolve().parents[2]
TWO_CLIENTS = """
import sys, numpy as np, tritonclient.grpc as triton
from importlib.metadata import version
from resserve.serve.client import DigitClient
target, png = sys.argv[1:]
x = triton.InferInput("input", [2, 1, 28, 28], "FP32")
x.set_data_from_numpy(np.zeros((2, 1, 28, 28), dtype=np.float32))
out = triton.InferenceServerClient(target).infer("resnet-mnist", [x]).as_numpy("probabilities")
with DigitClient(target) as client:
    digit = client.classify([open(png, "rb").read()])[0].digit
print(version("tritonclient"), len(out), digit)
"""


def test_a_serving_only_install_serves_the_packaged_model(tmp_path, mnist):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(ROOT)],
                   check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("resserve-*.whl"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    env = {**os.environ, "PATH": f"{env_dir / 'bin'}:{os.environ['PATH']}", "VIRTUAL_ENV": str(env_dir)}
    env.pop("PYTHONPATH", None)
    resserve = env_dir / "bin" / "resserve"
    for extras in ("", "[cpu,openvino]"):  # the core alone, then with a runtime
        install = subprocess.run(["sh", str(ROOT / "deploy" / "install-serving.sh"), f"{wheel}{extras}", "-q"],
                                 env=env, capture_output=True, text=True)
        assert install.returncode == 0, install.stderr[-2000:]
        if not extras:  # no ONNX Runtime yet: serving says which extra to install, in one line
            bare = subprocess.run([str(resserve), "serve", "--port", "0", "--http-port", "0", "--metrics-port", "0"],
                                  env=env, capture_output=True, text=True, timeout=120)
            assert (bare.returncode, bare.stderr.strip().splitlines()[-1]) == (
                1, "error: ONNX Runtime is not installed: pip install 'resserve[cpu]' (or 'resserve[gpu]' for NVIDIA GPUs)")

    python = env_dir / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import importlib.util as u; print(u.find_spec('torch') is None)"],
                           env=env, capture_output=True, text=True, check=True)
    assert probe.stdout.split() == ["True"]  # no torch
    help_text = subprocess.run([str(resserve), "--help"], env=env, capture_output=True, text=True, check=True).stdout
    assert "serve" in help_text and "train" in help_text
    train = subprocess.run([str(resserve), "train"], env=env, capture_output=True, text=True)
    assert (train.returncode, train.stderr.strip()) == (
        1, "error: this command needs the training extra: pip install 'resserve[train]'")
    traces = subprocess.run([str(resserve), "serve", "--trace-mode", "opentelemetry"], env=env, capture_output=True,
                            text=True)  # without the otel extra: one line, before anything starts
    assert (traces.returncode, traces.stderr.strip()) == (1, "error: --trace-mode opentelemetry needs the "
                                                          "OpenTelemetry SDK and its OTLP exporter: pip install "
                                                          "'resserve[otel]'")

    buffer = io.BytesIO()
    Image.fromarray(255 - mnist.test.images[0]).save(buffer, format="PNG")  # dark ink on white
    with ServerProcess(executable=env_dir / "bin" / "resserve", env=env) as server:
        with DigitClient(server.target) as client:
            assert client.health("resserve.readiness") == "SERVING"
            assert client.classify([buffer.getvalue()])[0].digit == mnist.test.labels[0]
        for path, shipped in (("/", "serve/rest/page/index.html"), ("/openapi.yaml", "serve/rest/openapi.yaml")):
            with urllib.request.urlopen(f"http://{server.http_target}{path}", timeout=30) as answer:
                assert answer.read() == (ROOT / shipped).read_bytes(), f"the wheel lacks {shipped}"
        # after a deployment, without torch: its accuracy through the whole served path is the number export
        # measured (within the 0.1 points a reduced precision may lose behind its guard), over gRPC, and over
        # HTTP as an ingress or KServe routes it
        reports = []
        for address in (server.target, server.url):
            evaluated = subprocess.run([str(resserve), "eval", "--server", address, "--json", "--data-dir",
                                        str(mnist.path.parent)], env=env, capture_output=True, text=True)
            assert evaluated.returncode == 0, evaluated.stderr[-2000:]
            reports.append(json.loads(evaluated.stdout))
            # what the model is, from the config the server gives (ModelConfig's parameters, from the manifest)
            assert (reports[-1]["model"], reports[-1]["arch"], reports[-1]["params"]) == (
                f"resnet-mnist 1 at {address}", "resnet", 117_802)
        report = reports[0]
        assert sum(map(sum, report["confusion_matrix"])) == 10_000 and len(report["per_class_accuracy"]) == 10
        exported = next(a for a in load_package().manifest.artifacts if a.file == "model.onnx").test_accuracy
        assert abs(report["test_accuracy"] - exported) <= MAX_BF16_LOSS and 0 < report["test_loss"] < 0.05
        assert [{**r, "model": ""} for r in reports[1:]] == [{**report, "model": ""}]  # the same pixels, answers

        # a Triton user adds the newest tritonclient beside it: both import and work in one process
        newest = subprocess.run([str(python), "-m", "pip", "index", "versions", "tritonclient"], env=env,
                                capture_output=True, text=True, check=True).stdout.split("(")[1].split(")")[0]
        subprocess.run([str(python), "-m", "pip", "install", "-q", "tritonclient[grpc]"], env=env, check=True)
        png = tmp_path / "digit.png"
        png.write_bytes(buffer.getvalue())
        both = subprocess.run([str(python), "-c", TWO_CLIENTS, server.target, str(png)], env=env,
                              capture_output=True, text=True)
        assert both.returncode == 0, both.stderr[-2000:]
        assert both.stdout.split() == [newest, "2", str(mnist.test.labels[0])]

    # nothing was deleted behind pip's back: the record is consistent and uninstall leaves nothing
    check = subprocess.run([str(python), "-m", "pip", "check"], env=env, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               env=env, capture_output=True, text=True, check=True).stdout.strip())
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", "resserve"], env=env, check=True)
    leftovers = [p for p in site.glob("resserve*/**/*") if p.is_file()] + list(site.glob("resserve-*"))
    assert leftovers == [] and not resserve.exists()  # (an empty namespace directory may stay, as pip leaves it)

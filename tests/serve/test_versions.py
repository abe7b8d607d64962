"""Two versions of one model on one server, as Triton serves them: the shipped package (version 1)
beside the shipped checkpoint re-exported as version 2 with one output. Every protocol reaches
either version by number, and the latest without one."""

import dataclasses
import json
import shutil
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.http as triton_http
from PIL import Image
from tritonclient.utils import InferenceServerException

from helpers import ServerProcess, metric_value, run_cli, triton_infer
from resserve.serve.package import SHIPPED_PACKAGE
from resserve.serve.stubs import digits_pb2, digits_pb2_grpc
from resserve.train.config import ExportOptions
from resserve.train.export import export_package
from resserve.train.files import SHIPPED_MODEL

MODEL = "resnet-mnist"


@pytest.fixture(scope="module")
def version_2(tmp_path_factory, mnist):
    """Verified on the first 1,000 test images: what these tests need of it, in a tenth of the
    time all 10,000 take (the served tests check the shipped package on all of them)."""
    out = tmp_path_factory.mktemp("export") / "resnet-mnist-2"
    export_package(SHIPPED_MODEL, out, ExportOptions(formats=("onnx",), version="2", outputs=("probabilities",)),
                   dataclasses.replace(mnist, test=mnist.test.head(1000)), log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def server(version_2):
    with ServerProcess(str(version_2), str(SHIPPED_PACKAGE)) as process:  # the order given does not matter
        yield process


def digits(mnist, count: int) -> np.ndarray:
    return mnist.test.images[:count, None].astype(np.float32) / 255.0


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_request_reaches_the_version_it_names_and_the_latest_without_one(server, mnist, protocol):
    client = (triton.InferenceServerClient(server.target) if protocol == "grpc"
              else triton_http.InferenceServerClient(server.http_target))
    images, labels = digits(mnist, 8), mnist.test.labels[:8]
    answers = {version: triton_infer(client, images, version=version) for version in ("", "1", "2")}
    served = {version: answer.get_response() for version, answer in answers.items()}
    if protocol == "grpc":
        served = {version: {"model_version": r.model_version, "outputs": [{"name": o.name} for o in r.outputs]}
                  for version, r in served.items()}
    assert {version: r["model_version"] for version, r in served.items()} == {"": "2", "1": "1", "2": "2"}
    assert [o["name"] for o in served["1"]["outputs"]] == ["logits", "probabilities"]  # each version's own contract
    assert [o["name"] for o in served["2"]["outputs"]] == ["probabilities"]
    for answer in answers.values():
        assert np.array_equal(answer.as_numpy("probabilities").argmax(1), labels)
    with pytest.raises(InferenceServerException, match=r"model 'resnet-mnist' has versions 1, 2, not '3'"):
        triton_infer(client, images, version="3")


def test_metadata_readiness_and_the_repository_index_list_every_version(server):
    client = triton.InferenceServerClient(server.target)
    assert list(client.get_model_metadata(MODEL).versions) == ["1", "2"]
    assert [o.name for o in client.get_model_metadata(MODEL).outputs] == ["probabilities"]  # the latest
    assert [o.name for o in client.get_model_metadata(MODEL, "1").outputs] == ["logits", "probabilities"]
    assert client.is_model_ready(MODEL, "1") and client.is_model_ready(MODEL, "2") and client.is_model_ready(MODEL)
    assert not client.is_model_ready(MODEL, "3")
    assert list(client.get_model_config(MODEL, "1").config.version_policy.specific.versions) == [1, 2]
    index = client.get_model_repository_index().models
    assert sorted((m.name, m.version, m.state) for m in index) == [(MODEL, "1", "READY"), (MODEL, "2", "READY")]
    http = triton_http.InferenceServerClient(server.http_target)
    assert http.get_model_metadata(MODEL, "1")["versions"] == ["1", "2"]
    assert http.get_model_config(MODEL)["version_policy"] == {"specific": {"versions": [1, 2]}}
    assert http.is_model_ready(MODEL, "2") and not http.is_model_ready(MODEL, "3")


def test_statistics_and_metrics_count_each_version_apart(server, mnist):
    client = triton.InferenceServerClient(server.target)

    def successes() -> dict[str, int]:
        stats = client.get_inference_statistics(MODEL).model_stats
        return {s.version: s.inference_stats.success.count for s in stats}

    def batches(version: str) -> float:
        return metric_value(server.metrics(), "resserve_batch_size_count", model=MODEL, version=version)

    before, batches_before = successes(), {v: batches(v) for v in ("1", "2")}
    for version in ("1", "1", "2", ""):
        triton_infer(client, digits(mnist, 1), version=version)
    after = successes()
    assert {v: after[v] - before[v] for v in after} == {"1": 2, "2": 2}
    assert {v: batches(v) - batches_before[v] for v in ("1", "2")} == {"1": 2, "2": 2}
    (only,) = client.get_inference_statistics(MODEL, "1").model_stats
    assert only.version == "1"


def test_a_version_served_twice_or_versions_without_numbers_are_one_line(tmp_path, version_2):
    result = run_cli("serve", str(SHIPPED_PACKAGE), str(SHIPPED_PACKAGE), "--port", "0")
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: two packages are resnet-mnist version 1 ({SHIPPED_PACKAGE} and "
                                     f"{SHIPPED_PACKAGE}): export one with another --name or --version")
    named = tmp_path / "named"
    shutil.copytree(version_2, named)
    manifest = json.loads((named / "manifest.json").read_text())
    (named / "manifest.json").write_text(json.dumps({**manifest, "version": "candidate"}))
    result = run_cli("serve", str(SHIPPED_PACKAGE), str(named), "--port", "0")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error: model resnet-mnist comes at versions 1, candidate: versions served side by side must be distinct "
        "whole numbers (export --version 2), so the latest answers requests that name no version")


def test_classify_takes_a_version_over_grpc_http_and_the_cli(server, mnist, tmp_path):
    png = tmp_path / "digit.png"
    Image.fromarray(mnist.test.images[0]).save(png)
    stub = digits_pb2_grpc.DigitClassifierStub(grpc.insecure_channel(server.target))
    for version, answered in (("", "2"), ("1", "1")):
        request = digits_pb2.ClassifyRequest(images=[digits_pb2.Image(encoded=png.read_bytes())], model_version=version)
        response = stub.Classify(request)
        assert response.model_version == answered and response.results[0].digit == mnist.test.labels[0]
        query = f"?version={version}" if version else ""
        with urllib.request.urlopen(urllib.request.Request(f"{server.url}/v1/classify{query}", data=png.read_bytes())) as r:
            body = json.loads(r.read())
        assert body["model_version"] == answered and body["results"][0]["digit"] == mnist.test.labels[0]
    result = run_cli("classify", "--server", server.target, "--model-version", "1", str(png))
    assert result.returncode == 0 and result.stdout.startswith(f"{png}: {mnist.test.labels[0]} ("), result.stderr
    for version, answered in (("", "2"), ("1", "1")):
        result = run_cli("classify", "--server", server.target, "--model-version", version, "--json", str(png))
        assert [(row["model"], row["model_version"]) for row in json.loads(result.stdout)] == [(MODEL, answered)]
    result = run_cli("classify", "--server", server.target, "--model-version", "3", str(png))
    assert result.returncode == 1 and "has versions 1, 2, not '3'" in result.stderr

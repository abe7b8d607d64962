"""A real `resserve serve` on a loopback port, spoken to by real clients: tritonclient, grpcio
stubs, `resserve classify` and `resserve health`."""

import contextlib
import io
import itertools
import json
import re
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from aiohttp import web
from PIL import Image

from helpers import (HEIC_PHOTO, MALFORMED_TIFF, ServerProcess, free_port, http_app, ingress, logged_since, metric_value,
                     run_cli, tree_resident_bytes)
from resserve.serve.backends.base import usable_cpus
from resserve.serve.bench.load import tree_cpu_seconds
from resserve.serve.client import DigitClient, connect
from resserve.serve.client.base import CLOSED_AT_LIMIT, requests_of
from resserve.serve.package import load_package
from resserve.serve.preprocess import HEIF_REFUSED, UNREADABLE
from resserve.serve.settings import ServerSettings, page_note
from resserve.serve.sharedmemory import OFF_MESSAGE
from resserve.serve.stubs import digits_pb2, digits_pb2_grpc, grpc_service_pb2 as kserve_pb2
from resserve.serve.stubs import grpc_service_pb2_grpc as kserve_grpc

MODEL = "resnet-mnist"


@pytest.fixture(params=["grpc", "http"])
def address(request, server) -> str:
    """How a client command names the module's server: by its gRPC port, or by its HTTP port's URL."""
    return server.target if request.param == "grpc" else server.url


def as_input(images: np.ndarray) -> np.ndarray:
    return images[:, None].astype(np.float32) / 255.0


def infer(client: triton.InferenceServerClient, batch: np.ndarray, datatype: str = "FP32", **kwargs):
    tensor = triton.InferInput("input", list(batch.shape), datatype)
    tensor.set_data_from_numpy(batch)
    return client.infer(MODEL, [tensor], **kwargs)


def kserve_stub(server) -> kserve_grpc.GRPCInferenceServiceStub:
    return kserve_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.target))


def test_the_ready_line_says_where_to_draw_a_digit(server):
    """The log gave the HTTP address as listened on (http://0.0.0.0:8000/ by default), which not
    every browser opens; a person starting the server wants the page's address."""
    ready = server.wait_for_line(" ready: ")
    assert ready.rstrip().endswith(f"ready: resnet-mnist v1; draw a digit at http://127.0.0.1:{server.http_port}/")


@pytest.mark.parametrize("host, tls, page", [
    ("0.0.0.0", False, "; draw a digit at http://localhost:8000/"),
    ("::", True, "; draw a digit at https://localhost:8000/"),
    ("::1", False, "; draw a digit at http://[::1]:8000/"),
    ("10.1.2.3", False, "; draw a digit at http://10.1.2.3:8000/"),
])
def test_a_server_on_every_interface_is_at_localhost_for_a_person(host, tls, page):
    files = {"tls_cert": Path("cert.pem"), "tls_key": Path("key.pem")} if tls else {}
    settings = ServerSettings(host=host, **files)
    assert page_note(settings, 8000) == page
    assert page_note(settings, 0) == ""  # no HTTP


# ----------------------------------------------------------------------------------------------
# tritonclient, unchanged


def test_tritonclient_sees_a_live_ready_server_and_the_model(server):
    client = triton.InferenceServerClient(server.target)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and not client.is_model_ready("no-such-model")
    metadata = client.get_model_metadata(MODEL, as_json=True)
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "1", "28", "28"]}]
    assert [o["name"] for o in metadata["outputs"]] == ["logits", "probabilities"]
    config = client.get_model_config(MODEL).config
    assert config.name == MODEL and config.platform in ("onnxruntime_onnx", "openvino")
    assert config.max_batch_size == 64 and config.dynamic_batching.max_queue_delay_microseconds == 0
    assert list(config.input[0].dims) == [1, 28, 28]
    assert client.get_server_metadata().name == "resserve"


def test_tritonclient_infer_on_the_mnist_test_set_gives_the_exported_accuracy(server, mnist):
    client = triton.InferenceServerClient(server.target)
    predictions = []
    for start in range(0, 10_000, 500):
        result = infer(client, as_input(mnist.test.images[start:start + 500]))
        predictions.append(result.as_numpy("logits").argmax(1))
    accuracy = float((np.concatenate(predictions) == mnist.test.labels).mean())
    manifest = load_package().manifest
    precision = client.get_model_config(MODEL).config.parameters["precision"].string_value
    expected = manifest.accuracy.test if precision == "fp32" else manifest.reduced_precision[precision].test_accuracy
    assert accuracy == expected  # what export measured for the runtime that answered


def test_uint8_inputs_and_requested_outputs(server, mnist):
    client = triton.InferenceServerClient(server.target)
    images = mnist.test.images[:8][:, None]
    result = infer(client, images, "UINT8", outputs=[triton.InferRequestedOutput("probabilities")])
    probabilities = result.as_numpy("probabilities")
    assert result.as_numpy("logits") is None
    assert np.allclose(probabilities.sum(1), 1, atol=1e-5)
    fp32 = infer(client, as_input(mnist.test.images[:8])).as_numpy("probabilities")
    assert np.allclose(probabilities, fp32, atol=1e-6)


def test_typed_contents_are_accepted_as_well_as_raw_bytes(server, mnist):
    batch = as_input(mnist.test.images[:3])
    request = kserve_pb2.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[3, 1, 28, 28])
    tensor.contents.fp32_contents.extend(batch.ravel().tolist())
    response = kserve_stub(server).ModelInfer(request)
    assert [o.name for o in response.outputs] == ["logits", "probabilities"]
    logits = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(3, 10)
    assert logits.argmax(1).tolist() == mnist.test.labels[:3].tolist()


# ----------------------------------------------------------------------------------------------
# Our own API and the CLI client


def encode(image: np.ndarray, format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=format)
    return buffer.getvalue()


def photo_like(digit: np.ndarray) -> np.ndarray:
    """An MNIST digit as dark ink on light, uneven paper, 8x larger: what a phone photo looks like."""
    big = np.asarray(Image.fromarray(digit).resize((224, 224), Image.BICUBIC), dtype=np.float32)
    paper = 215 + 20 * np.linspace(0, 1, 224)[None, :] + np.random.default_rng(0).normal(0, 4, (224, 224))
    return np.clip(paper - big * 0.8, 0, 255).astype(np.uint8)


def test_classify_png_and_jpeg_files_with_the_cli(address, mnist, tmp_path):
    files = []
    for i in range(10):
        path = tmp_path / f"digit{i}.{'png' if i % 2 else 'jpg'}"
        path.write_bytes(encode(photo_like(mnist.test.images[i]), "PNG" if i % 2 else "JPEG"))
        files.append(str(path))
    result = run_cli("classify", *files, "--server", address, "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [row["file"] for row in rows] == files
    correct = sum(row["digit"] == label for row, label in zip(rows, mnist.test.labels[:10]))
    assert correct >= 9
    assert all(0.0 <= row["confidence"] <= 1.0 and (row["model"], row["model_version"]) == (MODEL, "1") for row in rows)
    plain = run_cli("classify", files[0], "--server", address)
    assert plain.stdout.startswith(f"{files[0]}: {rows[0]['digit']} (")


def test_one_bad_file_does_not_sink_a_classify_call_and_is_named(address, mnist, tmp_path):
    good = [tmp_path / f"digit{i}.png" for i in range(3)]
    for path, image in zip(good, mnist.test.images):
        path.write_bytes(encode(photo_like(image), "PNG"))
    text, blank = tmp_path / "notes.png", tmp_path / "blank.png"
    text.write_text("not an image")
    blank.write_bytes(encode(np.full((40, 40), 255, dtype=np.uint8), "PNG"))
    files = [good[0], text, good[1], blank, good[2]]
    result = run_cli("classify", *map(str, files), "--server", address)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [f"{p}: {label} (" + line.split(" (")[1] for p, label, line in
                                          zip(good, mnist.test.labels[:3], result.stdout.splitlines())]
    assert result.stderr.splitlines() == [
        f"{text}: error: {UNREADABLE}",
        f"{blank}: error: the image is blank (no ink found): there is no digit to classify"]
    as_json = json.loads(run_cli("classify", *map(str, files), "--server", address, "--json").stdout)
    assert [("error" in row, row["file"]) for row in as_json] == [(f in (text, blank), str(f)) for f in files]


def test_classify_refuses_a_file_that_does_not_end_and_classifies_the_others(server, mnist, tmp_path):
    """/dev/zero was read until memory ran out (a MemoryError traceback under a memory limit)."""
    digit = tmp_path / "digit.png"
    digit.write_bytes(encode(photo_like(mnist.test.images[0]), "PNG"))
    result = run_cli("classify", "/dev/zero", str(digit), "--server", server.target, memory_gib=4)
    assert result.returncode == 1
    assert result.stdout.startswith(f"{digit}: {mnist.test.labels[0]} (")
    assert result.stderr.strip() == "/dev/zero: error: more than 256 MiB, larger than any image the server reads"


def test_classify_a_folder_classifies_the_images_in_it_by_name(server, mnist, tmp_path):
    folder = tmp_path / "scans"
    (folder / "older").mkdir(parents=True)  # subfolders are not read
    for i in (2, 0, 1):
        (folder / f"digit{i}.{'png' if i % 2 else 'jpg'}").write_bytes(encode(photo_like(mnist.test.images[i]), "PNG" if i % 2 else "JPEG"))
    (folder / "notes.txt").write_text("scanned on Monday")
    (folder / "._digit0.jpg").write_bytes(b"\0\5\26\7")  # what a Mac leaves beside a copied file
    (folder / "older" / "digit9.png").write_bytes(encode(mnist.test.images[9], "PNG"))
    result = run_cli("classify", str(folder), "--server", server.target, "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [row["file"] for row in rows] == [str(folder / name) for name in ("digit0.jpg", "digit1.png", "digit2.jpg")]
    assert [row["digit"] for row in rows] == list(mnist.test.labels[:3])
    empty = run_cli("classify", str(folder / "older" / ".."), str(tmp_path), "--server", server.target)
    assert empty.returncode == 1
    assert empty.stderr.strip() == f"error: {tmp_path} has no image files (PNG, JPEG, ...) in it"


def test_classify_reads_an_image_piped_in_as_dash(server, mnist, tmp_path):
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(encode(photo_like(mnist.test.images[3]), "JPEG"))
    with photo.open("rb") as piped:
        result = run_cli("classify", "-", str(photo), "--server", server.target, stdin=piped)
    assert result.returncode == 0, result.stderr
    label = mnist.test.labels[3]
    assert [line.split(" (")[0] for line in result.stdout.splitlines()] == [f"-: {label}", f"{photo}: {label}"]


def test_classify_names_an_iphones_heic_photos_and_how_to_send_them(server, mnist, tmp_path):
    folder = tmp_path / "camera roll"
    folder.mkdir()
    (folder / "IMG_0001.HEIC").write_bytes(HEIC_PHOTO)
    (folder / "IMG_0002.JPG").write_bytes(encode(photo_like(mnist.test.images[0]), "JPEG"))
    result = run_cli("classify", str(folder), "--server", server.target)
    assert result.returncode == 1
    assert result.stdout.startswith(f"{folder / 'IMG_0002.JPG'}: {mnist.test.labels[0]} (")
    assert result.stderr.strip() == f"{folder / 'IMG_0001.HEIC'}: error: {HEIF_REFUSED}"


def test_classify_sends_more_files_than_one_request_takes(server, mnist, tmp_path):
    files = []
    for i in range(1100):  # more than the server's --max-images-per-request (1024)
        files.append(tmp_path / f"{i:04d}.png")
        files[-1].write_bytes(encode(mnist.test.images[i], "PNG"))
    result = run_cli("classify", *map(str, files), "--server", server.target, "--json")  # (over HTTP: lower_limits)
    assert result.returncode == 0, result.stderr
    digits = [row["digit"] for row in json.loads(result.stdout)]
    assert len(digits) == 1100 and np.mean(np.array(digits) == mnist.test.labels[:1100]) >= 0.99


def test_classify_keeps_requests_in_flight_and_prints_their_answers_in_order(server, mnist, tmp_path):
    """It sent one request at a time, each decoded on one server thread: the server's other CPUs idled."""
    files = [tmp_path / f"{i:03d}.png" for i in range(96)]
    for path, image in zip(files, mnist.test.images):
        path.write_bytes(encode(photo_like(image), "PNG"))
    said, settings = len(server.lines), triton.InferenceServerClient(server.target)
    settings.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"], "trace_rate": "1"})  # every request
    result = run_cli("classify", str(tmp_path), "--server", server.target)
    requests = logged_since(server, said)
    settings.update_trace_settings(settings={"trace_level": None, "trace_rate": None})
    assert result.returncode == 0, result.stderr
    answers = [line.split(": ") for line in result.stdout.splitlines()]
    assert [file for file, _ in answers] == list(map(str, files))
    assert np.mean([int(answer.split()[0]) for _, answer in answers] == mnist.test.labels[:len(files)]) > 0.95
    times = sorted((stamp["ns"], +1 if stamp["name"] == "REQUEST_START" else -1) for trace in requests
                   for stamp in trace["timestamps"] if stamp["name"] in ("REQUEST_START", "REQUEST_END"))
    assert len(requests) == len(requests_of([path.stat().st_size for path in files])) > 1
    assert max(itertools.accumulate(change for _, change in times)) >= 2  # answered at once


def test_classify_fits_its_requests_to_a_servers_lower_limits(mnist, tmp_path):
    small = []
    for i in range(10):
        small.append(tmp_path / f"{i}.png")
        small[-1].write_bytes(encode(mnist.test.images[i], "PNG"))  # about 250 bytes each
    large = tmp_path / "photo.png"
    large.write_bytes(encode(photo_like(mnist.test.images[10]), "PNG"))  # over the 2,048-byte limit
    files = [*small[:5], large, tmp_path / "missing.png", *small[5:]]
    with ServerProcess("--max-images-per-request", "4", "--max-message-bytes", "2048") as server:
        for address in (server.target, server.url):  # gRPC, and HTTP (a 413, a form over the image limit)
            result = run_cli("classify", *map(str, files), "--server", address, "--json")
            assert result.returncode == 1
            rows = json.loads(result.stdout)
            assert [row["file"] for row in rows] == list(map(str, files))
            assert [row.get("digit") for row in rows[:5] + rows[7:]] == list(mnist.test.labels[:10])
            assert f"{large.stat().st_size:,} bytes: more than the server takes in one request" in rows[5]["error"]
            assert rows[6]["error"] == "cannot read it: No such file or directory"
            assert result.stderr.splitlines() == [f"{row['file']}: error: {row['error']}" for row in rows[5:7]]


def test_classify_sends_a_phone_photo_over_the_servers_message_limit_smaller_and_upright(server, mnist, tmp_path):
    """A 12-megapixel portrait photo as phones store it: sideways, with an EXIF orientation."""
    ink = np.asarray(Image.fromarray(mnist.test.images[0]).resize((3000, 4000), Image.BICUBIC), dtype=np.float32)
    paper = 215 + np.random.default_rng(0).normal(0, 6, ink.shape)
    upright = Image.fromarray(np.clip(paper - ink * 0.8, 0, 255).astype(np.uint8)).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # turn 90 degrees clockwise to view
    photo = tmp_path / "IMG_0001.jpg"
    upright.transpose(Image.Transpose.ROTATE_90).save(photo, quality=97, exif=exif)
    assert photo.stat().st_size > 4 * 2**20  # over the server's --max-message-bytes
    result = run_cli("classify", str(photo), "--server", server.target)  # (fit_to_send: the same over HTTP)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{photo}: {mnist.test.labels[0]} (")


def test_classify_sends_a_16_bit_scan_over_the_request_size_as_the_scan_shows(server, mnist, tmp_path):
    """The client re-encodes a file over 1 MB smaller: it clipped a 16-bit scan's pixels at 255,
    so dark ink on white paper went out all white ("the image is blank")."""
    page = 255 - np.kron(mnist.test.images[0], np.ones((40, 40), dtype=np.uint8))  # 1120x1120
    scan = tmp_path / "scan.tif"
    Image.fromarray(page.astype(np.uint16) * 257).save(scan)
    assert scan.stat().st_size > 2**20
    result = run_cli("classify", str(scan), "--server", server.target)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{scan}: {mnist.test.labels[0]} (")


def test_classify_sends_a_file_that_makes_pillow_raise_as_it_is_for_the_server_to_refuse(server, tmp_path):
    malformed = tmp_path / "scan.tif"
    malformed.write_bytes(MALFORMED_TIFF + bytes(2**20))  # over the size the client re-encodes
    result = run_cli("classify", str(malformed), "--server", server.target)
    assert (result.returncode, result.stderr.strip()) == (
        1, f"{malformed}: error: bytes are not an image Pillow can read (TypeError)")


def test_requests_of_groups_images_by_count_and_bytes():
    assert requests_of([], 2, 100) == []
    assert requests_of([10] * 5, 2, 100) == [range(0, 2), range(2, 4), range(4, 5)]
    assert requests_of([60, 60, 30, 500, 10], 8, 100) == [range(0, 1), range(1, 3), range(3, 4), range(4, 5)]


def test_classify_raw_pixels_with_top_k(server, mnist):
    stub = digits_pb2_grpc.DigitClassifierStub(grpc.insecure_channel(server.target))
    request = digits_pb2.ClassifyRequest(images=[digits_pb2.Image(raw_28x28=mnist.test.images[i].tobytes()) for i in range(4)],
                                         top_k=3)
    response = stub.Classify(request)
    assert response.model == MODEL and response.model_version == load_package().version
    assert [r.digit for r in response.results] == mnist.test.labels[:4].tolist()
    for r in response.results:
        assert len(r.probabilities) == 10 and len(r.top) == 3
        assert r.top[0].digit == r.digit and r.top[0].probability >= r.top[1].probability


# ----------------------------------------------------------------------------------------------
# Health, reflection, metrics


def test_health_and_reflection(server):
    channel = grpc.insecure_channel(server.target)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "resserve.liveness", "resserve.readiness", "inference.GRPCInferenceService"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
    watch = health.Watch(health_pb2.HealthCheckRequest(service="resserve.readiness"), timeout=10)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in next(responses).list_services_response.service}
    assert {"inference.GRPCInferenceService", "resserve.v1.DigitClassifier", "grpc.health.v1.Health"} <= names
    assert run_cli("health", "--server", server.target).stdout.strip() == "SERVING"
    for port in (server.http_port, server.metrics_port):  # a port of the server's that is not its gRPC port
        refused = run_cli("health", "--server", f"127.0.0.1:{port}")
        assert refused.returncode == 1 and refused.stderr.strip().endswith(
            "(what answers there does not speak gRPC, as the server's HTTP and metrics ports do not: --server or "
            "RESSERVE_SERVER takes its gRPC port, 8001 by default)"), refused.stderr


def test_both_transports_give_the_same_answers_from_python(server, mnist):
    images = mnist.test.images[:5]
    encoded = [encode(photo_like(image), "PNG") for image in images]
    answers = []
    for address in (server.target, server.url):
        with connect(address) as client:
            config = client.model_config(MODEL)
            answers.append((client.classify(encoded), client.classify_pixels(images, version="1"), client.models(),
                            config.name, dict(config.parameters)))
    assert answers[0] == answers[1]
    assert [result.digit for result in answers[0][1]] == list(mnist.test.labels[:5])


def test_health_over_http(server):
    for service in ("", "resserve.liveness"):  # (resserve.readiness asks what "" does)
        assert run_cli("health", "--server", server.url, "--service", service).stdout.strip() == "SERVING"
    unknown = run_cli("health", "--server", server.url, "--service", "inference.GRPCInferenceService", "--wait", "30")
    assert unknown.returncode == 1 and unknown.stderr.strip() == (
        f"error: {server.url}: NOT_FOUND: no health service 'inference.GRPCInferenceService' over HTTP; resserve's "
        "are '' (the server: GET /v2/health/ready), resserve.readiness (the same) and resserve.liveness (GET "
        "/v2/health/live)")  # at once: an unknown name is not waited for
    for port in (server.port, server.metrics_port):  # a port of the server's that is not its HTTP port
        refused = run_cli("health", "--server", f"http://127.0.0.1:{port}")
        assert refused.returncode == 1 and refused.stderr.strip().endswith(
            "(what answers there is not resserve's HTTP API, as the server's gRPC and metrics ports are not: --server "
            "or RESSERVE_SERVER takes the URL of its HTTP port, 8000 by default, or of what routes to it, with the "
            "path prefix it routes)"), refused.stderr


def test_the_client_commands_reach_a_server_under_an_ingress_path_prefix(server, mnist, tmp_path):
    digit = tmp_path / "digit.png"
    digit.write_bytes(encode(photo_like(mnist.test.images[0]), "PNG"))
    with ingress(server.url, "/digits") as url:
        assert run_cli("health", "--server", url).stdout.strip() == "SERVING"
        classified = run_cli("classify", str(digit), "--server", url + "/")
        assert classified.stdout.startswith(f"{digit}: {mnist.test.labels[0]} ("), classified.stderr
        assert run_cli("models", "--server", url).stdout.startswith("resnet-mnist\t1\tREADY")
        outside = run_cli("health", "--server", url.removesuffix("/digits"))  # the prefix left out
        assert outside.returncode == 1 and outside.stderr.strip().endswith(
            ": HTTP 404: Not Found (what answers there is not resserve's HTTP API, as the server's gRPC and metrics "
            "ports are not: --server or RESSERVE_SERVER takes the URL of its HTTP port, 8000 by default, or of what "
            "routes to it, with the path prefix it routes)")


def test_the_client_commands_and_bench_go_through_the_environments_proxy_and_read_no_netrc(server, tmp_path):
    netrc = tmp_path / "netrc"  # aiohttp's own reading of it sent nothing with a token: it ended every request
    netrc.write_text("machine resserve.invalid login someone password theirs\n")
    short_bench = ("bench", "serve", "--concurrency", "1", "--duration", "0.3", "--warmup", "0.1", "--json")
    with ingress(server.url, "") as proxy:  # a proxy in front of the server: what it is asked for, it asks of it
        named = {"HTTP_PROXY": proxy, "http_proxy": proxy, "NO_PROXY": "", "no_proxy": "", "NETRC": str(netrc)}
        through = run_cli("models", "--server", "http://resserve.invalid", "--token", "t", env=named)
        bypassed = run_cli("health", "--server", "http://resserve.invalid", env={**named, "NO_PROXY": "resserve.invalid",
                                                                                "no_proxy": "resserve.invalid"})
        loaded = run_cli(*short_bench, str(tmp_path / "bench.json"), "--target", "http://resserve.invalid", env=named)
        direct = run_cli(*short_bench, str(tmp_path / "triton.json"), "--target", server.url,
                         "--client", "tritonclient", env=named)
    assert through.stdout.startswith("resnet-mnist\t1\tREADY"), through.stderr  # a name only the proxy reaches
    assert bypassed.returncode == 1 and "(is a server running there?" in bypassed.stderr, bypassed.stderr
    for result, report in ((loaded, "bench.json"), (direct, "triton.json")):  # the load, not only its first look
        assert result.returncode == 0, result.stderr
        ((row,),) = json.loads((tmp_path / report).read_text())["servers"].values()
        assert row["ok"] > 0 and row["errors"] == {}, row
    assert "note: tritonclient.http connects to" not in loaded.stderr
    assert (f"note: tritonclient.http connects to {server.url} directly, not through the proxy that HTTPS_PROXY or "
            "HTTP_PROXY names for it (--client resserve and perf_analyzer go through it)") in direct.stderr


def test_a_connection_that_fails_through_a_proxy_names_the_proxy(server):
    dead = "http://someone:secret@127.0.0.1:9"  # nothing listens on the discard port
    unset = {"grpc_proxy": "", "no_grpc_proxy": "", "NO_PROXY": "", "no_proxy": ""}  # whatever this machine has
    over_grpc = run_cli("health", "--server", server.target, env={**unset, "grpc_proxy": dead})
    bare = dead.removeprefix("http://")  # as curl takes it
    over_http = run_cli("health", "--server", server.url, env={**unset, "HTTP_PROXY": bare, "http_proxy": bare})
    unusable = [run_cli("health", "--server", server.url, env={**unset, "HTTP_PROXY": value, "http_proxy": value})
                for value in ("http://[secret", "socks5://someone:secret@127.0.0.1:1080")]
    bench = ("bench", "serve", "--target", server.target, "--http-target", server.url.removeprefix("http://"),
             "--concurrency", "1", "--duration", "0.2")  # its gRPC calls go direct (grpc_proxy is set empty)
    unusable.append(run_cli(*bench, env={**unset, "HTTP_PROXY": "http://[secret", "http_proxy": "http://[secret"}))
    bench_over_http = run_cli(*bench, "--api", "rest", env={**unset, "HTTP_PROXY": dead, "http_proxy": dead})
    with ingress("http://127.0.0.1:9", "") as proxy:  # a proxy that cannot reach the server: its own 500
        unreached = run_cli("health", "--server", server.url, env={**unset, "HTTP_PROXY": proxy, "http_proxy": proxy})
        refused = run_cli("health", "--server", server.target, env={**unset, "grpc_proxy": proxy})  # CONNECT: a 4xx
    port = free_port()  # nothing listens there
    bypassed = [run_cli("health", "--server", address, env={**unset, "grpc_proxy": dead, "no_grpc_proxy": listed})
                for address, listed in ((f"127.0.0.1:{port}", "10.0.0.0/8, 127.0.0.0/8"),
                                        (f"localhost:{port}", "example.com,.localhost,localhost"))]
    assert over_grpc.returncode == 1 and over_grpc.stderr.strip().endswith(
        "(through the proxy http://127.0.0.1:9 that grpc_proxy names: is it running, and does it reach the server? "
        "no_grpc_proxy or no_proxy lists the hosts to connect to directly)"), over_grpc.stderr
    http_hint = ("names: is it running, and does it reach the server? NO_PROXY lists the hosts to connect to "
                 "directly)")
    assert over_http.returncode == 1 and over_http.stderr.strip().endswith(
        f"(through the proxy http://127.0.0.1:9 that HTTPS_PROXY or HTTP_PROXY {http_hint}"), over_http.stderr
    assert unreached.returncode == 1 and unreached.stderr.strip().endswith(
        f": HTTP 500: Internal Server Error (through the proxy {proxy} that HTTPS_PROXY or "
        f"HTTP_PROXY {http_hint}"), unreached.stderr
    assert refused.stderr.startswith("error: ") and refused.stderr.count("\n") == 1, refused.stderr  # no gRPC logs
    assert re.search(r"HTTP proxy returned response code 4\d\d \(through the proxy " + re.escape(
        f"{proxy} that grpc_proxy names: is it running, and does it reach the server? no_grpc_proxy or no_proxy "
        "lists the hosts to connect to directly)") + "$", refused.stderr.strip()), refused.stderr
    assert bench_over_http.returncode == 1 and bench_over_http.stderr.strip().endswith(
        f"(through the proxy http://127.0.0.1:9 that HTTPS_PROXY or HTTP_PROXY {http_hint}"), bench_over_http.stderr
    unparsable = "error: HTTP_PROXY (or http_proxy) in the environment is not a proxy's URL (Invalid IPv6 URL)\n"
    assert [(result.returncode, result.stderr) for result in unusable] == [
        (1, unparsable),
        (1, "error: HTTP_PROXY (or http_proxy) in the environment names a socks5:// proxy; resserve's HTTP client "
            "reaches HTTP proxies only, as http://HOST:PORT\n"),
        (1, unparsable)]  # bench reads the server's metrics through it
    assert "secret" not in over_grpc.stderr + over_http.stderr
    for result in bypassed:  # connected to directly, as no_grpc_proxy lists the host: no proxy to name
        assert result.returncode == 1 and "(is a server running there?" in result.stderr, result.stderr


def test_an_answer_far_larger_than_resserve_sends_is_not_read_whole():
    async def flood(request: web.Request) -> web.Response:  # something else at that URL, not a server of ours
        return web.Response(body=b" " * (64 * 2**20), content_type="application/json")

    with http_app(flood) as url:
        refused = run_cli("health", "--server", url)
    assert refused.returncode == 1 and refused.stderr.strip().startswith(
        f"error: {url}: RESOURCE_EXHAUSTED: the answer to GET /v2/health/ready is over 4 MiB, far more than resserve "
        "sends (what answers there is not resserve's HTTP API"), refused.stderr


def test_a_connection_reset_before_the_answer_is_said_as_a_refused_handshake():
    """A server with mutual TLS that refuses a client's certificate ends the connection with an alert,
    a disconnect or, by timing, a reset (TCP RST): each is the same refusal to the user."""
    listener = socket.create_server(("127.0.0.1", 0))

    def reset_each_connection() -> None:
        with contextlib.suppress(OSError):  # until the listener closes
            while True:
                connection, _ = listener.accept()
                connection.recv(1)
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close
                connection.close()

    threading.Thread(target=reset_each_connection, daemon=True).start()
    port = listener.getsockname()[1]
    with listener:
        for url, hint in ((f"https://127.0.0.1:{port}", "a server with mutual TLS closes connections without a "
                                                        "client certificate: give --tls-cert and --tls-key"),
                          (f"http://127.0.0.1:{port}", "a TLS server closes plaintext connections: give an "
                                                       "https:// URL")):
            refused = run_cli("health", "--server", url)
            assert refused.returncode == 1 and refused.stderr.strip().endswith(f"({hint}{CLOSED_AT_LIMIT})"), \
                refused.stderr


@pytest.mark.parametrize("server_option, target", [
    ("localhost", "localhost:8001"), ("10.0.0.5", "10.0.0.5:8001"), ("[::1]", "[::1]:8001"),  # was: port 443
    ("resserve.example.com:443", "resserve.example.com:443"), ("dns:///localhost:9001", "dns:///localhost:9001"),
    ("unix:/run/resserve.sock", "unix:/run/resserve.sock"),
])
def test_a_server_named_by_its_host_alone_is_reached_on_its_grpc_port(server_option, target):
    with DigitClient(server_option) as client:
        assert client.target == target


def test_concurrent_load_forms_batches(mnist):
    with ServerProcess("--max-queue-delay-us", "5000") as server:
        client = triton.InferenceServerClient(server.target)
        batch = as_input(mnist.test.images[:1])
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda _: infer(client, batch).as_numpy("logits"), range(400)))
        metrics = server.metrics()
    assert all(np.allclose(r, results[0], atol=1e-5) for r in results)  # every request got its own answer
    assert metric_value(metrics, "resserve_batch_size_sum") == 400  # warm-up runs outside the batcher
    assert metric_value(metrics, "resserve_batch_size_count") < 400 * 0.8  # batches held several requests
    assert metric_value(metrics, "resserve_requests_total", api="kserve", code="OK") == 400


# ----------------------------------------------------------------------------------------------
# Bad input: the right code, a precise message, and the server keeps serving

def _raw_request(datatype="FP32", shape=(1, 1, 28, 28), data: bytes | None = None, name="input", model=MODEL,
                 timeout_text: str | None = None, contents: int = 1):
    request = kserve_pb2.ModelInferRequest(model_name=model)
    if timeout_text is not None:
        request.parameters["timeout"].string_param = timeout_text
    request.inputs.add(name=name, datatype=datatype, shape=list(shape))
    if data is None:
        data = np.zeros(shape, dtype=np.float32).tobytes()
    request.raw_input_contents.extend([data] * contents)
    return request


def _typed_request(field: str, datatype="FP32"):
    """A request with its 784 values in typed contents, in ``field``."""
    request = kserve_pb2.ModelInferRequest(model_name=MODEL)
    getattr(request.inputs.add(name="input", datatype=datatype, shape=[1, 1, 28, 28]).contents, field).extend([0] * 784)
    return request


BAD_INPUTS = {
    "datatype": (_raw_request(datatype="FP64"), grpc.StatusCode.INVALID_ARGUMENT, "datatype FP64"),
    "shape": (_raw_request(shape=(1, 28, 28)), grpc.StatusCode.INVALID_ARGUMENT, "expected [N, 1, 28, 28]"),
    "scalar": (_raw_request(shape=()), grpc.StatusCode.INVALID_ARGUMENT,  # one value, 4 bytes: sized right
               "input has shape []; expected [N, 1, 28, 28]"),
    "size": (_raw_request(data=b"\0" * 100), grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents has 100 bytes"),
    "typed contents": (_typed_request("int_contents"), grpc.StatusCode.INVALID_ARGUMENT,
                       "input 'input' is FP32: its values go in contents.fp32_contents, not contents.int_contents"),
    "contents": (_raw_request(contents=2), grpc.StatusCode.INVALID_ARGUMENT,
                 "2 raw_input_contents for 1 input: send one for each input, in order"),
    "nan": (_raw_request(data=np.full((1, 1, 28, 28), np.nan, np.float32).tobytes()),
            grpc.StatusCode.INVALID_ARGUMENT, "NaN or infinity"),
    "infinity": (_raw_request(data=np.pad([np.inf], (783, 0)).astype(np.float32).tobytes()),
                 grpc.StatusCode.INVALID_ARGUMENT, "NaN or infinity"),
    "one nan": (_raw_request(data=np.pad([np.nan], (0, 783)).astype(np.float32).tobytes()),
                grpc.StatusCode.INVALID_ARGUMENT, "NaN or infinity"),
    "range": (_raw_request(data=np.full((1, 1, 28, 28), 255, np.float32).tobytes()),
              grpc.StatusCode.INVALID_ARGUMENT, "must be in [0, 1]"),
    "empty": (_raw_request(shape=(0, 1, 28, 28), data=b""), grpc.StatusCode.INVALID_ARGUMENT, "empty batch"),
    "too many": (_raw_request(shape=(1025, 1, 28, 28)), grpc.StatusCode.INVALID_ARGUMENT, "limit is 1024"),
    "input name": (_raw_request(name="pixels"), grpc.StatusCode.INVALID_ARGUMENT, "unknown input 'pixels'"),
    "model": (_raw_request(model="nope"), grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"),
    "timeout": (_raw_request(timeout_text="soon"), grpc.StatusCode.INVALID_ARGUMENT,
                "the timeout parameter must be an integer (microseconds)"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_kserve_input_gets_its_status_and_the_server_keeps_serving(server, case, mnist):
    request, code, message = BAD_INPUTS[case]
    with pytest.raises(grpc.RpcError) as info:
        kserve_stub(server).ModelInfer(request)
    assert info.value.code() == code
    assert message in info.value.details()
    assert "Traceback" not in info.value.details() and "/" not in info.value.details().replace("[0, 1]", "")
    assert infer(triton.InferenceServerClient(server.target), as_input(mnist.test.images[:1])).as_numpy("logits").shape == (1, 10)


@pytest.mark.parametrize("images, message", [
    ([], "no images in the request"),
    ([digits_pb2.Image(encoded=b"not an image")], "image 0: bytes are not an image"),
    ([digits_pb2.Image()], "image 0 has neither encoded bytes nor raw_28x28"),
    ([digits_pb2.Image(raw_28x28=b"\0" * 10)], "image 0: raw_28x28 must be 784 bytes"),
])
def test_bad_classify_input_is_invalid_argument(server, images, message):
    stub = digits_pb2_grpc.DigitClassifierStub(grpc.insecure_channel(server.target))
    with pytest.raises(grpc.RpcError) as info:
        stub.Classify(digits_pb2.ClassifyRequest(images=images))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


def test_a_message_over_the_size_limit_is_resource_exhausted(server):
    big = _raw_request(shape=(1400, 1, 28, 28))  # 4.4 MB > 4 MiB
    with pytest.raises(grpc.RpcError) as info:
        kserve_stub(server).ModelInfer(big)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_decompression_bomb_is_refused(server):
    side = 4200
    buffer = io.BytesIO()
    Image.new("L", (side, side)).save(buffer, format="PNG")
    stub = digits_pb2_grpc.DigitClassifierStub(grpc.insecure_channel(server.target))
    with pytest.raises(grpc.RpcError) as info:
        stub.Classify(digits_pb2.ClassifyRequest(images=[digits_pb2.Image(encoded=buffer.getvalue())]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "exceeds the limit" in info.value.details()


def test_the_torchscript_backend_serves_the_same_answers(mnist):
    batch = as_input(mnist.test.images[:32])
    with ServerProcess("--backend", "torchscript") as torchscript_server, \
            ServerProcess("--backend", "onnxruntime", "--device", "auto") as ort_server:
        assert "running resnet-mnist on the CPU" in "".join(ort_server.lines)  # auto fell back, and said so
        config = triton.InferenceServerClient(torchscript_server.target).get_model_config(MODEL).config
        assert config.platform == "pytorch_libtorch"
        ts = infer(triton.InferenceServerClient(torchscript_server.target), batch).as_numpy("logits")
        ort = infer(triton.InferenceServerClient(ort_server.target), batch).as_numpy("logits")
        assert np.abs(ts - ort).max() <= 1e-4


def test_precision_int8_serves_the_int8_artifact_with_the_accuracy_export_measured(mnist):
    images = as_input(mnist.test.images)
    with ServerProcess("--precision", "int8") as server:  # --device auto: int8 runs on the CPU regardless
        client = triton.InferenceServerClient(server.target)
        parameters = client.get_model_config(MODEL).config.parameters
        assert [parameters[key].string_value for key in ("backend", "precision", "device")] == ["onnxruntime", "int8", "cpu"]
        # the threads of a worker with every usable CPU (a container's CPU quota counted: tests/test_cgroups.py)
        threads = f"{usable_cpus()} thread{'s' * (usable_cpus() != 1)}"
        assert f"model.int8.onnx on onnxruntime (cpu, int8, {threads})" in "".join(server.lines)
        predictions = np.concatenate([infer(client, images[start:start + 500]).as_numpy("logits").argmax(1)
                                      for start in range(0, len(images), 500)])
    measured = load_package().manifest.find("onnx", "int8").test_accuracy
    # int8 kernels differ between CPUs (VNNI or not) by a rounding here and there: a few images at most
    assert abs(float((predictions == mnist.test.labels).mean()) - measured) <= 0.001


def test_the_default_server_on_a_bf16_cpu_runs_openvino_bf16_and_says_so(server):
    from resserve.serve.backends.openvino import openvino_cpu_capabilities

    parameters = triton.InferenceServerClient(server.target).get_model_config(MODEL).config.parameters
    expected = ("openvino", "bf16") if "BF16" in (openvino_cpu_capabilities() or set()) else ("onnxruntime", "fp32")
    assert (parameters["backend"].string_value, parameters["precision"].string_value) == expected
    assert f"runs on {expected[0]} in {expected[1]}" in "".join(server.lines)
    assert f'backend="{expected[0]}"' in server.metrics() and f'precision="{expected[1]}"' in server.metrics()


def test_without_thread_spinning_the_server_takes_no_cpu_between_requests(mnist):
    """RESSERVE_THREAD_SPINNING=false reaches ONNX Runtime, as deploy/k8s sets it: between requests
    the server's CPU use is nil, so the CPU-based autoscaler sees traffic, not threads spinning for
    the next batch (spinning, they take about a core in each gap)."""
    request = kserve_pb2.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 28, 28])
    request.raw_input_contents.append(as_input(mnist.test.images[:1]).tobytes())
    with ServerProcess("--backend", "onnxruntime", env={"RESSERVE_THREAD_SPINNING": "false"}) as server:
        stub, idle = kserve_stub(server), 0.0
        for _ in range(5):
            stub.ModelInfer(request)
            before = tree_cpu_seconds(server.process.pid)
            time.sleep(0.1)
            idle += tree_cpu_seconds(server.process.pid) - before
    assert idle < 0.1  # 0.5 s of gaps


# ----------------------------------------------------------------------------------------------
# Triton's extensions: statistics, repository index, classification


def _model_stats(client) -> dict:
    stats = client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    inference = stats["inference_stats"]
    return {"success": int(inference["success"].get("count", 0)), "fail": int(inference["fail"].get("count", 0)),
            "images": int(stats.get("inference_count", 0)), "batches": int(stats.get("execution_count", 0)),
            "batch3": sum(int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])
                          if int(b["batch_size"]) == 3)}


TRITON_METRICS = {"success": ("nv_inference_request_success", {}),
                  "fail": ("nv_inference_request_failure", {"reason": "OTHER"}),
                  "late": ("nv_inference_request_failure", {"reason": "REJECTED"}),
                  "images": ("nv_inference_count", {}), "batches": ("nv_inference_exec_count", {})}


def _triton_metrics(server) -> dict[str, float]:
    """Triton's metrics of the model, under Triton's names, as its dashboards read them."""
    text = server.metrics()
    counts = {key: metric_value(text, name, model=MODEL, version="1", **labels)
              for key, (name, labels) in TRITON_METRICS.items()}
    for phase in ("request", "queue", "compute_input", "compute_infer", "compute_output"):
        counts[phase] = metric_value(text, f"nv_inference_{phase}_duration_us", model=MODEL, version="1")
    return counts


def test_tritonclient_statistics_and_tritons_metrics_count_the_requests_sent(server, mnist):
    client = triton.InferenceServerClient(server.target)
    before, metrics_before = _model_stats(client), _triton_metrics(server)
    for start in range(0, 15, 3):  # five 3-image requests, one at a time: five batches of 3
        infer(client, as_input(mnist.test.images[start:start + 3]))
    with pytest.raises(triton.InferenceServerException):
        infer(client, np.full((1, 1, 28, 28), 2.0, dtype=np.float32))  # out of range: a failure
    with pytest.raises(triton.InferenceServerException, match="deadline exceeded"):
        infer(client, as_input(mnist.test.images[:1]), timeout=1)  # one microsecond: rejected, not computed
    after, metrics_after = _model_stats(client), _triton_metrics(server)
    assert {k: after[k] - before[k] for k in after} == {"success": 5, "fail": 2, "images": 15, "batches": 5, "batch3": 5}
    grown = {k: metrics_after[k] - metrics_before[k] for k in metrics_after}
    assert {k: grown[k] for k in TRITON_METRICS} == {"success": 5, "fail": 1, "late": 1, "images": 15, "batches": 5}
    assert all(grown[phase] > 0 for phase in ("request", "queue", "compute_input", "compute_infer", "compute_output"))
    assert grown["compute_infer"] < grown["request"]
    stats = client.get_inference_statistics(MODEL).model_stats[0]
    inference = stats.inference_stats
    assert stats.last_inference > 0 and inference.queue.ns > 0 and inference.compute_infer.ns > 0
    # the three compute phases count the same requests, as perf_analyzer requires (it refuses others)
    assert inference.compute_input.count == inference.compute_infer.count == inference.compute_output.count > 0
    for batch in stats.batch_stats:
        assert batch.compute_input.count == batch.compute_infer.count == batch.compute_output.count > 0
    assert "statistics" in client.get_server_metadata().extensions


def test_metrics_give_the_servers_cpu_and_memory_under_prometheus_process_names(server, mnist):
    client = triton.InferenceServerClient(server.target)
    before = metric_value(server.metrics(), "process_cpu_seconds_total")
    for start in range(0, 64, 8):
        infer(client, as_input(mnist.test.images[start:start + 8]))
    cpu_from = tree_cpu_seconds(server.process.pid)
    metrics = server.metrics()
    cpu_to = tree_cpu_seconds(server.process.pid)
    cpu = metric_value(metrics, "process_cpu_seconds_total")
    assert before < cpu and cpu_from - 0.02 <= cpu <= cpu_to + 0.02  # what /proc says, ticks of 10 ms apart
    assert metric_value(metrics, "process_resident_memory_bytes") == pytest.approx(
        tree_resident_bytes(server.process.pid), rel=0.2)
    assert 0 < metric_value(metrics, "process_open_fds") < metric_value(metrics, "process_max_fds")
    assert time.time() - 3600 < metric_value(metrics, "process_start_time_seconds") < time.time()


def test_grpc_calls_are_counted_by_api_with_inference_apart(server, mnist):
    """As over HTTP: metadata, the repository and the parts of the protocol left out are not
    counted as inference; calls about no model are no model's."""
    client = triton.InferenceServerClient(server.target)
    before = server.metrics()
    client.get_model_metadata(MODEL)
    client.get_model_repository_index()
    with pytest.raises(InferenceServerException, match="UNIMPLEMENTED"):
        client.register_cuda_shared_memory("input", b"aGFuZGxl", 0, 3136)
    infer(client, as_input(mnist.test.images[:1]))
    after = server.metrics()
    for api, code, model in (("kserve_metadata", "OK", MODEL), ("kserve_repository", "OK", ""),
                             ("kserve_left_out", "UNIMPLEMENTED", ""), ("kserve", "OK", MODEL)):
        counted = [metric_value(text, "resserve_requests_total", protocol="grpc", api=api, code=code, model=model)
                   for text in (before, after)]
        assert counted[1] - counted[0] == 1, (api, code, model)


def test_client_shared_memory_is_off_unless_the_server_is_started_with_it(server, tmp_path):
    """Off by default, as Triton's: a region lets a client have the server read and write a
    shared memory object it names (tests/serve/test_shared_memory.py turns it on)."""
    import tritonclient.http as triton_http

    for client in (triton.InferenceServerClient(server.target), triton_http.InferenceServerClient(server.http_target)):
        grpc_client = isinstance(client, triton.InferenceServerClient)
        metadata = client.get_server_metadata()
        assert "system_shared_memory" not in (metadata.extensions if grpc_client else metadata["extensions"])
        assert not (client.get_system_shared_memory_status().regions if grpc_client
                    else client.get_system_shared_memory_status())
        tensor = (triton if grpc_client else triton_http).InferInput("input", [1, 1, 28, 28], "FP32")
        tensor.set_shared_memory("input", 3136)
        for refused in (lambda: client.register_system_shared_memory("input", "/resserve-shm", 3136),
                        lambda: client.unregister_system_shared_memory(),
                        lambda: client.infer(MODEL, [tensor])):
            with pytest.raises(triton.InferenceServerException) as info:
                refused()
            assert info.value.status() in ("StatusCode.UNIMPLEMENTED", "501")
            assert info.value.message() == OFF_MESSAGE


def test_tritonclient_repository_index_lists_the_loaded_models(server):
    index = triton.InferenceServerClient(server.target).get_model_repository_index(as_json=True)["models"]
    assert index == [{"name": MODEL, "version": "1", "state": "READY"}]


def test_tritonclient_classification_returns_triton_formatted_top_k(server, mnist):
    client = triton.InferenceServerClient(server.target)
    images = as_input(mnist.test.images[:4])
    result = infer(client, images, outputs=[triton.InferRequestedOutput("probabilities", class_count=3)])
    top = result.as_numpy("probabilities")
    assert top.shape == (4, 3)
    plain = infer(client, images).as_numpy("probabilities")
    for row, probabilities, label in zip(top, plain, mnist.test.labels[:4]):
        fields = [entry.decode().split(":") for entry in row]
        assert [int(index) for _, index, _ in fields] == list(np.argsort(-probabilities)[:3])
        assert all(name == index for _, index, name in fields)  # the labels are the digits
        assert float(fields[0][0]) == pytest.approx(probabilities.max(), abs=1e-6) and int(fields[0][1]) == label
    config = client.get_model_config(MODEL).config
    assert config.input[0].format == config.input[0].FORMAT_NCHW and config.output[1].label_filename == "labels.txt"


def test_eval_of_a_server_refuses_an_unknown_model_and_a_checkpoint_beside_it(address):
    """(The evaluation itself runs in the serving-only install: tests/deploy/test_serving_install.py.)"""
    for args, message in ((["--model-name", "nope"], ": unknown model 'nope'; this server has resnet-mnist"),
                          (["model.pt"], "give a checkpoint or --server, not both")):
        refused = run_cli("eval", "--server", address, *args)
        assert refused.returncode == 1 and refused.stderr.strip().splitlines()[-1].endswith(message), refused.stderr


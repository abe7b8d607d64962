"""HTTP beside gRPC on one real server: KServe v2 REST spoken by Triton's own HTTP client
(tritonclient.http, unchanged), /v1/classify, bad input over HTTP, metrics, tokens and the drain."""

import asyncio
import base64
import collections
import gzip
import io
import re
import socket
import threading
import time
import urllib.request
import zlib
from http.client import HTTPConnection

import aiohttp
import numpy as np
import orjson
import pytest
import tritonclient.http as triton_http
import tritonclient.http.aio as triton_http_aio
from PIL import Image
from tritonclient.utils import InferenceServerException

from helpers import HEIC_PHOTO, MALFORMED_TIFF, ServerProcess, metric_value, run_cli, running
from resserve.serve.bench.load import tree_cpu_seconds
from resserve.serve.package import load_package
from resserve.serve.preprocess import HEIF_REFUSED

MODEL = "resnet-mnist"
INFER = f"/v2/models/{MODEL}/infer"


def call(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, headers, body) of one HTTP request."""
    connection = HTTPConnection(server.http_target, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def error_of(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    status, response_headers, payload = call(server, method, path, body, headers)
    assert response_headers["Content-Type"].startswith("application/json")
    return status, orjson.loads(payload)["error"]


def json_infer(images: np.ndarray, **extra) -> bytes:
    tensor = {"name": "input", "shape": list(images.shape), "datatype": "FP32", "data": images.ravel().tolist()}
    return orjson.dumps({"inputs": [tensor], **extra})


def png_of(image: np.ndarray, scale: int = 1, invert: bool = False) -> bytes:
    picture = Image.fromarray(255 - image if invert else image)
    if scale > 1:
        picture = picture.resize((28 * scale, 28 * scale), Image.BILINEAR)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def client(server):
    return triton_http.InferenceServerClient(server.http_target)


# ----------------------------------------------------------------------------------------------
# tritonclient.http, unchanged


def test_tritonclient_http_sees_health_metadata_and_config(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and not client.is_model_ready("no-such-model")
    server_metadata = client.get_server_metadata()
    assert server_metadata["name"] == "resserve" and "binary_tensor_data" in server_metadata["extensions"]
    metadata = client.get_model_metadata(MODEL)
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert [o["name"] for o in metadata["outputs"]] == ["logits", "probabilities"]
    config = client.get_model_config(MODEL)
    assert config["name"] == MODEL and config["max_batch_size"] == 64
    assert config["input"][0]["dims"] == [1, 28, 28]  # numbers, as Triton writes them
    assert config["parameters"]["backend"]["string_value"] in ("onnxruntime", "openvino")


def rest_predictions(client, images: np.ndarray, binary: bool) -> np.ndarray:
    """The digits tritonclient.http gets for MNIST test ``images``, 500 a request."""
    predictions = []
    for start in range(0, len(images), 500):
        batch = images[start:start + 500, None].astype(np.float32) / 255.0
        tensor = triton_http.InferInput("input", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch, binary_data=binary)
        result = client.infer(MODEL, [tensor], outputs=[triton_http.InferRequestedOutput("logits", binary_data=binary)])
        predictions.append(result.as_numpy("logits").argmax(1))
    return np.concatenate(predictions)


def test_tritonclient_http_on_the_mnist_test_set_gives_the_exported_accuracy(client, mnist):
    predictions = rest_predictions(client, mnist.test.images, binary=True)
    accuracy = float((predictions == mnist.test.labels).mean())
    manifest = load_package().manifest
    precision = client.get_model_config(MODEL)["parameters"]["precision"]["string_value"]
    expected = manifest.accuracy.test if precision == "fp32" else manifest.reduced_precision[precision].test_accuracy
    assert accuracy == expected  # what export measured for the runtime that answered
    # the same digits with the tensors as JSON numbers (a fifth of the set: JSON costs both sides 10x more)
    assert np.array_equal(rest_predictions(client, mnist.test.images[:2000], binary=False), predictions[:2000])


def test_rest_answers_equal_grpc_answers_and_classification_works(client, server, mnist):
    import tritonclient.grpc as triton_grpc

    images = mnist.test.images[:16, None]
    rest_input = triton_http.InferInput("input", list(images.shape), "UINT8")
    rest_input.set_data_from_numpy(images)
    grpc_input = triton_grpc.InferInput("input", list(images.shape), "UINT8")
    grpc_input.set_data_from_numpy(images)
    over_rest = client.infer(MODEL, [rest_input]).as_numpy("probabilities")
    over_grpc = triton_grpc.InferenceServerClient(server.target).infer(MODEL, [grpc_input]).as_numpy("probabilities")
    assert np.array_equal(over_rest, over_grpc)
    for binary in (True, False):
        top = client.infer(MODEL, [rest_input], outputs=[
            triton_http.InferRequestedOutput("probabilities", binary_data=binary, class_count=2)]).as_numpy("probabilities")
        assert top.shape == (16, 2)
        best = [int((row[0].decode() if binary else row[0]).split(":")[1]) for row in top]  # JSON: str
        assert best == list(over_rest.argmax(1))


def test_tritons_timeout_parameter_ends_a_request_uncomputed_over_both_protocols(client, server, mnist):
    """tritonclient's ``timeout=`` (microseconds, sent as a request parameter, not as the call's
    deadline): a request whose timeout passed before its batch ran is answered, not computed."""
    import tritonclient.grpc as triton_grpc

    images = mnist.test.images[:1, None]
    over_grpc = triton_grpc.InferenceServerClient(server.target)
    inputs = {}
    for protocol, module in (("grpc", triton_grpc), ("http", triton_http)):
        inputs[protocol] = module.InferInput("input", list(images.shape), "UINT8")
        inputs[protocol].set_data_from_numpy(images)
    computed = metric_value(server.metrics(), "resserve_batch_size_sum")
    with pytest.raises(InferenceServerException, match="deadline exceeded while queued; not computed") as expired:
        over_grpc.infer(MODEL, [inputs["grpc"]], timeout=1)
    assert expired.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    with pytest.raises(InferenceServerException, match="deadline exceeded while queued; not computed") as expired:
        client.infer(MODEL, [inputs["http"]], timeout=1)
    assert expired.value.status() == "504"
    assert metric_value(server.metrics(), "resserve_batch_size_sum") == computed
    for protocol, endpoint in (("grpc", over_grpc), ("http", client)):  # a timeout long enough changes nothing
        assert endpoint.infer(MODEL, [inputs[protocol]], timeout=30_000_000).as_numpy("probabilities").shape == (1, 10)


def test_statistics_and_repository_index_over_rest(client, server, mnist):
    images = triton_http.InferInput("input", [2, 1, 28, 28], "UINT8")
    images.set_data_from_numpy(mnist.test.images[:2, None])
    client.infer(MODEL, [images])
    stats = client.get_inference_statistics(MODEL)["model_stats"][0]
    assert stats["name"] == MODEL and stats["inference_count"] >= 2
    inference = stats["inference_stats"]
    assert inference["success"]["count"] > 0
    assert inference["compute_input"]["count"] == inference["compute_infer"]["count"] == inference["compute_output"]["count"] > 0
    assert client.get_model_repository_index() == [{"name": MODEL, "version": "1", "state": "READY", "reason": ""}]


@pytest.mark.parametrize("ask, extension", [
    (lambda client: client.register_cuda_shared_memory("input", b"handle", 0, 3136), "CUDA shared memory"),
])
def test_the_extensions_left_out_say_so_and_name_those_served(client, ask, extension):
    """They were "no such endpoint" over HTTP (perf_analyzer --shared-memory cuda), as over gRPC now."""
    with pytest.raises(InferenceServerException) as refused:
        ask(client)
    assert refused.value.status() == "501"
    assert refused.value.message() == (f"Triton's {extension} extension is not supported by resserve (supported "
                                       "extensions: binary_tensor_data, classification, logging, model_configuration, "
                                       "model_repository, statistics, trace)")


# ----------------------------------------------------------------------------------------------
# /v1/classify


def test_classify_a_raw_image_answers_digit_probabilities_and_the_input_it_saw(server, mnist):
    status, headers, body = call(server, "POST", "/v1/classify", png_of(mnist.test.images[0], scale=8, invert=True),
                                 {"Content-Type": "image/png"})
    assert status == 200, body
    answer = orjson.loads(body)
    result = answer["results"][0]
    assert result["digit"] == mnist.test.labels[0] and len(result["probabilities"]) == 10
    assert result["confidence"] == max(result["probabilities"]) > 0.9
    assert Image.open(io.BytesIO(base64.b64decode(result["input_png"]))).size == (28, 28)
    assert answer["model"] == MODEL and answer["backend"] in ("onnxruntime", "openvino")
    assert answer["server_ms"] > 0


def form_of(files: dict[str, bytes]) -> tuple[bytes, dict]:
    """A multipart form upload of ``files`` (name -> bytes), as a browser sends one: body and headers."""
    boundary = "resserve-test-boundary"
    parts = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
                     for name, data in files.items())
    return parts + f"--{boundary}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_classify_a_multipart_upload_of_several_files(server, mnist):
    status, _, payload = call(server, "POST", "/v1/classify",
                              *form_of({f"digit{i}.png": png_of(mnist.test.images[i]) for i in range(5)}))
    assert status == 200, payload
    results = orjson.loads(payload)["results"]
    assert [r["file"] for r in results] == [f"digit{i}.png" for i in range(5)]
    assert [r["digit"] for r in results] == list(mnist.test.labels[:5])


def test_a_form_with_more_images_than_a_request_takes_is_refused(server, mnist):
    digit = png_of(mnist.test.images[0])
    assert error_of(server, "POST", "/v1/classify", *form_of({f"{i}.png": digit for i in range(1025)})) == (
        400, "more than 1024 images in one request; the limit is 1024")


def test_an_uploaded_file_that_is_refused_is_named(server, mnist):
    status, error = error_of(server, "POST", "/v1/classify",
                             *form_of({"digit0.png": png_of(mnist.test.images[0]), "IMG_0001.HEIC": HEIC_PHOTO}))
    assert (status, error) == (400, f"image 1 ('IMG_0001.HEIC'): {HEIF_REFUSED}")


def test_a_file_that_makes_pillow_raise_is_a_400_and_leaves_the_log_alone(server):
    """Pillow raised TypeError on this TIFF (an internal error and a traceback for each request) and
    warned of its metadata on stderr, outside the log's format, as often as a client sent it."""
    said = len(server.lines)
    for _ in range(3):
        status, error = error_of(server, "POST", "/v1/classify", *form_of({"scan.tif": MALFORMED_TIFF}))
        assert (status, error) == (400, "image 0 ('scan.tif'): bytes are not an image Pillow can read (TypeError)")
    time.sleep(0.5)  # whatever the server wrote while answering has reached server.lines
    assert server.lines[said:] == []


def test_a_form_whose_file_name_is_not_utf8_is_answered_and_a_malformed_disposition_leaves_the_log_alone(
        server, mnist):
    """A file name of bytes that are not UTF-8 was a 500 (aiohttp keeps them as surrogates, which
    orjson refuses to write), and aiohttp warned on stderr of each malformed Content-Disposition."""
    said = len(server.lines)
    digit = png_of(mnist.test.images[0])
    body = (b'--x\r\nContent-Disposition: form-data; name="f"; filename="\xff\xfe.png"\r\n\r\n' + digit +
            b"\r\n--x\r\nContent-Disposition: form-data; name*=UTF-8''%ff; filename=\"b.png\"\r\n\r\n" + digit +
            b"\r\n--x--\r\n")
    status, _, payload = call(server, "POST", "/v1/classify", body, {"Content-Type": "multipart/form-data; boundary=x"})
    assert status == 200, payload
    assert [result["file"] for result in orjson.loads(payload)["results"]] == ["??.png", "b.png"]
    time.sleep(0.5)  # whatever the server wrote while answering has reached server.lines
    assert server.lines[said:] == []


# ----------------------------------------------------------------------------------------------
# bad input: one clear JSON error each, and the server carries on


def test_bad_requests_get_one_json_error_each_and_the_server_carries_on(server, mnist):
    image = np.zeros((1, 1, 28, 28), np.float32)
    binary_header = orjson.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                              "parameters": {"binary_data_size": 3136}}]})
    cases = [
        (b"{not json", {}, 400, "not valid JSON"),
        (b"[" * 100_000, {}, 400, "not valid JSON: depth limit exceeded"),  # deeper than Python's stack
        (orjson.dumps({"inputs": "x"}), {}, 400, "field inputs"),
        (json_infer(np.zeros((1, 28, 28), np.float32)), {}, 400, "expected [N, 1, 28, 28]"),
        (orjson.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP64", "data": [0] * 784}]}),
         {}, 400, "datatype FP64"),
        (orjson.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0] * 5}]}),
         {}, 400, "has 5 values"),
        (orjson.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": ["a"] * 784}]}),
         {}, 400, "FP32 numbers only"),
        (orjson.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [True] * 784}]}),
         {}, 400, "FP32 numbers only"),
        (orjson.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "UINT8", "data": [1.5] * 784}]}),
         {}, 400, "UINT8 integers only"),
        (binary_header + b"\0" * 100, {"Inference-Header-Content-Length": str(len(binary_header))}, 400,
         "runs past the 100 bytes"),
        (binary_header + b"\0" * 4000, {"Inference-Header-Content-Length": str(len(binary_header))}, 400,
         "bytes of binary data after"),
        (json_infer(image), {"Inference-Header-Content-Length": "x"}, 400, "must be an integer"),
        (binary_header.replace(b"3136", b"-1"), {"Inference-Header-Content-Length": str(len(binary_header) - 2)}, 400,
         "input 'input': binary_data_size must be >= 0, got -1"),
        (binary_header + b"\0" * 3136, {}, 400, f"3136 bytes follow the request's JSON: binary tensor data needs the "
         f"Inference-Header-Content-Length header, the JSON's length ({len(binary_header)} bytes here)"),
        (json_infer(image + 2), {}, 400, "input values must be in [0, 1]"),
        (json_infer(image, outputs=[{"name": "nope"}]), {}, 400, "unknown output 'nope'"),
    ]
    for body, headers, status, message in cases:
        got_status, error = error_of(server, "POST", INFER, body, headers)
        assert (got_status, message in error) == (status, True), (body[:80], error)
    assert error_of(server, "POST", "/v2/models/no-such-model/infer", json_infer(image)) == (
        404, f"unknown model 'no-such-model'; this server has {MODEL}")
    assert error_of(server, "GET", "/v2/nowhere") == (404, "no such endpoint: /v2/nowhere")
    assert error_of(server, "DELETE", INFER)[0] == 405
    digit = png_of(mnist.test.images[0])
    assert error_of(server, "POST", "/v1/classify?modle=other", digit) == (
        400, "unknown query parameter 'modle'; /v1/classify takes model and version")
    assert error_of(server, "POST", f"/v1/classify?model={MODEL}&model=other", digit) == (
        400, "the query gives model more than once")
    status, error = error_of(server, "POST", "/v1/classify", b"%PDF-1.4 not an image")
    assert status == 400 and error.startswith("image 0: bytes are not an image")
    assert error_of(server, "POST", "/v1/classify", b"") == (400, (
        "the request has no body: POST an image's bytes (curl --data-binary @digit.png) or files in a multipart "
        "form (curl -F file=@digit.png)"))
    encoded = orjson.dumps({"image": base64.b64encode(digit).decode()})  # as APIs that take base64 in JSON
    assert error_of(server, "POST", "/v1/classify", encoded, {"Content-Type": "application/json"}) == (
        415, "/v1/classify takes an image's own bytes, or files in a multipart form, not JSON; tensors in JSON go "
        "to /v2/models/NAME/infer (KServe v2)")
    status, error = error_of(server, "POST", "/v1/classify", b"--x\r\nno headers, no end",
                             {"Content-Type": "multipart/form-data; boundary=x"})
    assert status == 400 and error.startswith("malformed multipart form"), error
    status, error = error_of(server, "POST", "/v1/classify", b"--x--\r\n", {"Content-Type": "multipart/form-data; boundary=x"})
    assert (status, error) == (400, "no images in the request")
    assert call(server, "POST", INFER, json_infer(mnist.test.images[:1, None].astype(np.float32) / 255))[0] == 200


def test_tritonclient_http_compressed_requests_and_responses_answer_the_same(client, mnist):
    images = mnist.test.images[:8, None]
    answers = []
    for request, response in ((None, None), ("gzip", None), ("deflate", "gzip"), ("gzip", "deflate")):
        tensor = triton_http.InferInput("input", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images)
        answers.append(client.infer(MODEL, [tensor], request_compression_algorithm=request,
                                    response_compression_algorithm=response).as_numpy("probabilities"))
    assert all(np.array_equal(answer, answers[0]) for answer in answers)


def test_an_inference_answer_is_compressed_where_the_client_asks_and_no_other_answer_is(server, mnist):
    body = json_infer(mnist.test.images[:64, None].astype(np.float32) / 255)
    inflate = {"gzip": gzip.decompress, "deflate": zlib.decompress, None: bytes}
    answers, sizes = [], {}
    for accept in ("gzip", "deflate", None):
        status, headers, payload = call(server, "POST", INFER, body, {"Accept-Encoding": accept} if accept else {})
        assert (status, headers.get("Content-Encoding")) == (200, accept)
        answers.append(orjson.loads(inflate[accept](payload))["outputs"])
        sizes[accept] = len(payload)
    assert all(answer == answers[0] for answer in answers)
    assert sizes["gzip"] < sizes[None] / 2 and sizes["deflate"] < sizes[None] / 2, sizes
    images = mnist.test.images[:64, None].astype(np.float32) / 255
    header = orjson.dumps({"inputs": [{"name": "input", "shape": list(images.shape), "datatype": "FP32",
                                       "parameters": {"binary_data_size": images.nbytes}}],
                           "parameters": {"binary_data_output": True}})
    status, headers, payload = call(server, "POST", INFER, header + images.tobytes(),
                                    {"Inference-Header-Content-Length": str(len(header)), "Accept-Encoding": "gzip"})
    assert (status, headers.get("Content-Encoding")) == (200, None) and len(payload) > 5000  # float32 scores: no gain
    for count in range(1, 9):  # a batch of each size: statistics then list eight, over 1 KiB
        assert call(server, "POST", INFER, json_infer(mnist.test.images[:count, None].astype(np.float32) / 255))[0] == 200
    status, headers, statistics = call(server, "GET", f"/v2/models/{MODEL}/stats", headers={"Accept-Encoding": "gzip"})
    assert (status, headers.get("Content-Encoding")) == (200, None) and len(statistics) > 1024  # inference answers only


def test_an_answer_is_compressed_as_the_q_values_of_accept_encoding_rank_the_codings(server, mnist):
    """A coding with q=0 is refused by the client: an answer in it would be unreadable there."""
    body = json_infer(mnist.test.images[:64, None].astype(np.float32) / 255)
    answered = {}
    for accept in ("gzip;q=0", "gzip;q=0, deflate", "deflate;q=0.5, gzip;q=0.4", "gzip;q=0.5, identity", "*;q=0",
                   "*", "x-gzip", "br", "GZIP; Q=1.0"):
        status, headers, payload = call(server, "POST", INFER, body, {"Accept-Encoding": accept})
        assert status == 200
        answered[accept] = headers.get("Content-Encoding")
    assert answered == {"gzip;q=0": None, "gzip;q=0, deflate": "deflate", "deflate;q=0.5, gzip;q=0.4": "deflate",
                        "gzip;q=0.5, identity": None, "*;q=0": None, "*": "gzip", "x-gzip": "gzip", "br": None,
                        "GZIP; Q=1.0": "gzip"}


def test_tritonclient_http_aio_reads_every_answer_though_its_session_asks_for_gzip(server, mnist):
    """Its aiohttp session sends Accept-Encoding: gzip on every request and inflates inference
    answers only: a compressed config or metadata answer would reach it as gzip bytes."""
    async def session():
        async with triton_http_aio.InferenceServerClient(server.http_target) as client:
            tensor = triton_http_aio.InferInput("input", [64, 1, 28, 28], "UINT8")
            tensor.set_data_from_numpy(mnist.test.images[:64, None])
            answer = await client.infer(MODEL, [tensor], outputs=[triton_http_aio.InferRequestedOutput(
                "probabilities", binary_data=False)])
            return (await client.get_model_config(MODEL), await client.get_model_metadata(MODEL),
                    answer.as_numpy("probabilities"))
    config, metadata, probabilities = asyncio.run(session())
    assert config["name"] == metadata["name"] == MODEL
    assert (probabilities.argmax(1) == mnist.test.labels[:64]).mean() > 0.95


def test_a_compressed_body_is_refused_once_it_inflates_past_the_cap_at_little_cost(server, mnist):
    """A 1 MB gzip of 1 GB of zeros: aiohttp's own decompression inflated all of it after its 413
    (3.4 CPU-seconds); decompression now stops at the cap."""
    deflater = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    bomb = b"".join(deflater.compress(bytes(1 << 20)) for _ in range(1024)) + deflater.flush()
    assert len(bomb) < 1_100_000
    cpu_before = tree_cpu_seconds(server.process.pid)
    for path in (INFER, "/v1/classify"):
        status, error = error_of(server, "POST", path, bomb, {"Content-Encoding": "gzip"})
        assert (status, error) == (413, "request body exceeds the limit of 4,194,304 bytes (--max-message-bytes) "
                                        "once decompressed (gzip)")
    time.sleep(0.5)  # what aiohttp went on inflating after answering
    assert tree_cpu_seconds(server.process.pid) - cpu_before < 0.5
    assert error_of(server, "POST", "/v1/classify", b"not gzip", {"Content-Encoding": "gzip"}) == (
        400, "the body is not valid gzip data (Error -3 while decompressing data: incorrect header check)")
    assert error_of(server, "POST", "/v1/classify", gzip.compress(b"cut short")[:-4], {"Content-Encoding": "gzip"}) == (
        400, "the body is not valid gzip data (it ends early)")
    assert error_of(server, "POST", INFER, b"{}", {"Content-Encoding": "br"}) == (
        415, "Content-Encoding 'br' is not supported; send gzip, deflate or none")
    photo = png_of(mnist.test.images[0], scale=8, invert=True)
    status, _, body = call(server, "POST", "/v1/classify", zlib.compress(photo), {"Content-Encoding": "deflate"})
    assert status == 200 and orjson.loads(body)["results"][0]["digit"] == mnist.test.labels[0]


def test_a_body_over_the_size_cap_is_413_announced_or_streamed(mnist):
    with ServerProcess("--max-message-bytes", "65536") as server:
        big = json_infer(np.zeros((64, 1, 28, 28), np.float32))
        assert len(big) > 65536
        status, error = error_of(server, "POST", INFER, big)
        assert status == 413 and "exceeds the limit of 65,536" in error

        def chunks():  # no Content-Length: the cap applies as the body streams in
            for start in range(0, len(big), 8192):
                yield big[start:start + 8192]

        connection = HTTPConnection(server.http_target, timeout=30)
        connection.request("POST", INFER, body=chunks(), encode_chunked=True,
                           headers={"Transfer-Encoding": "chunked"})
        response = connection.getresponse()
        assert response.status == 413 and "exceeds the limit" in orjson.loads(response.read())["error"]

        def form_with_a_long_note():  # a form streams part by part: text fields count against the cap too
            yield b'--x\r\nContent-Disposition: form-data; name="note"\r\n\r\n'
            for _ in range(64):
                yield b"a" * 8192
            yield b"\r\n--x--\r\n"

        connection = HTTPConnection(server.http_target, timeout=30)
        connection.request("POST", "/v1/classify", body=form_with_a_long_note(), encode_chunked=True,
                           headers={"Transfer-Encoding": "chunked", "Content-Type": "multipart/form-data; boundary=x"})
        response = connection.getresponse()
        assert (response.status, orjson.loads(response.read())["error"]) == (
            413, "request body exceeds the limit of 65,536 bytes (--max-message-bytes)")
        nested = (b'--x\r\nContent-Disposition: form-data; name="files"\r\nContent-Type: multipart/mixed; boundary=y'
                  b'\r\n\r\n--y\r\nContent-Disposition: file; filename="a.png"\r\n\r\n' + png_of(mnist.test.images[0])
                  + b"\r\n--y--\r\n--x--\r\n")
        assert error_of(server, "POST", "/v1/classify", nested, {"Content-Type": "multipart/form-data; boundary=x"}) == (
            400, "a nested multipart form is not read; send each file as a part of the form itself")
        assert call(server, "POST", INFER, json_infer(mnist.test.images[:1, None].astype(np.float32) / 255))[0] == 200


def test_metrics_count_http_requests_by_protocol_api_and_status(server, mnist):
    """Each call under its own api, so that a model's inference rate and latency are inference's
    alone (metadata, statistics and log settings counted there made 9 "requests" of 0 inferences);
    a call about no model (log settings) is no model's."""
    before = server.metrics()
    call(server, "GET", f"/v2/models/{MODEL}")
    call(server, "GET", "/v2/models/no-such-model")
    call(server, "GET", f"/v2/models/{MODEL}/stats")
    call(server, "GET", "/v2/logging")
    call(server, "POST", INFER, json_infer(mnist.test.images[:1, None].astype(np.float32) / 255))
    after = server.metrics()
    for api, code, model in (("kserve_metadata", "200", MODEL), ("kserve_metadata", "404", "unknown"),
                             ("kserve_statistics", "200", MODEL), ("kserve_logging", "200", ""),
                             ("kserve", "200", MODEL)):
        counted = [metric_value(text, "resserve_requests_total", protocol="http", api=api, code=code, model=model)
                   for text in (before, after)]
        assert counted[1] - counted[0] == 1, (api, code, model)
    inferences = [metric_value(text, "resserve_request_latency_seconds_count", protocol="http", api="kserve")
                  for text in (before, after)]
    assert inferences[1] - inferences[0] == 1
    assert "_created" not in after  # as under --workers, where prometheus-client's multiprocess mode has none


# ----------------------------------------------------------------------------------------------
# tokens, ports and the drain, each on its own server


def test_tokens_guard_the_rest_apis_but_not_health_or_the_page(tmp_path, mnist):
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\n")
    body = json_infer(mnist.test.images[:1, None].astype(np.float32) / 255)
    with ServerProcess("--token-file", str(tokens)) as server:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            assert error_of(server, "POST", INFER, body, headers) == (401, "missing or invalid bearer token")
        assert error_of(server, "POST", "/v1/classify", png_of(mnist.test.images[0]))[0] == 401
        assert call(server, "POST", INFER, body, {"Authorization": "Bearer s3cret"})[0] == 200
        for public in ("/v2/health/live", "/v2/health/ready", "/", "/page/page.js", "/openapi.yaml"):
            assert call(server, "GET", public)[0] == 200, public
        client = triton_http.InferenceServerClient(server.http_target)
        with pytest.raises(InferenceServerException, match="401"):
            client.get_model_metadata(MODEL)
        assert client.get_model_metadata(MODEL, headers={"Authorization": "Bearer s3cret"})["name"] == MODEL


def first_status_line(server, headers: dict) -> str:
    """What the server says first to a request that sends ``Expect: 100-continue`` and waits
    before sending its body: "HTTP/1.1 100 Continue", or its final status at once."""
    head = "".join(f"{name}: {value}\r\n" for name, value in {"Expect": "100-continue", **headers}.items())
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as connection:
        connection.sendall(f"POST {INFER} HTTP/1.1\r\nHost: localhost\r\n{head}\r\n".encode())
        return connection.makefile("rb").readline().decode().strip()


def test_100_continue_asks_for_the_body_only_of_requests_that_would_be_taken(tmp_path, mnist):
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\n")
    body = json_infer(mnist.test.images[:1, None].astype(np.float32) / 255)
    token = {"Authorization": "Bearer s3cret"}
    with ServerProcess("--token-file", str(tokens)) as server:
        async def post_waiting_for_continue() -> int:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
                async with session.post(f"http://{server.http_target}{INFER}", data=body, headers=token,
                                        expect100=True) as response:
                    return response.status

        assert asyncio.run(post_waiting_for_continue()) == 200  # aiohttp sends the body after the 100 only
        # refused before the body is asked for, so the client never sends it
        assert first_status_line(server, {"Content-Length": len(body)}) == "HTTP/1.1 401 Unauthorized"
        assert first_status_line(server, {**token, "Content-Length": 10 ** 9}) == (
            "HTTP/1.1 413 Request Entity Too Large")
        assert first_status_line(server, {**token, "Content-Length": len(body)}) == "HTTP/1.1 100 Continue"
        assert error_of(server, "POST", INFER, body, {**token, "Expect": "a-miracle"}) == (
            417, "Expect: 'a-miracle' cannot be met; only 100-continue is")


def test_answers_name_the_server_without_versions(server, mnist):
    """aiohttp's default header, "Python/3.11 aiohttp/3.x.y" (and wsgiref's on the metrics port), tells
    scanners which flaws to try."""
    body = json_infer(mnist.test.images[:1, None].astype(np.float32) / 255)
    for method, path, body, headers, status in (
            ("GET", "/", None, {}, 200), ("GET", "/page/page.js", None, {}, 200), ("GET", "/v2/health/ready", None, {}, 200),
            ("POST", INFER, body, {}, 200), ("GET", "/v2/nowhere", None, {}, 404), ("DELETE", INFER, None, {}, 405),
            ("POST", INFER, body, {"Expect": "a-miracle"}, 417)):
        got, response_headers, _ = call(server, method, path, body, headers)
        assert (got, response_headers["Server"]) == (status, "resserve"), path
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as metrics:
        assert metrics.headers.get_all("Server") == ["resserve"]  # prometheus-client's port, on wsgiref


def test_an_http_port_in_use_is_one_line():
    with ServerProcess() as first:
        result = run_cli("serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
                         "--http-port", str(first.http_port), timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: cannot listen on 127.0.0.1:{first.http_port}: Address already in use "
        "(choose another --http-port, or 0 to disable)"]


def test_http_port_zero_disables_http():
    with ServerProcess("--http-port", "0") as server:
        assert not any("HTTP on" in line for line in server.lines)
        with pytest.raises(OSError):
            urllib.request.urlopen(f"{server.url}/v2/health/live", timeout=2)


@pytest.mark.slow
def binary_infer(images: np.ndarray) -> tuple[bytes, dict]:
    """A KServe v2 REST body with the tensor in binary (Triton's extension), and its headers."""
    header = orjson.dumps({"inputs": [{"name": "input", "shape": list(images.shape), "datatype": "FP32",
                                       "parameters": {"binary_data_size": images.nbytes}}]})
    return header + images.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


LARGE = np.zeros((1024, 1, 28, 28), np.float32)  # over a second of work on one thread


def test_requests_whose_clients_went_away_are_not_computed():
    body, headers = binary_infer(LARGE)
    with ServerProcess("--backend", "onnxruntime", "--threads", "1") as server:
        busy = threading.Thread(target=call, args=(server, "POST", INFER, body, headers))
        busy.start()
        time.sleep(0.2)  # computing; the next ones queue behind it, and their clients give up

        def impatient() -> None:
            connection = HTTPConnection(server.http_target, timeout=0.3)
            try:
                connection.request("POST", INFER, body=body, headers=headers)
                connection.getresponse()
            except OSError:  # timed out, as meant
                pass
            finally:
                connection.close()

        clients = [threading.Thread(target=impatient) for _ in range(6)]
        for thread in clients:
            thread.start()
        for thread in clients + [busy]:
            thread.join()
        time.sleep(0.3)
        idle_from = tree_cpu_seconds(server.process.pid)
        time.sleep(1.0)
        idle = tree_cpu_seconds(server.process.pid) - idle_from
        metrics = server.metrics()
    assert idle < 0.3  # nothing left running for them
    assert metric_value(metrics, "resserve_batch_size_sum") == len(LARGE)  # the first request alone
    assert metric_value(metrics, "resserve_requests_total", protocol="http", code="499") == 6


def test_after_the_grace_period_queued_requests_get_503_uncomputed_and_the_server_exits():
    body, headers = binary_infer(LARGE)
    with ServerProcess("--backend", "onnxruntime", "--threads", "1", "--grace-seconds", "1") as server:
        statuses = collections.Counter()

        def client() -> None:
            statuses[call(server, "POST", INFER, body, headers)[0]] += 1

        threads = [threading.Thread(target=client) for _ in range(6)]  # 6+ s of work, one at a time
        for thread in threads:
            thread.start()
        time.sleep(0.3)
        signalled = time.monotonic()
        server.process.send_signal(15)
        assert server.process.wait(timeout=60) == 0
        took = time.monotonic() - signalled
        for thread in threads:
            thread.join()
    assert took < 5  # grace, the batch running and the flush; not the queue's minutes
    assert set(statuses) == {200, 503} and statuses[503] >= 3, statuses
    assert "queued ones answered UNAVAILABLE, uncomputed" in "".join(server.lines)


def test_sigterm_under_http_load_answers_only_200_or_503_and_ready_goes_false(mnist):
    body = json_infer(mnist.test.images[:1, None].astype(np.float32) / 255)
    with ServerProcess("--grace-seconds", "5", drain_seconds=1.0) as server:
        statuses, ready = collections.Counter(), []

        def client(stop: threading.Event) -> None:
            while not stop.is_set():
                try:
                    statuses[call(server, "POST", INFER, body)[0]] += 1
                except OSError:  # the server has exited: refused, never accepted
                    time.sleep(0.01)

        with running(*[client] * 8):
            time.sleep(1.0)
            server.process.send_signal(15)
            time.sleep(0.5)
            ready.append(call(server, "GET", "/v2/health/ready")[0])  # inside the drain window
            assert server.process.wait(timeout=60) == 0
    assert ready == [503]
    assert set(statuses) <= {200, 503} and statuses[200] > 0, statuses
    answered = dict(re.findall(r"(\w+) (\d+)", "".join(server.lines).split("requests answered: ")[1]))
    assert set(answered) <= {"200", "503"}, answered  # no accepted request was dropped or failed
    assert int(answered["200"]) == statuses[200]  # every 200 the server sent arrived

"""The HTTP API's OpenAPI description (serve/rest/openapi.yaml, served at /openapi.yaml) is valid
OpenAPI 3.1, names every route the server has and no other, and describes what a real server
answers: real requests, from Python's requests, each checked against it by openapi-core, the
request as well as the answer, error answers included."""

import io
import re
import urllib.parse
from multiprocessing import shared_memory

import numpy as np
import pytest
import requests
import yaml
from aiohttp import hdrs
from openapi_core import Config, OpenAPI
from openapi_core.contrib.requests import RequestsOpenAPIRequest, RequestsOpenAPIResponse
from openapi_core.exceptions import OpenAPIError
from openapi_spec_validator import validate
from PIL import Image

from helpers import ServerProcess
from resserve.serve import __version__
from resserve.serve.rest import classify, kserve, openapi

MODEL = "resnet-mnist"
DESCRIPTION = yaml.safe_load(openapi.DESCRIPTION.read_text())
OPERATIONS = {(method.upper(), path) for path, operations in DESCRIPTION["paths"].items()
              for method in operations if method != "parameters"}
BINARY_MEDIA_TYPES = ("application/octet-stream", "image/*")


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--allow-client-shm") as process:
        yield process


@pytest.fixture(scope="module")
def region():
    """A POSIX shared memory object a client registers."""
    memory = shared_memory.SharedMemory(create=True, size=4 * 784)
    yield memory
    memory.close()
    memory.unlink()


def png_of(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_description_is_valid_openapi_and_served_as_written(server):
    validate(DESCRIPTION)
    assert DESCRIPTION["info"]["version"] == __version__
    answer = requests.get(f"http://{server.http_target}/openapi.yaml", timeout=30)
    assert answer.status_code == 200 and answer.headers["Content-Type"] == "application/yaml; charset=utf-8"
    assert answer.content == openapi.DESCRIPTION.read_bytes()
    # the server URL is where the description came from, under the path prefix of an ingress too (a
    # viewer resolves it against the description's URL: "/" sent "Try it out" to the host's root)
    for fetched_from, server_url in (("http://localhost:8000/openapi.yaml", "http://localhost:8000/"),
                                     ("https://example.com/digits/openapi.yaml", "https://example.com/digits/")):
        assert [urllib.parse.urljoin(fetched_from, s["url"]) for s in DESCRIPTION["servers"]] == [server_url]


def test_every_route_is_described_and_every_operation_described_is_a_route():
    routed = {(route.method, route.path) for table in (kserve.routes, classify.routes, openapi.routes)
              for route in table if getattr(route, "method", hdrs.METH_ANY) != hdrs.METH_ANY}  # not static files,
    assert routed == OPERATIONS  # nor the extensions left out, which answer 501 to any method


def cases(mnist, region) -> list[tuple[int, str, str, dict]]:
    """(expected status, method, path, what requests sends) for every operation, errors among them."""
    images = mnist.test.images[:2, None].astype(np.float32) / 255
    tensor = {"name": "input", "shape": [2, 1, 28, 28], "datatype": "FP32", "data": images.ravel().tolist()}
    infer = {"id": "request-7", "parameters": {"timeout": 10_000_000}, "inputs": [tensor]}
    binary = b'{"inputs": [{"name": "input", "shape": [2, 1, 28, 28], "datatype": "FP32", ' \
             b'"parameters": {"binary_data_size": 6272}}], "parameters": {"binary_data_output": true}}'
    png = png_of(mnist.test.images[0])
    model, version = f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/versions/1"
    shm = "/v2/systemsharedmemory"
    return [
        (200, "GET", "/v2/health/live", {}), (200, "GET", "/v2/health/ready", {}), (200, "GET", "/v2", {}),
        (200, "GET", model, {}), (200, "GET", version, {}), (404, "GET", "/v2/models/nine", {}),
        (200, "GET", f"{model}/ready", {}), (503, "GET", f"{model}/versions/9/ready", {}),
        (200, "GET", f"{model}/config", {}), (200, "GET", f"{version}/config", {}),
        (200, "GET", "/v2/models/stats", {}), (200, "GET", f"{model}/stats", {}), (200, "GET", f"{version}/stats", {}),
        (200, "POST", f"{model}/infer", {"json": infer}),
        (200, "POST", f"{version}/infer", {"json": {"inputs": [tensor], "outputs": [
            {"name": "probabilities", "parameters": {"classification": 3}}]}}),
        (200, "POST", f"{model}/infer", {"data": binary + images.tobytes(), "headers": {
            "Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(binary))}}),
        (400, "POST", f"{model}/infer", {"json": {"inputs": [{**tensor, "shape": [3, 1, 28, 28]}]}}),
        (200, "POST", "/v1/classify", {"data": png, "headers": {"Content-Type": "image/png"}}),
        (200, "POST", f"/v1/classify?model={MODEL}&version=1", {"files": {"seven": ("seven.png", png)}}),
        (400, "POST", "/v1/classify", {"data": b"not an image", "headers": {"Content-Type": "image/png"}}),
        (415, "POST", "/v1/classify", {"json": {"image": "iVBORw0KGgo="}}),
        (200, "POST", "/v2/repository/index", {"json": {"ready": True}}),
        (200, "POST", f"/v2/repository/models/{MODEL}/unload", {}),
        (200, "POST", "/v2/repository/index", {}),
        (200, "POST", f"/v2/repository/models/{MODEL}/load", {"json": {"parameters": {}}}),
        (400, "POST", f"/v2/repository/models/{MODEL}/load", {"json": {"parameters": {"config": "{}"}}}),
        (200, "GET", "/v2/logging", {}), (200, "POST", "/v2/logging", {"json": {"log_verbose_level": 0}}),
        (200, "GET", "/v2/trace/setting", {}),
        (200, "POST", "/v2/trace/setting", {"json": {"trace_level": ["OFF"], "trace_rate": 1000, "trace_count": "-1"}}),
        (200, "GET", f"{model}/trace/setting", {}),
        (200, "POST", f"{model}/trace/setting", {"json": {"trace_level": "OFF", "trace_rate": None}}),
        (200, "POST", f"{shm}/region/digits/register", {"json": {"key": f"/{region.name}", "byte_size": region.size}}),
        (200, "GET", f"{shm}/status", {}), (200, "GET", f"{shm}/region/digits/status", {}),
        (200, "POST", f"{shm}/region/digits/unregister", {}), (200, "POST", f"{shm}/unregister", {}),
        (404, "GET", f"{shm}/region/digits/status", {}),
        (200, "GET", "/v2/cudasharedmemory/status", {}), (404, "GET", "/v2/cudasharedmemory/region/gpu/status", {}),
        (200, "POST", "/v2/cudasharedmemory/unregister", {}),
        (200, "POST", "/v2/cudasharedmemory/region/gpu/unregister", {}),
        (200, "GET", "/openapi.yaml", {}), (200, "GET", "/", {}),
    ]


def test_a_real_server_answers_as_described(server, mnist, region):
    # binary bodies (an image, tensors) are strings of format binary: openapi-core reads them as text
    as_text = {media_type: lambda body: body.decode("latin-1") for media_type in BINARY_MEDIA_TYPES}
    description = OpenAPI.from_dict({**DESCRIPTION, "servers": [{"url": f"http://{server.http_target}"}]},
                                    config=Config(extra_media_type_deserializers=as_text))
    answered, mismatches = set(), []
    with requests.Session() as session:
        for status, method, path, sent in cases(mnist, region):
            request = requests.Request(method, f"http://{server.http_target}{path}", **sent).prepare()
            answer = session.send(request, timeout=30)
            assert answer.status_code == status, (method, path, answer.text[:300])
            sent_as_described = RequestsOpenAPIRequest(request)
            if status == 415:  # a body the server does not read is one the description does not name
                with pytest.raises(OpenAPIError, match="mimetype not found: application/json"):
                    description.validate_request(sent_as_described)
            else:
                mismatches += differences(f"{method} {path}", description.validate_request, sent_as_described)
            mismatches += differences(f"{method} {path} ({status})", description.validate_response,
                                      sent_as_described, RequestsOpenAPIResponse(answer))
            answered.add((method, template_of(path.partition("?")[0])))
    assert not mismatches, "\n".join(mismatches)
    assert answered == OPERATIONS  # every operation was tried


def differences(what: str, check, *messages) -> list[str]:
    """What openapi-core's ``check`` of ``messages`` finds different from the description, named by ``what``."""
    try:
        check(*messages)
    except OpenAPIError as exc:  # the error, and the schema errors behind it
        return [f"{what}: {exc!r} {exc.__cause__!r}"[:1000]]
    return []


def template_of(path: str) -> str:
    """The path of the description that ``path`` is an instance of: the one with the fewest
    parameters where several match (/v2/models/stats, not /v2/models/{name})."""
    matching = [template for template in DESCRIPTION["paths"]
                if re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", template), path)]
    return min(matching, key=lambda template: template.count("{"))

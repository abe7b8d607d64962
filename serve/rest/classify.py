"""``POST /v1/classify`` for people and scripts, and the draw-a-digit page at ``/`` that uses it.

The body is one image (raw bytes, any Content-Type but multipart or JSON) or a multipart form
with one or several files. The answer, per image: the digit, its confidence, the ten probabilities and
the 28x28 input the model saw (PNG, base64); with the model, how it runs, and the milliseconds
the server spent. Same preprocessing and limits as the gRPC Classify (``DataPlane.classify``).
"""

from __future__ import annotations

import base64
import time
import warnings
from pathlib import Path

from aiohttp import ClientPayloadError, MultipartReader, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.multipart import BadContentDispositionHeader, BadContentDispositionParam

from resserve.serve.dataplane import Image
from resserve.serve.errors import InvalidInput, TooManyImages, UnsupportedMediaType
from resserve.serve.preprocess import to_png
from resserve.serve.rest.encoding import IDENTITY, compressed_where_asked, encoding_of
from resserve.serve.rest.server import FRONT_DOOR, endpoint, json_response, next_chunk, plane_of, read_body

PAGE_DIR = Path(__file__).parent / "page"
routes = web.RouteTableDef()
# aiohttp warns on stderr of a form part's malformed Content-Disposition (and reads what it can of
# it), as often as a client sends one: the client's input, not the server's news
warnings.filterwarnings("ignore", category=BadContentDispositionHeader)
warnings.filterwarnings("ignore", category=BadContentDispositionParam)


async def _images(request: web.Request) -> list[Image]:
    """The request's images, named by their file names where a form gave them."""
    if request.content_type == "application/json":  # an image as base64 in JSON, as other APIs take it
        raise UnsupportedMediaType("/v1/classify takes an image's own bytes, or files in a multipart form, not "
                                   "JSON; tensors in JSON go to /v2/models/NAME/infer (KServe v2)")
    if request.content_type != "multipart/form-data":
        body = await read_body(request)
        if not body:  # `curl -X POST` without --data-binary: a body forgotten, not an image found empty
            raise InvalidInput("the request has no body: POST an image's bytes (curl --data-binary @digit.png) or "
                               "files in a multipart form (curl -F file=@digit.png)")
        return [Image(body)]
    if encoding_of(request.headers.get(hdrs.CONTENT_ENCODING)) != IDENTITY:  # browsers never compress a form
        raise UnsupportedMediaType("a compressed multipart form is not read; send the form uncompressed")
    try:
        return await _form_images(request)
    except (ValueError, AssertionError, HttpProcessingError, ClientPayloadError) as exc:  # aiohttp's parser, bad form
        detail = " ".join(str(getattr(exc, "message", "") or exc).split())  # one line
        raise InvalidInput(f"malformed multipart form: {detail}") from None


async def _form_images(request: web.Request) -> list[Image]:
    images = []
    limit = plane_of(request).state.settings.max_images_per_request
    door = request.app[FRONT_DOOR]
    async for part in await request.multipart():
        if isinstance(part, MultipartReader):  # RFC 2388's multipart/mixed inside a form, which no browser sends
            raise InvalidInput("a nested multipart form is not read; send each file as a part of the form itself")
        name = part.filename  # parsed from its headers each time it is asked for
        is_file = name is not None  # else a text field: read (the cap counts it) and dropped
        if is_file and len(images) == limit:
            raise TooManyImages(limit)
        data = bytearray()
        while chunk := await next_chunk(request, part.read_chunk):
            door.check_received(request)  # text fields count against the cap too
            if is_file:
                door.hold(request, len(chunk))
                data += chunk
        if is_file:
            images.append(Image(bytes(data), name=_text(name)))
    return images


def _text(file_name: str) -> str:
    """A file name as text a JSON answer can carry: bytes of it that are not UTF-8 (aiohttp keeps
    them as surrogates, which orjson refuses) become '?'."""
    return file_name.encode("utf-8", "replace").decode("utf-8")


def _model_asked(request: web.Request) -> tuple[str, str]:
    """The model and the version the query names ("": the default). A query that says anything
    else is refused, so that a misspelt ``?modle=b`` is not answered by the default model."""
    for key in request.query:
        if key not in ("model", "version"):
            raise InvalidInput(f"unknown query parameter {key[:100]!r}; /v1/classify takes model and version")
        if len(request.query.getall(key)) > 1:
            raise InvalidInput(f"the query gives {key} more than once")
    return request.query.get("model", ""), request.query.get("version", "")


@routes.post("/v1/classify")
@endpoint("classify")
async def classify(request: web.Request) -> web.Response:
    started = time.perf_counter()
    plane = plane_of(request)
    model, version = _model_asked(request)
    images = await _images(request)
    result = await plane.classify(images, model, version, headers=lambda: request.headers)
    backend = result.model.backend
    answers = []
    for image, probabilities, seen in zip(images, result.probabilities, result.inputs):
        digit = int(probabilities.argmax())
        answers.append({**({"file": image.name} if image.name is not None else {}), "digit": digit,
                        "confidence": probabilities[digit], "probabilities": probabilities,
                        "input_png": base64.b64encode(to_png(seen)).decode()})
    answer = json_response({
        "model": result.model.name, "model_version": result.model.version, "backend": backend.name,
        "precision": backend.precision, "device": backend.device, "server_ms": (time.perf_counter() - started) * 1e3,
        "results": answers})
    return compressed_where_asked(answer, request.headers.get(hdrs.ACCEPT_ENCODING))


@routes.get("/")
async def page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(PAGE_DIR / "index.html")


routes.static("/page", PAGE_DIR)

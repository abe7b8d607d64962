"""What resserve's clients share, whichever transport: the errors, the results, and ``Client``,
which does once what does not depend on the transport (many images as requests a server takes,
one refused image not sinking the others, requests in flight, waiting until ready); a transport
(grpc.py, http.py) gives the calls themselves."""

from __future__ import annotations

import io
import re
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import grpc
import numpy as np
from PIL import Image, ImageOps

from resserve.serve.errors import ResserveError
from resserve.serve.preprocess import READ_FORMATS, draft_within, eight_bit, has_alpha
from resserve.serve.stubs import model_config_pb2

# Nothing listens there: the likeliest reason is a server not started, or another port (the
# hints name the option that gave the server's address: ``{option}``)
NO_SERVER_HINT = " (is a server running there? `resserve serve` starts one; {option} names another)"
SERVER_OPTION = "--server or RESSERVE_SERVER"
HTTP_SCHEMES = ("http", "https")  # a server named by a URL of these is reached over HTTP (http.py)
# A server that closes the connection in the handshake: what it refused, by how this client
# connected; or it held as many connections as it may (serve/connections.py)
CLOSED_HINTS = {
    "plaintext": "a TLS server closes plaintext connections: --tls-ca names the CA that signed its certificate",
    "TLS": "a server with mutual TLS closes connections without a client certificate: give --tls-cert and --tls-key",
    "mutual TLS": "the server did not accept the certificate in --tls-cert: is it signed by the server's "
                  "--tls-client-ca?",
}
CLOSED_AT_LIMIT = "; or it holds all the connections it may (its --max-connections): retry later"


class ClientError(ResserveError):
    """The server answered with an error, or could not be reached: ``code`` as gRPC names it (over
    HTTP, the code the server's HTTP status pairs with), ``status`` as the user is shown it, and
    ``hint`` what to do, where there is something to say."""

    def __init__(self, target: str, code: grpc.StatusCode, details: str, hint: str = "", status: str = "",
                 too_large: bool = False) -> None:
        super().__init__(f"{target}: {status or code.name}: {details}{hint}")
        self.code, self.details, self.hint = code, details, hint
        self.too_large = too_large  # the request is larger than the server takes: send it in parts


# How the server names the image at fault in a Classify request (with its file name, over HTTP),
# and a request with more images than it takes (serve/errors.py's TooManyImages, on every API)
IMAGE_AT_FAULT = re.compile(r"image (\d+)(?: \('[^']*'\))?: (.+)", re.S)
TOO_MANY_IMAGES = re.compile(r"(?:more than )?\d+ images in one request; the limit is (\d+)")
# What one Classify request carries at most: well inside the server's defaults (1024 images, 4 MiB),
# so a folder of digits or of phone photos goes as several requests, not one the server refuses.
REQUEST_IMAGES = 64
REQUEST_BYTES = 1 << 20
# A larger photo (a phone's are 3-8 MB) is sent at most this many pixels on its longer side: the
# model reads 28x28 pixels of it either way (the page does the same).
PHOTO_SIDE = 1024
HEALTH_POLL_SECONDS = 0.2
# Requests a client keeps in flight where it has many to send (`resserve classify` on a folder): a
# server decodes the images of one request on one thread, so requests sent one at a time left all
# but one of its CPUs idle (300 photos, a 2-CPU machine's own server: 8.5-9.0 s one at a time,
# 6.0-6.2 s four at a time, docs/serving.md; eight at a time were no faster there)
IN_FLIGHT = 4
Item = TypeVar("Item")
Answer = TypeVar("Answer")


def requests_of(sizes: list[int], max_images: int = REQUEST_IMAGES, max_bytes: int = REQUEST_BYTES) -> list[range]:
    """Images of these byte ``sizes``, in order, grouped into requests of at most ``max_images``
    and ``max_bytes`` (an image larger than that goes alone)."""
    requests, start, total = [], 0, 0
    for index, size in enumerate(sizes):
        if index > start and (index - start == max_images or total + size > max_bytes):
            requests.append(range(start, index))
            start, total = index, 0
        total += size
    return requests + [range(start, len(sizes))] if sizes else requests


def fit_to_send(image: bytes) -> bytes:
    """A photo over ``REQUEST_BYTES``, upright and scaled down to ``PHOTO_SIDE`` (JPEG, or PNG
    where it has transparency; a 16-bit or float scan brought to 8 bits over its range first, as
    the server does); smaller images, and bytes Pillow cannot read (the server will say what is
    wrong with them), as they are."""
    if len(image) <= REQUEST_BYTES:
        return image
    try:
        with Image.open(io.BytesIO(image), formats=READ_FORMATS) as opened:
            draft_within(opened, "RGB", PHOTO_SIDE)
            photo = eight_bit(ImageOps.exif_transpose(opened))
        photo.thumbnail((PHOTO_SIDE, PHOTO_SIDE))
        transparent = has_alpha(photo)
        photo = photo.convert("RGBA" if transparent else "RGB")
        smaller = io.BytesIO()
        photo.save(smaller, "PNG" if transparent else "JPEG", quality=90)
    except Exception:  # noqa: BLE001 - Pillow raises any kind on a malformed file (serve/preprocess.py)
        return image
    return smaller.getvalue() if smaller.tell() < len(image) else image


@dataclass(frozen=True)
class ModelEntry:
    """A model version the server has, or a model it has unloaded (version ''), and its state."""

    name: str
    version: str
    state: str  # READY or UNAVAILABLE
    # why it is not READY: "unloaded", "not loaded", "the last load failed: ..." or the server loading or draining
    reason: str


@dataclass(frozen=True)
class Result:
    digit: int
    confidence: float
    probabilities: list[float]
    model: str  # the model and version that answered
    model_version: str


class Client(ABC):
    """What every transport does alike; a transport gives the calls themselves."""

    target: str  # the server, as errors name it

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @abstractmethod
    def close(self) -> None:
        """Ends the connections, and the calls still running on them at once."""

    @abstractmethod
    def classify(self, images: list[bytes], model: str = "", version: str = "") -> list[Result]:
        """Encoded images (PNG, JPEG, ...) -> one result per image, in order ('' model: the server's
        default; '' version: the latest)."""

    @abstractmethod
    def classify_pixels(self, images: np.ndarray, model: str = "", version: str = "") -> list[Result]:
        """MNIST-style uint8 images [N,28,28] (white ink on black, centred) -> one result per image,
        as ``classify``; the server takes them as they are, without preprocessing."""

    @abstractmethod
    def health(self, service: str = "") -> str:
        """SERVING, NOT_SERVING, ... for ``service`` ('' for the whole server)."""

    @abstractmethod
    def model_config(self, name: str, version: str = "") -> model_config_pb2.ModelConfig:
        """The model's configuration, as Triton gives it (its architecture, backend and precision
        among the parameters)."""

    @abstractmethod
    def models(self) -> list[ModelEntry]:
        """What the server has (its model repository index)."""

    @abstractmethod
    def load(self, name: str) -> None:
        """Load the model called ``name`` (again) from the packages the server was started with (a folder's
        as they are now)."""

    @abstractmethod
    def unload(self, name: str) -> None:
        """Stop serving every version of the model called ``name``."""

    def classify_each(self, images: list[bytes], model: str = "", version: str = "") -> list[Result | str]:
        """Like ``classify``, but an image the server refuses does not sink the others: its entry is
        the server's reason (a string), and the rest are classified. Images beyond what this server
        takes in one request (its image count or message size) are sent in several, and large
        photos smaller (``fit_to_send``)."""
        images = [fit_to_send(image) for image in images]
        return [outcome for request in requests_of([len(image) for image in images])
                for outcome in self._classify_request(images[request.start:request.stop], model, version)]

    def _classify_request(self, images: list[bytes], model: str, version: str) -> list[Result | str]:
        """One request's worth; sent again without an image the server refuses, or in parts."""
        try:
            return self.classify(images, model, version)
        except ClientError as exc:
            if exc.too_large:
                if len(images) == 1:
                    return [f"{len(images[0]):,} bytes: more than the server takes in one request "
                            f"(its --max-message-bytes): {exc.details}"]
                return self._in_parts(images, (len(images) + 1) // 2, model, version)
            if exc.code != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            limit = TOO_MANY_IMAGES.fullmatch(exc.details)
            if limit and int(limit.group(1)) < len(images):
                return self._in_parts(images, int(limit.group(1)), model, version)
            fault = IMAGE_AT_FAULT.fullmatch(exc.details)
            if fault is None or int(fault.group(1)) >= len(images):
                raise
            at = int(fault.group(1))
            others = self._classify_request(images[:at] + images[at + 1:], model, version) if len(images) > 1 else []
            return [*others[:at], fault.group(2), *others[at:]]

    def _in_parts(self, images: list[bytes], size: int, model: str, version: str) -> list[Result | str]:
        size = max(1, size)
        return [outcome for start in range(0, len(images), size)
                for outcome in self._classify_request(images[start:start + size], model, version)]

    def in_order(self, send: Callable[[Item], Answer], items: Iterable[Item],
                 in_flight: int = IN_FLIGHT) -> Iterator[Answer]:
        """``send(item)`` for each of ``items`` (a request's worth of this client's calls), answered
        in their order, with up to ``in_flight`` sent at once, each from a thread of its own (both
        transports are thread-safe). Stopped early (an error, Ctrl-C, or closed), it closes the
        client, which ends the calls still running at once rather than after their timeout."""
        sent: deque[Future[Answer]] = deque()
        with ThreadPoolExecutor(in_flight, thread_name_prefix="request") as pool:
            try:
                for item in items:
                    sent.append(pool.submit(send, item))
                    if len(sent) == in_flight:
                        yield sent.popleft().result()
                while sent:
                    yield sent.popleft().result()
            finally:
                if sent:
                    for future in sent:
                        future.cancel()
                    self.close()

    def wait_until_serving(self, service: str = "", seconds: float = 0.0) -> str:
        """Ask until ``service`` is SERVING, for up to ``seconds``, through a server that is not
        listening yet or still loading; returns the last status, or raises the last error. An
        unknown service name is not waited for."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                status = self.health(service)
            except ClientError as exc:
                if exc.code == grpc.StatusCode.NOT_FOUND or time.monotonic() >= deadline:
                    raise
            else:
                if status == "SERVING" or time.monotonic() >= deadline:
                    return status
            time.sleep(HEALTH_POLL_SECONDS)

"""resserve's client over HTTP, for a server reached on its HTTP port: ``--server
http://HOST:8000``, or ``https://HOST[/PREFIX]`` behind an ingress or KServe (which route one
port, HTTP by default).

The calls of the gRPC client (grpc.py), on the server's HTTP API: ``/v1/classify`` for
images (a multipart form, a part per image), KServe v2 REST for pixels, health, a model's
configuration and the model repository. Errors keep the gRPC code the server's HTTP status pairs
with (serve/errors.py), so that what the commands do with them does not depend on the transport.
aiohttp's client (the server's own HTTP library) runs on an event loop of its own, in a thread,
so that the commands call it from their threads as they call a gRPC channel.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import io
import threading
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import numpy as np
import orjson
from google.protobuf import json_format
from PIL import Image
from yarl import URL

from resserve.serve.client.base import (CLOSED_AT_LIMIT, CLOSED_HINTS, HTTP_SCHEMES, NO_SERVER_HINT, SERVER_OPTION,
                                        Client, ClientError, ModelEntry, Result)
from resserve.serve.client.proxies import environment_proxy, http_proxy_hint
from resserve.serve.errors import HTTP_STATUS, ResserveError
from resserve.serve.settings import LIVENESS_SERVICE, READINESS_SERVICE
from resserve.serve.stubs import model_config_pb2
from resserve.serve.tls import client_ssl_context

# The gRPC code of each HTTP status the server answers (errors.HTTP_STATUS read backwards: the
# first code paired with a status; and the statuses of errors more precise over HTTP)
GRPC_CODE = {**{status: code for code, status in reversed(HTTP_STATUS.items())},
             408: grpc.StatusCode.DEADLINE_EXCEEDED, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
             415: grpc.StatusCode.INVALID_ARGUMENT}
# What each gRPC health service name of resserve's asks over HTTP (KServe v2's health endpoints)
HEALTH_PATHS = {"": "ready", READINESS_SERVICE: "ready", LIVENESS_SERVICE: "live"}
OTHER_PORT_HINT = (" (what answers there is not resserve's HTTP API, as the server's gRPC and metrics ports are not: "
                   "{option} takes the URL of its HTTP port, 8000 by default, or of what routes to it, with the "
                   "path prefix it routes)")
# An answer is read whole, up to this: as gRPC's clients take 4 MiB at most by default (resserve's
# largest, 64 images' classifications with the 28x28 inputs, is about 100 KB)
MAX_ANSWER_BYTES = 4 * 2**20
TLS_FILES_NEED_HTTPS = "--tls-ca, --tls-cert and --tls-key are for a server reached with TLS: give an https:// URL"


def binary_infer_request(input_name: str, tensor: np.ndarray, **request: Any) -> tuple[bytes, dict[str, str]]:
    """A KServe v2 REST infer request body carrying ``tensor`` as Triton's binary tensor extension
    does (4 bytes a number after the JSON header, rather than each number's decimals printed and
    parsed), with ``request``'s other fields; and the headers that frame it."""
    data = np.ascontiguousarray(tensor, dtype=np.float32)
    header = orjson.dumps({"inputs": [{"name": input_name, "shape": list(data.shape), "datatype": "FP32",
                                       "parameters": {"binary_data_size": data.nbytes}}], **request})
    return header + data.tobytes(), {"Inference-Header-Content-Length": str(len(header)),
                                     "Content-Type": "application/octet-stream"}


def base_url(url: str, option: str = SERVER_OPTION) -> URL:
    """The server's URL, checked: http or https, a host, and at most a path prefix (an ingress's)."""
    try:
        parsed = URL(url)
    except ValueError as exc:
        raise ResserveError(f"{option}: {url[:200]!r} is not a URL ({exc})") from None
    if parsed.scheme not in HTTP_SCHEMES or not parsed.host:
        raise ResserveError(f"{option}: a URL names a host, as in http://localhost:8000; got {url[:200]!r}")
    if parsed.user is not None or parsed.query_string or parsed.fragment:
        raise ResserveError(f"{option}: a server's URL has no user, query or fragment (a token goes in --token-file); "
                            f"got {url[:200]!r}")
    return parsed.with_path(parsed.path.rstrip("/"))


class HttpDigitClient(Client):
    """``with HttpDigitClient("http://localhost:8000") as client: client.classify([png_bytes])``."""

    def __init__(self, url: str = "http://localhost:8000", tls_ca: Path | None = None, token: str | None = None,
                 timeout: float = 30.0, tls_cert: Path | None = None, tls_key: Path | None = None,
                 option: str = SERVER_OPTION) -> None:
        """``option``: how the user named ``url``, for the hints of a connection that fails."""
        self.url = base_url(url, option)
        if self.url.scheme == "http" and (tls_ca or tls_cert or tls_key):
            raise ResserveError(f"{TLS_FILES_NEED_HTTPS}; {option} is {url[:200]!r}")
        self.target, self.option, self.timeout, self.tls_ca = str(self.url), option, timeout, tls_ca
        self.mutual_tls = tls_cert is not None
        ssl = client_ssl_context(tls_ca, tls_cert, tls_key) if self.url.scheme == "https" else True
        self.proxy, self.proxy_headers = environment_proxy(self.url)
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.input_names: dict[str, str] = {}  # by model: the name of its input tensor
        self.default_model = ""  # the model the server answers requests that name none with, once asked
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="http-client", daemon=True)
        self.thread.start()
        self.closing, self.closed = threading.Lock(), False  # once closed, nothing more reaches the loop
        self.session = self._on_loop(self._open(ssl, timeout))

    @staticmethod
    async def _open(ssl: Any, timeout: float) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl),
                                     timeout=aiohttp.ClientTimeout(total=timeout), raise_for_status=False)

    def close(self) -> None:
        """Closes the connections, ends the calls still running on them, and the loop's thread."""
        with self.closing:
            if self.closed:
                return
            self.closed = True
        asyncio.run_coroutine_threadsafe(self._shut_down(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()

    async def _shut_down(self) -> None:
        await self.session.close()
        running = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    def _on_loop(self, coroutine):
        """``coroutine`` run on the client's loop, from any thread; refused once the client is closed
        (a coroutine sent to a loop that has stopped would never finish, nor its caller)."""
        with self.closing:
            if self.closed:
                coroutine.close()
                raise ClientError(self.target, grpc.StatusCode.CANCELLED, "the client is closed")
            running = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return running.result()

    # the calls -------------------------------------------------------------------------------

    def classify(self, images: list[bytes], model: str = "", version: str = "") -> list[Result]:
        form = aiohttp.FormData()
        for index, image in enumerate(images):  # the server reads parts with a file name as images
            form.add_field("image", image, filename=str(index), content_type="application/octet-stream")
        query = {key: value for key, value in (("model", model), ("version", version)) if value}
        answer = self._call("POST", "v1", "classify", params=query, data=form)
        # float32 as the model gave them, as gRPC carries them (JSON writes their shortest decimals)
        return [Result(r["digit"], float(np.float32(r["confidence"])), np.float32(r["probabilities"]).tolist(),
                       answer["model"], answer["model_version"]) for r in answer["results"]]

    def classify_pixels(self, images: np.ndarray, model: str = "", version: str = "") -> list[Result]:
        model = model or self._default_model()
        pixels = images.reshape(len(images), 1, 28, 28).astype(np.float32) / 255.0  # as Classify's raw_28x28
        body, headers = binary_infer_request(self._input_name(model), pixels, outputs=[{"name": "probabilities"}])
        answer = self._call("POST", "v2", "models", model, *(("versions", version) if version else ()), "infer",
                            data=body, headers=headers)
        probabilities = np.asarray(answer["outputs"][0]["data"], dtype=np.float32).reshape(len(images), -1)
        return [Result(int(p.argmax()), float(p.max()), p.tolist(), answer["model_name"], answer["model_version"])
                for p in probabilities]

    def _default_model(self) -> str:
        """The model requests that name none get: KServe v2 REST names one in its path, so the server
        is asked once, by classifying a stroke (a 1; any image with ink would do) through /v1/classify."""
        if not self.default_model:
            stroke, png = np.zeros((28, 28), dtype=np.uint8), io.BytesIO()
            stroke[4:24, 13:15] = 255
            Image.fromarray(stroke).save(png, "PNG")
            self.default_model = self.classify([png.getvalue()])[0].model
        return self.default_model

    def _input_name(self, model: str) -> str:
        """The name of ``model``'s input tensor, from its metadata (asked once)."""
        if model not in self.input_names:
            self.input_names[model] = self._call("GET", "v2", "models", model)["inputs"][0]["name"]
        return self.input_names[model]

    def health(self, service: str = "") -> str:
        if service not in HEALTH_PATHS:
            raise ClientError(self.target, grpc.StatusCode.NOT_FOUND,
                              f"no health service {service!r} over HTTP; resserve's are '' (the server: GET "
                              f"/v2/health/ready), {READINESS_SERVICE} (the same) and {LIVENESS_SERVICE} (GET "
                              "/v2/health/live)")
        path = ("v2", "health", HEALTH_PATHS[service])
        status, reason, answer = self._exchange("GET", *path)
        if status == 503:  # not ready: loading, draining (or, behind an ingress, no replica ready)
            return "NOT_SERVING"
        self._check(status, reason, answer)
        said = self._json(answer, "GET", path)  # {"ready": true}: resserve's, not another port's 200
        if not isinstance(said, dict) or not isinstance(said.get(path[-1]), bool):
            raise self._not_resserve("GET", path)
        return "SERVING" if said[path[-1]] else "NOT_SERVING"

    def model_config(self, name: str, version: str = "") -> model_config_pb2.ModelConfig:
        answer = self._call("GET", "v2", "models", name, *(("versions", version) if version else ()), "config")
        return json_format.ParseDict(answer, model_config_pb2.ModelConfig(), ignore_unknown_fields=True)

    def models(self) -> list[ModelEntry]:
        return [ModelEntry(m["name"], m.get("version", ""), m["state"], m.get("reason", ""))
                for m in self._call("POST", "v2", "repository", "index", data=b"{}")]

    def load(self, name: str) -> None:
        self._call("POST", "v2", "repository", "models", name, "load", data=b"{}")

    def unload(self, name: str) -> None:
        self._call("POST", "v2", "repository", "models", name, "unload", data=b"{}")

    # requests and their errors ---------------------------------------------------------------

    def _call(self, method: str, *path: str, **request: Any) -> Any:
        """The JSON answer to a request to ``path`` under the server's URL, or ClientError."""
        status, reason, answer = self._exchange(method, *path, **request)
        self._check(status, reason, answer)
        return self._json(answer, method, path)

    def _json(self, answer: bytes, method: str, path: tuple[str, ...]) -> Any:
        try:
            return orjson.loads(answer)
        except orjson.JSONDecodeError:
            raise self._not_resserve(method, path) from None

    def _not_resserve(self, method: str, path: tuple[str, ...]) -> ClientError:
        return ClientError(self.target, grpc.StatusCode.UNKNOWN, f"the answer to {method} /{'/'.join(path)} is not "
                           "resserve's", OTHER_PORT_HINT.format(option=self.option))

    def _exchange(self, method: str, *path: str, **request: Any) -> tuple[int, str, bytes]:
        """The answer's HTTP status, reason and body; ClientError where none came."""
        try:
            return self._on_loop(self._fetch(method, self.url.joinpath(*path),
                                             headers={**self.headers, **request.pop("headers", {})}, **request))
        except asyncio.TimeoutError:
            raise ClientError(self.target, grpc.StatusCode.DEADLINE_EXCEEDED,
                              f"no answer within {self.timeout:g} s") from None
        except concurrent.futures.CancelledError:  # closed while it ran
            raise ClientError(self.target, grpc.StatusCode.CANCELLED, "the client was closed") from None
        except aiohttp.ClientError as exc:
            raise ClientError(self.target, grpc.StatusCode.UNAVAILABLE, _details(exc), self._hint(exc)) from None

    async def _fetch(self, method: str, url: URL, **request: Any) -> tuple[int, str, bytes]:
        async with self.session.request(method, url, proxy=self.proxy, proxy_headers=self.proxy_headers,
                                        **request) as response:
            answer = bytearray()
            while len(answer) <= MAX_ANSWER_BYTES and (chunk := await response.content.read(
                    MAX_ANSWER_BYTES + 1 - len(answer))):
                answer += chunk
            if len(answer) > MAX_ANSWER_BYTES:
                raise ClientError(self.target, grpc.StatusCode.RESOURCE_EXHAUSTED, f"the answer to {method} "
                                  f"{url.path} is over {MAX_ANSWER_BYTES // 2**20} MiB, far more than resserve sends",
                                  OTHER_PORT_HINT.format(option=self.option))
            return response.status, response.reason or "", bytes(answer)

    def _check(self, status: int, reason: str, answer: bytes) -> None:
        """ClientError for an error status, with the server's message; from something else (another
        port, an ingress's page), the status's reason."""
        if status < 400:
            return
        code = GRPC_CODE.get(status, grpc.StatusCode.UNAVAILABLE if status >= 500 else grpc.StatusCode.UNKNOWN)
        try:
            details, hint = str(orjson.loads(answer)["error"]), ""
        except (orjson.JSONDecodeError, TypeError, KeyError):  # a 5xx through a proxy: likely the proxy's own
            details, hint = reason or "error", (OTHER_PORT_HINT.format(option=self.option) if status < 500 else
                                                http_proxy_hint(self.proxy) if self.proxy else "")
        raise ClientError(self.target, code, details, hint, status=f"HTTP {status}", too_large=status == 413)

    def _hint(self, exc: aiohttp.ClientError) -> str:
        """What to do about a request that found no server to answer it, where the error says."""
        if isinstance(exc, aiohttp.ClientConnectorCertificateError):
            if "mismatch" in str(exc):  # "Hostname mismatch", "IP address mismatch"
                return f" (the server's certificate does not name the host in {self.option})"
            return (" (the server's certificate is not signed by the CA in --tls-ca)" if self.tls_ca else
                    " (the server's certificate is not signed by a CA this machine trusts: --tls-ca names the one "
                    "that signed it)")
        if "WRONG_VERSION_NUMBER" in str(exc):  # the TLS handshake was answered in plaintext
            return " (the server there does not speak TLS: give an http:// URL)"
        if _closed_before_answering(exc):  # what the server refused, by how this client connected
            closed = (CLOSED_HINTS["mutual TLS" if self.mutual_tls else "TLS"] if self.url.scheme == "https" else
                      "a TLS server closes plaintext connections: give an https:// URL")
            return f" ({closed}{CLOSED_AT_LIMIT})"
        if isinstance(exc, aiohttp.ClientConnectorError):  # through a proxy, it is the proxy that is connected to
            return http_proxy_hint(self.proxy) if self.proxy else NO_SERVER_HINT.format(option=self.option)
        if isinstance(exc, aiohttp.ClientHttpProxyError):  # the proxy refused to connect to the server
            return http_proxy_hint(self.proxy)
        if isinstance(exc, aiohttp.ClientResponseError):
            return OTHER_PORT_HINT.format(option=self.option)
        return ""


def _closed_before_answering(exc: aiohttp.ClientError) -> bool:
    """The server closed the connection before it answered: in the TLS handshake or just after it (a
    client certificate it refuses ends either way, by timing: an alert, a reset, or a disconnect), or
    at its connection limit."""
    return (isinstance(exc, aiohttp.ServerDisconnectedError) or "_ALERT_" in str(exc)
            or (isinstance(exc, aiohttp.ClientOSError) and exc.errno in (errno.ECONNRESET, errno.EPIPE)))


def _details(exc: aiohttp.ClientError) -> str:
    """What went wrong, in one line: the cause rather than aiohttp's wrapping of it."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"failed to connect: {exc.certificate_error}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"failed to connect: {exc.os_error}"
    if isinstance(exc, aiohttp.ClientResponseError):  # a status line that does not parse: not HTTP/1.1
        return f"the answer is not HTTP/1.1 ({exc.message.splitlines()[0].rstrip(':')})"
    return " ".join(str(exc).split()) or type(exc).__name__

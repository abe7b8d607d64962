"""The clients ``resserve bench serve`` loads a server with: one connection per client, per API.

Each opens one connection (as separate clients have, so the kernel can spread them over a
server's workers) and yields ``send()``, which sends one request of ``spec.batch`` images and
returns None or what went wrong (a status code name, an HTTP status, an exception's name). A
client may have several requests in flight (the open loop sends without waiting): over gRPC on
its one connection; over REST, where HTTP/1.1 carries one request at a time, on up to
``http_connections`` kept-alive connections, since a request waiting for a free connection
would be the client's queue counted as the server's latency.
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import ssl
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import aiohttp
import grpc
import numpy as np
from yarl import URL

from resserve.serve.client.grpc import CLIENT_CERT_NEEDS_CA, channel_credentials
from resserve.serve.client.http import binary_infer_request
from resserve.serve.client.proxies import environment_proxy
from resserve.serve.errors import ResserveError
from resserve.serve.stubs import digits_pb2, digits_pb2_grpc
from resserve.serve.stubs import grpc_service_pb2 as kserve_pb2
from resserve.serve.stubs import grpc_service_pb2_grpc as kserve_grpc
from resserve.serve.tls import client_ssl_context

# gRPC KServe v2 (one call per request, or many requests on one ModelStreamInfer call per connection),
# gRPC Classify, KServe v2 REST with binary tensors
APIS = ("kserve", "kserve-stream", "classify", "rest")

# our own stubs and aiohttp, Triton's Python clients (asyncio), or Triton's perf_analyzer (C++,
# perf_analyzer.py)
CLIENTS = ("resserve", "tritonclient", "perf_analyzer")


@dataclass(frozen=True)
class Level:
    """One load level: ``concurrency`` closed-loop clients, or open-loop arrivals at ``rate``
    requests per second."""

    concurrency: int = 0
    rate: float = 0.0

    def __str__(self) -> str:
        return f"{self.rate:g}/s" if self.rate else f"C={self.concurrency}"

    def shares(self, processes: int) -> list["Level"]:
        """This level spread over at most ``processes`` load processes, one share each."""
        if self.rate:
            return [Level(rate=self.rate / processes)] * processes
        count = min(processes, self.concurrency)
        return [Level(self.concurrency // count + (i < self.concurrency % count)) for i in range(count)]


@dataclass
class LoadResult:
    """What one load level measured on the load generator's side."""

    latencies: list[float]  # seconds, of the requests sent in the measured window and answered OK
    errors: Counter  # what went wrong -> how many requests, for those sent in the measured window
    window: float  # seconds: the measured window
    elapsed: float  # seconds the load ran, warm-up included: what CPU seconds are divided by
    client_cpu: float  # CPU seconds the load generator used
    processes: int  # load processes it took


@dataclass(frozen=True)
class Credentials:
    """What the load shows a server with TLS or bearer tokens, as ``resserve classify`` does: the
    files' paths and the token, from which each load process makes its own connections."""

    tls_ca: Path | None = None  # the CA of the server's certificate: connect with TLS
    tls_cert: Path | None = None  # this client's certificate and key, for mutual TLS
    tls_key: Path | None = None
    token: str | None = None

    def check(self) -> None:
        """One line now, rather than a failure in every connection, for files that cannot serve."""
        if self.tls_ca is None and (self.tls_cert or self.tls_key):
            raise ResserveError(CLIENT_CERT_NEEDS_CA)
        self.grpc()  # reads and checks the files

    def grpc(self) -> grpc.ChannelCredentials | None:
        """gRPC's TLS credentials; None for plaintext."""
        return channel_credentials(self.tls_ca, self.tls_cert, self.tls_key) if self.tls_ca else None

    def ssl_context(self) -> ssl.SSLContext | None:
        """HTTPS's, trusting the CA (and showing the client's certificate); None for plain HTTP, or
        HTTPS trusting the machine's CAs."""
        return client_ssl_context(self.tls_ca, self.tls_cert, self.tls_key) if self.tls_ca else None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The token as gRPC metadata."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    @property
    def headers(self) -> dict[str, str]:
        """The token as an HTTP header, or as tritonclient's gRPC metadata (which takes lower case only)."""
        return dict(self.metadata)


@dataclass(frozen=True)
class LoadSpec:
    target: str  # host:port of gRPC
    http_url: str  # the HTTP port's URL, or what routes to it: http(s)://host:port[/prefix]
    model: str
    api: str  # a key of APIS
    batch: int
    duration: float
    warmup: float
    client: str = "resserve"  # one of CLIENTS (only resserve speaks classify)
    credentials: Credentials = Credentials()


def stand_in_images(batch: int) -> np.ndarray:
    """Deterministic stand-in digits: inference cost does not depend on the pixels."""
    return np.random.default_rng(0).random((batch, 1, 28, 28), dtype=np.float32)


def _kserve_request(spec: LoadSpec) -> kserve_pb2.ModelInferRequest:
    images = stand_in_images(spec.batch)
    request = kserve_pb2.ModelInferRequest(model_name=spec.model)
    request.inputs.add(name="input", datatype="FP32", shape=list(images.shape))
    request.raw_input_contents.append(images.tobytes())
    return request


def _call(spec: LoadSpec, channel: grpc.aio.Channel):
    """An async function sending one request of ``spec.batch`` images."""
    metadata = spec.credentials.metadata
    if spec.api == "kserve":
        request = _kserve_request(spec)
        return lambda: kserve_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30, metadata=metadata)
    images = stand_in_images(spec.batch)
    raw = [digits_pb2.Image(raw_28x28=(image[0] * 255).astype(np.uint8).tobytes()) for image in images]
    request = digits_pb2.ClassifyRequest(images=raw, model=spec.model)
    return lambda: digits_pb2_grpc.DigitClassifierStub(channel).Classify(request, timeout=30, metadata=metadata)


# a connection of its own (not gRPC's shared subchannel), as separate clients have, so the kernel
# can spread clients over a server's workers
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def _channel(spec: LoadSpec) -> grpc.aio.Channel:
    credentials = spec.credentials.grpc()
    if credentials is None:
        return grpc.aio.insecure_channel(spec.target, options=OWN_CONNECTION)
    return grpc.aio.secure_channel(spec.target, credentials, options=OWN_CONNECTION)


@asynccontextmanager
async def _grpc_sender(spec: LoadSpec):
    """One client's connection: yields ``send()``, which returns None or the error's code."""
    async with _channel(spec) as channel:
        call = _call(spec, channel)

        async def send() -> str | None:
            try:
                await call()
            except grpc.aio.AioRpcError as exc:
                return exc.code().name
            return None

        yield send


class _Pending:
    """Requests sent on a stream and not yet answered, by id: what a stream client keeps to pair
    each response with its request (a server answers in the order it finishes them)."""

    def __init__(self) -> None:
        self.waiting: dict[str, asyncio.Future] = {}
        self.ids = (str(n) for n in itertools.count())

    def add(self) -> tuple[str, asyncio.Future]:
        request_id = next(self.ids)
        self.waiting[request_id] = asyncio.get_running_loop().create_future()
        return request_id, self.waiting[request_id]

    def answer(self, request_id: str | None, error: str | None) -> None:
        """``request_id`` None: the oldest request (a client that is not told which one failed)."""
        if request_id is None and self.waiting:
            request_id = next(iter(self.waiting))
        future = self.waiting.pop(request_id, None)
        if future is not None and not future.done():
            future.set_result(error)

    def end(self, error: str) -> None:
        """The stream ended: every request still waiting failed with ``error``."""
        for request_id in list(self.waiting):
            self.answer(request_id, error)


@asynccontextmanager
async def _grpc_stream_sender(spec: LoadSpec):
    """As ``_grpc_sender``, on one ``ModelStreamInfer`` call per connection: each request is a
    message on it, and ``send()`` returns when that request's response arrives."""
    template, pending, writing = _kserve_request(spec), _Pending(), asyncio.Lock()
    async with _channel(spec) as channel:
        call = kserve_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(metadata=spec.credentials.metadata)

        async def read() -> None:
            try:
                async for response in call:
                    pending.answer(response.infer_response.id, "error_message" if response.error_message else None)
                pending.end("stream ended")
            except grpc.aio.AioRpcError as exc:
                pending.end(exc.code().name)

        reader = asyncio.create_task(read())

        async def send() -> str | None:
            if reader.done():  # nothing would answer
                return "stream ended"
            request = kserve_pb2.ModelInferRequest()
            request.CopyFrom(template)
            request.id, answered = pending.add()
            try:
                async with writing:  # one message at a time on a call (the open loop sends concurrently)
                    await call.write(request)
            except grpc.aio.AioRpcError as exc:
                pending.answer(request.id, exc.code().name)
            except asyncio.InvalidStateError:  # the call has ended (its reader says how)
                pending.answer(request.id, "stream ended")
            return await answered

        try:
            yield send
        finally:
            call.cancel()
            await asyncio.gather(reader, return_exceptions=True)


@asynccontextmanager
async def _rest_sender(spec: LoadSpec, http_connections: int):
    """As ``_grpc_sender``, over HTTP: Triton's binary tensor extension, as tritonclient.http sends it;
    through the proxy the environment names, as the client commands go (serve/client/http.py)."""
    body, headers = binary_infer_request("input", stand_in_images(spec.batch), parameters={"binary_data_output": True})
    headers.update(spec.credentials.headers)
    url = URL(f"{spec.http_url}/v2/models/{spec.model}/infer")
    proxy, proxy_headers = environment_proxy(url)
    connector = aiohttp.TCPConnector(limit=http_connections, ssl=spec.credentials.ssl_context() or True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def send() -> str | None:
            try:
                async with session.post(url, data=body, headers=headers, proxy=proxy,
                                        proxy_headers=proxy_headers) as response:
                    await response.read()
                    return None if response.status == 200 else f"HTTP {response.status}"
            except aiohttp.ClientError as exc:
                return type(exc).__name__

        yield send


def triton_client_module(api: str) -> ModuleType:
    """tritonclient's asyncio client for ``api`` (http.aio for rest, grpc.aio otherwise), or a
    one-line error that names the install."""
    try:
        return importlib.import_module("tritonclient.http.aio" if api == "rest" else "tritonclient.grpc.aio")
    except ImportError:
        raise ResserveError('--client tritonclient needs tritonclient: pip install "tritonclient[grpc,http]"') from None


def _triton_client(spec: LoadSpec, http_connections: int = 1):
    """A tritonclient asyncio client for ``spec``, and the input tensor it sends."""
    triton = triton_client_module(spec.api)
    credentials = spec.credentials
    if spec.api == "rest":
        scheme, _, address = spec.http_url.partition("://")  # tritonclient takes the scheme as ssl
        client = triton.InferenceServerClient(address, conn_limit=http_connections, ssl=scheme == "https",
                                              ssl_context=credentials.ssl_context())
    else:
        client = triton.InferenceServerClient(spec.target, creds=credentials.grpc(), channel_args=OWN_CONNECTION)
    images = stand_in_images(spec.batch)
    tensor = triton.InferInput("input", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    return client, tensor


@asynccontextmanager
async def _tritonclient_sender(spec: LoadSpec, http_connections: int = 1):
    """As ``_grpc_sender``/``_rest_sender``, with Triton's own asyncio clients (tritonclient.grpc.aio
    or tritonclient.http.aio), as a Triton user would load the server."""
    from tritonclient.utils import InferenceServerException

    client, tensor = _triton_client(spec, http_connections)

    async def send() -> str | None:
        try:
            await client.infer(spec.model, [tensor], headers=spec.credentials.headers)
        except InferenceServerException as exc:
            return str(exc.status() or "error")
        except aiohttp.ClientError as exc:  # tritonclient.http.aio lets its transport's errors through
            return type(exc).__name__
        return None

    try:
        yield send
    finally:
        await client.close()


@asynccontextmanager
async def _tritonclient_stream_sender(spec: LoadSpec):
    """As ``_grpc_stream_sender``, with tritonclient.grpc.aio's ``stream_infer``. It hands a failed
    request's error over without its id, so an error is paired with the oldest request waiting."""
    client, tensor = _triton_client(spec)
    pending, outgoing = _Pending(), asyncio.Queue()

    async def requests():
        while (request := await outgoing.get()) is not None:
            yield request

    async def read() -> None:
        try:
            async for result, error in client.stream_infer(requests(), headers=spec.credentials.headers):
                pending.answer(None if error else result.get_response().id, "error_message" if error else None)
            pending.end("stream ended")
        except Exception as exc:  # noqa: BLE001 - tritonclient raises its own and grpc's errors here
            pending.end(type(exc).__name__)

    reader = asyncio.create_task(read())

    async def send() -> str | None:
        if reader.done():  # nothing would answer
            return "stream ended"
        request_id, answered = pending.add()
        outgoing.put_nowait({"model_name": spec.model, "inputs": [tensor], "request_id": request_id})
        return await answered

    try:
        yield send
    finally:
        outgoing.put_nowait(None)
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await client.close()


def sender(spec: LoadSpec, http_connections: int = 1):
    """The context manager that opens one client of ``spec``'s client library and API: one
    connection, or over REST up to ``http_connections``, one per request in flight."""
    if spec.api == "rest":
        return (_tritonclient_sender(spec, http_connections) if spec.client == "tritonclient"
                else _rest_sender(spec, http_connections))
    if spec.api == "kserve-stream":
        return _tritonclient_stream_sender(spec) if spec.client == "tritonclient" else _grpc_stream_sender(spec)
    return _tritonclient_sender(spec) if spec.client == "tritonclient" else _grpc_sender(spec)

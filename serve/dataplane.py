"""The protocol-neutral data plane, between the front doors and the batchers.

A front door (the KServe v2 gRPC service, the DigitClassifier service, REST next) decodes its
wire format into the types below, calls ``DataPlane`` and encodes what it returns. Everything
that does not depend on the wire lives here once: finding the model, checking a request
against the model's contract (names, datatypes, shapes, ranges, requested outputs), image
preprocessing, batching, and the metadata the protocols report.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
import threading
import time
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import numpy as np

from resserve.serve.control import ModelControl
from resserve.serve.errors import DeadlineExpired, InvalidInput, ModelNotFound, QueueFull, ResserveError, TooManyImages
from resserve.serve.logs import LogSettings, SettingValue, current_log_settings
from resserve.serve.manifest import INPUT_SHAPE, TensorSpec
from resserve.serve.package import readable_packages
from resserve.serve.preprocess import MAX_REQUEST_PIXELS, encoded_to_input, pixels_of, raw_to_input
from resserve.serve.repository import ServedModel
from resserve.serve.sharedmemory import Placement, Region, check_client
from resserve.serve.state import ServerState
from resserve.serve.tracing import Headers, Trace, TraceSetting, TraceValue, tracer

SERVER_NAME = "resserve"
IMAGE_SHAPE = INPUT_SHAPE[1:]  # one image
INPUT_DTYPES = {"FP32": np.dtype("<f4"), "UINT8": np.dtype("u1")}

log = logging.getLogger("resserve.serve")


@dataclass(frozen=True)
class Tensor:
    """A named tensor: ``data`` is a numpy array of ``shape`` in the dtype of ``datatype``."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray


def _input_dtype(datatype: str) -> np.dtype:
    dtype = INPUT_DTYPES.get(datatype)
    if dtype is None:
        raise InvalidInput(f"input has datatype {datatype}; expected FP32 or UINT8")
    return dtype


def _element_count(shape: tuple[int, ...]) -> int:
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input has shape {list(shape)}; dimensions must be >= 0")
    return math.prod(shape)  # Python ints: no overflow; a scalar (shape []) holds one


def tensor_from_bytes(name: str, datatype: str, shape: tuple[int, ...], raw: bytes, source: str) -> Tensor:
    """An input sent as little-endian bytes (gRPC raw contents, REST binary data), its size checked."""
    dtype, values = _input_dtype(datatype), _element_count(shape)
    if len(raw) != values * dtype.itemsize:
        raise InvalidInput(f"{source} has {len(raw)} bytes; shape {list(shape)} of {datatype} "
                           f"needs {values * dtype.itemsize}")
    return Tensor(name, datatype, shape, np.frombuffer(raw, dtype=dtype))


def tensor_from_values(name: str, datatype: str, shape: tuple[int, ...], values, source: str) -> Tensor:
    """An input sent as numbers (gRPC typed contents, REST JSON ``data``, flat or nested), checked
    for count, type and, for UINT8, range before it is narrowed."""
    dtype, count = _input_dtype(datatype), _element_count(shape)
    try:  # the values' own type first: casting would turn true into 1 and a UINT8 1.5 into 1
        array = np.asarray(values).ravel()
    except (TypeError, ValueError, OverflowError):
        array = None
    kinds, what = ("iu", "integers") if datatype == "UINT8" else ("iuf", "numbers")
    if array is None or (array.size and array.dtype.kind not in kinds):
        raise InvalidInput(f"{source} must hold {datatype} {what} only, in a flat or nested list")
    if array.size != count:
        raise InvalidInput(f"{source} has {array.size} values; shape {list(shape)} needs {count}")
    if datatype == "UINT8" and count and (array.min() < 0 or array.max() > 255):
        raise InvalidInput("UINT8 values must be in [0, 255]")
    return Tensor(name, datatype, shape, array.astype(dtype))


def tensor_bytes(tensor: Tensor) -> bytes:
    """Triton's raw encoding (gRPC raw contents, REST binary data): little-endian numbers; BYTES
    elements as a 4-byte length, then the bytes."""
    if tensor.datatype == "BYTES":
        return b"".join(struct.pack("<I", len(item)) + item for item in tensor.data.ravel())
    return np.ascontiguousarray(tensor.data, dtype="<f4").tobytes()


@dataclass(frozen=True)
class SharedTensor:
    """An input a client left in shared memory (serve/sharedmemory.py): read once it is checked."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    place: Placement


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    classification: int = 0  # > 0: the top k classes as "score:index:label" strings (Triton's extension)
    place: Placement | None = None  # written to shared memory, not sent back


@dataclass(frozen=True)
class InferenceRequest:
    model_name: str  # "" for the server's default model
    model_version: str  # "" for the latest version
    inputs: tuple[Tensor | SharedTensor, ...]
    outputs: tuple[RequestedOutput, ...] = ()  # empty: all of the model's
    id: str = ""
    deadline: float | None = None  # time.monotonic() value
    # its IP address, where the transport says, asked only of a request that names shared memory
    # (which is for loopback's clients): not on every request's path
    client: Callable[[], str | None] = lambda: None
    headers: Headers = dict  # its headers (gRPC metadata), asked only where a trace may continue a caller's


def deadline_within(timeout_us: int | None, deadline: float | None = None) -> float | None:
    """The earlier of a transport's ``deadline`` and Triton's ``timeout`` request parameter
    (microseconds from now; none or 0: no timeout), as a time.monotonic() value."""
    if not timeout_us or timeout_us < 0:
        return deadline
    ends = time.monotonic() + timeout_us / 1e6
    return ends if deadline is None else min(deadline, ends)


@dataclass(frozen=True)
class InferenceResponse:
    model_name: str
    model_version: str
    outputs: tuple[Tensor, ...]
    id: str = ""


@dataclass(frozen=True)
class Image:
    """An image to classify: encoded (PNG, JPEG, ...) or 784 raw MNIST-style pixels."""

    data: bytes
    raw: bool = False
    name: str | None = None  # the file name an upload gave it: errors name the file too

    def label(self, index: int) -> str:
        """How errors name this image: by its place in the request, and its file name where known."""
        return f"image {index} ({self.name!r})" if self.name else f"image {index}"  # repr: one line, whatever it holds


@dataclass(frozen=True)
class Classification:
    model: ServedModel
    probabilities: np.ndarray  # float32 [N,10]
    inputs: np.ndarray  # float32 [N,1,28,28] in [0,1]: the images as the model saw them


@dataclass(frozen=True)
class RepositoryEntry:
    name: str
    version: str
    state: str  # READY | UNAVAILABLE, as Triton says it
    reason: str = ""


def validate_requested_outputs(requested: tuple[RequestedOutput, ...],
                               specs: tuple[TensorSpec, ...]) -> list[RequestedOutput]:
    """The outputs to answer with: each known and asked for once, checked before any work."""
    known = {spec.name: spec for spec in specs}
    seen = set()
    for output in requested:
        spec = known.get(output.name)
        if spec is None:
            raise InvalidInput(f"unknown output {output.name!r}; the model has {', '.join(known)}")
        if output.name in seen:
            raise InvalidInput(f"output {output.name!r} is requested more than once")
        if output.classification and output.place:
            raise InvalidInput(f"output {output.name!r} cannot be both classified and written to shared memory")
        if output.classification < 0 or (output.classification and (len(spec.shape) != 2 or spec.datatype != "FP32")):
            raise InvalidInput(f"output {output.name!r} cannot be classified: classification needs k >= 1 "
                               f"on an FP32 vector of class scores, got k={output.classification} on "
                               f"{spec.datatype} {list(spec.shape)}")
        seen.add(output.name)
    return list(requested) or [RequestedOutput(name) for name in known]


def top_classes(name: str, scores: np.ndarray, k: int, labels: tuple[str, ...]) -> Tensor:
    """Triton's classification extension: per row, the k best "score:index[:label]" strings, best first."""
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    rows = [[f"{row[i]:f}:{i}" + (f":{labels[i]}" if i < len(labels) else "") for i in best]
            for row, best in zip(scores, order)]
    return Tensor(name, "BYTES", (len(rows), k), np.array([[s.encode() for s in row] for row in rows], dtype=object))


def check_image_tensor(tensor: Tensor | SharedTensor, spec: TensorSpec, max_images: int) -> int:
    """That the request's image tensor is named, typed and shaped as the model's input; its image count."""
    if tensor.name != spec.name:
        raise InvalidInput(f"unknown input {tensor.name!r}; the model's input is {spec.name!r}")
    if tensor.datatype not in INPUT_DTYPES:
        raise InvalidInput(f"input has datatype {tensor.datatype}; expected FP32 or UINT8")
    if len(tensor.shape) != 4 or tensor.shape[1:] != IMAGE_SHAPE:
        raise InvalidInput(f"input has shape {list(tensor.shape)}; expected [N, 1, 28, 28]")
    count = tensor.shape[0]
    if count < 1:
        raise InvalidInput("empty batch: the input holds no image")
    if count > max_images:
        raise TooManyImages(max_images, count)
    return count


def model_input(tensor: Tensor, spec: TensorSpec, max_images: int, value_range: tuple[float, float]) -> np.ndarray:
    """The request's image tensor as the graph's float32 [N,1,28,28] in [0,1], or a precise InvalidInput.

    ``value_range`` is what the package's FP32 input takes (the manifest's preprocessing range):
    [0, 1], or [0, 255] for clients that send pixel values as floats (Triton's image clients).
    UINT8 inputs are pixel values in every package.
    """
    count = check_image_tensor(tensor, spec, max_images)
    array = tensor.data.reshape(count, *IMAGE_SHAPE)
    if tensor.datatype == "UINT8":
        return array.astype(np.float32) / 255.0
    low, high = value_range
    least, most = array.min(), array.max()  # two passes check all: NaN propagates, and fails both comparisons
    if not (low <= least and most <= high):
        if not (np.isfinite(least) and np.isfinite(most)):
            raise InvalidInput("input holds NaN or infinity")
        raise InvalidInput(f"input values must be in [{low:g}, {high:g}] (pixel intensities); "
                           f"got [{least:g}, {most:g}]")
    return array if (low, high) == (0.0, 1.0) else (array - np.float32(low)) / np.float32(high - low)


def _preprocess(images: list[Image], deadline: float | None, stop: threading.Event) -> np.ndarray:
    """All images of a request -> float32 [N,1,28,28]. Runs in the preprocessing pool.

    The request's pixel budget is checked from the images' headers before any is decoded; the
    client's deadline and cancellation (``stop``) are checked before each image, so abandoned
    work ends within one image.
    """
    pixels = 0
    for index, image in enumerate(images):
        if not image.raw:
            pixels += _for_image(image.label(index), pixels_of, image.data)
    if pixels > MAX_REQUEST_PIXELS:
        raise InvalidInput(f"the images hold {pixels:,} pixels in all; one request may hold {MAX_REQUEST_PIXELS:,}")
    batch = []
    for index, image in enumerate(images):
        if stop.is_set():
            break
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlineExpired(f"deadline exceeded while preprocessing {image.label(index)}; not computed")
        batch.append(_for_image(image.label(index), raw_to_input if image.raw else encoded_to_input, image.data))
    return np.stack(batch) if len(batch) == len(images) else np.empty((0, 1, 28, 28), np.float32)


def _for_image(label: str, work, data: bytes):
    try:
        return work(data)
    except InvalidInput as exc:
        raise type(exc)(f"{label}: {exc}") from None


@contextmanager
def traced(model: ServedModel, request_id: str = "", headers: Headers = dict) -> Iterator[Trace | None]:
    """A trace of one request to ``model``, if it is one to trace (serve/tracing.py), logged when
    it ends, with the error that ended it if one did."""
    trace = tracer.start(model.name, model.version, request_id, headers)
    if trace is None:
        yield None
        return
    error = ""
    try:
        yield trace
    except asyncio.CancelledError:
        error = "cancelled: the client went away, or its deadline passed"
        raise
    except BaseException as exc:
        error = str(exc) or type(exc).__name__
        raise
    finally:
        trace.end(error)


class DataPlane:
    """What the server can do, in terms no protocol owns."""

    def __init__(self, state: ServerState, preprocess_pool: Executor, control: ModelControl) -> None:
        self.state = state
        self.control = control
        self._pool = preprocess_pool  # sized to the usable CPUs
        self._preprocessing = 0  # classify requests waiting for, or in, the pool

    # health and metadata ----------------------------------------------------------------------

    def ready(self) -> bool:
        return self.state.ready

    def model_ready(self, name: str, version: str = "") -> bool:
        repository = self.state.repository
        if not self.state.ready or repository is None or name not in repository:
            return False
        return version in ("", *(m.version for m in repository.versions(name)))

    def model(self, name: str = "", version: str = "") -> ServedModel:
        """The model called ``name`` ('' for the default) at ``version`` ('' for the latest)."""
        return self.state.models().get(name, version)

    def models(self, name: str = "", version: str = "") -> list[ServedModel]:
        """What the statistics extension reports: every model ('' name), every version of one
        ('' version), or the one asked for."""
        return self.state.models().select(name, version)

    def versions(self, name: str = "") -> list[str]:
        """The versions served of the model called ``name`` ('' for the default), oldest first,
        as Triton lists them."""
        return [m.version for m in reversed(self.state.models().versions(name))]

    async def repository_index(self, ready_only: bool = False) -> list[RepositoryEntry]:
        """The models and their state: each version loaded, each model unloaded through the API, and
        each package found (a folder of packages read anew) whose version a load would bring in
        (or failed to: the reason names the error)."""
        repository = self.state.repository
        if repository is None:
            return []
        state, reason = ("READY", "") if self.state.ready else ("UNAVAILABLE", "the server is not ready (loading or draining)")
        if ready_only and state != "READY":
            return []
        loaded = [RepositoryEntry(m.name, m.version, state, reason) for m in repository.models]
        if ready_only:
            return loaded
        why = self.control.why_not_served
        unloaded = [RepositoryEntry(name, "", "UNAVAILABLE", why(name, unloaded=True)) for name in repository.unloaded]
        served = {(m.name, m.version) for m in repository.models}
        packages, _ = await asyncio.to_thread(readable_packages, self.state.settings.packages)
        found = [RepositoryEntry(p.name, p.version, "UNAVAILABLE", why(p.name, unloaded=False)) for p in packages
                 if (p.name, p.version) not in served and p.name not in repository.unloaded]
        return loaded + unloaded + found

    async def load_model(self, name: str, parameters: Mapping[str, object]) -> None:
        """Triton's RepositoryModelLoad: the model called ``name`` (re)loaded from the packages, and
        folders of them, given at start, in every worker (serve/control.py)."""
        if parameters:
            raise InvalidInput(f"resserve loads a model only from the packages, and folders of them, it was started "
                               f"with; load parameters ({', '.join(sorted(parameters))[:200]}) are not taken")
        try:
            await self.control.load(name)
        except ModelNotFound:
            raise  # a name no package holds: the client's to hear, as any unknown model
        except ResserveError as exc:  # a package that does not read or verify: the operator's to see
            log.error("model %s could not be loaded through the API: %s; the versions served until now stay "
                      "served", name, exc)
            raise

    async def unload_model(self, name: str, parameters: Mapping[str, object]) -> None:
        """Triton's RepositoryModelUnload: the model called ``name`` no longer served, in every worker.
        ``unload_dependents`` is taken and means nothing here: no model depends on another."""
        if set(parameters) - {"unload_dependents"}:
            raise InvalidInput(f"unload takes the parameter unload_dependents only, got "
                               f"{', '.join(sorted(parameters))[:200]}")
        await self.control.unload(name)

    def log_settings(self, changes: Mapping[str, SettingValue | None]) -> LogSettings:
        """Triton's logging extension: the log settings after ``changes`` (none: as they are), here
        and, under --workers, in every worker (the supervisor passes them on)."""
        current = current_log_settings()
        settings = current.updated(changes)
        if settings != current:
            settings.apply()
            self.state.peers.share_settings(settings)
            log.info("log settings changed through the API: %s", settings.as_triton())
        return settings

    def trace_settings(self, model: str, changes: Mapping[str, TraceValue | None]) -> TraceSetting:
        """Triton's trace extension: the trace settings of ``model`` ("": the server's) after
        ``changes`` (none: as they are), here and, under --workers, in every worker."""
        if model:
            self.model(model)  # one the server has: ModelNotFound otherwise
        if changes:
            settings = tracer.settings.updated(model, changes)
            settings.apply()
            self.state.peers.share_settings(settings)
            log.info("trace settings of %s set through the API: %s", f"model {model}" if model else "the server",
                     settings.of(model).as_triton())
        return tracer.current(model)

    # Triton's system shared memory extension (serve/sharedmemory.py) ------------------------------

    async def register_region(self, region: Region, client_host: str | None) -> None:
        """A region of a shared memory object, registered by a client on this host, in every worker
        (in turn with the changes made through other workers, so all make them in one order)."""
        memory = self.state.shared_memory
        memory.check_allowed()
        check_client(client_host)

        async def here() -> None:
            memory.register(region)

        await asyncio.shield(self.state.peers.register_region(region, here))  # a turn taken is handed back
        log.info("shared memory region %s registered: %d bytes from offset %d of %s", region.name[:128],
                 region.byte_size, region.offset, region.key)

    async def unregister_region(self, name: str) -> None:
        """The region called ``name`` ("": every region) no longer used, in every worker."""
        memory = self.state.shared_memory

        async def here() -> None:
            memory.unregister(name)

        await asyncio.shield(self.state.peers.unregister_region(name, here))
        log.info("%s unregistered", f"shared memory region {name[:128]}" if name else "every shared memory region")

    def region_status(self, name: str) -> list[Region]:
        """The region called ``name``, or every region ("": none while client shared memory is off)."""
        return self.state.shared_memory.status(name)

    def check_image_count(self, count: int) -> None:
        limit = self.state.settings.max_images_per_request
        if count == 0:
            raise InvalidInput("no images in the request")
        if count > limit:
            raise TooManyImages(limit, count)

    # inference --------------------------------------------------------------------------------

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        """Outputs asked for in shared memory are written there, and answered without their data."""
        model = self.model(request.model_name, request.model_version)
        with model.statistics.request(), traced(model, request.id, request.headers) as trace:
            manifest = model.package.manifest
            wanted = validate_requested_outputs(request.outputs, manifest.outputs)
            if len(request.inputs) != len(manifest.inputs):
                raise InvalidInput(f"expected {len(manifest.inputs)} input tensor named "
                                   f"{manifest.inputs[0].name!r}, got {len(request.inputs)}")
            self._check_shared_memory_use(request, wanted)
            tensor = self._in_memory(request.inputs[0], manifest.inputs[0])
            batch = model_input(tensor, manifest.inputs[0], self.state.settings.max_images_per_request,
                                manifest.preprocessing.range)
            self._check_output_room(wanted, manifest.outputs, len(batch))
            outputs = await model.batcher.submit(batch, request.deadline, trace)
            answers = tuple(
                top_classes(o.name, outputs[o.name], o.classification, manifest.labels) if o.classification
                else Tensor(o.name, "FP32", outputs[o.name].shape, outputs[o.name]) for o in wanted)
            self._write_to_shared_memory(wanted, answers)
        return InferenceResponse(model_name=model.name, model_version=model.version, id=request.id, outputs=answers)

    def _check_shared_memory_use(self, request: InferenceRequest, wanted: list[RequestedOutput]) -> None:
        """A request that names shared memory: on a server that allows it, from a client on its host."""
        if any(isinstance(t, SharedTensor) for t in request.inputs) or any(o.place for o in wanted):
            self.state.shared_memory.check_allowed()
            check_client(request.client())

    def _write_to_shared_memory(self, wanted: list[RequestedOutput], answers: tuple[Tensor, ...]) -> None:
        for output, answer in zip(wanted, answers):
            if output.place:
                self.state.shared_memory.write(output.place, tensor_bytes(answer))

    def _in_memory(self, tensor: Tensor | SharedTensor, spec: TensorSpec) -> Tensor:
        """An input from shared memory, read once its name, type and shape are checked (so at most
        a request's worth of bytes is read, whatever the region's size)."""
        if isinstance(tensor, Tensor):
            return tensor
        check_image_tensor(tensor, spec, self.state.settings.max_images_per_request)
        needed = _element_count(tensor.shape) * _input_dtype(tensor.datatype).itemsize
        if tensor.place.byte_size != needed:
            raise InvalidInput(f"input {tensor.name!r}: shared_memory_byte_size is {tensor.place.byte_size}; shape "
                               f"{list(tensor.shape)} of {tensor.datatype} needs {needed}")
        return tensor_from_bytes(tensor.name, tensor.datatype, tensor.shape,
                                 self.state.shared_memory.read(tensor.place),
                                 f"shared memory region {tensor.place.region[:128]!r}")

    def _check_output_room(self, wanted: list[RequestedOutput], specs: tuple[TensorSpec, ...], images: int) -> None:
        """Outputs asked for in shared memory fit where they are to go: checked before the work is done."""
        shapes = {spec.name: spec.shape for spec in specs}
        for output in wanted:
            if output.place is None:
                continue
            self.state.shared_memory.check(output.place)
            needed = images * math.prod(shapes[output.name][1:]) * INPUT_DTYPES["FP32"].itemsize
            if output.place.byte_size < needed:
                raise InvalidInput(f"output {output.name!r} needs {needed} bytes; shared_memory_byte_size gives "
                                   f"{output.place.byte_size}")

    async def classify(self, images: list[Image], model_name: str = "", model_version: str = "",
                       deadline: float | None = None, headers: Headers = dict) -> Classification:
        """Preprocess images the way MNIST was made, then run them as one batch."""
        model = self.model(model_name, model_version)
        with model.statistics.request(), traced(model, headers=headers) as trace:
            self.check_image_count(len(images))
            batch = await self._preprocess(images, deadline)
            outputs = await model.batcher.submit(batch, deadline, trace)
        return Classification(model, outputs["probabilities"], batch)

    async def _preprocess(self, images: list[Image], deadline: float | None) -> np.ndarray:
        """Preprocessing counts against the queue limit too: it is work the server has taken on."""
        limit = self.state.settings.batching.max_queue_size
        if self._preprocessing >= limit:
            raise QueueFull(f"preprocessing queue full ({limit} requests); retry later")
        self._preprocessing += 1
        stop = threading.Event()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, _preprocess, images, deadline, stop)
        except asyncio.CancelledError:  # the client went away or its deadline passed: stop at the next image
            stop.set()
            raise
        finally:
            self._preprocessing -= 1

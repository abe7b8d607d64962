"""KServe v2 REST (the Open Inference Protocol over HTTP), as Triton serves it on port 8000.

The HTTP codec of the data plane: JSON in, ``DataPlane`` call, JSON out, with Triton's binary
tensor data extension (what ``tritonclient.http`` sends with ``binary_data=True``): the body is
a JSON header of ``Inference-Header-Content-Length`` bytes followed by the inputs' bytes, each
input naming its size in ``parameters.binary_data_size``; outputs asked for with
``binary_data`` (or all of them, with the request's ``binary_data_output``) come back the same
way. Errors are ``{"error": "..."}`` (serve/rest/server.py).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Callable, TypeVar

import orjson
from aiohttp import hdrs, web
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from resserve.serve.dataplane import (SERVER_NAME, InferenceRequest, InferenceResponse, RequestedOutput,
                                      SharedTensor, Tensor, deadline_within, tensor_bytes, tensor_from_bytes,
                                      tensor_from_values)
from resserve.serve.errors import InvalidInput, describe_validation_error
from resserve.serve.kserve import served_extensions, served_model_config, unsupported
from resserve.serve.kserve import model_metadata as metadata_of
from resserve.serve.kserve import model_statistics as statistics_of
from resserve.serve.repository import ServedModel
from resserve.serve.rest.encoding import compressed_where_asked
from resserve.serve.rest.server import endpoint, json_response, plane_of, read_body
from resserve.serve.sharedmemory import Region, no_cuda_region, placement
from resserve.serve.stubs import grpc_service_pb2 as pb
from resserve.serve.tracing import Headers

HEADER_LENGTH = "Inference-Header-Content-Length"
INT64_TYPES = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
               FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}
routes = web.RouteTableDef()
M = TypeVar("M", bound=BaseModel)


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, strict=True)


class RestInput(_Message):
    name: str
    shape: list[Annotated[int, Field(ge=0)]]
    datatype: str
    parameters: dict[str, Any] = {}
    data: Any = None  # numbers, flat or nested; absent with binary_data_size


class RestOutput(_Message):
    name: str
    parameters: dict[str, Any] = {}


class RestRegionRequest(_Message):
    """A system shared memory region to register (Triton's shared memory extension)."""

    key: str
    offset: Annotated[int, Field(ge=0)] = 0
    byte_size: Annotated[int, Field(ge=0)]


class RestInferRequest(_Message):
    id: str = ""
    parameters: dict[str, Any] = {}
    inputs: list[RestInput]
    outputs: list[RestOutput] = []


def _parameter(parameters: dict[str, Any], key: str, kind: type, where: str):
    value = parameters.get(key)
    if value is not None and (type(value) is not kind):
        raise InvalidInput(f"{where}: parameter {key!r} must be {'an integer' if kind is int else 'a boolean'}, "
                           f"got {value!r}"[:200])
    return value


def _split(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """The JSON header and the binary data after it."""
    if header_length is None:
        return body, memoryview(b"")
    try:
        length = int(header_length)
    except ValueError:
        raise InvalidInput(f"{HEADER_LENGTH} must be an integer, got {header_length[:50]!r}") from None
    if not 0 <= length <= len(body):
        raise InvalidInput(f"{HEADER_LENGTH} is {length} but the body has {len(body)} bytes")
    view = memoryview(body)
    return bytes(view[:length]), view[length:]


def _json_length(body: bytes) -> int | None:
    """The length in bytes of the JSON document ``body`` starts with, where bytes follow it; else
    None. For the error of a client that sent binary tensor data without the header that says
    where the JSON ends: only on that error's path, as it parses the JSON again."""
    text = body.decode("latin-1")  # a character per byte: the binary data after the JSON need not be UTF-8
    try:
        _, end = json.JSONDecoder().raw_decode(text)
    except (ValueError, RecursionError):  # nested deeper than the stack: orjson refused it already
        return None
    return end if end < len(text) else None


def _parse(header: bytes, kind: type[M]) -> M:
    """A request's JSON as ``kind``, or one InvalidInput naming what is wrong."""
    try:
        return kind.model_validate(orjson.loads(header))
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the request is not valid JSON: {exc}") from None
    except ValidationError as exc:
        raise InvalidInput(f"the request's {describe_validation_error(exc)}") from None


def _inputs(request: RestInferRequest, binary: memoryview) -> tuple[Tensor | SharedTensor, ...]:
    tensors, offset = [], 0
    for tensor in request.inputs:
        where = f"input {tensor.name!r}"
        size = _parameter(tensor.parameters, "binary_data_size", int, where)
        shape = tuple(tensor.shape)
        if (place := placement(tensor.parameters, where)) is not None:
            if tensor.data is not None or size is not None:
                raise InvalidInput(f"{where} is in shared memory and has data too; send one")
            tensors.append(SharedTensor(tensor.name, tensor.datatype, shape, place))
            continue
        if size is None:
            if tensor.data is None:
                raise InvalidInput(f"{where} has neither data nor parameters.binary_data_size")
            tensors.append(tensor_from_values(tensor.name, tensor.datatype, shape, tensor.data, f"{where} data"))
            continue
        if size < 0:
            raise InvalidInput(f"{where}: binary_data_size must be >= 0, got {size}")
        if offset + size > len(binary):
            raise InvalidInput(f"{where}: binary_data_size {size} runs past the {len(binary)} bytes of binary data")
        tensors.append(tensor_from_bytes(tensor.name, tensor.datatype, shape, binary[offset:offset + size],
                                         f"{where} binary data"))
        offset += size
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data after the inputs' binary_data_size")
    return tuple(tensors)


def _requested(output: RestOutput) -> RequestedOutput:
    where = f"output {output.name!r}"
    place = placement(output.parameters, where)
    if place is not None and output.parameters.get("binary_data"):
        raise InvalidInput(f"{where} cannot be both binary data and in shared memory")
    return RequestedOutput(output.name, _parameter(output.parameters, "classification", int, where) or 0, place)


def decode_infer(body: bytes, header_length: str | None, name: str, version: str,
                 client: Callable[[], str | None], headers: Headers = dict) -> tuple[InferenceRequest, dict]:
    """The data plane's request from ``client()`` (its IP address), and for each output name whether
    it goes back as binary data (the key ``""`` for outputs not asked for by name), or None: it is
    written to shared memory."""
    header, binary = _split(body, header_length)
    try:
        request = _parse(header, RestInferRequest)
    except InvalidInput:
        length = None if header_length is not None else _json_length(body)
        if length is None:
            raise
        raise InvalidInput(f"{len(body) - length} bytes follow the request's JSON: binary tensor data needs the "
                           f"{HEADER_LENGTH} header, the JSON's length ({length} bytes here)") from None
    binary_default = bool(_parameter(request.parameters, "binary_data_output", bool, "request"))
    as_binary = {"": binary_default}
    for output in request.outputs:
        wanted = _parameter(output.parameters, "binary_data", bool, f"output {output.name!r}")
        as_binary[output.name] = binary_default if wanted is None else wanted
    outputs = tuple(_requested(o) for o in request.outputs)
    as_binary.update({o.name: None for o in outputs if o.place})
    decoded = InferenceRequest(name, version, _inputs(request, binary), outputs, request.id,
                               deadline_within(_parameter(request.parameters, "timeout", int, "request")), client,
                               headers)
    return decoded, as_binary


def encode_infer(answer: InferenceResponse, as_binary: dict) -> web.Response:
    outputs, blobs = [], []
    for tensor in answer.outputs:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        binary = as_binary.get(tensor.name, as_binary[""])
        if binary is None:
            pass  # written to shared memory: answered without data, as Triton does
        elif binary:
            blobs.append(tensor_bytes(tensor))
            entry["parameters"] = {"binary_data_size": len(blobs[-1])}
        elif tensor.datatype == "BYTES":
            entry["data"] = [item.decode() for item in tensor.data.ravel()]
        else:
            entry["data"] = tensor.data.ravel()
        outputs.append(entry)
    payload = {"model_name": answer.model_name, "model_version": answer.model_version, "outputs": outputs}
    if answer.id:
        payload["id"] = answer.id
    if not blobs:
        return json_response(payload)
    header = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    response = web.Response(body=b"".join([header, *blobs]), content_type="application/octet-stream")
    response.headers[HEADER_LENGTH] = str(len(header))
    return response


def _route_model(request: web.Request) -> tuple[str, str]:
    """The model name and version ('' for the latest) a /v2/models/{name}[/versions/{version}] route names."""
    return request.match_info["name"], request.match_info.get("version", "")


def _triton_json(message: Message, defaults: bool = False) -> dict:
    """A KServe/Triton message as Triton's REST answers it: protobuf's JSON with proto field names
    and 64-bit integers as numbers (protobuf's JSON mapping writes them as strings); ``defaults``:
    zero-valued fields too (statistics report their zeros)."""

    def numbers(message: Message, value: Any) -> Any:
        for field in message.DESCRIPTOR.fields:
            if field.name not in value:
                continue
            if field.type in INT64_TYPES:
                value[field.name] = [int(v) for v in value[field.name]] if _repeated(field) else int(value[field.name])
            elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
                items = getattr(message, field.name)
                for item, entry in zip(items, value[field.name]) if _repeated(field) else [(items, value[field.name])]:
                    numbers(item, entry)
        return value

    return numbers(message, MessageToDict(message, preserving_proto_field_name=True,
                                          always_print_fields_with_no_presence=defaults))


def _statistics(models: list[ServedModel]) -> web.Response:
    return json_response(_triton_json(pb.ModelStatisticsResponse(model_stats=[statistics_of(m) for m in models]),
                                      defaults=True))


def _repeated(field: FieldDescriptor) -> bool:
    return field.label == FieldDescriptor.LABEL_REPEATED


# health and metadata --------------------------------------------------------------------------


@routes.get("/v2/health/live")
async def live(request: web.Request) -> web.Response:
    return json_response({"live": True})


@routes.get("/v2/health/ready")
async def ready(request: web.Request) -> web.Response:
    is_ready = plane_of(request).ready()
    return json_response({"ready": is_ready}, 200 if is_ready else 503)


@routes.get("/v2")
async def server_metadata(request: web.Request) -> web.Response:
    from resserve.serve import __version__

    return json_response({"name": SERVER_NAME, "version": __version__,
                          "extensions": served_extensions(plane_of(request))})


@routes.get("/v2/models/stats")
@endpoint("kserve_statistics")
async def all_statistics(request: web.Request) -> web.Response:
    return _statistics(plane_of(request).models())


@routes.get("/v2/models/{name}")
@routes.get("/v2/models/{name}/versions/{version}")
@endpoint("kserve_metadata")
async def model_metadata(request: web.Request) -> web.Response:
    return json_response(_triton_json(metadata_of(plane_of(request), *_route_model(request))))


@routes.get("/v2/models/{name}/ready")
@routes.get("/v2/models/{name}/versions/{version}/ready")
async def model_ready(request: web.Request) -> web.Response:
    is_ready = plane_of(request).model_ready(*_route_model(request))
    return json_response({"name": request.match_info["name"][:128], "ready": is_ready}, 200 if is_ready else 503)


@routes.get("/v2/models/{name}/config")
@routes.get("/v2/models/{name}/versions/{version}/config")
@endpoint("kserve_config")
async def model_config(request: web.Request) -> web.Response:
    return json_response(_triton_json(served_model_config(plane_of(request), *_route_model(request))))


@routes.get("/v2/models/{name}/stats")
@routes.get("/v2/models/{name}/versions/{version}/stats")
@endpoint("kserve_statistics")
async def model_statistics(request: web.Request) -> web.Response:
    return _statistics(plane_of(request).models(*_route_model(request)))


# system shared memory (Triton's extension; serve/sharedmemory.py) --------------------------------


@routes.get("/v2/systemsharedmemory/status")
@routes.get("/v2/systemsharedmemory/region/{region}/status")
@endpoint("kserve_shared_memory")
async def region_status(request: web.Request) -> web.Response:
    regions = plane_of(request).region_status(request.match_info.get("region", ""))
    return json_response([{"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size}
                          for r in regions])


@routes.post("/v2/systemsharedmemory/region/{region}/register")
@endpoint("kserve_shared_memory")
async def register_region(request: web.Request) -> web.Response:
    body = _parse(await read_body(request), RestRegionRequest)
    region = Region(request.match_info["region"], body.key, body.offset, body.byte_size)
    await plane_of(request).register_region(region, request.remote)
    return json_response({})


@routes.post("/v2/systemsharedmemory/unregister")
@routes.post("/v2/systemsharedmemory/region/{region}/unregister")
@endpoint("kserve_shared_memory")
async def unregister_region(request: web.Request) -> web.Response:
    await plane_of(request).unregister_region(request.match_info.get("region", ""))
    return json_response({})


@routes.get("/v2/cudasharedmemory/status")
@routes.get("/v2/cudasharedmemory/region/{region}/status")
@endpoint("kserve_shared_memory")
async def cuda_region_status(request: web.Request) -> web.Response:
    return json_response(no_cuda_region(request.match_info.get("region", "")))


@routes.post("/v2/cudasharedmemory/unregister")
@routes.post("/v2/cudasharedmemory/region/{region}/unregister")
@endpoint("kserve_shared_memory")
async def unregister_cuda_region(request: web.Request) -> web.Response:
    return json_response({})


# Triton's HTTP extensions left out: what is supported, rather than "no such endpoint" (perf_analyzer
# --shared-memory cuda asks for the first), as over gRPC
LEFT_OUT = {"cudasharedmemory": "CUDA shared memory", "generate": "generate", "generate_stream": "generate"}


@routes.route("*", "/v2/{extension:cudasharedmemory}{rest:(/.*)?}")
@routes.route("*", "/v2/models/{name}{version:(/versions/[^/]+)?}/{extension:generate|generate_stream}{rest:(/.*)?}")
@endpoint("kserve_left_out")
async def left_out(request: web.Request) -> web.Response:
    raise unsupported(f"Triton's {LEFT_OUT[request.match_info['extension']]} extension")


@routes.post("/v2/repository/index")
@endpoint("kserve_repository")
async def repository_index(request: web.Request) -> web.Response:
    payload = _json_object(await read_body(request), 'empty or a JSON object such as {"ready": true}',
                           may_be_empty=True, valid=lambda payload: isinstance(payload.get("ready", False), bool))
    return json_response([{"name": e.name, "version": e.version, "state": e.state, "reason": e.reason}
                          for e in await plane_of(request).repository_index(payload.get("ready", False))])


@routes.post("/v2/repository/models/{name}/load")
@endpoint("kserve_repository")
async def load_model(request: web.Request) -> web.Response:
    await plane_of(request).load_model(request.match_info["name"], await _control_parameters(request))
    return json_response({})


@routes.post("/v2/repository/models/{name}/unload")
@endpoint("kserve_repository")
async def unload_model(request: web.Request) -> web.Response:
    await plane_of(request).unload_model(request.match_info["name"], await _control_parameters(request))
    return json_response({})


async def _control_parameters(request: web.Request) -> dict:
    """A load or unload request's ``parameters``: its body is empty, or {"parameters": {...}}."""
    payload = _json_object(await read_body(request), 'empty or a JSON object such as {"parameters": {}}',
                           may_be_empty=True, valid=lambda payload: isinstance(payload.get("parameters", {}), dict))
    return payload.get("parameters", {})


@routes.get("/v2/logging")
@endpoint("kserve_logging")
async def log_settings(request: web.Request) -> web.Response:
    return json_response(plane_of(request).log_settings({}).as_triton())


@routes.post("/v2/logging")
@endpoint("kserve_logging")
async def update_log_settings(request: web.Request) -> web.Response:
    changes = _json_object(await read_body(request), 'a JSON object of log settings, such as {"log_verbose_level": 1}')
    return json_response(plane_of(request).log_settings(changes).as_triton())


@routes.get("/v2/trace/setting")
@routes.get("/v2/models/{name}/trace/setting")
@endpoint("kserve_trace")
async def trace_settings(request: web.Request) -> web.Response:
    return json_response(plane_of(request).trace_settings(request.match_info.get("name", ""), {}).as_triton())


@routes.post("/v2/trace/setting")
@routes.post("/v2/models/{name}/trace/setting")
@endpoint("kserve_trace")
async def update_trace_settings(request: web.Request) -> web.Response:
    changes = _json_object(await read_body(request), 'a JSON object of trace settings, such as {"trace_rate": "1"}')
    return json_response(plane_of(request).trace_settings(request.match_info.get("name", ""), changes).as_triton())


def _json_object(body: bytes, what: str, may_be_empty: bool = False,
                 valid: Callable[[dict], bool] = lambda payload: True) -> dict:
    """The body of a request that sends a JSON object (``{}`` for an empty one, where it may be
    empty), or one InvalidInput saying it must be ``what``: not an object, or not ``valid``."""
    try:
        payload = orjson.loads(body) if body.strip() or not may_be_empty else {}
    except orjson.JSONDecodeError:
        payload = None
    if not isinstance(payload, dict) or not valid(payload):
        raise InvalidInput(f"the request must be {what}")
    return payload


# inference ------------------------------------------------------------------------------------


@routes.post("/v2/models/{name}/infer")
@routes.post("/v2/models/{name}/versions/{version}/infer")
@endpoint("kserve")
async def infer(request: web.Request) -> web.Response:
    body = await read_body(request)
    decoded, as_binary = decode_infer(body, request.headers.get(HEADER_LENGTH), *_route_model(request),
                                      lambda: request.remote, lambda: request.headers)
    answer = encode_infer(await plane_of(request).infer(decoded), as_binary)
    return compressed_where_asked(answer, request.headers.get(hdrs.ACCEPT_ENCODING))

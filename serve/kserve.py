"""``inference.GRPCInferenceService``: the KServe v2 / Open Inference Protocol, as Triton speaks it.

This module is the gRPC codec only: protobuf in, ``DataPlane`` call, protobuf out. tritonclient
sends input tensors as bytes in ``raw_input_contents`` and decodes outputs only from
``raw_output_contents`` (in the order of ``outputs``): raw or typed inputs are accepted here
(never both, as Triton); outputs are always raw.
"""

from __future__ import annotations

from typing import Callable

from resserve.serve.batcher import BatchingConfig
from resserve.serve.dataplane import (SERVER_NAME, DataPlane, InferenceRequest, RequestedOutput, SharedTensor, Tensor,
                                     deadline_within, tensor_bytes, tensor_from_bytes, tensor_from_values)
from resserve.serve.errors import InvalidInput, Unsupported
from resserve.serve.logs import LogSettings, SettingValue
from resserve.serve.manifest import Manifest, TensorSpec
from resserve.serve.repository import ServedModel
from resserve.serve.rpc import deadline_of, metadata_of, peer_host, rpc
from resserve.serve.sharedmemory import Region, no_cuda_region, placement
from resserve.serve.statistics import Compute, Duration, ModelStatistics
from resserve.serve.stream import InferStream
from resserve.serve.stubs import grpc_service_pb2 as pb
from resserve.serve.stubs import grpc_service_pb2_grpc as pb_grpc
from resserve.serve.stubs import model_config_pb2 as config_pb
from resserve.serve.tracing import Headers, TraceSetting

# Exactly what is served (binary_tensor_data: on HTTP, serve/rest/kserve.py; model_repository: the
# index, and loading and unloading the models of the packages given at start, serve/control.py), and
# system_shared_memory where the server allows it (served_extensions)
EXTENSIONS = ["binary_tensor_data", "classification", "logging", "model_configuration", "model_repository",
              "statistics", "trace"]
TYPED_FIELDS = {"FP32": "fp32_contents", "UINT8": "uint_contents"}
LABELS_FILE = "labels.txt"  # as in a Triton repository (train/triton.py writes it); the labels are the manifest's


def served_extensions(plane: DataPlane) -> list[str]:
    """What the server metadata lists (both protocols)."""
    allowed = plane.state.shared_memory.allowed
    return sorted([*EXTENSIONS, *(["system_shared_memory"] if allowed else [])])


def _parameters(parameters) -> dict[str, object]:
    """A protobuf map of InferParameter as Python values."""
    return {name: getattr(value, kind) if (kind := value.WhichOneof("parameter_choice")) else None
            for name, value in parameters.items()}


def _tensor(tensor, raw: bytes | None) -> Tensor | SharedTensor:
    """An input from shared memory, from its raw bytes or from typed contents (one of them, as Triton requires)."""
    shape = tuple(tensor.shape)
    place = placement(_parameters(tensor.parameters), f"input {tensor.name!r}")
    if place is not None:
        if tensor.HasField("contents"):
            raise InvalidInput(f"input {tensor.name!r} is in shared memory and has typed contents; send one")
        return SharedTensor(tensor.name, tensor.datatype, shape, place)
    if raw is None:
        field = TYPED_FIELDS.get(tensor.datatype, "fp32_contents")
        misplaced = [f.name for f, _ in tensor.contents.ListFields() if f.name != field]
        if tensor.datatype in TYPED_FIELDS and misplaced:
            raise InvalidInput(f"input {tensor.name!r} is {tensor.datatype}: its values go in contents.{field}, "
                               f"not contents.{misplaced[0]}")
        return tensor_from_values(tensor.name, tensor.datatype, shape, getattr(tensor.contents, field),
                                  f"contents.{field}")
    if tensor.HasField("contents"):
        raise InvalidInput(f"input {tensor.name!r} has both raw_input_contents and typed contents; send one")
    return tensor_from_bytes(tensor.name, tensor.datatype, shape, raw, "raw_input_contents")


def decode_request(request: pb.ModelInferRequest, deadline: float | None,
                   client: Callable[[], str | None], headers: Headers = dict) -> InferenceRequest:
    """``deadline``: the call's; Triton's ``timeout`` parameter (tritonclient's ``timeout=``) may end it
    sooner. ``raw_input_contents`` holds the bytes of each input not in shared memory, in order.
    ``client()``: the client's IP address; ``headers()``: the call's metadata."""
    shared = ["shared_memory_region" in t.parameters for t in request.inputs]
    raw = request.raw_input_contents
    if raw and len(raw) != shared.count(False):
        expected = shared.count(False)
        raise InvalidInput(f"{len(raw)} raw_input_contents for {expected} {'input' if expected == 1 else 'inputs'}: "
                           "send one for each input, in order (none for an input in shared memory)")
    raws = iter(raw)
    inputs = tuple(_tensor(t, None if in_shared_memory or not raw else next(raws))
                   for t, in_shared_memory in zip(request.inputs, shared))
    return InferenceRequest(request.model_name, request.model_version, inputs,
                            tuple(_requested(o) for o in request.outputs), request.id,
                            deadline_within(_timeout_us(request), deadline), client, headers)


def _timeout_us(request: pb.ModelInferRequest) -> int | None:
    timeout = request.parameters.get("timeout")
    if timeout is None:
        return None
    kind = timeout.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        raise InvalidInput("the timeout parameter must be an integer (microseconds)")
    return getattr(timeout, kind)


def _requested(output) -> RequestedOutput:
    parameters = _parameters(output.parameters)
    classification = parameters.get("classification", 0)
    if type(classification) is not int:
        raise InvalidInput(f"output {output.name!r}: the classification parameter must be an int64")
    return RequestedOutput(output.name, classification, placement(parameters, f"output {output.name!r}"))


def _duration(duration: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=duration.count, ns=duration.ns)


def _compute(compute: Compute) -> dict[str, pb.StatisticDuration]:
    return {"compute_input": _duration(compute.input), "compute_infer": _duration(compute.infer),
            "compute_output": _duration(compute.output)}


def model_statistics(model: ServedModel) -> pb.ModelStatistics:
    """A model's statistics as Triton's statistics extension reports them (both protocols)."""
    stats: ModelStatistics = model.statistics
    return pb.ModelStatistics(
        name=model.name, version=model.version, last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count, execution_count=stats.execution_count,
        inference_stats=pb.InferStatistics(success=_duration(stats.success), fail=_duration(stats.fail),
                                           queue=_duration(stats.queue), **_compute(stats.compute)),
        batch_stats=[pb.InferBatchStatistics(batch_size=size, **_compute(compute))
                     for size, compute in sorted(stats.batches.items())])


def _tensor_metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype, shape=spec.shape)


def model_metadata(plane: DataPlane, name: str, version: str) -> pb.ModelMetadataResponse:
    """A model version's KServe v2 metadata (both protocols), listing every version of it served."""
    model = plane.model(name, version)
    manifest = model.package.manifest
    return pb.ModelMetadataResponse(
        name=model.name, versions=plane.versions(name), platform=model.platform,
        inputs=[_tensor_metadata(spec) for spec in manifest.inputs],
        outputs=[_tensor_metadata(spec) for spec in manifest.outputs])


def triton_model_config(manifest: Manifest, platform: str, batching: BatchingConfig) -> config_pb.ModelConfig:
    """The model as Triton describes it: what ModelConfig answers and what a Triton repository holds."""
    return config_pb.ModelConfig(
        name=manifest.name, platform=platform, max_batch_size=batching.max_batch_size,
        input=[_input_config(spec) for spec in manifest.inputs],
        output=[_output_config(spec, manifest.labels) for spec in manifest.outputs],
        dynamic_batching=config_pb.ModelDynamicBatching(max_queue_delay_microseconds=batching.max_queue_delay_us))


def served_model_config(plane: DataPlane, name: str, version: str) -> config_pb.ModelConfig:
    """A served model version's Triton config (both protocols), with what it is (its architecture
    and trained parameter count, from the manifest) and how it runs (backend, precision, device) as
    parameters; beside other versions of it, the version policy names them all."""
    model, versions = plane.model(name, version), plane.versions(name)
    manifest = model.package.manifest
    config = triton_model_config(manifest, model.platform, model.batcher.config)
    for key, value in (("arch", manifest.model.arch), ("params", str(manifest.model.params)),
                       ("backend", model.backend.name), ("precision", model.backend.precision),
                       ("device", model.backend.device)):
        config.parameters[key].string_value = value
    if len(versions) > 1:  # whole numbers: read_packages checks it
        config.version_policy.specific.versions.extend(int(v) for v in versions)
    return config


def _input_config(spec: TensorSpec) -> config_pb.ModelInput:
    image = len(spec.shape) == 4  # [N, C, H, W]: an image model, as Triton's image clients expect it
    return config_pb.ModelInput(name=spec.name, data_type=config_pb.DataType.Value(f"TYPE_{spec.datatype}"),
                                dims=spec.shape[1:], format=config_pb.ModelInput.FORMAT_NCHW if image else 0)


def _output_config(spec: TensorSpec, labels: tuple[str, ...]) -> config_pb.ModelOutput:
    classes = len(spec.shape) == 2 and spec.shape[1] == len(labels)
    return config_pb.ModelOutput(name=spec.name, data_type=config_pb.DataType.Value(f"TYPE_{spec.datatype}"),
                                 dims=spec.shape[1:], label_filename=LABELS_FILE if classes else "")


def log_setting_changes(request: pb.LogSettingsRequest) -> dict[str, SettingValue | None]:
    """A LogSettings request's settings by name (None: one sent without a value)."""
    return _parameters(request.settings)


def log_settings_response(settings: LogSettings) -> pb.LogSettingsResponse:
    response = pb.LogSettingsResponse()
    for name, value in settings.as_triton().items():
        setting = response.settings[name]
        if isinstance(value, bool):
            setting.bool_param = value
        elif isinstance(value, int):
            setting.uint32_param = value
        else:
            setting.string_param = value
    return response


def trace_setting_changes(request: pb.TraceSettingRequest) -> dict[str, list[str] | None]:
    """A TraceSetting request's settings by name (None: one sent without a value, to clear it)."""
    return {name: list(setting.value) or None for name, setting in request.settings.items()}


def trace_settings_response(setting: TraceSetting) -> pb.TraceSettingResponse:
    response = pb.TraceSettingResponse()
    for name, value in setting.as_triton().items():
        response.settings[name].value.extend(value if isinstance(value, list) else [value])
    return response


def _one_repository(name: str) -> None:
    if name:
        raise InvalidInput(f"resserve has one model repository, the packages (and folders of them) it was started "
                           f"with; repository_name must be empty, got {name[:128]!r}")


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.plane.ready())

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.plane.model_ready(request.name, request.version))

    async def ServerMetadata(self, request, context):
        from resserve.serve import __version__

        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__,
                                         extensions=served_extensions(self.plane))

    @rpc("kserve_metadata", model_of=lambda r: r.name)
    async def ModelMetadata(self, request, context):
        return model_metadata(self.plane, request.name, request.version)

    @rpc("kserve_config", model_of=lambda r: r.name)
    async def ModelConfig(self, request, context):
        return pb.ModelConfigResponse(config=served_model_config(self.plane, request.name, request.version))

    @rpc("kserve_statistics", model_of=lambda r: r.name)
    async def ModelStatistics(self, request, context):
        return pb.ModelStatisticsResponse(model_stats=[
            model_statistics(m) for m in self.plane.models(request.name, request.version)])

    @rpc("kserve_repository", model_of=lambda r: "")
    async def RepositoryIndex(self, request, context):
        return pb.RepositoryIndexResponse(models=[
            pb.RepositoryIndexResponse.ModelIndex(name=e.name, version=e.version, state=e.state, reason=e.reason)
            for e in await self.plane.repository_index(request.ready)])

    @rpc("kserve_repository", model_of=lambda r: r.model_name)
    async def RepositoryModelLoad(self, request, context):
        _one_repository(request.repository_name)
        await self.plane.load_model(request.model_name, dict(request.parameters))
        return pb.RepositoryModelLoadResponse()

    @rpc("kserve_repository", model_of=lambda r: r.model_name)
    async def RepositoryModelUnload(self, request, context):
        _one_repository(request.repository_name)
        await self.plane.unload_model(request.model_name, dict(request.parameters))
        return pb.RepositoryModelUnloadResponse()

    @rpc("kserve_logging", model_of=lambda r: "")
    async def LogSettings(self, request, context):
        return log_settings_response(self.plane.log_settings(log_setting_changes(request)))

    @rpc("kserve_trace", model_of=lambda r: r.model_name)
    async def TraceSetting(self, request, context):
        return trace_settings_response(self.plane.trace_settings(request.model_name, trace_setting_changes(request)))

    @rpc("kserve_shared_memory", model_of=lambda r: "")
    async def SystemSharedMemoryStatus(self, request, context):
        status = pb.SystemSharedMemoryStatusResponse
        return status(regions={r.name: status.RegionStatus(name=r.name, key=r.key, offset=r.offset,
                                                            byte_size=r.byte_size)
                               for r in self.plane.region_status(request.name)})

    @rpc("kserve_shared_memory", model_of=lambda r: "")
    async def SystemSharedMemoryRegister(self, request, context):
        region = Region(request.name, request.key, request.offset, request.byte_size)
        await self.plane.register_region(region, peer_host(context.peer()))
        return pb.SystemSharedMemoryRegisterResponse()

    @rpc("kserve_shared_memory", model_of=lambda r: "")
    async def SystemSharedMemoryUnregister(self, request, context):
        await self.plane.unregister_region(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    @rpc("kserve_shared_memory", model_of=lambda r: "")
    async def CudaSharedMemoryStatus(self, request, context):
        no_cuda_region(request.name)  # none is ever registered
        return pb.CudaSharedMemoryStatusResponse()

    @rpc("kserve_shared_memory", model_of=lambda r: "")
    async def CudaSharedMemoryUnregister(self, request, context):
        return pb.CudaSharedMemoryUnregisterResponse()

    @rpc("kserve", model_of=lambda r: r.model_name)
    async def ModelInfer(self, request, context):
        return await self._infer(request, deadline_of(context), lambda: peer_host(context.peer()),
                                 metadata_of(context))

    async def ModelStreamInfer(self, request_iterator, context):
        """Many requests on one call, each answered on it (serve/stream.py); the call's deadline
        and metadata are every request's."""
        deadline, client, headers = deadline_of(context), lambda: peer_host(context.peer()), metadata_of(context)
        await InferStream(self.plane.state, context,
                          lambda request: self._infer(request, deadline, client, headers)).run()

    async def _infer(self, request: pb.ModelInferRequest, deadline: float | None,
                     client: Callable[[], str | None], headers: Headers) -> pb.ModelInferResponse:
        decoded = decode_request(request, deadline, client, headers)
        answer = await self.plane.infer(decoded)
        response = pb.ModelInferResponse(model_name=answer.model_name, model_version=answer.model_version,
                                         id=answer.id)
        in_shared_memory = {o.name for o in decoded.outputs if o.place}
        for tensor in answer.outputs:
            response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=list(tensor.shape))
            # as Triton: an output written to shared memory has empty contents, so each output keeps its index
            response.raw_output_contents.append(b"" if tensor.name in in_shared_memory else tensor_bytes(tensor))
        return response


def unsupported(what: str) -> Unsupported:
    """The refusal of a part of the protocol left out, over gRPC and HTTP alike."""
    return Unsupported(f"{what} is not supported by resserve (supported extensions: {', '.join(EXTENSIONS)})")


def _unsupported(name: str):
    @rpc("kserve_left_out", model_of=lambda r: "")
    async def answer(self, request, context):
        raise unsupported(name)

    answer.__name__ = name
    return answer


# Every other RPC of the protocol answers UNIMPLEMENTED with a reason, not the generated base
# class's NotImplementedError (which grpc logs as a traceback on every call).
for _name in dir(pb_grpc.GRPCInferenceServiceServicer):
    if not _name.startswith("_") and _name not in vars(InferenceServicer):
        setattr(InferenceServicer, _name, _unsupported(_name))

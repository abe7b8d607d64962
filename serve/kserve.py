"""``inference.GRPCInferenceService``: the KServe v2 / Open Inference Protocol, as Triton speaks it.

This module is the gRPC codec only: protobuf in, ``DataPlane`` call, protobuf out. tritonclient
sends input tensors as bytes in ``raw_input_contents`` and decodes outputs only from
``raw_output_contents`` (in the order of ``outputs``): raw or typed inputs are accepted here
(never both, as Triton); outputs are always raw.
"""

from __future__ import annotations

import math

import grpc
import numpy as np

from resserve.serve.dataplane import INPUT_DTYPES, SERVER_NAME, DataPlane, InferenceRequest, Tensor
from resserve.serve.errors import InvalidInput
from resserve.serve.manifest import TensorSpec
from resserve.serve.rpc import deadline_of, rpc
from resserve.serve.stubs import grpc_service_pb2 as pb
from resserve.serve.stubs import grpc_service_pb2_grpc as pb_grpc
from resserve.serve.stubs import model_config_pb2 as config_pb

EXTENSIONS = ["model_configuration"]
TYPED_FIELDS = {"FP32": "fp32_contents", "UINT8": "uint_contents"}


def _tensor_data(request: pb.ModelInferRequest, index: int, tensor) -> np.ndarray:
    """The flat values of input ``index``, from raw bytes or typed contents, checked before any cast."""
    dtype = INPUT_DTYPES.get(tensor.datatype)
    if dtype is None:
        raise InvalidInput(f"input has datatype {tensor.datatype}; expected FP32 or UINT8")
    values = math.prod(tensor.shape) if len(tensor.shape) else 0  # Python ints: no overflow
    typed = getattr(tensor.contents, TYPED_FIELDS[tensor.datatype])
    if request.raw_input_contents:
        if tensor.HasField("contents"):
            raise InvalidInput(f"input {tensor.name!r} has both raw_input_contents and typed contents; send one")
        if len(request.raw_input_contents) != len(request.inputs):
            raise InvalidInput(f"{len(request.raw_input_contents)} raw_input_contents for {len(request.inputs)} input")
        raw = request.raw_input_contents[index]
        if len(raw) != values * dtype.itemsize:
            raise InvalidInput(f"raw_input_contents has {len(raw)} bytes; shape {list(tensor.shape)} "
                               f"of {tensor.datatype} needs {values * dtype.itemsize}")
        return np.frombuffer(raw, dtype=dtype)
    if len(typed) != values:
        raise InvalidInput(f"contents.{TYPED_FIELDS[tensor.datatype]} has {len(typed)} values; "
                           f"shape {list(tensor.shape)} needs {values}")
    if tensor.datatype == "UINT8":  # typed UINT8 values travel as uint32: check before narrowing
        wide = np.asarray(typed, dtype=np.uint32)
        if values and wide.max() > 255:
            raise InvalidInput("UINT8 values must be in [0, 255]")
        return wide.astype(np.uint8)
    return np.asarray(typed, dtype=dtype)


def decode_request(request: pb.ModelInferRequest, deadline: float | None) -> InferenceRequest:
    inputs = []
    for index, tensor in enumerate(request.inputs):
        if any(d < 0 for d in tensor.shape):
            raise InvalidInput(f"input has shape {list(tensor.shape)}; dimensions must be >= 0")
        inputs.append(Tensor(tensor.name, tensor.datatype, tuple(tensor.shape), _tensor_data(request, index, tensor)))
    return InferenceRequest(request.model_name, request.model_version, tuple(inputs),
                            tuple(o.name for o in request.outputs), request.id, deadline)


def _tensor_metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype, shape=spec.shape)


def _tensor_config(spec: TensorSpec, kind):
    return kind(name=spec.name, data_type=config_pb.DataType.Value(f"TYPE_{spec.datatype}"), dims=spec.shape[1:])


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

        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)

    @rpc("kserve", model_of=lambda r: r.name)
    async def ModelMetadata(self, request, context):
        model = self.plane.model(request.name, request.version)
        manifest = model.package.manifest
        return pb.ModelMetadataResponse(
            name=model.name, versions=[model.version], platform=model.platform,
            inputs=[_tensor_metadata(spec) for spec in manifest.inputs],
            outputs=[_tensor_metadata(spec) for spec in manifest.outputs])

    @rpc("kserve", model_of=lambda r: r.name)
    async def ModelConfig(self, request, context):
        model = self.plane.model(request.name, request.version)
        manifest, batching = model.package.manifest, model.batcher.config
        return pb.ModelConfigResponse(config=config_pb.ModelConfig(
            name=model.name, platform=model.platform, max_batch_size=batching.max_batch_size,
            input=[_tensor_config(spec, config_pb.ModelInput) for spec in manifest.inputs],
            output=[_tensor_config(spec, config_pb.ModelOutput) for spec in manifest.outputs],
            dynamic_batching=config_pb.ModelDynamicBatching(
                max_queue_delay_microseconds=batching.max_queue_delay_us),
            parameters={key: config_pb.ModelParameter(string_value=value) for key, value in (
                ("backend", model.backend.name), ("precision", model.backend.precision),
                ("device", model.backend.device))}))

    @rpc("kserve", model_of=lambda r: r.model_name)
    async def ModelInfer(self, request, context):
        answer = await self.plane.infer(decode_request(request, deadline_of(context)))
        response = pb.ModelInferResponse(model_name=answer.model_name, model_version=answer.model_version,
                                         id=answer.id)
        for tensor in answer.outputs:
            response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=list(tensor.shape))
            response.raw_output_contents.append(np.ascontiguousarray(tensor.data, dtype="<f4").tobytes())
        return response


def _unsupported(name: str):
    async def answer(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            f"{name} is not supported by resserve (models are fixed at start; supported "
                            f"extensions: {', '.join(EXTENSIONS)})")

    answer.__name__ = name
    return answer


# Every other RPC of the protocol answers UNIMPLEMENTED with a reason, not the generated base
# class's NotImplementedError (which grpc logs as a traceback on every call).
for _name in dir(pb_grpc.GRPCInferenceServiceServicer):
    if not _name.startswith("_") and _name not in vars(InferenceServicer):
        setattr(InferenceServicer, _name, _unsupported(_name))

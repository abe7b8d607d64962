"""``inference.GRPCInferenceService``: the KServe v2 / Open Inference Protocol, as Triton speaks it.

tritonclient sends input tensors as bytes in ``raw_input_contents`` and decodes outputs only
from ``raw_output_contents`` (in the order of ``outputs``): both raw and typed inputs are
accepted here; outputs are always raw. Inputs: FP32 [N,1,28,28] in [0,1], or UINT8 [N,1,28,28].
"""

from __future__ import annotations

import numpy as np

from resserve.serve.errors import InvalidInput
from resserve.serve.rpc import ServerState, deadline_of, rpc
from resserve.serve.stubs import grpc_service_pb2 as pb
from resserve.serve.stubs import grpc_service_pb2_grpc as pb_grpc
from resserve.serve.stubs import model_config_pb2 as config_pb

SERVER_NAME = "resserve"
EXTENSIONS = ["model_configuration"]
IMAGE_SHAPE = (1, 28, 28)
DTYPES = {"FP32": (np.dtype("<f4"), "fp32_contents"), "UINT8": (np.dtype("u1"), "uint_contents")}


def decode_input(request: pb.ModelInferRequest, max_images: int) -> np.ndarray:
    """The request's one input tensor as float32 [N,1,28,28] in [0,1], or a precise InvalidInput."""
    if len(request.inputs) != 1:
        raise InvalidInput(f"expected 1 input tensor named 'input', got {len(request.inputs)}")
    tensor = request.inputs[0]
    if tensor.name != "input":
        raise InvalidInput(f"unknown input {tensor.name!r}; the model's input is 'input'")
    if tensor.datatype not in DTYPES:
        raise InvalidInput(f"input has datatype {tensor.datatype}; expected FP32 or UINT8")
    shape = tuple(tensor.shape)
    if len(shape) != 4 or shape[1:] != IMAGE_SHAPE:
        raise InvalidInput(f"input has shape {list(shape)}; expected [N, 1, 28, 28]")
    count = shape[0]
    if count < 1:
        raise InvalidInput("empty batch: the input holds no image")
    if count > max_images:
        raise InvalidInput(f"{count} images in one request; the limit is {max_images}")
    dtype, typed_field = DTYPES[tensor.datatype]
    values = count * 28 * 28
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise InvalidInput(f"{len(request.raw_input_contents)} raw_input_contents for 1 input")
        raw = request.raw_input_contents[0]
        if len(raw) != values * dtype.itemsize:
            raise InvalidInput(f"raw_input_contents has {len(raw)} bytes; shape {list(shape)} "
                               f"of {tensor.datatype} needs {values * dtype.itemsize}")
        array = np.frombuffer(raw, dtype=dtype)
    else:
        typed = getattr(tensor.contents, typed_field)
        if len(typed) != values:
            raise InvalidInput(f"contents.{typed_field} has {len(typed)} values; shape {list(shape)} needs {values}")
        array = np.asarray(typed, dtype=dtype)
    if dtype == np.uint8:
        if array.max() > 255:  # typed UINT8 values travel as uint32
            raise InvalidInput("UINT8 values must be in [0, 255]")
        return (array.astype(np.float32) / 255.0).reshape(count, *IMAGE_SHAPE)
    if not np.isfinite(array).all():
        raise InvalidInput("input holds NaN or infinity")
    if array.min() < 0.0 or array.max() > 1.0:
        raise InvalidInput(f"input values must be in [0, 1] (pixel intensities); got [{array.min():g}, {array.max():g}]")
    return array.reshape(count, *IMAGE_SHAPE)


def _tensor_metadata(entry: dict) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=entry["name"], datatype=entry["datatype"], shape=entry["shape"])


def _tensor_config(entry: dict, kind):
    return kind(name=entry["name"], data_type=config_pb.DataType.Value(f"TYPE_{entry['datatype']}"),
                dims=entry["shape"][1:])


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.state.ready)

    async def ModelReady(self, request, context):
        repository = self.state.repository
        known = repository is not None and request.name in repository.models and \
            request.version in ("", repository.models[request.name].version)
        return pb.ModelReadyResponse(ready=self.state.ready and known)

    async def ServerMetadata(self, request, context):
        from resserve.serve import __version__

        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)

    @rpc("kserve", model_of=lambda r: r.name)
    async def ModelMetadata(self, request, context):
        model = self.state.models().get(request.name, request.version)
        manifest = model.package.manifest
        return pb.ModelMetadataResponse(
            name=model.name, versions=[model.version], platform=model.platform,
            inputs=[_tensor_metadata(e) for e in manifest["inputs"]],
            outputs=[_tensor_metadata(e) for e in manifest["outputs"]])

    @rpc("kserve", model_of=lambda r: r.name)
    async def ModelConfig(self, request, context):
        model = self.state.models().get(request.name, request.version)
        manifest, batching = model.package.manifest, model.batcher.config
        return pb.ModelConfigResponse(config=config_pb.ModelConfig(
            name=model.name, platform=model.platform, max_batch_size=batching.max_batch_size,
            input=[_tensor_config(e, config_pb.ModelInput) for e in manifest["inputs"]],
            output=[_tensor_config(e, config_pb.ModelOutput) for e in manifest["outputs"]],
            dynamic_batching=config_pb.ModelDynamicBatching(
                max_queue_delay_microseconds=batching.max_queue_delay_us),
            parameters={key: config_pb.ModelParameter(string_value=value) for key, value in (
                ("backend", model.backend.name), ("precision", model.backend.precision),
                ("device", model.backend.device))}))

    @rpc("kserve", model_of=lambda r: r.model_name)
    async def ModelInfer(self, request, context):
        model = self.state.models().get(request.model_name, request.model_version)
        known = [e["name"] for e in model.package.manifest["outputs"]]
        wanted = [o.name for o in request.outputs] or known
        unknown = [name for name in wanted if name not in known]
        if unknown:
            raise InvalidInput(f"unknown output {unknown[0]!r}; the model has {', '.join(known)}")
        batch = decode_input(request, self.state.settings.max_images_per_request)
        outputs = await model.batcher.submit(batch, deadline_of(context))
        response = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id)
        for name in wanted:
            array = np.ascontiguousarray(outputs[name], dtype="<f4")
            response.outputs.add(name=name, datatype="FP32", shape=list(array.shape))
            response.raw_output_contents.append(array.tobytes())
        return response

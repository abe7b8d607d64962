"""``resserve.v1.DigitClassifier``: the gRPC codec of the data plane's ``classify``."""

from __future__ import annotations

import numpy as np

from resserve.serve.dataplane import DataPlane, Image
from resserve.serve.errors import InvalidInput
from resserve.serve.rpc import deadline_of, metadata_of, rpc
from resserve.serve.stubs import digits_pb2 as pb
from resserve.serve.stubs import digits_pb2_grpc as pb_grpc


def _image(index: int, image: pb.Image) -> Image:
    kind = image.WhichOneof("content")
    if kind is None:
        raise InvalidInput(f"image {index} has neither encoded bytes nor raw_28x28 pixels")
    return Image(image.raw_28x28, raw=True) if kind == "raw_28x28" else Image(image.encoded)


def _classification(probabilities: np.ndarray, top_k: int) -> pb.Classification:
    order = np.argsort(-probabilities)[:max(1, min(top_k, 10))]
    return pb.Classification(
        digit=int(order[0]), probability=float(probabilities[order[0]]),
        probabilities=probabilities.tolist(),
        top=[pb.DigitScore(digit=int(d), probability=float(probabilities[d])) for d in order])


class DigitClassifierServicer(pb_grpc.DigitClassifierServicer):
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    @rpc("classify", model_of=lambda r: r.model)
    async def Classify(self, request, context):
        self.plane.check_image_count(len(request.images))  # before any per-image work
        images = [_image(i, image) for i, image in enumerate(request.images)]
        result = await self.plane.classify(images, request.model, request.model_version, deadline_of(context),
                                           metadata_of(context))
        return pb.ClassifyResponse(
            results=[_classification(p, request.top_k) for p in result.probabilities],
            model=result.model.name, model_version=result.model.version)

"""``resserve.v1.DigitClassifier``: images in (encoded or raw 28x28), digits out."""

from __future__ import annotations

import asyncio

import numpy as np

from resserve.serve.errors import InvalidInput
from resserve.serve.preprocess import encoded_to_input, raw_to_input
from resserve.serve.rpc import ServerState, deadline_of, rpc
from resserve.serve.stubs import digits_pb2 as pb
from resserve.serve.stubs import digits_pb2_grpc as pb_grpc


def _image_to_input(index: int, image: pb.Image) -> np.ndarray:
    kind = image.WhichOneof("content")
    try:
        if kind == "encoded":
            return encoded_to_input(image.encoded)
        if kind == "raw_28x28":
            return raw_to_input(image.raw_28x28)
    except InvalidInput as exc:
        raise InvalidInput(f"image {index}: {exc}") from None
    raise InvalidInput(f"image {index} has neither encoded bytes nor raw_28x28 pixels")


def _preprocess(images) -> np.ndarray:
    """All images of a request -> float32 [N,1,28,28] (Pillow work: runs in a worker thread)."""
    return np.stack([_image_to_input(i, image) for i, image in enumerate(images)])


def _classification(probabilities: np.ndarray, top_k: int) -> pb.Classification:
    order = np.argsort(-probabilities)[:max(1, min(top_k, 10))]
    return pb.Classification(
        digit=int(order[0]), probability=float(probabilities[order[0]]),
        probabilities=probabilities.tolist(),
        top=[pb.DigitScore(digit=int(d), probability=float(probabilities[d])) for d in order])


class DigitClassifierServicer(pb_grpc.DigitClassifierServicer):
    def __init__(self, state: ServerState) -> None:
        self.state = state

    @rpc("classify", model_of=lambda r: r.model)
    async def Classify(self, request, context):
        model = self.state.models().get(request.model)
        count, limit = len(request.images), self.state.settings.max_images_per_request
        if count == 0:
            raise InvalidInput("no images in the request")
        if count > limit:
            raise InvalidInput(f"{count} images in one request; the limit is {limit}")
        batch = await asyncio.to_thread(_preprocess, request.images)
        outputs = await model.batcher.submit(batch, deadline_of(context))
        return pb.ClassifyResponse(
            results=[_classification(p, request.top_k) for p in outputs["probabilities"]],
            model=model.name, model_version=model.version)

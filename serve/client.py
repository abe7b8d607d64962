"""A small Python client for resserve: digit classification and health, behind `resserve classify`/`health`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from resserve.serve.errors import ResserveError
from resserve.serve.stubs import digits_pb2, digits_pb2_grpc


class ClientError(ResserveError):
    """The server answered with an error, or could not be reached."""


@dataclass(frozen=True)
class Result:
    digit: int
    confidence: float
    probabilities: list[float]


class DigitClient:
    """``with DigitClient("localhost:8001") as client: client.classify([png_bytes])``."""

    def __init__(self, target: str = "localhost:8001", tls_ca: Path | None = None, token: str | None = None,
                 timeout: float = 30.0) -> None:
        if tls_ca is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
            self.channel = grpc.secure_channel(target, credentials)
        else:
            self.channel = grpc.insecure_channel(target)
        self.target = target
        self.timeout = timeout
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.classifier = digits_pb2_grpc.DigitClassifierStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self) -> "DigitClient":
        return self

    def __exit__(self, *exc) -> None:
        self.channel.close()

    def classify(self, images: list[bytes], model: str = "") -> list[Result]:
        """Encoded images (PNG, JPEG, ...) -> one result per image, in order."""
        request = digits_pb2.ClassifyRequest(images=[digits_pb2.Image(encoded=data) for data in images], model=model)
        response = self._call(self.classifier.Classify, request)
        return [Result(r.digit, r.probability, list(r.probabilities)) for r in response.results]

    def health(self, service: str = "") -> str:
        """SERVING, NOT_SERVING, ... for ``service`` ('' for the whole server)."""
        response = self._call(self.health_stub.Check, health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise ClientError(f"{self.target}: {exc.code().name}: {exc.details()}") from None

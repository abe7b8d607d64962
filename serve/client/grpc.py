"""resserve's client over gRPC: ``DigitClient``, for a server named by host:port (its gRPC port,
8001 where only a host is given): resserve.v1.DigitClassifier, grpc.health.v1 and KServe v2's
model configuration and repository, with what gRPC core's errors mean said as hints."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from resserve.serve.client.base import (CLOSED_AT_LIMIT, CLOSED_HINTS, NO_SERVER_HINT, SERVER_OPTION, Client,
                                        ClientError, ModelEntry, Result)
from resserve.serve.client.proxies import grpc_proxy, proxy_hint
from resserve.serve.errors import ResserveError
from resserve.serve.settings import DEFAULT_PORT, LIVENESS_SERVICE, READINESS_SERVICE, host_port, with_port
from resserve.serve.stubs import digits_pb2, digits_pb2_grpc
from resserve.serve.stubs import grpc_service_pb2 as kserve_pb2
from resserve.serve.stubs import grpc_service_pb2_grpc as kserve_grpc
from resserve.serve.stubs import model_config_pb2
from resserve.serve.tls import client_key_pair, read_pem

# Why a connection failed, by what gRPC core says, and what to do: the first marker found wins
CONNECT_HINTS = (
    ("WRONG_VERSION_NUMBER", " (the server there does not speak TLS: leave out --tls-ca)"),
    ("CERTIFICATE_VERIFY_FAILED", " (the server's certificate is not signed by the CA in --tls-ca)"),
    ("Hostname Verification Check failed", " (the server's certificate does not name the host in {option})"),
    ("Failed parsing HTTP/2", " (what answers there does not speak gRPC, as the server's HTTP and metrics ports do "
                              "not: {option} takes its gRPC port, 8001 by default)"),
)
# A URL given where gRPC wants host:port: gRPC reads "http://host:8000" as a host name that does
# not resolve ("Misformatted domain name"); its own schemes (dns:///, unix:, ipv4:) stay valid.
# (``connect`` takes http:// and https:// to the HTTP client first.)
URL_SCHEMES = ("http", "https", "grpc", "grpcs")
CLIENT_CERT_NEEDS_CA = ("--tls-cert and --tls-key (mutual TLS) need --tls-ca: the CA that signed the server's "
                        "certificate")
# gRPC's own answer to a message over the server's --max-message-bytes
MESSAGE_TOO_LARGE = "larger than max"


def _connect_hint(code: grpc.StatusCode, details: str, target: str, connection: str, option: str) -> str:
    """Why a call to ``target`` found no server to answer it, where gRPC's details say:
    ``connection`` is plaintext, TLS or mutual TLS; ``option`` gave the server's address."""
    if code != grpc.StatusCode.UNAVAILABLE:
        return ""
    hint = next((hint for marker, hint in CONNECT_HINTS if marker in details), "")
    if not hint and "Socket closed" in details:
        hint = f" ({CLOSED_HINTS[connection]}{CLOSED_AT_LIMIT})"
    if not hint and ("failed to connect" in details or "errors resolving" in details) and (
            proxy := grpc_proxy(target)):  # through a proxy, what is resolved and connected to is the proxy
        named_by, address = proxy
        return proxy_hint(address, named_by, "no_grpc_proxy or no_proxy")
    return (hint or (NO_SERVER_HINT if "failed to connect" in details else "")).format(option=option)


def channel_credentials(tls_ca: Path, tls_cert: Path | None, tls_key: Path | None) -> grpc.ChannelCredentials:
    """TLS trusting the CA in ``tls_ca``, with the client's own certificate and key for a server
    that asks for one (mutual TLS). The files are checked here: gRPC would only fail at the first
    call, with "Failed to create security handshaker"."""
    certificate, key = client_key_pair(tls_cert, tls_key) or (None, None)
    return grpc.ssl_channel_credentials(root_certificates=read_pem(tls_ca, "--tls-ca", "CERTIFICATE"),
                                        private_key=key, certificate_chain=certificate)


def _check_target(target: str, option: str) -> None:
    """One line for the two ways of naming a server that gRPC answers with a resolver error: a URL,
    and an IPv6 address without the brackets that set it apart from its port."""
    scheme, _, address = target.partition("://")
    if address and scheme.lower() in URL_SCHEMES:
        raise ResserveError(f"{option} takes the host:port of a server's gRPC port (such as localhost:8001), "
                            f"not a URL: got {target[:200]!r}"
                            + ("; for TLS, give --tls-ca" if scheme.lower().endswith("s") else ""))
    host, _, port = target.rpartition(":")  # "::1:8001" is an IPv6 address too: the port is meant
    readings = ([(host, int(port))] if port.isdigit() else []) + [(target, DEFAULT_PORT)]
    for ip, meant_port in readings:
        if _is_ipv6(ip):
            raise ResserveError(f"{option}: an IPv6 address takes brackets before its port, as in "
                                f"{host_port(ip, meant_port)}; got {target[:200]!r}")


def _is_ipv6(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 6
    except ValueError:
        return False


class DigitClient(Client):
    """Over gRPC: ``with DigitClient("localhost:8001") as client: client.classify([png_bytes])``."""

    def __init__(self, target: str = "localhost:8001", tls_ca: Path | None = None, token: str | None = None,
                 timeout: float = 30.0, tls_cert: Path | None = None, tls_key: Path | None = None,
                 option: str = SERVER_OPTION) -> None:
        """``option``: how the user named ``target``, for the hints of a connection that fails."""
        _check_target(target, option)
        target = with_port(target, DEFAULT_PORT)
        if tls_ca is not None:
            self.channel = grpc.secure_channel(target, channel_credentials(tls_ca, tls_cert, tls_key))
        elif tls_cert or tls_key:
            raise ResserveError(CLIENT_CERT_NEEDS_CA)
        else:
            self.channel = grpc.insecure_channel(target)
        self.connection = "mutual TLS" if tls_cert else "TLS" if tls_ca else "plaintext"
        self.target, self.option = target, option
        self.timeout = timeout
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.classifier = digits_pb2_grpc.DigitClassifierStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.inference = kserve_grpc.GRPCInferenceServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def classify(self, images: list[bytes], model: str = "", version: str = "") -> list[Result]:
        return self._classify([digits_pb2.Image(encoded=data) for data in images], model, version)

    def classify_pixels(self, images: np.ndarray, model: str = "", version: str = "") -> list[Result]:
        return self._classify([digits_pb2.Image(raw_28x28=image.tobytes()) for image in images], model, version)

    def _classify(self, images: list[digits_pb2.Image], model: str, version: str) -> list[Result]:
        request = digits_pb2.ClassifyRequest(images=images, model=model, model_version=version)
        response = self._call(self.classifier.Classify, request)
        return [Result(r.digit, r.probability, list(r.probabilities), response.model, response.model_version)
                for r in response.results]

    def health(self, service: str = "") -> str:
        try:
            response = self._call(self.health_stub.Check, health_pb2.HealthCheckRequest(service=service))
        except ClientError as exc:
            if exc.code != grpc.StatusCode.NOT_FOUND:
                raise
            raise ClientError(self.target, exc.code, f"no health service {service!r}; resserve's are '' (the "
                              f"server), {LIVENESS_SERVICE} and {READINESS_SERVICE}") from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def model_config(self, name: str, version: str = "") -> model_config_pb2.ModelConfig:
        request = kserve_pb2.ModelConfigRequest(name=name, version=version)
        return self._call(self.inference.ModelConfig, request).config

    def models(self) -> list[ModelEntry]:
        response = self._call(self.inference.RepositoryIndex, kserve_pb2.RepositoryIndexRequest())
        return [ModelEntry(m.name, m.version, m.state, m.reason) for m in response.models]

    def load(self, name: str) -> None:
        self._call(self.inference.RepositoryModelLoad, kserve_pb2.RepositoryModelLoadRequest(model_name=name))

    def unload(self, name: str) -> None:
        self._call(self.inference.RepositoryModelUnload, kserve_pb2.RepositoryModelUnloadRequest(model_name=name))

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
            hint = _connect_hint(code, details, self.target, self.connection, self.option)
            raise ClientError(self.target, code, details, hint,
                              too_large=code == grpc.StatusCode.RESOURCE_EXHAUSTED and MESSAGE_TOO_LARGE in details
                              ) from None

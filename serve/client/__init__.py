"""A small Python client for resserve: digit classification, health and the models served, behind
`resserve classify`, `health`, `models` and `eval --server`.

``connect`` picks the transport by how the server is named: host:port for its gRPC port
(``DigitClient``, grpc.py), an http:// or https:// URL for its HTTP port, or for what routes to it,
an ingress or KServe (``HttpDigitClient``, http.py). Both are a ``Client`` (base.py).
"""

from __future__ import annotations

from pathlib import Path

from resserve.serve.client.base import HTTP_SCHEMES, SERVER_OPTION, Client, ClientError, ModelEntry, Result
from resserve.serve.client.grpc import DigitClient

__all__ = ["Client", "ClientError", "DigitClient", "ModelEntry", "Result", "connect", "is_url"]


def is_url(server: str) -> bool:
    """Whether ``server`` names a server by an http:// or https:// URL (reached over HTTP) rather
    than by the host:port of its gRPC port."""
    return server.partition("://")[0].lower() in HTTP_SCHEMES


def connect(server: str, tls_ca: Path | None = None, token: str | None = None, timeout: float = 30.0,
            tls_cert: Path | None = None, tls_key: Path | None = None, option: str = SERVER_OPTION) -> Client:
    """A client of the server named ``server``: over HTTP for an http:// or https:// URL (the
    server's HTTP port, or what routes to it: an ingress, KServe), over gRPC for host:port."""
    if is_url(server):
        from resserve.serve.client.http import HttpDigitClient

        return HttpDigitClient(server, tls_ca, token, timeout, tls_cert, tls_key, option)
    return DigitClient(server, tls_ca, token, timeout, tls_cert, tls_key, option)

"""TLS for every front door: the settings' PEM files read and checked once, then handed to gRPC
(``grpc.ServerCredentials``) and to the HTTP server (``ssl.SSLContext``) alike.

Settings that ask for security fail closed: an unreadable or non-PEM file, or a key that does
not match its certificate, stops the server before it listens.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from resserve.serve.errors import ResserveError
from resserve.serve.settings import ServerSettings


@dataclass(frozen=True)
class TlsFiles:
    key: Path
    cert: Path
    client_ca: Path | None  # mutual TLS: clients must present a certificate signed by this CA


def tls_files(settings: ServerSettings) -> TlsFiles | None:
    """The checked TLS files, or None when TLS is off (settings refuse a key or CA without a certificate)."""
    if not settings.tls_cert:
        return None
    files = TlsFiles(settings.tls_key, settings.tls_cert, settings.tls_client_ca)
    for path, marker in ((files.key, b"PRIVATE KEY-----"), (files.cert, b"-----BEGIN CERTIFICATE-----"),
                         (files.client_ca, b"-----BEGIN CERTIFICATE-----")):
        if path is not None and marker not in _read(path):
            what = "private key" if marker.startswith(b"PRIVATE") else "certificate"
            raise ResserveError(f"{path} is not a PEM {what}")
    return files


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ResserveError(f"cannot read TLS file {exc.filename}: {exc.strerror}") from exc


def grpc_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    client_ca = _read(files.client_ca) if files.client_ca else None
    return grpc.ssl_server_credentials([(_read(files.key), _read(files.cert))], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def ssl_context(files: TlsFiles) -> ssl.SSLContext:
    """The HTTP server's TLS: TLS 1.2 or later; client certificates required under mutual TLS."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(files.cert, files.key)
        if files.client_ca:
            context.load_verify_locations(cafile=files.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except ssl.SSLError as exc:
        raise ResserveError(f"cannot use TLS files {files.cert}, {files.key}: {exc.reason or exc} "
                            "(does the key match the certificate?)") from None
    return context

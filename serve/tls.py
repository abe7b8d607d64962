"""TLS for every front door: the settings' PEM files read and checked once, then handed to gRPC
(``grpc.ServerCredentials``) and to the HTTP server (``ssl.SSLContext``) alike; the same checks
serve the client commands' files (serve/client/).

Settings that ask for security fail closed: an unreadable or non-PEM file, a key that does not
match its certificate, or a certificate that has expired, stops the server before it listens, in
one line that names the option.
A running server reads the files again when they change (``CertificateRotation``, serve/rotation.py).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import grpc
from cryptography import x509
from prometheus_client import Counter, Gauge

from resserve.serve.errors import ResserveError
from resserve.serve.rotation import WatchedFiles, read_secret_file
from resserve.serve.settings import ServerSettings


@dataclass(frozen=True)
class TlsFiles:
    key: Path
    cert: Path
    client_ca: Path | None  # mutual TLS: clients must present a certificate signed by this CA
    # their PEM, read and checked once by tls_files: gRPC takes bytes, Python's ssl the paths
    key_pem: bytes
    cert_pem: bytes
    client_ca_pem: bytes | None
    expires: datetime  # the certificate's notAfter (UTC)

    @property
    def valid_until(self) -> str:
        """What the log says of the certificate: ``valid until 2027-01-02 13:26:44 UTC``."""
        return f"valid until {_utc(self.expires)}"


def tls_files(settings: ServerSettings) -> TlsFiles | None:
    """The checked TLS files, or None when TLS is off (settings refuse a key or CA without a certificate)."""
    if not settings.tls_cert:
        return None
    cert_pem, key_pem = check_key_pair(settings.tls_cert, settings.tls_key)
    client_ca = settings.tls_client_ca
    return TlsFiles(settings.tls_key, settings.tls_cert, client_ca, key_pem, cert_pem,
                    read_pem(client_ca, "--tls-client-ca", "CERTIFICATE") if client_ca else None,
                    certificate_expiry(cert_pem, settings.tls_cert))


def certificate_expiry(cert_pem: bytes, path: Path) -> datetime:
    """When the server's certificate (the first in ``path``, --tls-cert) expires; refused in one
    line when it has: every client would refuse the handshake, and a renewal that arrives expired
    must not replace a certificate that still serves. (One not valid yet is served: a renewal
    issued a moment ago and a clock a little behind would otherwise keep the old one to its end.)"""
    try:
        certificate = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise ResserveError(f"--tls-cert {path} holds no certificate that can be read: {exc}") from None
    expires = certificate.not_valid_after_utc
    if expires <= datetime.now(timezone.utc):
        raise ResserveError(f"--tls-cert {path} expired on {_utc(expires)}: every client would refuse it; renew it")
    return expires


def _utc(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC"


def read_pem(path: Path, option: str, kind: str) -> bytes:
    """The PEM file ``option`` names, refused in one line when it cannot be read or holds no
    ``kind`` (CERTIFICATE, PRIVATE KEY): gRPC would only fail later, and vaguely."""
    pem = read_secret_file(path, option)
    if f"{kind}-----".encode() not in pem:
        raise ResserveError(f"{option} {path} holds no PEM {kind.lower()} (-----BEGIN {kind}-----)")
    return pem


def check_key_pair(cert: Path, key: Path) -> tuple[bytes, bytes]:
    """That ``key`` (--tls-key) is the unencrypted private key of ``cert`` (--tls-cert), as Python's
    ssl reads the pair: a server's or a client's (mutual TLS). Returns both files' PEM."""
    pair = read_pem(cert, "--tls-cert", "CERTIFICATE"), read_pem(key, "--tls-key", "PRIVATE KEY")
    try:  # an encrypted key gets an empty password and fails, rather than a prompt: gRPC cannot use one either
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as exc:
        raise ResserveError(f"--tls-key {key} is not the (unencrypted) key of --tls-cert {cert}: "
                            f"{exc.reason or exc}") from None
    return pair


def client_key_pair(tls_cert: Path | None, tls_key: Path | None) -> tuple[bytes, bytes] | None:
    """A client's certificate and key (PEM), checked as a pair, for a server with mutual TLS; None
    where neither is given."""
    if (tls_cert is None) != (tls_key is None):
        raise ResserveError("a client certificate needs both --tls-cert and --tls-key")
    return check_key_pair(tls_cert, tls_key) if tls_cert and tls_key else None


def client_ssl_context(tls_ca: Path | None, tls_cert: Path | None, tls_key: Path | None) -> ssl.SSLContext:
    """HTTPS for a client: trusting the CA in ``tls_ca`` (this machine's CAs where None: a server
    behind an ingress with a public certificate), showing its own certificate and key where given
    (mutual TLS). The files are checked as the server's are, in one line that names the option."""
    pair = client_key_pair(tls_cert, tls_key)
    # a file that cannot be read, or holds no PEM certificate, is one line; what it holds is read once
    trusted = read_pem(tls_ca, "--tls-ca", "CERTIFICATE").decode("ascii", "replace") if tls_ca else None
    try:
        context = ssl.create_default_context(cadata=trusted)
    except ssl.SSLError as exc:
        raise ResserveError(f"--tls-ca {tls_ca} holds no certificate that TLS can use: {exc.reason or exc}") from None
    if pair:
        context.load_cert_chain(tls_cert, tls_key)
    return context


def _certificate_configuration(files: TlsFiles) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(files.key_pem, files.cert_pem)],
                                                     root_certificates=files.client_ca_pem)


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
        raise ResserveError(f"cannot use TLS files {files.cert}, {files.key}: {exc.reason or exc}") from None
    return context


class CertificateRotation(WatchedFiles[tuple[TlsFiles, ssl.SSLContext]]):
    """The server's TLS files, read again when they change, so that new connections get a renewed
    certificate without a restart. cert-manager renews a certificate weeks before it expires and
    Kubernetes updates the mounted Secret's files in place: a server that read them once served
    the old certificate until it expired, and from then on every client refused it.

    Connections already open keep the certificate of their handshake. Files that change into a
    pair that does not match (a certificate written before its key) are logged and left: the
    certificate read before is served until the files change again."""

    what = "the TLS files"
    kept = "new connections still get the certificate read before"

    def __init__(self, settings: ServerSettings, reloads: Counter, expiry: Gauge) -> None:
        super().__init__((settings.tls_cert, settings.tls_key, settings.tls_client_ca), reloads)
        self.settings, self.expiry = settings, expiry
        self.files, self.http_context = self._read()
        self.expiry.set(self.files.expires.timestamp())
        self._grpc_update: grpc.ServerCertificateConfiguration | None = None

    @classmethod
    def of(cls, settings: ServerSettings, reloads: Counter, expiry: Gauge) -> "CertificateRotation | None":
        """The checked TLS files (refused in one line before the server listens), None when TLS is
        off. ``expiry`` is set to when the certificate served expires, for alerts."""
        return cls(settings, reloads, expiry) if settings.tls_cert else None

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(_certificate_configuration(self.files), self._take_grpc_update,
                                                   require_client_authentication=self.files.client_ca_pem is not None)

    def _take_grpc_update(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC core asks before each new connection's handshake: the renewed files once, else None (no change)."""
        update, self._grpc_update = self._grpc_update, None
        return update

    def _read(self) -> tuple[TlsFiles, ssl.SSLContext]:
        files = tls_files(self.settings)
        return files, ssl_context(files)

    def _use(self, read: tuple[TlsFiles, ssl.SSLContext]) -> str:
        """New connections get the files' certificate: over gRPC from its next handshake, over HTTP
        from ``http_context`` (which the server hands its HTTP site)."""
        self.files, self.http_context = read
        self._grpc_update = _certificate_configuration(self.files)
        self.expiry.set(self.files.expires.timestamp())
        return f"new connections get the certificate now in {self.files.cert} ({self.files.valid_until})"

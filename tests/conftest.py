"""Shared fixtures: real MNIST (fetched once, then cached); certificates for TLS."""

import ipaddress
import os

# As the resserve command does (serve/app.py), before any test imports grpc: this process starts
# servers and CLIs while its gRPC clients run, and with gRPC's fork handlers on, a child forked for a
# preexec_fn restarts gRPC's poller and may crash before it runs the command (about 1 fork in 60 here,
# grpcio 1.85: "Epoll1Poller ... epoll_wait error: Bad file descriptor", then SIGSEGV; grpc/grpc#43055).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
from datetime import datetime, timedelta, timezone

import pytest


@pytest.fixture(scope="session")
def mnist():
    from resserve.train.data import load_mnist

    return load_mnist()


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate, and one from elsewhere."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    root = tmp_path_factory.mktemp("pki")
    now = datetime.now(timezone.utc)

    def issue(name, issuer_key, issuer_name, ca=False, san=None, days=1):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name or subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - timedelta(days=2)).not_valid_after(now + timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(issuer_key or key, hashes.SHA256())
        (root / f"{name}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (root / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return key, subject

    ca_key, ca_name = issue("ca", None, None, ca=True)
    issue("server", ca_key, ca_name, san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    issue("client", ca_key, ca_name)
    issue("stranger", None, None)  # a client certificate signed by itself, not by the CA
    ca2_key, ca2_name = issue("ca2", None, None, ca=True)  # the server's next certificate, from another CA
    issue("renewed", ca2_key, ca2_name, san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1"))], days=90)
    issue("expired", ca_key, ca_name, san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1"))], days=-1)
    return root

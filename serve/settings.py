"""Server settings: one dataclass, one source of defaults; every CLI option has a RESSERVE_ env var."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from resserve.serve.batcher import BatchingConfig
from resserve.serve.errors import ResserveError
from resserve.serve.runtime import BACKENDS, PRECISIONS

DEFAULT_PORT = 8001  # as Triton: gRPC 8001, metrics 8002
DEFAULT_METRICS_PORT = 8002
LIVENESS_SERVICE = "resserve.liveness"
READINESS_SERVICE = "resserve.readiness"


@dataclass(frozen=True)
class ServerSettings:
    packages: tuple[Path, ...] = ()  # empty: the shipped package
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    metrics_port: int = DEFAULT_METRICS_PORT  # 0 disables the metrics endpoint
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    device: str = "cpu"  # cpu | cuda | auto
    backend: str = "auto"  # auto | onnxruntime | openvino | torchscript (see runtime.py)
    precision: str = "auto"  # auto | fp32 | bf16
    threads: int | None = None  # default: the CPUs this process may use
    max_images_per_request: int = 1024
    max_message_bytes: int = 4 * 1024 * 1024
    drain_seconds: float = 5.0  # after SIGTERM: NOT_SERVING but still answering, so endpoints go
    grace_seconds: float = 10.0  # then: in-flight requests get this long to finish
    max_connection_age_seconds: float | None = None  # clients re-resolve (Kubernetes scaling)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # mutual TLS: clients must present a cert signed by this CA
    tokens: tuple[str, ...] = ()  # bearer tokens accepted; empty: no authentication

    def validate(self) -> None:
        """One-line errors for settings that cannot work, before anything starts."""
        b = self.batching
        checks = [
            (self.device in ("cpu", "cuda", "auto"), f"--device must be cpu, cuda or auto, got {self.device!r}"),
            (self.backend in BACKENDS, f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}"),
            (self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"),
            (0 <= self.port < 65536 and 0 <= self.metrics_port < 65536, "ports must be in 0-65535"),
            (b.max_batch_size >= 1, "--max-batch-size must be >= 1"),
            (b.max_queue_delay_us >= 0, "--max-queue-delay-us must be >= 0"),
            (b.max_queue_size >= 1, "--max-queue-size must be >= 1"),
            (self.threads is None or self.threads >= 1, "--threads must be >= 1"),
            (self.max_images_per_request >= 1, "--max-images-per-request must be >= 1"),
            (self.max_message_bytes >= 1024, "--max-message-bytes must be at least 1024"),
            (self.drain_seconds >= 0 and self.grace_seconds >= 0, "drain and grace seconds must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ResserveError(message)

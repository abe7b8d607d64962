"""Server settings: one dataclass, one source of defaults; every CLI option has a RESSERVE_ env var."""

from __future__ import annotations

import importlib.util
import logging
import math
import re
import socket
import sys
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from resserve.serve.backends.base import CudaOptions, runnable_cpus, usable_cpus
from resserve.serve.batcher import BatchingConfig
from resserve.serve.cgroups import memory_headroom
from resserve.serve.errors import ResserveError

log = logging.getLogger("resserve.serve")

DEFAULT_PORT = 8001  # as Triton: HTTP 8000, gRPC 8001, metrics 8002
DEFAULT_HTTP_PORT = 8000
DEFAULT_METRICS_PORT = 8002
GRPC_INT_MAX = 2**31 - 1  # gRPC's channel arguments are C ints
MAX_GRPC_MESSAGE_BYTES = GRPC_INT_MAX
MAX_GRPC_SECONDS = GRPC_INT_MAX // 1000  # its durations are milliseconds: about 24.8 days
# RPCs the server takes beyond its in-flight budget's count (max_concurrent_rpcs): health checks
# and metadata calls share gRPC's one limit with inference, so clients using the whole budget
# (64 of them by default, each with a call in flight; Triton's perf_analyzer at concurrency 64
# reads statistics besides) must not starve them. More clients take these places too, which is
# why Kubernetes probes over HTTP (deploy/k8s). Any RPC may be as large as the largest message:
# the memory bound counts these too.
CONTROL_RPCS = 8
MAX_WORKERS = 64
# the most images one batch may hold: a server warms its largest batch before it is ready, and on
# the CPU 4,096 images took 1 GB and 12 s on 2 CPUs, where a slip of the finger (100000) took 11 GB
# and minutes, more than a pod's memory limit
MAX_BATCH_SIZE = 4096
# the longest batching window: a request that comes alone waits this long for batch-mates, so a
# value meant in milliseconds or nanoseconds (100000000: 100 s) would hold every lone request
MAX_QUEUE_DELAY_US = 1_000_000
# an origin as a browser's Origin header gives it: scheme, host (lowercase) and port, nothing after
ORIGIN = re.compile(r"https?://(?:[a-z0-9.-]+|\[[0-9a-f:.]+\])(?::\d{1,5})?")
CPUS_PER_WORKER = 4  # --workers auto: one worker per this many usable CPUs (docs/serving.md "Workers")
CUDA_WORKERS = 4  # --workers auto on --device cuda: at most this many processes share the GPU
# Workers listen on the same ports with SO_REUSEPORT, which spreads a port's connections over its
# sockets on Linux only: macOS and the BSDs have the option but give every connection to one socket,
# so a second worker there would hold its models and take no requests
WORKERS_SHARE_PORTS = sys.platform.startswith("linux")
# One worker's memory at its worst: idle (runtime and models) and what each byte of its full
# in-flight budgets adds (gRPC reads a request whole, then copies; freed buffers stay in malloc's
# arenas). Measured with the defaults (docs/serving.md "Limits"): 145 MB idle, 1,022 MB with gRPC's
# 256 MiB budget full, 1,409 MB with HTTP's full too; these round up. Idle, ONNX Runtime took 142 MB,
# OpenVINO 181 MB and TorchScript (libtorch) 618 MB. --workers auto runs no more workers than a
# memory limit holds at this, and the server warns where its workers exceed it.
WORKER_IDLE_BYTES = 256 * 2**20
TORCHSCRIPT_IDLE_BYTES = 640 * 2**20
GRPC_BUDGET_GROWTH = 3.5  # bytes of memory per byte of --max-inflight-bytes, gRPC's budget full
HTTP_BUDGET_GROWTH = 1.5  # ... and HTTP's
LIVENESS_SERVICE = "resserve.liveness"
READINESS_SERVICE = "resserve.readiness"


class Choice(str, Enum):
    """A setting with a fixed set of values. Members compare equal to their strings."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: str, option: str) -> "Choice":
        """``value`` as a member, or a one-line error naming ``option`` and the choices."""
        try:
            return cls(value)
        except ValueError:
            raise ResserveError(f"{option} must be one of {cls.listing(', ')}, got {value!r}") from None

    @classmethod
    def listing(cls, separator: str = " | ") -> str:
        return separator.join(member.value for member in cls)


class Device(Choice):
    CPU = "cpu"
    CUDA = "cuda"
    AUTO = "auto"  # CUDA where the backend has it, else the CPU


class BackendChoice(Choice):
    AUTO = "auto"  # see serve/runtime.py
    ONNXRUNTIME = "onnxruntime"
    OPENVINO = "openvino"
    TORCHSCRIPT = "torchscript"


class ConvSearch(Choice):
    """ONNX Runtime's cuDNN convolution algorithm search on CUDA (serve/backends/onnxruntime.py)."""

    EXHAUSTIVE = "EXHAUSTIVE"
    HEURISTIC = "HEURISTIC"
    DEFAULT = "DEFAULT"


class Precision(Choice):
    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"
    INT8 = "int8"


class LogLevel(Choice):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class TraceLevel(Choice):
    """Triton's trace levels that resserve has (serve/tracing.py): no TENSORS."""

    OFF = "OFF"
    TIMESTAMPS = "TIMESTAMPS"


class TraceMode(Choice):
    """Where traces go (serve/tracing.py), as Triton's ``mode`` trace setting."""

    TRITON = "triton"  # Triton's trace records, one log line each
    OPENTELEMETRY = "opentelemetry"  # OpenTelemetry spans, exported over OTLP/HTTP (serve/otel.py)


class LogFormat(Choice):
    TEXT = "text"  # for people: time, level, logger, message
    JSON = "json"  # one JSON object a line, for log collectors (serve/logs.py)


def auto_workers(cpus: int, device: str = "cpu", fitting: int | None = None) -> int:
    """``--workers auto``: one server process per CPUS_PER_WORKER usable CPUs, at least one; on
    ``--device cuda`` at most CUDA_WORKERS; no more than ``fitting``, the workers a memory limit
    holds at their worst (None: no limit); one where workers cannot share ports (not Linux).

    Each worker needs CPUs for its inference threads as well as for its Python front end; on 2
    CPUs a second worker measured no faster than one (docs/benchmarks.md "Workers"), while one
    process on 16 CPUs served 0.37x its in-process limit (the front end, not the model, bound).
    Workers on CUDA share the GPU, each with its own CUDA context, and the contexts take turns:
    on an H200 with 16 CPUs four served 1-image requests at 2.4x one's rate and eight at 0.75x
    four's (docs/benchmarks.md "GPU").
    """
    if not WORKERS_SHARE_PORTS:
        return 1
    count = min(MAX_WORKERS, cpus // CPUS_PER_WORKER, CUDA_WORKERS if device == "cuda" else MAX_WORKERS)
    return max(1, count if fitting is None else min(count, fitting))


def worker_peak_memory(max_inflight_bytes: int, http: bool, backend: str = "auto") -> int:
    """Bytes one worker may hold at its worst: idle (with ``backend``'s runtime), and its in-flight
    budgets full (gRPC's, and HTTP's when it serves HTTP)."""
    idle = TORCHSCRIPT_IDLE_BYTES if backend == "torchscript" else WORKER_IDLE_BYTES
    growth = GRPC_BUDGET_GROWTH + (HTTP_BUDGET_GROWTH if http else 0)
    return idle + int(growth * max_inflight_bytes)


def parse_auto(value: str, option: str, unit: str) -> int | None:
    """An option that is "auto" (None: chosen where its default is known) or a number of ``unit``."""
    if value == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        raise ResserveError(f"{option} must be auto or a number of {unit}, got {value!r}") from None


def parse_max_batch_size(value: str) -> int | None:
    """``--max-batch-size``: "auto" (None: chosen by the device, BatchingConfig.for_device) or a number."""
    return parse_auto(value, "--max-batch-size", "images")


def parse_buckets(value: str, max_batch_size: int | None) -> tuple[int, ...] | None:
    """``--batch-buckets``: "auto" (None: chosen by the device, BatchingConfig.for_device), "none",
    or sizes such as "1,8,64" whose largest is the max batch size (when that is not auto)."""
    if value == "auto":
        return None
    if value == "none":
        return ()
    try:
        sizes = sorted({int(size) for size in value.split(",")})
    except ValueError:
        raise ResserveError(f"--batch-buckets must be auto, none or sizes such as 1,8,64; got {value!r}") from None
    if sizes[0] < 1:
        raise ResserveError(f"--batch-buckets must be sizes >= 1; got {value!r}")
    if max_batch_size is not None and sizes[-1] != max_batch_size:
        raise ResserveError(f"--batch-buckets must be sizes whose largest is --max-batch-size ({max_batch_size}); "
                            f"got {value!r}")
    return tuple(sizes)


def parse_workers(value: str, cpus: int, device: str, worker_memory: int) -> int:
    """``--workers``: "auto" (for ``device``, ``cpus`` and the memory limit, each worker needing
    ``worker_memory`` at its worst) or a count, as an int (a bad value is one line)."""
    count = parse_auto(value, "--workers", "processes")
    if count is not None:
        return count
    room = memory_headroom()
    return auto_workers(cpus, device, None if room is None else room // worker_memory)


@dataclass(frozen=True)
class ServerSettings:
    packages: tuple[Path, ...] = ()  # empty: the shipped package
    # the packages (folders of them read anew) looked at this often, and a model whose packages
    # changed loaded again, one no package holds any more unloaded (serve/polling.py); 0: only
    # through the API
    poll_seconds: float = 0.0
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    http_port: int = DEFAULT_HTTP_PORT  # KServe v2 REST, /v1/classify and the page; 0 disables
    metrics_port: int = DEFAULT_METRICS_PORT  # 0 disables the metrics endpoint
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    device: Device = Device.CPU
    backend: BackendChoice = BackendChoice.AUTO
    precision: Precision = Precision.AUTO
    cuda_conv_search: ConvSearch = ConvSearch.EXHAUSTIVE  # paid before ready, for every shape bucket
    cuda_graphs: bool = True  # ONNX Runtime on CUDA: one captured CUDA graph per shape bucket
    cuda_tf32: bool = False  # ONNX Runtime on CUDA: TF32 for fp32 (faster at large batches, not fp32's logits)
    threads: int | None = None  # inference threads per worker; default: the CPUs divided among the workers
    # ONNX Runtime and TorchScript on the CPU: idle inference threads spin, waiting for the next
    # batch, instead of sleeping (OpenVINO's sleep either way). Faster to answer, but CPU use then
    # does not follow load (docs/benchmarks.md "Open loop"): off where a CPU-based autoscaler reads
    # it (deploy/k8s).
    thread_spinning: bool = True
    cpus: int | None = None  # CPUs the server may use; default: affinity mask and cgroup quota (usable_cpus)
    max_images_per_request: int = 1024
    max_message_bytes: int = 4 * 1024 * 1024
    # gRPC reads a request whole before the server sees its size, so memory is bounded by how
    # many RPCs run at once: this budget / max_message_bytes of them (64 by default), and
    # CONTROL_RPCS more; beyond that gRPC answers RESOURCE_EXHAUSTED at once. RSS grows by about
    # 3x that many largest messages at most.
    max_inflight_bytes: int = 256 * 1024 * 1024
    # a batch computing this long means the backend hung: the process exits to be started again
    # (serve/watchdog.py); 0: never. A batch of 64 takes milliseconds on a CPU, a 1024-image request 1 s on 2.
    batch_timeout_seconds: float = 60.0
    drain_seconds: float = 5.0  # after SIGTERM: NOT_SERVING but still answering, so endpoints go
    grace_seconds: float = 10.0  # then: in-flight requests get this long to finish
    max_connection_age_seconds: float | None = None  # clients re-resolve (Kubernetes scaling)
    # gRPC pings a client after this long without a frame from it, and closes the connection when
    # no answer comes (within KEEPALIVE_TIMEOUT_SECONDS): the calls of a client that vanished
    # (crashed, partitioned, forgotten by a NAT) free their places in the RPC limit then, not after
    # gRPC's default two hours
    keepalive_seconds: float = 60.0
    # an HTTP connection that has not sent a whole request for this long is closed (an idle
    # keep-alive connection, one trickling its headers, a body that stopped arriving: 408), as
    # nginx's keepalive_timeout; aiohttp's own default is an hour. Behind a load balancer it must
    # outlast the balancer's idle timeout, or the balancer reuses connections the server closes.
    http_idle_seconds: float = 75.0
    max_connections: int | None = None  # per port and worker; None: what the open-file limit allows (serve/connections.py)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # mutual TLS: clients must present a cert signed by this CA
    token_file: Path | None = None  # bearer tokens accepted, one a line; None: no authentication (serve/auth.py)
    admin_token_file: Path | None = None  # tokens for loading and unloading models and log settings
    # Triton's system shared memory extension, for clients on this host (serve/sharedmemory.py):
    # off by default, as Triton's, since a region lets a client have the server read and write a
    # shared memory object it names
    allow_client_shm: bool = False
    # web pages of these origins may call the HTTP API (serve/rest/cors.py); "*": any; none by default
    cors_origins: tuple[str, ...] = ()
    workers: int = 1  # server processes on the same ports (serve/workers/); see auto_workers
    reuse_port: bool = False  # set by the supervisor for its workers: they listen on shared ports
    log_level: LogLevel = LogLevel.INFO
    log_format: LogFormat = LogFormat.TEXT
    # Triton's trace settings at start (serve/tracing.py); clients may change them while it serves
    trace_level: TraceLevel = TraceLevel.OFF
    trace_rate: int = 1000  # one request in this many is traced
    trace_count: int = -1  # traces to take at most; -1: no limit
    trace_mode: TraceMode = TraceMode.TRITON

    @property
    def inference_threads(self) -> int:
        """Each worker's inference threads: --threads, or its share of the CPUs."""
        return self.threads or max(1, (self.cpus or usable_cpus()) // self.workers)

    @property
    def cuda(self) -> CudaOptions:
        """How ONNX Runtime runs on CUDA: --cuda-conv-search, --cuda-graphs, --cuda-tf32."""
        return CudaOptions(self.cuda_conv_search.value, self.cuda_graphs, self.cuda_tf32)

    @property
    def worker_peak_memory(self) -> int:
        """Bytes each worker may hold at its worst (worker_peak_memory)."""
        return worker_peak_memory(self.max_inflight_bytes, bool(self.http_port), self.backend)

    @property
    def max_concurrent_rpcs(self) -> int:
        """RPCs handled at once: as many largest requests as the in-flight budget holds, and room
        for the health probes and metadata calls made beside them."""
        return self.max_inflight_bytes // self.max_message_bytes + CONTROL_RPCS

    def __post_init__(self) -> None:
        """Choices given as strings become their enums, and every setting is checked: once, here."""
        for name, choice in (("device", Device), ("backend", BackendChoice), ("precision", Precision),
                             ("cuda_conv_search", ConvSearch), ("log_level", LogLevel), ("log_format", LogFormat),
                             ("trace_level", TraceLevel), ("trace_mode", TraceMode)):
            object.__setattr__(self, name, choice.parse(getattr(self, name), f"--{name.replace('_', '-')}"))
        self._validate()

    def _validate(self) -> None:
        """One-line errors for settings that cannot work, before anything starts."""
        b, cpus, runnable = self.batching, self.cpus or usable_cpus(), runnable_cpus()
        ports = [port for port in (self.port, self.http_port, self.metrics_port) if port]  # 0: none, or any free one
        checks = [
            *((0 <= port < 65536, f"--{option} must be in 0-65535, got {port}")
              for option, port in (("port", self.port), ("http-port", self.http_port),
                                   ("metrics-port", self.metrics_port))),
            (len(set(ports)) == len(ports),
             f"--port, --http-port and --metrics-port must be different ports (or 0), got {self.port}, "
             f"{self.http_port} and {self.metrics_port}"),
            (b.max_batch_size is None or 1 <= b.max_batch_size <= MAX_BATCH_SIZE,
             f"--max-batch-size must be auto or 1-{MAX_BATCH_SIZE} (the largest batch is warmed before ready: "
             f"{MAX_BATCH_SIZE} images take about 1 GB)"),
            (not b.buckets or b.buckets[-1] <= MAX_BATCH_SIZE,
             f"--batch-buckets must be sizes of at most {MAX_BATCH_SIZE} (each is warmed before ready: "
             f"{MAX_BATCH_SIZE} images take about 1 GB)"),
            (0 <= b.max_queue_delay_us <= MAX_QUEUE_DELAY_US,
             f"--max-queue-delay-us must be 0-{MAX_QUEUE_DELAY_US} (at most a second: a request that comes alone "
             "waits this long for batch-mates)"),
            (b.max_queue_size >= 1, "--max-queue-size must be >= 1"),
            (self.threads is None or self.threads >= 1, "--threads must be >= 1"),
            (self.cpus is None or self.cpus >= 1, "--cpus must be >= 1"),
            (self.cpus is None or self.cpus <= runnable,
             f"--cpus {self.cpus} is more than the {runnable} CPUs this machine lets the server run on "
             "(its affinity mask): its workers and threads would take turns on them"),
            (self.threads is None or self.threads <= cpus,
             f"--threads {self.threads} is more than the {cpus} CPUs this server may use "
             "(spinning threads beyond them starve the rest; --cpus raises the count)"),
            (self.max_images_per_request >= 1, "--max-images-per-request must be >= 1"),
            (1024 <= self.max_message_bytes <= MAX_GRPC_MESSAGE_BYTES,
             f"--max-message-bytes must be in 1024-{MAX_GRPC_MESSAGE_BYTES} (gRPC's limit)"),
            (self.max_inflight_bytes >= self.max_message_bytes,
             "--max-inflight-bytes must be at least --max-message-bytes (one largest request must fit)"),
            (bool(self.tls_cert) == bool(self.tls_key), "TLS needs both --tls-cert and --tls-key"),
            (not self.tls_client_ca or bool(self.tls_cert),
             "--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key; refusing to serve without TLS"),
            (all(0 <= seconds < math.inf for seconds in (self.drain_seconds, self.grace_seconds)),
             "--drain-seconds and --grace-seconds must be finite and >= 0"),
            (self.max_connection_age_seconds is None or 1 <= self.max_connection_age_seconds <= MAX_GRPC_SECONDS,
             f"--max-connection-age must be 1-{MAX_GRPC_SECONDS} seconds (gRPC's limit, about 24 days)"),
            (1 <= self.keepalive_seconds <= MAX_GRPC_SECONDS,
             f"--keepalive-seconds must be 1-{MAX_GRPC_SECONDS} (gRPC's limit, about 24 days)"),
            (1 <= self.http_idle_seconds < math.inf, "--http-idle-seconds must be at least 1 (and finite)"),
            (self.batch_timeout_seconds == 0 or 1 <= self.batch_timeout_seconds < math.inf,
             "--batch-timeout must be 0 (never) or at least 1 second (and finite)"),
            (1 <= self.workers <= MAX_WORKERS, f"--workers must be auto or 1-{MAX_WORKERS}"),
            (self.max_connections is None or self.max_connections >= 1, "--max-connections must be auto or >= 1"),
            (1 <= self.trace_rate < 2**31, "--trace-rate must be >= 1 (one request in that many is traced)"),
            (-1 <= self.trace_count < 2**31, "--trace-count must be -1 (no limit) or >= 0"),
            (self.poll_seconds == 0 or 0.1 <= self.poll_seconds < math.inf,
             "--poll-seconds must be 0 (no polling) or at least 0.1 (and finite)"),
            (self.trace_mode != TraceMode.OPENTELEMETRY or otel_installed(),
             "--trace-mode opentelemetry needs the OpenTelemetry SDK and its OTLP exporter: "
             "pip install 'resserve[otel]'"),
            *self._runtime_checks(),
            *((origin == "*" or bool(ORIGIN.fullmatch(origin)),
               f"--cors-origins takes origins as browsers send them, scheme://host[:port] in lowercase (no path, no "
               f"trailing slash: http://localhost:5173), or *; got {origin!r}") for origin in self.cors_origins),
        ]
        for ok, message in checks:
            if not ok:
                raise ResserveError(message)
        _check_host(self.host)

    def _runtime_checks(self) -> list[tuple[bool, str]]:
        """Backend, precision and device that cannot go together (serve/runtime.py chooses among the rest)."""
        backend, precision, cuda = self.backend, self.precision, self.device == Device.CUDA
        return [
            (precision != Precision.BF16 or backend in (BackendChoice.AUTO, BackendChoice.OPENVINO),
             f"--precision bf16 needs --backend openvino (or auto), not {backend}"),
            (precision != Precision.INT8 or backend in (BackendChoice.AUTO, BackendChoice.ONNXRUNTIME),
             f"--precision int8 runs on ONNX Runtime: use --backend onnxruntime (or auto), not {backend}"),
            (not (cuda and backend == BackendChoice.OPENVINO),
             "--backend openvino runs on the CPU; use --device cpu or --backend onnxruntime"),
            (not (cuda and precision == Precision.INT8), "--precision int8 runs on the CPU: use --device cpu (or auto)"),
        ]

    @property
    def address(self) -> str:
        """Where gRPC listens, as gRPC and the logs write it."""
        return host_port(self.host, self.port)


def otel_installed() -> bool:
    """Whether the ``otel`` extra is installed (serve/otel.py imports it only when traces export)."""
    try:  # a submodule's spec imports its parents, which raises where they are missing
        return all(importlib.util.find_spec(name) for name in ("opentelemetry.sdk",
                                                               "opentelemetry.exporter.otlp.proto.http"))
    except ModuleNotFoundError:
        return False


def host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets (``[::]:8001``), as gRPC and URLs need it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# A host alone: a name, an IPv4 address, or an IPv6 address in brackets (a bare one is refused
# with a hint, serve/client/grpc.py); anything else (host:port, gRPC's dns:///, unix: and ipv4: targets)
# says where to connect already
_HOST_ALONE = re.compile(r"(\[[0-9A-Fa-f:.]+(%[\w.-]+)?\]|[\w.-]+)")


def with_port(address: str, port: int) -> str:
    """``address`` with ``:port`` where it names a host alone (``localhost``, ``10.0.0.5``,
    ``[::1]``): a client sent there would otherwise connect to its protocol's default port (gRPC's
    is 443), not the server's."""
    return f"{address}:{port}" if _HOST_ALONE.fullmatch(address) else address


def warn_of_memory_limit(settings: ServerSettings) -> None:
    """Say at start, once, where the workers at their worst would take more memory than the
    server's memory limit leaves it (an explicit --workers, or one worker with large budgets): the
    kernel would kill one under load, and with it the requests it holds."""
    room, each = memory_headroom(), settings.worker_peak_memory
    if room is None or settings.workers * each <= room:
        return
    who = "1 worker" if settings.workers == 1 else f"{settings.workers} workers, each"
    fixes = "--max-inflight-bytes" if settings.workers == 1 else "--workers or --max-inflight-bytes"
    log.warning("%s may hold up to %.1f GB at its in-flight budgets' worst, more than the %.1f GB this server's "
                "memory limit leaves: lower %s, or raise the limit (docs/serving.md \"Limits\")", who, each / 1e9,
                room / 1e9, fixes)


def page_note(settings: ServerSettings, http_port: int) -> str:
    """Where a person opens the draw-a-digit page, for the log's "ready" line ("" without HTTP). A
    server on every interface (0.0.0.0, ::) is at localhost to them: not every browser opens 0.0.0.0."""
    if not http_port:
        return ""
    host = "localhost" if settings.host in ("0.0.0.0", "::") else settings.host
    return f"; draw a digit at {'https' if settings.tls_cert else 'http'}://{host_port(host, http_port)}/"


def _check_host(host: str) -> None:
    """``--host``: an address or name this machine resolves (0.0.0.0, ::, 127.0.0.1, localhost)."""
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not a valid host name"
        raise ResserveError(f"--host {host!r} is not an address to listen on ({reason}); give an IP address "
                            "(0.0.0.0 or :: for every interface, without brackets) or a name this machine "
                            "resolves") from None

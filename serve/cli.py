"""The serving commands: ``serve``, ``classify``, ``health``, ``models`` and ``bench serve``.

Registered into the root command (serve/app.py) by ``register``; torch-free.
"""

import dataclasses
import functools
import itertools
import json
import math
import sys
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, BinaryIO, Optional

import typer

from resserve.serve.batcher import DEFAULT_MAX_BATCH_SIZE, BatchingConfig
from resserve.serve.errors import ResserveError
from resserve.serve.outputs import check_writable
from resserve.serve.settings import (CPUS_PER_WORKER, CUDA_WORKERS, DEFAULT_HTTP_PORT, DEFAULT_METRICS_PORT,
                                     DEFAULT_PORT, MAX_BATCH_SIZE, MAX_QUEUE_DELAY_US, BackendChoice, ConvSearch,
                                     Device, LogFormat, LogLevel, Precision, ServerSettings, TraceLevel, TraceMode,
                                     parse_auto, parse_buckets, parse_max_batch_size, parse_workers, with_port,
                                     worker_peak_memory)

if TYPE_CHECKING:
    from resserve.serve.bench.clients import Level
    from resserve.serve.client import Client, Result

MODEL_CONTROL_SECONDS = 300.0  # a load reads, verifies and warms packages: seconds, more on a GPU with many buckets


def _env(name: str) -> str:
    return f"RESSERVE_{name}"


def serve(
    packages: Annotated[Optional[list[Path]], typer.Argument(
        help="Model package directories (from `resserve export`), or folders of them [default: the shipped "
        "model]. Packages of one model name at versions 1, 2, ... (`export --version`) are served side by side; a "
        "request that names no version gets the latest. A folder of packages is read again at each model load, so "
        "one exported into it while the server runs (a new version, a new model) is served after `resserve models "
        "--load NAME`.",
        show_default=False, envvar=_env("PACKAGES"))] = None,
    poll_seconds: Annotated[float, typer.Option(envvar=_env("POLL_SECONDS"),
        help="Look at the packages (folders of them anew) this often, as Triton's --model-control-mode poll: "
        "a model whose packages changed (a version added, re-exported or removed) is loaded again, one no package "
        "holds any more is unloaded, each in every worker, once two looks in a row find the change (not half "
        "copied or removed). 0: only a load through the API (resserve models --load) reads them "
        "again.")] = ServerSettings.poll_seconds,
    host: Annotated[str, typer.Option(envvar=_env("HOST"), help="Address to listen on.")] = ServerSettings.host,
    port: Annotated[int, typer.Option(envvar=_env("PORT"), help="gRPC port (Triton's default).")] = ServerSettings.port,
    http_port: Annotated[int, typer.Option(envvar=_env("HTTP_PORT"),
        help="HTTP port (Triton's default): KServe v2 REST, POST /v1/classify, and the draw-a-digit page "
        "at /; 0 disables.")] = ServerSettings.http_port,
    metrics_port: Annotated[int, typer.Option(envvar=_env("METRICS_PORT"),
                                              help="Prometheus /metrics port; 0 disables.")] = ServerSettings.metrics_port,
    max_batch_size: Annotated[str, typer.Option(envvar=_env("MAX_BATCH_SIZE"),
        help=f"Most images the batcher runs at once (at most {MAX_BATCH_SIZE}: the largest batch is warmed before "
        f"ready). auto: {DEFAULT_MAX_BATCH_SIZE['cpu']} on the CPU, "
        f"{DEFAULT_MAX_BATCH_SIZE['cuda']} on CUDA, or the largest --batch-buckets size.")] = "auto",
    max_queue_delay_us: Annotated[int, typer.Option(envvar=_env("MAX_QUEUE_DELAY_US"),
        help=f"Longest wait for batch-mates after the first queued request, microseconds (at most "
        f"{MAX_QUEUE_DELAY_US}: a second).")] = BatchingConfig.max_queue_delay_us,
    max_queue_size: Annotated[int, typer.Option(envvar=_env("MAX_QUEUE_SIZE"),
        help="Requests that may wait per model; beyond it: UNAVAILABLE (retryable).")] = BatchingConfig.max_queue_size,
    batch_buckets: Annotated[str, typer.Option(envvar=_env("BATCH_BUCKETS"),
        help="Batch sizes batches are zero-padded up to, each warmed before ready (e.g. 1,8,64; the largest is "
        "--max-batch-size), or none. auto: powers of two on CUDA (no shape compiles under load), none on the CPU "
        "(padding only costs there).")] = "auto",
    device: Annotated[str, typer.Option(envvar=_env("DEVICE"),
        help=f"{Device.listing()} (auto: CUDA where ONNX Runtime has it, else CPU).")] = ServerSettings.device.value,
    backend: Annotated[str, typer.Option(envvar=_env("BACKEND"),
        help=f"{BackendChoice.listing()} (torchscript needs torch). auto: OpenVINO bf16 where the CPU "
        "has BF16 (AMX, AVX512-BF16) and the package's accuracy guard allows it, else ONNX Runtime.")] = ServerSettings.backend.value,
    precision: Annotated[str, typer.Option(envvar=_env("PRECISION"),
        help=f"{Precision.listing()}. bf16 needs OpenVINO and a manifest showing <= 0.1 points accuracy loss; "
        "int8 runs the package's int8 artifact (export --quantize int8) on ONNX Runtime on the CPU. Either falls "
        "back to fp32, saying why, where the package does not allow it.")] = ServerSettings.precision.value,
    cuda_conv_search: Annotated[str, typer.Option(envvar=_env("CUDA_CONV_SEARCH"),
        help=f"{ConvSearch.listing()}: ONNX Runtime's cuDNN algorithm search on CUDA, paid at startup for every "
        "--batch-buckets size.")] = ServerSettings.cuda_conv_search.value,
    cuda_graphs: Annotated[bool, typer.Option("--cuda-graphs/--no-cuda-graphs", envvar=_env("CUDA_GRAPHS"),
        help="ONNX Runtime on CUDA: capture each --batch-buckets size as a CUDA graph before ready, replayed "
        "with one launch per batch.")] = ServerSettings.cuda_graphs,
    cuda_tf32: Annotated[bool, typer.Option("--cuda-tf32/--no-cuda-tf32", envvar=_env("CUDA_TF32"),
        help="ONNX Runtime on CUDA (Ampere and later): TF32 for the fp32 model's convolutions, reported as "
        "precision tf32: 1.5-1.7x at batch 256-1024 on an H200, logits up to 1.7e-2 from fp32's. Off: fp32 "
        "is fp32.")] = ServerSettings.cuda_tf32,
    threads: Annotated[Optional[int], typer.Option(envvar=_env("THREADS"),
        help="Inference threads per worker [default: the CPUs (--cpus) divided among the workers].",
        show_default=False)] = None,
    thread_spinning: Annotated[bool, typer.Option("--thread-spinning/--no-thread-spinning",
        envvar=_env("THREAD_SPINNING"),
        help="Idle inference threads (ONNX Runtime, TorchScript) spin waiting for work instead of sleeping: "
        "answers sooner at low load, but CPU use no longer follows load (turn off under a CPU-based "
        "autoscaler; OpenVINO's threads sleep either way).")] = ServerSettings.thread_spinning,
    max_images_per_request: Annotated[int, typer.Option(envvar=_env("MAX_IMAGES_PER_REQUEST"),
        help="Most images in one request (KServe batch or Classify images); more: INVALID_ARGUMENT.")] = ServerSettings.max_images_per_request,
    max_message_bytes: Annotated[int, typer.Option(envvar=_env("MAX_MESSAGE_BYTES"),
        help="Largest request; bigger ones get RESOURCE_EXHAUSTED.")] = ServerSettings.max_message_bytes,
    max_inflight_bytes: Annotated[int, typer.Option(envvar=_env("MAX_INFLIGHT_BYTES"),
        help="Memory budget for requests: the server handles this / --max-message-bytes RPCs at once "
        "(64 by default), and 8 more for health checks and metadata calls; more get RESOURCE_EXHAUSTED. "
        "Lower --max-message-bytes for more, smaller RPCs.")
    ] = ServerSettings.max_inflight_bytes,
    batch_timeout: Annotated[float, typer.Option(envvar=_env("BATCH_TIMEOUT"),
        help="Seconds a batch may compute: one that takes longer means the backend hung (a GPU that stopped "
        "answering), and the process exits with status 3 to be started again (by the supervisor under --workers, "
        "by Kubernetes otherwise). 0: never.")] = ServerSettings.batch_timeout_seconds,
    drain_seconds: Annotated[float, typer.Option(envvar=_env("DRAIN_SECONDS"),
        help="After SIGTERM: keep serving, not ready, this long.")] = ServerSettings.drain_seconds,
    grace_seconds: Annotated[float, typer.Option(envvar=_env("GRACE_SECONDS"),
        help="Then: time in-flight requests get to finish.")] = ServerSettings.grace_seconds,
    max_connection_age: Annotated[Optional[float], typer.Option(envvar=_env("MAX_CONNECTION_AGE"),
        help="Seconds before a client connection is recycled, so clients re-resolve.", show_default=False)] = None,
    keepalive_seconds: Annotated[float, typer.Option(envvar=_env("KEEPALIVE_SECONDS"),
        help="gRPC pings a client silent this long and closes its connection when no answer comes within 20 s "
        "(or this, if shorter), so the calls of a vanished client (crashed, partitioned, dropped by a NAT) "
        "free their places in the RPC limit.")] = ServerSettings.keepalive_seconds,
    http_idle_seconds: Annotated[float, typer.Option(envvar=_env("HTTP_IDLE_SECONDS"),
        help="An HTTP connection that has not sent a whole request this long is closed (a body that stopped "
        "arriving gets 408 first). Behind a load balancer, set it above the balancer's idle timeout (AWS ALB: "
        "60 s, Google Cloud: 600 s), or the balancer reuses connections the server is closing: 502s."
        )] = ServerSettings.http_idle_seconds,
    max_connections: Annotated[str, typer.Option(envvar=_env("MAX_CONNECTIONS"),
        help="Client connections each worker holds on each of its gRPC and HTTP ports; new ones beyond are "
        "closed at once, so a flood of connections cannot use up the open files every port needs. auto: "
        "10,000, or fewer where the open-file limit (ulimit -n) would run out first.")] = "auto",
    tls_cert: Annotated[Optional[Path], typer.Option(envvar=_env("TLS_CERT"),
        help="Server certificate (PEM); read again, with the key, when the files change.")] = None,
    tls_key: Annotated[Optional[Path], typer.Option(envvar=_env("TLS_KEY"), help="Server private key (PEM).")] = None,
    tls_client_ca: Annotated[Optional[Path], typer.Option(envvar=_env("TLS_CLIENT_CA"),
        help="Require client certificates signed by this CA (mutual TLS).")] = None,
    token_file: Annotated[Optional[Path], typer.Option(envvar=_env("TOKEN_FILE"),
        help="Bearer tokens, one per line; clients must send one (health is exempt). Read again when the file "
        "changes: a token taken out is refused from then on.")] = None,
    admin_token_file: Annotated[Optional[Path], typer.Option(envvar=_env("ADMIN_TOKEN_FILE"),
        help="Bearer tokens, one per line, that loading and unloading models and changing log and trace settings "
        "take (no other token does); good for every other API too.")] = None,
    allow_client_shm: Annotated[bool, typer.Option("--allow-client-shm/--no-allow-client-shm",
        envvar=_env("ALLOW_CLIENT_SHM"),
        help="Let clients on this host pass tensors in system shared memory (Triton's extension: "
        "tritonclient.utils.shared_memory, perf_analyzer --shared-memory system). Only clients connected over "
        "loopback may register a region, which lets them have the server read and write a /dev/shm object they "
        "name.")] = ServerSettings.allow_client_shm,
    cors_origins: Annotated[str, typer.Option(envvar=_env("CORS_ORIGINS"),
        help="Web pages of these origins may call the HTTP API from a browser (CORS), comma-separated, as in "
        "http://localhost:5173,https://app.example.com; * for any. [default: none: only the server's own page; "
        "clients other than browsers need none]", show_default=False)] = "",
    workers: Annotated[str, typer.Option(envvar=_env("WORKERS"),
        help="Server processes on the same ports, each with its own models and a share of the CPUs "
        f"(Linux; elsewhere 1). auto: one per {CPUS_PER_WORKER} CPUs (--cpus), at least one; with --device cuda "
        f"at most {CUDA_WORKERS}, which share the GPU; no more than a memory limit (a container's) holds at their "
        "in-flight budgets' worst (--max-inflight-bytes).")] = "auto",
    cpus: Annotated[Optional[int], typer.Option(envvar=_env("CPUS"),
        help="CPUs the server may use, shared by its workers (Kubernetes: the CPU limit, from the downward API) "
        "[default: the affinity mask, capped by a cgroup CPU quota (a container's), v2 or v1].",
        show_default=False)] = None,
    log_level: Annotated[str, typer.Option(envvar=_env("LOG_LEVEL"),
        help=f"{LogLevel.listing()}: the least severe log lines written. debug adds a line per request answered "
        "(an access log).")] = ServerSettings.log_level.value,
    log_format: Annotated[str, typer.Option(envvar=_env("LOG_FORMAT"),
        help=f"{LogFormat.listing()}. json: one JSON object a line (level, name, message, timestamp; worker under "
        "--workers), for log collectors.")] = ServerSettings.log_format.value,
    trace_level: Annotated[str, typer.Option(envvar=_env("TRACE_LEVEL"),
        help=f"{TraceLevel.listing()}: Triton's request traces; TIMESTAMPS logs the requests sampled (--trace-rate) "
        "with when each was queued and computed, one line each. Clients may change it while the server runs "
        "(Triton's trace extension).")] = ServerSettings.trace_level.value,
    trace_rate: Annotated[int, typer.Option(envvar=_env("TRACE_RATE"),
        help="With --trace-level TIMESTAMPS, one request in this many is traced.")] = ServerSettings.trace_rate,
    trace_count: Annotated[int, typer.Option(envvar=_env("TRACE_COUNT"),
        help="Traces to take at most; -1: no limit.")] = ServerSettings.trace_count,
    trace_mode: Annotated[str, typer.Option(envvar=_env("TRACE_MODE"),
        help=f"{TraceMode.listing()}: where traces go. triton: a log line each (Triton's trace record); "
        "opentelemetry: OpenTelemetry spans over OTLP/HTTP to OTEL_EXPORTER_OTLP_TRACES_ENDPOINT "
        "(default http://localhost:4318/v1/traces), a request's W3C traceparent their parent, and a request "
        "that carries one traced whatever the rate (needs the otel extra).")] = ServerSettings.trace_mode.value,
) -> None:
    """Serve digit classification over gRPC and HTTP.

    gRPC (--port): resserve.v1.DigitClassifier and KServe v2 / Triton. HTTP (--http-port):
    KServe v2 REST (tritonclient.http works unchanged), POST /v1/classify (images in, digits
    out, JSON), and a page at / to draw a digit and see it classified; /openapi.yaml describes the
    HTTP API. On many CPUs, one server process (--workers) per 4 CPUs by default, all on the
    same ports.

    Health: grpc.health.v1 with service "resserve.liveness" (process up) and
    "resserve.readiness" (models loaded and not draining); over HTTP /v2/health/live and
    /v2/health/ready. Stop with SIGTERM: not ready, drain, grace for in-flight requests, exit 0.
    """
    from resserve.serve.backends.base import usable_cpus

    largest_batch = parse_max_batch_size(max_batch_size)
    settings = ServerSettings(
        packages=tuple(packages or ()), poll_seconds=poll_seconds, host=host, port=port, http_port=http_port,
        metrics_port=metrics_port,
        batching=BatchingConfig(max_batch_size=largest_batch, max_queue_delay_us=max_queue_delay_us,
                                max_queue_size=max_queue_size, buckets=parse_buckets(batch_buckets, largest_batch)),
        device=device, backend=backend, precision=precision, cuda_conv_search=cuda_conv_search,
        cuda_graphs=cuda_graphs, cuda_tf32=cuda_tf32, threads=threads, thread_spinning=thread_spinning,
        cpus=cpus, workers=parse_workers(workers, cpus or usable_cpus(), device,
                                         worker_peak_memory(max_inflight_bytes, bool(http_port), backend)),
        max_images_per_request=max_images_per_request, max_message_bytes=max_message_bytes,
        max_inflight_bytes=max_inflight_bytes, batch_timeout_seconds=batch_timeout, drain_seconds=drain_seconds,
        grace_seconds=grace_seconds,
        max_connection_age_seconds=max_connection_age, keepalive_seconds=keepalive_seconds,
        http_idle_seconds=http_idle_seconds,
        max_connections=parse_auto(max_connections, "--max-connections", "connections"),
        tls_cert=tls_cert, tls_key=tls_key, tls_client_ca=tls_client_ca, token_file=token_file,
        admin_token_file=admin_token_file, allow_client_shm=allow_client_shm,
        cors_origins=tuple(origin.strip() for origin in cors_origins.split(",") if origin.strip()),
        log_level=log_level, log_format=log_format, trace_level=trace_level, trace_rate=trace_rate,
        trace_count=trace_count, trace_mode=trace_mode)
    # the server's modules (a fifth of a second) once the settings are known to be good: a bad flag is answered sooner
    if settings.workers > 1:
        from resserve.serve.workers.supervisor import supervise

        supervise(settings)
    else:
        from resserve.serve.server import run_server

        run_server(settings)


def client_token(token: str | None, token_file: Path | None) -> str | None:
    """The bearer token a client command sends: --token, or the first line of --token-file."""
    from resserve.serve.auth import check_token, read_tokens

    if token and token_file:
        raise ResserveError("give --token or --token-file, not both")
    return read_tokens(token_file)[0] if token_file else token and check_token(token, "--token")


Server = Annotated[str, typer.Option("--server", envvar=_env("SERVER"),
    help=f"The server: host:port of its gRPC port ({DEFAULT_PORT} where only a host is given), or the http:// "
    "or https:// URL of its HTTP port, or of what routes to it (an ingress, KServe; https:// trusts this machine's "
    "CAs, or --tls-ca).")]
TlsCa = Annotated[Optional[Path], typer.Option(envvar=_env("TLS_CA"), help="CA certificate: connect with TLS.")]
TlsCert = Annotated[Optional[Path], typer.Option(envvar=_env("CLIENT_CERT"), show_envvar=True, show_default=False,
    help="This client's certificate (PEM), for a server with mutual TLS (--tls-client-ca); with --tls-key.")]
TlsKey = Annotated[Optional[Path], typer.Option(envvar=_env("CLIENT_KEY"), show_envvar=True, show_default=False,
    help="The private key (PEM) of --tls-cert.")]
Token = Annotated[Optional[str], typer.Option(envvar=_env("TOKEN"), show_envvar=True,
    help="Bearer token. Prefer the environment variable or --token-file: a flag shows in the process list.")]
TokenFile = Annotated[Optional[Path], typer.Option(envvar=_env("TOKEN_FILE"),
    help="File whose first line is the bearer token.", show_default=False)]


def classify(
    images: Annotated[list[Path], typer.Argument(metavar="IMAGE", show_default=False,
        help="Image files (PNG, JPEG, ...), or folders of them: photos and drawings work; - reads one "
        "image from standard input.")],
    server: Server = "localhost:8001",
    model: Annotated[str, typer.Option(help="Model name [default: the server's default].")] = "",
    model_version: Annotated[str, typer.Option(help="Model version [default: the latest the server has].")] = "",
    tls_ca: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    token: Token = None,
    token_file: TokenFile = None,
    as_json: Annotated[bool, typer.Option("--json", help="A JSON list of {file, digit, confidence, model, model_version} (or {file, error}).")] = False,
) -> None:
    """Classify handwritten digit images with a running server.

    An image that cannot be read, or that the server refuses (not an image, blank, too large), is
    named with the reason on stderr; the others are still classified; the exit code is 1 if any
    was refused. Many files go as several requests, four at a time (the server decodes each on a
    CPU of its own), printed in order as they are answered. A folder stands for the images in it,
    by name (files in a format the server reads, by their extension; not its subfolders); - for an
    image piped in (`curl -s URL | resserve classify -`).
    """
    from resserve.serve.client import connect
    from resserve.serve.client.base import requests_of

    images, rows = _image_files(images), []
    with connect(server, tls_ca, client_token(token, token_file), tls_cert=tls_cert, tls_key=tls_key) as client:
        def send(request: range) -> list[dict]:
            return _classify_files(client, images[request.start:request.stop], model, model_version)

        with closing(client.in_order(send, requests_of([_size_of(path) for path in images]))) as answers:
            for row in itertools.chain.from_iterable(answers):
                if "error" in row:
                    typer.echo(f"{row['file']}: error: {row['error']}", err=True)
                elif not as_json:
                    typer.echo(f"{row['file']}: {row['digit']} ({row['confidence']:.1%})")
                rows.append(row)
    if as_json:
        typer.echo(json.dumps(rows))
    if any("error" in row for row in rows):
        raise typer.Exit(1)


STDIN = Path("-")  # the file name that stands for standard input, as in curl and tar
# What classify reads of one file at most: more than any image the server decodes (16 million
# pixels of 16-bit RGBA is 128 MB), so a device or a stream that never ends is refused, not read
# until memory runs out.
MAX_IMAGE_FILE_BYTES = 256 * 2**20


def _image_files(paths: list[Path]) -> list[Path]:
    """``paths``, each folder among them replaced by the image files in it, sorted by name."""
    files = []
    for path in paths:
        if not path.is_dir():
            files.append(path)
            continue
        try:  # hidden files are left out: a Mac's ._IMG_0001.jpg is no image
            found = sorted(f for f in path.iterdir()
                           if f.suffix.lower() in _image_extensions() and not f.name.startswith(".") and f.is_file())
        except OSError as exc:
            raise ResserveError(f"cannot read {path}: {exc.strerror}") from None
        if not found:
            raise ResserveError(f"{path} has no image files (PNG, JPEG, ...) in it")
        files.extend(found)
    return files


@functools.cache
def _image_extensions() -> set[str]:
    """The file extensions of the formats the server reads (.png, .jpg, ...), and an iPhone's HEIC, which
    the server answers with how to send it: asked only for a folder, as it loads every Pillow plugin."""
    from PIL import Image

    from resserve.serve.preprocess import READ_FORMATS

    readable = {extension for extension, format in Image.registered_extensions().items() if format in READ_FORMATS}
    return readable | {".heic", ".heif"}


def _bounded(stream: BinaryIO) -> bytes | str:
    """A file's bytes, or why they are not sent."""
    data = stream.read(MAX_IMAGE_FILE_BYTES + 1)
    if len(data) > MAX_IMAGE_FILE_BYTES:
        return f"more than {MAX_IMAGE_FILE_BYTES // 2**20} MiB, larger than any image the server reads"
    return data


@functools.cache
def _stdin_bytes() -> bytes | str:
    """What was piped in, for the file name ``-``: read once, however often ``-`` is given."""
    return _bounded(sys.stdin.buffer)


def _file_bytes(path: Path) -> bytes | str:
    try:
        with path.open("rb") as file:
            return _bounded(file)
    except OSError as exc:
        return f"cannot read it: {exc.strerror}"


def _size_of(path: Path) -> int:
    """How many bytes ``path`` will send (0 where it cannot be read: reading it will say why)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _classify_files(client: "Client", paths: list[Path], model: str, version: str) -> list[dict]:
    """One request's files as ``classify``'s output rows; a file that cannot be read is a row with
    its reason, and is not sent."""
    blobs = [_stdin_bytes() if path == STDIN else _file_bytes(path) for path in paths]
    outcomes = iter(client.classify_each([b for b in blobs if isinstance(b, bytes)], model, version))
    return [_row(path, blob if isinstance(blob, str) else next(outcomes)) for path, blob in zip(paths, blobs)]


def _row(path: Path, outcome: "Result | str") -> dict:
    if isinstance(outcome, str):
        return {"file": str(path), "error": outcome}
    return {"file": str(path), "digit": outcome.digit, "confidence": round(outcome.confidence, 6),
            "model": outcome.model, "model_version": outcome.model_version}


def health(
    server: Server = "localhost:8001",
    service: Annotated[str, typer.Option(help='Health service name: "" (server), resserve.liveness, resserve.readiness.')] = "",
    wait: Annotated[float, typer.Option(
        help="Seconds to keep asking until SERVING (a server still starting or loading) before giving up; "
        "0: ask once.")] = 0.0,
    tls_ca: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
) -> None:
    """Ask a server's grpc.health.v1 service (over HTTP: GET /v2/health/ready, or /live); exit 0 only when SERVING.

    In scripts: `resserve serve & resserve health --service resserve.readiness --wait 60 && ...`.
    """
    from resserve.serve.client import connect

    if not 0 <= wait < math.inf:
        raise ResserveError(f"--wait must be finite and >= 0, got {wait}")
    with connect(server, tls_ca, timeout=5.0, tls_cert=tls_cert, tls_key=tls_key) as client:
        status = client.wait_until_serving(service, wait)
    typer.echo(status)
    if status != "SERVING":
        raise typer.Exit(1)


def models(
    server: Server = "localhost:8001",
    load: Annotated[Optional[str], typer.Option(
        help="Load this model (again) from the packages the server was started with, and those in its folders "
        "of packages now, in every worker, before listing: a package re-exported in place, or exported into such "
        "a folder (a new version, a new model), is served from then on, without a restart.",
        show_default=False)] = None,
    unload: Annotated[Optional[str], typer.Option(
        help="Stop serving this model (every version) before listing; --load serves it again.",
        show_default=False)] = None,
    tls_ca: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    token: Token = None,
    token_file: TokenFile = None,
    as_json: Annotated[bool, typer.Option("--json", help="A JSON list of {name, version, state, reason}.")] = False,
) -> None:
    """The models a server has and their state (and versions in its packages that a load would
    bring in: not loaded); load or unload one while it serves.

    In scripts: `resserve export model.pt --name resnet-mnist --out pkg/ && resserve models --load resnet-mnist`.
    """
    from resserve.serve.client import connect

    if load and unload:
        raise ResserveError("give --load or --unload, not both")
    with connect(server, tls_ca, client_token(token, token_file), timeout=MODEL_CONTROL_SECONDS, tls_cert=tls_cert,
                 tls_key=tls_key) as client:
        if load:
            client.load(load)
        if unload:
            client.unload(unload)
        entries = client.models()
    if as_json:
        typer.echo(json.dumps([dataclasses.asdict(entry) for entry in entries]))
        return
    for entry in entries:
        typer.echo(f"{entry.name}\t{entry.version or '-'}\t{entry.state}" + (f" ({entry.reason})" if entry.reason else ""))


def bench_serve(
    target: Annotated[Optional[str], typer.Option(help=f"host:port of a running server's gRPC port ({DEFAULT_PORT} "
        "where only a host is given), instead of --start; or the http:// or https:// URL of its HTTP port, or of "
        "what routes to it (an ingress, KServe), for --api rest.")] = None,
    start: Annotated[bool, typer.Option("--start", help="Start the server(s) on loopback: batched and unbatched.")] = False,
    package: Annotated[Optional[Path], typer.Option(
        help="Model package to serve and to run in-process [default: the shipped model].", show_default=False)] = None,
    model: Annotated[str, typer.Option(help="Model name [default: the package's].")] = "",
    api: Annotated[Optional[str], typer.Option(
        help="APIs to load, comma-separated, each against the same server(s): kserve (gRPC KServe v2, a call "
        "per request), kserve-stream (the same requests on one ModelStreamInfer call per client), classify "
        "(gRPC DigitClassifier), rest (KServe v2 REST with binary tensors, as tritonclient.http) "
        "[default: kserve; rest for a --target URL].", show_default=False)] = None,
    client: Annotated[str, typer.Option(
        help="The load's client: resserve (grpc.aio stubs, aiohttp), tritonclient (Triton's asyncio "
        "clients; needs tritonclient installed) or perf_analyzer (Triton's C++ load generator, one "
        "multi-threaded process, which takes the least CPU from a server it shares CPUs with; needs "
        "perf_analyzer on PATH). The Triton clients speak every API but classify.")] = "resserve",
    http_target: Annotated[Optional[str], typer.Option(
        help="With a --target HOST:PORT and --api rest: the server's HTTP host:port [default: HOST:8000].",
        show_default=False)] = None,
    concurrency: Annotated[Optional[str], typer.Option(
        help="Closed-loop load: concurrent clients, each sending its next request when the last returns, "
        "comma-separated [default: 1,2,4,8,16,32].", show_default=False)] = None,
    rate: Annotated[Optional[str], typer.Option(
        help="Open-loop load instead: requests per second, comma-separated (e.g. 20,100,300); requests arrive at "
        "random (Poisson) times whether or not earlier ones have returned, and latency counts from when each "
        "was due. Shows what the server costs (CPU) and answers at a given traffic.", show_default=False)] = None,
    batch: Annotated[int, typer.Option(help="Images per request.")] = 1,
    duration: Annotated[float, typer.Option(help="Measured seconds per load level.")] = 10.0,
    warmup: Annotated[float, typer.Option(help="Unmeasured seconds before each level.")] = 2.0,
    backends: Annotated[str, typer.Option(
        help="With --start: server backends to measure, comma-separated, each optionally with its precision "
        "(e.g. onnxruntime,auto,onnxruntime:int8,openvino:fp32); each runs batched, and ONNX Runtime unbatched "
        "is always added as the baseline.")] = "onnxruntime,auto",
    workers: Annotated[str, typer.Option(
        help="With --start: server worker counts to measure side by side, comma-separated (e.g. 1,2,4) "
        "[default: what --workers auto gives here].", show_default=False)] = "auto",
    load_processes: Annotated[str, typer.Option(
        help="Processes the Python load generator spreads its clients over (each at most one core) [default "
        "auto: one per 2 usable CPUs; with a server sharing the CPUs, more load processes take its CPU]. "
        "perf_analyzer is always one process.",
        show_default=False)] = "auto",
    metrics: Annotated[Optional[str], typer.Option(
        help="The target's metrics URL, where its batch sizes, queue times and CPU time are read "
        "[default: http://HOST:8002/metrics for a --target HOST:PORT; none for a URL].", show_default=False)] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the report as JSON here.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write a PNG: latency percentiles against throughput.")] = None,
    tls_ca: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    token: Token = None,
    token_file: TokenFile = None,
) -> None:
    """Latency, throughput and CPU under closed- or open-loop load, beside the in-process limit.

    A --target with TLS or tokens takes the client commands' options (--tls-ca, --tls-cert and
    --tls-key, --token or --token-file), for every client and API; the servers --start starts
    have neither, and those options are left unused."""
    from resserve.serve.backends.base import usable_cpus
    from resserve.serve.bench.clients import Credentials
    from resserve.serve.bench.report import plot_report, print_report, report_json
    from resserve.serve.bench.sweep import SweepPlan, run_benchmark
    from resserve.serve.client import is_url

    if start == (target is not None):
        raise ResserveError("give exactly one of --start and --target (HOST:PORT or URL)")
    cpus = usable_cpus()
    each = worker_peak_memory(ServerSettings.max_inflight_bytes, http=True)  # the servers --start starts
    counts = [parse_workers(w, cpus, "cpu", each) for w in comma_separated(workers)]
    if not counts or min(counts) < 1:
        raise ResserveError(f"--workers takes auto or counts >= 1, comma-separated; got {workers!r}")
    processes = max(1, cpus // 2) if load_processes == "auto" else _positive(load_processes, "--load-processes")
    credentials = Credentials(tls_ca, tls_cert, tls_key, client_token(token, token_file)) if target else Credentials()
    api = api or ("rest" if target and is_url(target) else "kserve")  # a URL reaches the HTTP API alone
    target, http_url, metrics_url = _bench_addresses(target, http_target, metrics, https=bool(credentials.tls_ca))
    plan = SweepPlan(
        apis=comma_separated(api), levels=_levels(concurrency, rate), batch=batch, duration=duration, warmup=warmup,
        client=client, load_processes=processes, package=package, model=model, target=target,
        backends=comma_separated(backends), workers=counts, http_url=http_url, metrics_url=metrics_url,
        credentials=credentials)
    plan.check()
    for output, example in ((json_out, "serve.json"), (plot, "serve.png")):
        if output:
            check_writable(output, example)
    report = run_benchmark(plan, log=lambda m: typer.echo(m, err=True))
    print_report(report)
    if json_out:
        json_out.write_text(report_json(report))
    if plot:
        plot_report(report, plot)


def _bench_addresses(target: Optional[str], http_target: Optional[str], metrics: Optional[str],
                     https: bool) -> tuple[Optional[str], Optional[str], Optional[str]]:
    """``bench serve --target``'s server: its gRPC host:port (or its URL), its HTTP URL (https where
    --tls-ca says the server has TLS) and its metrics URL; all None with --start. A URL names the
    HTTP port (or an ingress) alone: an ingress routes no metrics port, so none is read unless
    --metrics names it."""
    from resserve.serve.client import is_url
    from resserve.serve.client.http import base_url

    if target is None:
        return None, None, None
    if is_url(target):
        if http_target:
            raise ResserveError("--http-target goes with a --target HOST:PORT of a server's gRPC port; a --target URL "
                                "names the HTTP port itself")
        url = str(base_url(target, "--target"))
        return url, url, metrics
    target = with_port(target, DEFAULT_PORT)
    host = target.rsplit(":", 1)[0]
    http = with_port(http_target, DEFAULT_HTTP_PORT) if http_target else f"{host}:{DEFAULT_HTTP_PORT}"
    scheme = "https" if https else "http"
    return target, f"{scheme}://{http}", metrics or f"http://{host}:{DEFAULT_METRICS_PORT}/metrics"


def _levels(concurrency: Optional[str], rate: Optional[str]) -> list["Level"]:
    """The load levels: closed loop at each --concurrency, or open loop at each --rate."""
    from resserve.serve.bench.clients import Level

    if concurrency is not None and rate is not None:
        raise ResserveError("give --concurrency (closed loop) or --rate (open loop), not both")
    option, values = ("--rate", rate) if rate is not None else ("--concurrency", concurrency or "1,2,4,8,16,32")
    try:
        numbers = [float(v) if rate is not None else int(v) for v in values.split(",")]
    except ValueError:
        numbers = []
    if not numbers or not all(math.isfinite(n) and n > 0 for n in numbers):
        kind = "requests per second > 0" if rate is not None else "client counts >= 1"
        raise ResserveError(f"{option} takes {kind}, comma-separated; got {values!r}")
    return [Level(rate=n) if rate is not None else Level(concurrency=n) for n in numbers]


def comma_separated(values: str) -> list[str]:
    """A comma-separated option's values, blanks dropped (the training commands' options too)."""
    return [v.strip() for v in values.split(",") if v.strip()]


def _positive(value: str, option: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ResserveError(f"{option} must be auto or a count >= 1, got {value!r}")
    return number


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add these commands to the root CLI (serve/app.py)."""
    app.command()(serve)
    app.command()(classify)
    app.command()(health)
    app.command()(models)
    bench_app.command("serve")(bench_serve)

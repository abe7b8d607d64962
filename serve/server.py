"""Wiring: the gRPC server with both APIs, health, reflection; the HTTP server (serve/rest/);
metrics, auth, TLS, and a drain on SIGTERM for all of them.

Lifecycle:
1. bind the ports (one in use: a startup error) and start answering; health says NOT_SERVING;
2. load every model package (sha256-verified), warm each backend, start its batcher;
3. health SERVING (liveness and readiness);
4. on SIGTERM/SIGINT: readiness NOT_SERVING (liveness stays SERVING) while the server keeps
   answering for ``drain_seconds`` so load balancers stop sending (a second signal skips the
   rest of it); then new requests are answered UNAVAILABLE (HTTP 503; retryable) and in-flight ones get
   ``grace_seconds`` to finish, after which those still queued are answered UNAVAILABLE too and
   only the batches running finish; exit 0. No request is ever answered CANCELLED (see ``_serve``).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Awaitable, Callable, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from prometheus_client import CollectorRegistry, disable_created_metrics, start_http_server

from resserve.serve.aio import done_before, set_within
from resserve.serve.auth import ADMIN_GRPC_METHODS, TokenRotation, Verdict, warn_of_open_admin_apis
from resserve.serve.connections import ConnectionLimits
from resserve.serve.control import ModelControl
from resserve.serve.dataplane import DataPlane
from resserve.serve.digits import DigitClassifierServicer
from resserve.serve.errors import ResserveError
from resserve.serve.heap import freeze_long_lived
from resserve.serve.kserve import InferenceServicer
from resserve.serve.logs import LogSettings, configure_logging
from resserve.serve.metrics import ServerProcessCollector
from resserve.serve.package import ModelPackage
from resserve.serve.polling import follow_packages, look
from resserve.serve.repository import load_repository, read_packages
from resserve.serve.rest import classify as rest_classify
from resserve.serve.rest import kserve as rest_kserve
from resserve.serve.rest import openapi as rest_openapi
from resserve.serve.rest.server import SERVER_NAME, HttpServer
from resserve.serve.rpc import Registrar, abort
from resserve.serve.sharedmemory import MAX_REGIONS, SharedMemory
from resserve.serve.state import ModelAction, Peers, ServerState
from resserve.serve.settings import (LIVENESS_SERVICE, MAX_GRPC_SECONDS, READINESS_SERVICE, ServerSettings, host_port,
                                     page_note, warn_of_memory_limit)
from resserve.serve.stubs import digits_pb2, digits_pb2_grpc, grpc_service_pb2, grpc_service_pb2_grpc
from resserve.serve.rotation import ROTATION_CHECK_SECONDS
from resserve.serve.tls import CertificateRotation
from resserve.serve.tracing import TraceSettings, tracer
from resserve.serve.watchdog import WatchedInferenceThread

log = logging.getLogger("resserve.serve")

API_SERVICES = [
    grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
    digits_pb2.DESCRIPTOR.services_by_name["DigitClassifier"].full_name,
]
# "" (the whole server) and each API follow readiness: a draining server is not ready for traffic
READINESS_NAMES = ["", READINESS_SERVICE, *API_SERVICES]
AUTH_EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
FLUSH_SECONDS = 0.1  # after the last answer, before the process exits
PENDING_CALLS = 20_000
KEEPALIVE_TIMEOUT_SECONDS = 20.0  # for the answer to a keepalive ping (gRPC's default)
CLIENT_PING_SECONDS = 5  # the shortest interval of clients' pings, as gRPC's keepalive example allows them
METRICS_SOCKET_SECONDS = 10.0  # for a scrape's request and its answer (Prometheus's own scrape timeout is 10 s)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` on every RPC except health and reflection, an
    admin token on the admin RPCs where the server has them (serve/auth.py)."""

    def __init__(self, access: TokenRotation) -> None:
        self._access = access

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        if details.method.startswith(AUTH_EXEMPT_PREFIXES):
            return await continuation(details)
        metadata = details.invocation_metadata or ()
        verdict = self._access.verdict([value for key, value in metadata if key == "authorization"],
                                       admin_api=details.method in ADMIN_GRPC_METHODS)
        if verdict is Verdict.ALLOWED:
            return await continuation(details)

        async def deny(request_or_stream, context):
            await abort(context, verdict.code, verdict.message)

        handler = await continuation(details)
        if handler is not None and handler.request_streaming:  # refused at once, before any message
            return grpc.stream_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


def _grpc_options(settings: ServerSettings, connections: ConnectionLimits) -> list[tuple[str, int]]:
    options = [
        # connections beyond: closed at once (serve/connections.py)
        ("grpc.max_allowed_incoming_connections", connections.per_port),
        # a port in use is an error, not a silent second listener; workers share theirs (serve/workers/)
        ("grpc.so_reuseport", int(settings.reuse_port)),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Calls that arrived but are not yet handed to Python wait in gRPC core; past its default
        # backlog (1,000 soft, 3,000 hard) core drops them as CANCELLED, uncounted. Let them wait
        # (they carry headers only) and be answered by the server: OK, or UNAVAILABLE when full.
        ("grpc.server.max_pending_requests", PENDING_CALLS),
        ("grpc.server.max_pending_requests_hard_limit", 2 * PENDING_CALLS),
        # a client that does not answer a ping is gone: its connection closes, its calls end
        ("grpc.keepalive_time_ms", int(settings.keepalive_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", _keepalive_timeout_ms(settings)),
        ("grpc.http2.ping_timeout_ms", _keepalive_timeout_ms(settings)),  # what core's chttp2 waits for (60 s if unset)
        ("grpc.keepalive_permit_without_calls", 1),  # idle connections too: each holds a --max-connections place
        ("grpc.http2.max_pings_without_data", 0),  # core's default stops pinging after 2 while no data is sent
        # clients' keepalive pings (tritonclient's KeepAliveOptions, for a load balancer's idle timeout)
        # as often as every CLIENT_PING_SECONDS: core's default, 5 minutes, answers a client that pings
        # more often while nothing else is sent (an idle stream, a quiet channel) with GOAWAY
        # "too_many_pings" at its third such ping, which ends its open streams UNAVAILABLE
        ("grpc.http2.min_ping_interval_without_data_ms", CLIENT_PING_SECONDS * 1000),
    ]
    if settings.max_connection_age_seconds:
        options += [("grpc.max_connection_age_ms", int(settings.max_connection_age_seconds * 1000)),
                    # a grace longer than gRPC counts (about 24 days) is as long as it counts
                    ("grpc.max_connection_age_grace_ms", int(min(settings.grace_seconds, MAX_GRPC_SECONDS) * 1000))]
    return options


def _keepalive_timeout_ms(settings: ServerSettings) -> int:
    return int(min(KEEPALIVE_TIMEOUT_SECONDS, settings.keepalive_seconds) * 1000)


class Server:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.state = ServerState(settings)
        self.preprocess_pool = ThreadPoolExecutor(max_workers=settings.inference_threads, thread_name_prefix="preprocess")
        self.health = health_aio.HealthServicer()
        self.executor = WatchedInferenceThread(settings.batch_timeout_seconds or None)
        self.control = ModelControl(self.state, self.executor)
        self.plane = DataPlane(self.state, self.preprocess_pool, self.control)
        self.tokens = TokenRotation.of(settings, self.state.metrics.token_reloads)  # a bad file: refused here
        interceptors = [BearerTokenInterceptor(self.tokens)] if self.tokens else []
        # a region registered holds a descriptor: room for as many as may be, where clients may register them
        self.connections = ConnectionLimits.of(settings.max_connections,
                                               MAX_REGIONS if settings.allow_client_shm else 0)
        self.grpc = grpc.aio.server(options=_grpc_options(settings, self.connections), interceptors=interceptors,
                                    maximum_concurrent_rpcs=settings.max_concurrent_rpcs)
        self.http = (HttpServer(self.plane, [*rest_kserve.routes, *rest_classify.routes, *rest_openapi.routes],
                                self.tokens)
                     if settings.http_port else None)
        self.tls: CertificateRotation | None = None
        self.port = self.http_port = 0  # as bound: a setting of 0 takes a free port
        self.background: set[asyncio.Task] = set()

    async def _set_health(self, names: list[str], serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in names:
            await self.health.set(name, status)

    async def start(self, coordinator: Coordinator | None = None) -> None:
        """Listen and load. Alone: listen first (health says NOT_SERVING while models load), then
        load. As one of several workers (``coordinator``): load first, listen when every worker
        has loaded, so no connection ever reaches a worker that is not ready."""
        seen = look(self.settings.packages) if self.settings.poll_seconds else None  # before they are read
        packages = read_packages(self.settings)  # a missing or malformed package: an error before listening
        await self._set_health([LIVENESS_SERVICE, *READINESS_NAMES], serving=False)
        if coordinator is None:
            await self._listen()
            warn_of_open_admin_apis(self.settings.host, bool(self.settings.token_file),
                                    bool(self.settings.admin_token_file))
            warn_of_memory_limit(self.settings)
            await self._load(packages)
        else:
            self.state.peers = coordinator
            await self._load(packages, coordinator.unloaded)
            await coordinator.loaded(self.control.follow, self.state.shared_memory)
            await self._listen()
        freeze_long_lived()  # what the start loaded lives as long as the server
        self.state.ready = True
        await self._set_health(READINESS_NAMES, serving=True)
        if seen is not None:  # under --workers, the first worker's alone (serve/workers/)
            log.info("looking at the packages every %g s for changes to load (--poll-seconds)",
                     self.settings.poll_seconds)
            self.background.add(asyncio.get_running_loop().create_task(
                follow_packages(self.control, self.state, self.settings.poll_seconds, seen)))
        if coordinator is None:
            log.info("ready: %s%s", ", ".join(f"{m.name} v{m.version}" for m in self.state.repository.models)
                     or "no model loaded", page_note(self.settings, self.http_port))
        else:  # the supervisor says ready when every worker is
            coordinator.ready()

    async def _listen(self) -> None:
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.plane), Registrar(self.grpc, streams_read_malformed=True))
        digits_pb2_grpc.add_DigitClassifierServicer_to_server(DigitClassifierServicer(self.plane), Registrar(self.grpc))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, Registrar(self.grpc))
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflection.aio.ReflectionServicer(
            [*API_SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]),
            Registrar(self.grpc))
        # a bad key or certificate: refused here, before listening
        metrics = self.state.metrics
        self.tls = CertificateRotation.of(self.settings, metrics.tls_reloads, metrics.tls_certificate_expiry)
        if self.http and not self.settings.reuse_port:
            check_port_free(self.settings.host, self.settings.http_port, "--http-port")
        self.port = self._bind()
        await self.grpc.start()
        await self._set_health([LIVENESS_SERVICE], serving=True)
        secure = " (TLS)" if self.tls else ""
        log.info("listening on %s%s", host_port(self.settings.host, self.port),
                 f" (TLS, the certificate {self.tls.files.valid_until})" if self.tls else "")
        if self.http:
            self.http_port = await self.http.start(self.settings.host, self.settings.http_port,
                                                   self.tls.http_context if self.tls else None, self.connections,
                                                   self.settings.reuse_port)
            log.info("HTTP on %s://%s/ (KServe v2 REST, /v1/classify, the page)%s%s",
                     "https" if self.tls else "http", host_port(self.settings.host, self.http_port), secure,
                     f"; web pages of {', '.join(self.settings.cors_origins)} may call it (CORS)"
                     if self.settings.cors_origins else "")
        if self.settings.metrics_port:
            serve_metrics(self.state.metrics.registry, self.settings.metrics_port, self.settings.host)
        if self.tls or self.tokens:
            self.background.add(asyncio.get_running_loop().create_task(self._follow_files()))

    async def _follow_files(self) -> None:
        """Renewed TLS files and token files are in use within ROTATION_CHECK_SECONDS (serve/rotation.py)."""
        while True:
            await asyncio.sleep(ROTATION_CHECK_SECONDS)
            if self.tokens:
                self.tokens.renew()
            if self.tls and self.tls.renew() and self.http:
                self.http.use_tls(self.tls.http_context)

    async def _load(self, packages: list[ModelPackage], unloaded: frozenset[str] = frozenset()) -> None:
        repository = await asyncio.to_thread(load_repository, packages, self.settings, self.executor,
                                             self.state.metrics, unloaded)
        for model in repository.models:
            model.batcher.start()
        self.state.repository = repository

    def _bind(self) -> int:
        address = self.settings.address
        if not self.settings.reuse_port:
            check_port_free(self.settings.host, self.settings.port, "--port")
        credentials = self.tls.grpc_credentials() if self.tls else None
        try:  # the TLS files were checked already (CertificateRotation): what is left to fail is the address
            port = (self.grpc.add_secure_port(address, credentials) if credentials
                    else self.grpc.add_insecure_port(address))
        except RuntimeError:
            port = 0
        if port == 0:
            raise ResserveError(f"cannot listen on {address}: port in use or address unavailable "
                                f"({PORT_HINTS['--port']})")
        return port

    async def drain(self, hurry: asyncio.Event) -> None:
        """Not ready; keep serving for the drain window (cut short by ``hurry``); then answer new
        requests UNAVAILABLE while every admitted request finishes, up to the grace period, after
        which what is still queued is answered UNAVAILABLE and only the running batches finish."""
        log.info("shutting down: not ready; draining for %.1f s (signal again to skip)", self.settings.drain_seconds)
        self.state.ready = False
        await self._set_health(READINESS_NAMES, serving=False)
        await set_within(hurry, self.settings.drain_seconds)
        log.info("stopping: new requests get UNAVAILABLE; in-flight requests get %.1f s", self.settings.grace_seconds)
        self.state.accepting = False
        finished = await set_within(self.state.idle, self.settings.grace_seconds)
        models = list(self.state.repository.models) if self.state.repository else []
        if not finished:
            shed = sum(model.batcher.shed() for model in models)
            log.warning("%d requests still in flight after the grace period: %d queued ones answered "
                        "UNAVAILABLE, uncomputed; the batches running finish", self.state.in_flight, shed)
        for model in models:
            await model.batcher.close()
        self.executor.shutdown(wait=True)
        self.preprocess_pool.shutdown(wait=True, cancel_futures=True)
        await asyncio.sleep(FLUSH_SECONDS)  # the last answers leave the process


# what to do about a port that cannot be had, by the option that chose it
PORT_HINTS = {"--port": "choose another --port", "--http-port": "choose another --http-port, or 0 to disable"}


def check_port_free(host: str, port: int, option: str) -> None:
    """A port in use is one line from us, before gRPC tries it (and logs its own error line),
    which says which ``option`` picks another."""
    if port == 0:
        return
    for family, kind, _, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
            try:
                probe.bind(address)
            except OSError as exc:
                in_use = exc.errno == errno.EADDRINUSE
                hint = PORT_HINTS[option] if in_use else "--host takes an address of this machine"
                raise ResserveError(f"cannot listen on {host_port(host, port)}: {exc.strerror or exc} "
                                    f"({hint})") from None


def answer_counts(answered: Counter) -> str:
    """"OK 12, UNAVAILABLE 3": the last log line's count of answers by status code."""
    return ", ".join(f"{code} {count}" for code, count in sorted(answered.items())) or "none"


def serve_metrics(registry: CollectorRegistry, port: int, host: str) -> None:
    """Prometheus /metrics on ``port`` (a daemon thread); a port in use is one line.

    prometheus-client's server gives each connection a thread that waits for the request as long
    as the client likes: connections that never send one piled up, a thread and a file
    descriptor each, until the process had none left for its other ports. Each connection now
    has METRICS_SOCKET_SECONDS to send its request and take the answer. Its answers name the
    server as the HTTP port's do (wsgiref's named Python's version).

    Counters come without their ``_created`` series, which prometheus-client's multiprocess mode
    leaves out: so one worker and many serve the same series (one process gave a ``_created``
    gauge per labelled counter, more series for the scraper and none a dashboard reads). The
    server's CPU and memory come with them, its workers' included (ServerProcessCollector)."""
    disable_created_metrics()
    registry.register(ServerProcessCollector())
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ResserveError(f"cannot serve metrics on {host_port(host, port)}: {exc.strerror or exc} "
                            "(choose another --metrics-port, or 0 to disable)") from None
    # socketserver's documented hook: the handler class, here prometheus-client's with a socket
    # timeout, and its own errors (a request line that does not parse) named as the rest
    server.RequestHandlerClass = type("TimedMetricsHandler", (server.RequestHandlerClass,),
                                      {"timeout": METRICS_SOCKET_SECONDS, "version_string": lambda _: SERVER_NAME})
    server.set_app(_named(server.get_app()))
    log.info("metrics on http://%s/metrics", host_port(host, port))


def _named(app: Callable) -> Callable:
    """A WSGI application whose answers carry ``Server: SERVER_NAME`` (wsgiref adds its own where one has none)."""
    def named(environ, start_response):
        return app(environ, lambda status, headers, exc_info=None: start_response(
            status, [*headers, ("Server", SERVER_NAME)], exc_info))

    return named


Follow = Callable[[ModelAction, str, Callable[[], None]], Awaitable[None]]  # ModelControl.follow


class Coordinator(Peers, Protocol):
    """What a worker reports to the supervisor that runs it (serve/workers/worker.py), and hears from it."""

    unloaded: frozenset[str]  # models unloaded through the API before this worker started: not to load

    async def loaded(self, follow: Follow, shared_memory: SharedMemory) -> None:
        """Models loaded and warmed; returns when every worker has loaded (time to listen). From
        then on, ``follow(action, name, made)`` makes the model changes made through other workers
        (calling ``made()`` once made), and the shared memory regions registered through them are
        registered in ``shared_memory``."""

    def ready(self) -> None:
        """Listening and ready."""

    def stopped(self, answered: Counter) -> None:
        """Drained: the answers this worker gave, by status code."""


async def serve(settings: ServerSettings, coordinator: Coordinator | None = None) -> None:
    """Serve until SIGTERM/SIGINT, drain, and exit 0 without calling gRPC's own shutdown; a
    signal before the server is ready ends it at once, without waiting for the models to load.

    gRPC core cancels every call that reaches it once its shutdown has begun: a client sending
    at that moment gets CANCELLED, which it must not retry. Exiting instead closes the
    connections, and a call that was not admitted fails UNAVAILABLE on the client (retryable),
    while every admitted request has been answered by then (``Server.drain``).
    """
    server = Server(settings)
    tracer.prepare()
    stop, hurry = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: hurry.set() if stop.is_set() else stop.set())
    try:
        started = await done_before(server.start(coordinator), stop)
    except BaseException:
        await server.grpc.stop(0)
        raise
    if started:
        await stop.wait()
        await server.drain(hurry)
    else:  # loading can take minutes, or hang (a backend stuck warming up): never ready, so no traffic to drain
        log.info("shutting down while loading: never ready, so nothing to drain")
    if coordinator is None:
        log.info("stopped; requests answered: %s", answer_counts(server.state.answered))
    else:  # the supervisor logs the answers of all its workers
        coordinator.stopped(server.state.answered)
    tracer.flush()
    logging.shutdown()
    os._exit(0)


def run_server(settings: ServerSettings) -> None:
    """Serve until SIGTERM/SIGINT, then drain and exit 0."""
    configure_logging(LogSettings.of(settings))
    TraceSettings.at_start(settings).apply()
    asyncio.run(serve(settings))

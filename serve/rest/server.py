"""The HTTP server: aiohttp in the event loop grpc.aio runs in, over the same ``DataPlane``.

Same process, models, batchers, settings, tokens and TLS as gRPC. Every API route goes through
``endpoint``, the HTTP twin of serve/rpc.py: admission and the drain (``ServerState``), the
in-flight byte budget, typed errors as ``{"error": "..."}`` with the HTTP status errors.py pairs
with the gRPC code, and counting by protocol, API, model and status. The ``guard`` middleware
checks bearer tokens (health and the page's static files are public) and answers aiohttp's own
errors (unknown path, wrong method) as JSON too.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from typing import Any, Awaitable, Callable

import orjson
from aiohttp import HttpVersion11, StreamReader, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import Counter

from resserve.serve.auth import TokenRotation, Verdict
from resserve.serve.connections import CappedSite, ConnectionLimits
from resserve.serve.dataplane import DataPlane
from resserve.serve.errors import BodyTimeout, Busy, ResserveError, TooLarge, to_http_status
from resserve.serve.logs import RepeatedWarning
from resserve.serve.rest.cors import allow_origins, foreign_origin, is_preflight
from resserve.serve.rest.encoding import IDENTITY, decompress, encoding_of
from resserve.serve.rest.openapi import PATH as OPENAPI_PATH
from resserve.serve.settings import host_port
from resserve.serve.state import check_api_label

log = logging.getLogger("resserve.serve")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# what needs no token, as it holds no data: health, the page and its files, the API's description
PUBLIC_PATHS = frozenset({"/", OPENAPI_PATH})
PUBLIC_PREFIXES = ("/v2/health/", "/page/")
# the admin APIs (serve/auth.py), by their routes' patterns: decoded paths are not matched by hand
ADMIN_ROUTES = frozenset({"/v2/repository/models/{name}/load", "/v2/repository/models/{name}/unload", "/v2/logging",
                          "/v2/trace/setting", "/v2/models/{name}/trace/setting"})
MAX_PATH_CHARS = 200  # of a client's path quoted in an error
# every answer's Server header: aiohttp's default names Python's and aiohttp's versions, which tell
# a scanner which published flaws to try
SERVER_NAME = "resserve"


class _ClientFaults(logging.Filter):
    """aiohttp logs each request it cannot parse (a header with a control character, a line over
    8,190 bytes, a Content-Length that is not a number) at ERROR with a traceback, after answering
    it 400: the client's fault, logged as often as a client sends one (2,000 a second from one
    client: 1.2 MB of log a second). Those become one warning a minute with a count. A body that
    stopped arriving is answered 408 (``next_chunk``), and aiohttp's read of the rest of it meets
    the same end: not logged. Whatever else aiohttp logs passes as it is."""

    def __init__(self, counter: Counter) -> None:
        super().__init__()
        self.malformed = RepeatedWarning(log, "answering HTTP requests that do not parse with 400, such as %s", counter)

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            what = error.message.splitlines()[0].rstrip(":")  # the rest quotes the client's bytes
            self.malformed.happened(f"{type(error).__name__}: {what}"[:MAX_PATH_CHARS])
        return not isinstance(error, (HttpProcessingError, BodyTimeout))


PROTOCOL_LOG = logging.getLogger("resserve.serve.http")  # aiohttp's, for the lines of its HTTP/1.1 protocol


class HttpFrontDoor:
    """What every HTTP handler shares: the data plane, the token check and the byte budget."""

    def __init__(self, plane: DataPlane, access: TokenRotation | None) -> None:
        settings = plane.state.settings
        self.plane = plane
        self.access = access  # the same as gRPC's: one look at the files for both
        self.cors_origins = settings.cors_origins
        self.max_body_bytes = settings.max_message_bytes
        self.budget_bytes = settings.max_inflight_bytes
        self.inflight_bytes = 0
        self.idle_seconds = settings.http_idle_seconds

    def check_announced(self, request: web.Request) -> None:
        """A body announced over the cap is refused before any of it is read."""
        announced = request.content_length
        if announced is not None and announced > self.max_body_bytes:
            raise TooLarge(f"request body of {announced:,} bytes exceeds the limit of {self.max_body_bytes:,} "
                           "(--max-message-bytes)")

    def check_received(self, request: web.Request) -> None:
        """A body of any framing (no Content-Length, a form's parts) is cut off at the cap as it streams in."""
        if request.content.total_bytes > self.max_body_bytes:
            raise TooLarge(f"request body exceeds the limit of {self.max_body_bytes:,} bytes (--max-message-bytes)")

    def hold(self, request: web.Request, size: int) -> None:
        """``size`` more bytes in memory for ``request`` (its body as it arrives, and what that
        inflates to), within the in-flight budget. Counted as the bytes arrive rather than as
        announced: 64 clients that announced 4 MiB bodies and sent none of them held the whole
        budget, and every other request with a body got 429 for as long as they waited."""
        if self.inflight_bytes + size > self.budget_bytes:
            raise Busy(f"the server holds {self.inflight_bytes:,} bytes of requests (budget "
                       f"{self.budget_bytes:,}, --max-inflight-bytes); retry shortly")
        self.inflight_bytes += size
        request[HELD_BYTES] = request.get(HELD_BYTES, 0) + size

    def release(self, request: web.Request) -> None:
        """The request is answered: what it held is free again."""
        self.inflight_bytes -= request.get(HELD_BYTES, 0)


FRONT_DOOR = web.AppKey("front_door", HttpFrontDoor)
HELD_BYTES = "resserve.held_bytes"  # of the in-flight budget, by this request (aiohttp 3.9 has no RequestKey)


def plane_of(request: web.Request) -> DataPlane:
    return request.app[FRONT_DOOR].plane


def json_response(payload: Any, status: int = 200) -> web.Response:
    """orjson: 7-27x the standard library on tensors (docs/benchmarks.md "JSON")."""
    return web.Response(body=orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY), status=status,
                        content_type="application/json")


def error_response(status: int, message: str) -> web.Response:
    response = json_response({"error": message}, status)
    if status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


async def read_body(request: web.Request) -> bytes:
    """The whole body, decompressed, within the size cap and the in-flight budget, which count its
    bytes as they arrive (a body without Content-Length is cut off at the cap)."""
    door = request.app[FRONT_DOOR]
    body = bytearray()
    while chunk := await next_chunk(request, request.content.readany):
        door.check_received(request)
        door.hold(request, len(chunk))
        body += chunk
    encoding = encoding_of(request.headers.get(hdrs.CONTENT_ENCODING))
    if encoding == IDENTITY:
        return bytes(body)
    inflated = decompress(bytes(body), encoding, door.max_body_bytes)
    door.hold(request, len(inflated))
    return inflated


async def next_chunk(request: web.Request, read: Callable[[], Awaitable[bytes]]) -> bytes:
    """The body's next bytes (b"" at its end) from ``read``, or 408 when none come for
    --http-idle-seconds: a client that announced a body and stopped sending it holds its
    connection that long at most, as nginx's client_body_timeout. The timer fails the body's
    stream rather than wrapping the read in a task (asyncio.wait_for), so that a client that
    disconnects still cancels its handler."""
    idle_seconds = request.app[FRONT_DOOR].idle_seconds
    timer = asyncio.get_running_loop().call_later(idle_seconds, _time_out, request.content, idle_seconds)
    try:
        return await read()
    finally:
        timer.cancel()


def _time_out(body: StreamReader, idle_seconds: float) -> None:
    body.set_exception(BodyTimeout(f"no byte of the request body came for {idle_seconds:g} s "
                                   "(--http-idle-seconds)"))


def endpoint(api: str) -> Callable[[Handler], Handler]:
    """Wrap an API handler: admitted and counted like every request; errors become JSON; the
    model label is the route's ``{name}`` (bounded by ``ServerState.model_label``)."""
    check_api_label(api)

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def wrapped(request: web.Request) -> web.StreamResponse:
            door = request.app[FRONT_DOOR]
            state = door.plane.state
            model = state.model_label(api, request.match_info.get("name") or request.query.get("model", ""))
            started = state.admit()
            status, message = 500, ""
            try:
                state.check_accepting()
                door.check_announced(request)
                await continue_if_expected(request)
                response = await handler(request)
                status = response.status
                return response
            except asyncio.CancelledError:  # the client went away
                status = 499
                raise
            except Exception as exc:  # noqa: BLE001 - mapped to a status here, as serve/rpc.py does
                status, message = to_http_status(exc)
                return error_response(status, message)
            finally:
                door.release(request)
                state.finish("http", api, model, str(status), started, lambda: request.remote or "", message)

        return wrapped

    return decorate


CONTINUE_OWED = "resserve.continue_owed"  # the request asked for 100 Continue and has not had it


async def expect_continue_later(request: web.Request) -> web.Response | None:
    """``Expect: 100-continue`` is answered by ``endpoint``, once the token, the drain and the
    announced size have been checked, rather than by aiohttp as soon as the headers arrive: a
    client that would be refused (401, 403, 413, 503) gets the final status instead (RFC 9110
    10.1.1) and never sends the body it asked about. aiohttp's own handler invited every such
    body, then refused it. Other expectations are 417."""
    expect = request.headers.get(hdrs.EXPECT, "")
    if request.version != HttpVersion11:
        return None  # HTTP/1.0 has no interim answers: its Expect is ignored
    if expect.strip().lower() != "100-continue":
        return error_response(417, f"Expect: {expect[:MAX_PATH_CHARS]!r} cannot be met; only 100-continue is")
    request[CONTINUE_OWED] = True
    return None


async def continue_if_expected(request: web.Request) -> None:
    """Send the 100 Continue the client waits for before its body, if it asked for one."""
    if request.pop(CONTINUE_OWED, False):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")


def deferring_continue(routes: list[web.AbstractRouteDef]) -> list[web.AbstractRouteDef]:
    """``routes``, each answering ``Expect: 100-continue`` with ``expect_continue_later``."""
    return [web.RouteDef(route.method, route.path, route.handler,
                         {**route.kwargs, "expect_handler": expect_continue_later})
            if isinstance(route, web.RouteDef) else route for route in routes]


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Tokens first (not on a browser's CORS preflight, which carries none: serve/rest/cors.py), and
    no admin API for pages of other origins; aiohttp's own errors as JSON; connections close while
    the server drains."""
    door = request.app[FRONT_DOOR]
    public = request.path in PUBLIC_PATHS or request.path.startswith(PUBLIC_PREFIXES) or is_preflight(request)
    resource = request.match_info.route.resource  # None where no route matched (404, 405)
    admin_api = resource is not None and resource.canonical in ADMIN_ROUTES
    if door.access and not public:
        verdict = door.access.verdict(request.headers.getall("Authorization", []), admin_api=admin_api)
        if verdict is not Verdict.ALLOWED:
            return error_response(verdict.http_status, verdict.message)
    if admin_api and (origin := foreign_origin(request, door.cors_origins)):
        return error_response(403, f"{request.method} {request.path[:MAX_PATH_CHARS]} from a web page of "
                                   f"{origin[:MAX_PATH_CHARS]}: pages of other origins may not use the admin APIs "
                                   "(models loaded and unloaded, log and trace settings); --cors-origins allows one")
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        path = request.path[:MAX_PATH_CHARS]
        message = {404: f"no such endpoint: {path}", 405: f"{request.method} is not allowed on {path}"}
        # a CORS preflight refused: aiohttp-cors says why (no origin, or one, a method or a header not allowed)
        reason = exc.text if request.method == hdrs.METH_OPTIONS else exc.reason
        response = error_response(exc.status, message.get(exc.status, reason))
    if not door.plane.state.ready:  # not ready or draining: let clients reconnect elsewhere
        response.force_close()
    return response


async def name_the_server(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer of the app (an expectation's 417 and the page's files too) as ``SERVER_NAME``."""
    response.headers[hdrs.SERVER] = SERVER_NAME


class HttpServer:
    """The aiohttp application and its listening socket."""

    def __init__(self, plane: DataPlane, routes: list[web.AbstractRouteDef], access: TokenRotation | None) -> None:
        self.refused = plane.state.metrics.http_refused
        PROTOCOL_LOG.addFilter(_ClientFaults(self.refused.labels("unparsable")))  # one HTTP server a process
        self.app = web.Application(middlewares=[guard])  # bodies: read_body, within --max-message-bytes
        self.app[FRONT_DOOR] = HttpFrontDoor(plane, access)
        self.app.add_routes(deferring_continue(routes))
        if plane.state.settings.cors_origins:
            allow_origins(self.app, plane.state.settings.cors_origins)
        self.app.on_response_prepare.append(name_the_server)
        # a client that disconnects cancels its handler, and so its place in the batcher's queue,
        # as a cancelled gRPC call does: abandoned requests are not computed (aiohttp's default
        # since 3.9 lets them run on)
        # (and bodies are decompressed within the size cap by serve/rest/encoding.py, not by aiohttp)
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False, handler_cancellation=True,
                                    auto_decompress=False, keepalive_timeout=plane.state.settings.http_idle_seconds,
                                    logger=PROTOCOL_LOG)
        self.site: CappedSite | None = None  # once started

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None, limits: ConnectionLimits,
                    reuse_port: bool = False) -> int:
        """Listen (``reuse_port``: beside the other workers) within ``limits``; returns the port."""
        await self.runner.setup()
        self.site = CappedSite(self.runner, host, port, limits=limits, ssl_context=ssl_context, reuse_port=reuse_port,
                               refused=self.refused.labels("connection_limit"))
        try:
            await self.site.start()
        except OSError as exc:
            raise ResserveError(f"cannot listen for HTTP on {host_port(host, port)}: {exc.strerror or exc} "
                                "(choose another --http-port, or 0 to disable)") from None
        return self.runner.addresses[0][1]

    def use_tls(self, ssl_context: ssl.SSLContext) -> None:
        """New connections' TLS from now on (renewed certificates: serve/tls.py)."""
        self.site.tls = ssl_context

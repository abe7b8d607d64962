"""How many connections each port holds at once, so a flood of them cannot leave the server
without file descriptors.

Every connection is a file descriptor. Once the process's open-file limit is reached, accept()
fails on every port at once: gRPC core stops taking connections, and asyncio's accept loop
(before CPython's fix of gh-151615) logs a traceback and schedules a retry for each failed
accept, hundreds of thousands of lines in a minute that starve the event loop, so health checks
time out too (docs/serving.md "Limits"). So each port of a worker holds at most a set number of
connections: gRPC core closes those beyond it (``grpc.max_allowed_incoming_connections``), and
``CappedSite`` does the same for HTTP. ``auto`` keeps both within the open-file limit.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import ssl
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import Counter

from resserve.serve.logs import RepeatedWarning

log = logging.getLogger("resserve.serve")

FD_RESERVE = 256  # descriptors kept for everything but client connections: model files, threads' wake-ups, logs
MAX_AUTO_CONNECTIONS = 10_000  # per port and worker: about 60 MB of idle HTTP connections, far beyond a model server's clients
MAX_BACKLOG = 1024  # connections the kernel queues for a port until they are accepted
HANDSHAKE_SECONDS = 10.0  # for a TLS handshake over HTTP (asyncio's default is 60 s)


def raise_open_file_limit() -> int:
    """Raise the soft open-file limit to the hard one (as Go's runtime does at start: the soft
    limit, often 1,024, is there for programs that use select(), which neither asyncio nor gRPC
    does); returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # never unlimited on Linux: at most fs.nr_open
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # refused (a sandbox's policy): keep the soft one
            pass
    return soft


@dataclass(frozen=True)
class ConnectionLimits:
    """What each port of this process holds, within its open-file limit."""

    per_port: int  # connections held at once; new ones beyond are closed as soon as they are accepted
    # connections the kernel queues for a port before the server accepts them; asyncio accepts up
    # to this many at once, before the server can close any: they need descriptors too
    backlog: int

    @classmethod
    def of(cls, max_connections: int | None, other_files: int = 0) -> "ConnectionLimits":
        """``--max-connections``, or (None: auto) what the open-file limit leaves for the gRPC and
        HTTP ports after FD_RESERVE, ``other_files`` (clients' shared memory regions) and the
        backlog, up to MAX_AUTO_CONNECTIONS."""
        open_files = raise_open_file_limit()
        backlog = min(MAX_BACKLOG, max(16, open_files // 8))
        fitting = max(1, (open_files - FD_RESERVE - other_files - backlog) // 2)
        if max_connections is None:
            return cls(min(MAX_AUTO_CONNECTIONS, fitting), backlog)
        if max_connections > fitting:
            log.warning("--max-connections %d is more than the open-file limit (ulimit -n %d) leaves for two "
                        "ports (%d each): a flood of connections can exhaust it; raise the limit or lower the "
                        "setting", max_connections, open_files, fitting)
        return cls(max_connections, backlog)


class _Refused(asyncio.Protocol):
    """A connection beyond the limit: closed as soon as it is accepted."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class _TlsHandshake(asyncio.Protocol):
    """A TLS connection during its handshake, counted by its site: then handed to ``protocol``.

    asyncio's own TLS for a server (``create_server(ssl=...)``) reports a connection only after
    its handshake, and one whose handshake never ends not at all, while each holds a file
    descriptor from the moment it is accepted: a flood of connections that never send a
    ClientHello went uncounted. So the site accepts plain connections and starts TLS on each
    itself (``loop.start_tls``), counting it until the handshake ends."""

    def __init__(self, site: CappedSite, protocol: asyncio.BaseProtocol) -> None:
        self.site, self.protocol = site, protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()  # the ClientHello is start_tls's to read
        self.site.handshaking += 1  # until _handshake ends, however it ends
        task = asyncio.get_running_loop().create_task(self._handshake(transport))
        self.site.tasks.add(task)
        task.add_done_callback(self.site.tasks.discard)

    async def _handshake(self, transport: asyncio.Transport) -> None:
        try:
            tls = await asyncio.get_running_loop().start_tls(
                transport, self.protocol, self.site.tls, server_side=True, ssl_handshake_timeout=HANDSHAKE_SECONDS)
        except OSError as exc:  # failed, abandoned or too slow (SSLError, ConnectionError, TimeoutError): closed
            log.debug("TLS handshake over HTTP failed: %s", exc)
            return
        finally:
            self.site.handshaking -= 1
        self.protocol.connection_made(tls)


class CappedSite(web.BaseSite):
    """aiohttp's TCP site, holding at most ``limits.per_port`` connections, those in their TLS
    handshake included: any beyond are closed as soon as they are accepted (a client sees the
    connection reset or closed, and may retry), with a warning at most once a minute."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, limits: ConnectionLimits, refused: Counter,
                 ssl_context: ssl.SSLContext | None = None, reuse_port: bool = False) -> None:
        super().__init__(runner, backlog=limits.backlog)  # TLS is not asyncio's here, but _TlsHandshake's
        self._host, self._port, self._reuse_port = host, port, reuse_port
        self.tls = ssl_context
        self.limit = limits.per_port
        self.handshaking = 0  # TLS connections accepted whose handshake has not ended
        self.tasks: set[asyncio.Task] = set()  # the handshakes under way
        self.refusals = RepeatedWarning(log, "HTTP holds %d connections, its limit (--max-connections): "
                                             "closing new ones", refused)

    @property
    def name(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        if self._host != "::":
            where = {"host": self._host, "port": self._port, "reuse_port": self._reuse_port}
        else:
            where = {"sock": self._every_interface()}
        self._server = await asyncio.get_running_loop().create_server(self._accept, backlog=self._backlog, **where)

    def _every_interface(self) -> socket.socket:
        """For ``::``, one socket for IPv6 and IPv4 alike, as gRPC listens there (asyncio's own
        would take IPv6 only: IPv4 clients reached gRPC on a port and not HTTP on the next)."""
        listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self._reuse_port:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            listener.bind(("::", self._port))
        except OSError:
            listener.close()
            raise
        return listener

    def _accept(self) -> asyncio.BaseProtocol:
        server = self._runner.server
        assert server is not None
        if len(server.connections) + self.handshaking < self.limit:
            return _TlsHandshake(self, server()) if self.tls else server()
        self.refusals.happened(self.limit)
        return _Refused()

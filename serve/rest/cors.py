"""Cross-origin requests (CORS): web pages served from elsewhere calling the HTTP API.

A browser lets a page read an answer from another origin (a web app on http://localhost:5173
calling /v1/classify or KServe v2 REST on :8000) only when the server says that origin may, and
before a POST with a JSON body or a token it first asks with a preflight OPTIONS request. The
origins ``--cors-origins`` names get that (aiohttp-cors answers the preflights and adds the
headers); with none, the default, no other site's page can read an answer, which is what the
server's own page (same origin) and every client that is not a browser need. Whatever the setting,
the admin APIs refuse what pages of origins not allowed send: without admin tokens, any site a
developer visits could otherwise have their browser unload a local server's models.
"""

from __future__ import annotations

import aiohttp_cors
from aiohttp import hdrs, web

# what a page's fetch() may send beside a simple request's headers: a JSON or binary-tensor body
# (compressed), a bearer token, and a W3C trace context
ALLOWED_HEADERS = ("Content-Type", "Content-Encoding", "Authorization", "Inference-Header-Content-Length",
                   "traceparent", "tracestate")
# what it may read beside the simple response headers: the length of a binary answer's JSON part
EXPOSED_HEADERS = ("Inference-Header-Content-Length",)
PREFLIGHT_CACHE_SECONDS = 600  # a browser asks again after this long (Chromium caps it at 2 hours)


def allow_origins(app: web.Application, origins: tuple[str, ...]) -> None:
    """Let pages of ``origins`` ("*": any) call the routes ``app`` has now, but those for any method
    (Triton's extensions left out, which answer every method the same). No credentials (cookies):
    a token is sent as a header, which the preflight allows."""
    options = aiohttp_cors.ResourceOptions(allow_headers=ALLOWED_HEADERS, expose_headers=EXPOSED_HEADERS,
                                           max_age=PREFLIGHT_CACHE_SECONDS, allow_methods=("GET", "POST"))
    cors = aiohttp_cors.setup(app, defaults={origin: options for origin in origins})
    for route in list(app.router.routes()):
        if route.method != hdrs.METH_ANY:
            cors.add(route)
    app.on_response_prepare.append(_vary_by_origin)


async def _vary_by_origin(request: web.Request, response: web.StreamResponse) -> None:
    """Answers now differ by the page that asks (the origin they allow): caches must keep them apart."""
    response.headers.add(hdrs.VARY, hdrs.ORIGIN)


def is_preflight(request: web.Request) -> bool:
    """A browser's question before a cross-origin request: it carries no token, so it is not asked for one."""
    return (request.method == hdrs.METH_OPTIONS and hdrs.ORIGIN in request.headers
            and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers)


def foreign_origin(request: web.Request, allowed: tuple[str, ...]) -> str | None:
    """The origin of the web page whose script sent ``request`` from a browser, unless ``allowed``
    lets that origin call the API; None for clients that are not browsers (they send no Origin).

    A browser sends some cross-origin requests without asking first (a POST with a text body), and
    only keeps the answer from the page: the request itself still acts. The server's own page is
    not told apart by the Host it names: it calls no admin API, and a page elsewhere whose name
    was made to point at the server (DNS rebinding) names the same Host."""
    origin = request.headers.get(hdrs.ORIGIN)
    return None if origin is None or origin in allowed or "*" in allowed else origin

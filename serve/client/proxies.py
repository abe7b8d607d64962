"""The proxy the environment names for a server, read as each transport reads it, so that a
connection that fails through one says so rather than "is a server running there?".

HTTP (aiohttp, as curl and Python's urllib): ``HTTPS_PROXY`` or ``HTTP_PROXY`` by the URL's
scheme, in either case, unless ``NO_PROXY`` lists the host. gRPC core: the first of
``grpc_proxy``, ``https_proxy`` and ``http_proxy`` that is set, in lowercase only, where it is
an http:// URL, unless ``no_grpc_proxy`` (else ``no_proxy``) lists the host.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.request import getproxies, proxy_bypass

from aiohttp import BasicAuth
from yarl import URL

from resserve.serve.errors import ResserveError

GRPC_PROXY_VARIABLES = ("grpc_proxy", "https_proxy", "http_proxy")  # gRPC core's order: the first set wins
GRPC_NO_PROXY_VARIABLES = ("no_grpc_proxy", "no_proxy")
# What any of this process's clients, or perf_analyzer's curl, may read a proxy from
PROXY_VARIABLES = (*GRPC_PROXY_VARIABLES, "HTTPS_PROXY", "HTTP_PROXY", "all_proxy", "ALL_PROXY")


def environment_proxy(url: URL) -> tuple[URL | None, dict[str, str] | None]:
    """The proxy that HTTPS_PROXY, HTTP_PROXY and NO_PROXY name for ``url`` (Python's urllib reads
    them, as aiohttp's ``trust_env`` does), without its user and password, and the header that
    signs in to it with them. ``trust_env`` itself also reads ~/.netrc for the server's host, whose
    credentials aiohttp refuses to send beside a token's Authorization header: with a token, a
    ~/.netrc naming the host ended every request."""
    if url.host is None or proxy_bypass(url.host):
        return None, None
    value = getproxies().get(url.scheme)
    if not value:
        return None, None
    proxy = _http_proxy(value, f"{url.scheme.upper()}_PROXY")
    credentials = BasicAuth.from_url(proxy)
    return proxy.with_user(None), {"Proxy-Authorization": credentials.encode()} if credentials else None


def _http_proxy(value: str, name: str) -> URL:
    """``value`` as the URL of an HTTP proxy (``host:port`` alone too, as curl takes it), or
    one line naming the variable: never the value, which may hold a password."""
    try:
        proxy = URL(value if "://" in value else f"http://{value}")
    except ValueError as exc:
        raise ResserveError(f"{name} (or {name.lower()}) in the environment is not a proxy's URL ({exc})") from None
    if proxy.scheme != "http" or not proxy.host:
        raise ResserveError(f"{name} (or {name.lower()}) in the environment names a {proxy.scheme}:// proxy; "
                            "resserve's HTTP client reaches HTTP proxies only, as http://HOST:PORT")
    return proxy


def grpc_proxy(target: str) -> tuple[str, str] | None:
    """The variable that names the proxy gRPC core connects to ``target`` (host:port) through, and
    that proxy; None where none is named, or no_grpc_proxy (else no_proxy) lists the host: as the
    host or a suffix of it, or an IP network that holds it. As in gRPC, the first variable set is
    read, even where it is set empty (``grpc_proxy=`` turns the proxy off)."""
    name = next((name for name in GRPC_PROXY_VARIABLES if name in os.environ), None)
    scheme, _, address = os.environ[name].partition("://") if name else ("", "", "")
    if scheme.lower() != "http" or not address or target.startswith("unix:"):
        return None  # gRPC takes http:// proxies alone (and ignores any other value, with a log line)
    host = target.removeprefix("dns:///").rpartition(":")[0].strip("[]").lower()
    listed = next((os.environ[name] for name in GRPC_NO_PROXY_VARIABLES if name in os.environ), "")
    if any(_bypasses(entry.strip().lower(), host) for entry in listed.split(",") if entry.strip()):
        return None
    return name, os.environ[name]


def _bypasses(entry: str, host: str) -> bool:
    if host.endswith(entry):  # gRPC takes no "*" (curl does): with no_grpc_proxy=* it still uses the proxy
        return True
    try:
        return ipaddress.ip_address(host) in ipaddress.ip_network(entry, strict=False)
    except ValueError:  # a name, not an address; or an entry that is no network
        return False


def proxy_hint(proxy: str | URL, named_by: str, bypass: str) -> str:
    """What to check about a connection that failed through ``proxy`` (a URL: gRPC's and the HTTP
    client's both have a scheme), shown as its scheme, host and port: never the user and password
    it may hold, nor a value that does not parse."""
    try:
        shown = f"the proxy {URL(str(proxy)).origin()}"
    except ValueError:
        shown = "the proxy"
    return (f" (through {shown} that {named_by} names: is it running, and does it reach the server? {bypass} lists "
            "the hosts to connect to directly)")


def http_proxy_hint(proxy: URL) -> str:
    """``proxy_hint`` for the proxy ``environment_proxy`` gave."""
    return proxy_hint(proxy, "HTTPS_PROXY or HTTP_PROXY", "NO_PROXY")


@contextmanager
def without_proxies() -> Iterator[None]:
    """No proxy for what this process (and the processes it starts) connects to until the block
    ends: for servers it started on loopback, which a proxy elsewhere does not reach."""
    saved = {name: os.environ.pop(name) for name in PROXY_VARIABLES if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)

"""Bearer tokens: the one check every front door makes (gRPC metadata, HTTP headers).

Two kinds: tokens for every API (``--token-file``), and admin tokens (``--admin-token-file``)
for the APIs that change what the server does rather than ask it something: loading and
unloading models, and log settings (Triton restricts the same groups with
``--grpc-restricted-protocol``). With admin tokens, those APIs take an admin token only; an admin
token is good for every other API too. Health (and the page's static files) take none.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
from dataclasses import dataclass
from enum import Enum

import grpc

from resserve.serve.errors import ResserveError

log = logging.getLogger("resserve.serve")

UNAUTHENTICATED_MESSAGE = "missing or invalid bearer token"
# the admin APIs over gRPC (serve/rest/server.py has their HTTP paths)
ADMIN_GRPC_METHODS = frozenset(f"/inference.GRPCInferenceService/{name}"
                               for name in ("RepositoryModelLoad", "RepositoryModelUnload", "LogSettings"))
ADMIN_ONLY_MESSAGE = ("loading and unloading models and log settings take an admin token (the server's "
                      "--admin-token-file); this token is not one")
TOKEN_CHARACTERS = re.compile(r"[\x21-\x7e]+")  # visible ASCII: what HTTP headers and gRPC metadata carry


def check_token(token: str, where: str) -> str:
    """``token``, if clients can send it; else one line naming ``where`` (never the token: a
    secret). Before, a token file that was not ASCII text ended the server in a traceback, and a
    client's token with other characters failed every call with gRPC's "Invalid metadata"."""
    if not TOKEN_CHARACTERS.fullmatch(token):
        raise ResserveError(f"{where}: a bearer token is visible ASCII characters without spaces (what HTTP "
                            "headers and gRPC metadata carry), and this one is not")
    return token


class TokenCheck:
    """Accepts exactly one ``Bearer <token>`` credential naming one of ``tokens``."""

    def __init__(self, tokens: tuple[str, ...]) -> None:
        self._tokens = [t.encode() for t in tokens]

    def accepts(self, authorization: list[str]) -> bool:
        """``authorization``: every value of the request's authorization header(s)."""
        if len(authorization) != 1:  # none, or several: which one would count is ambiguous, so none does
            return False
        scheme, _, token = authorization[0].partition(" ")
        return scheme.lower() == "bearer" and any(hmac.compare_digest(token.encode(), t) for t in self._tokens)


class Verdict(Enum):
    """What a request's credentials allow, and how it is refused if they do not."""

    ALLOWED = (None, None, "")
    UNAUTHENTICATED = (grpc.StatusCode.UNAUTHENTICATED, 401, UNAUTHENTICATED_MESSAGE)
    ADMIN_ONLY = (grpc.StatusCode.PERMISSION_DENIED, 403, ADMIN_ONLY_MESSAGE)

    def __init__(self, code: grpc.StatusCode | None, http_status: int | None, message: str) -> None:
        self.code, self.http_status, self.message = code, http_status, message


@dataclass(frozen=True)
class Access:
    """Who may call what: ``tokens`` for every API (none: open), ``admin_tokens`` for the admin
    APIs (none: those are as open as the rest)."""

    tokens: TokenCheck | None
    admin_tokens: TokenCheck | None

    @classmethod
    def of(cls, tokens: tuple[str, ...], admin_tokens: tuple[str, ...]) -> "Access | None":
        """None where nothing asks for a token."""
        if not tokens and not admin_tokens:
            return None
        return cls(TokenCheck(tokens) if tokens else None, TokenCheck(admin_tokens) if admin_tokens else None)

    def verdict(self, authorization: list[str], admin_api: bool) -> Verdict:
        def holds(check: TokenCheck | None) -> bool:
            return check is not None and check.accepts(authorization)

        if admin_api and self.admin_tokens is not None:
            if holds(self.admin_tokens):
                return Verdict.ALLOWED
            return Verdict.ADMIN_ONLY if holds(self.tokens) else Verdict.UNAUTHENTICATED
        if self.tokens is None or holds(self.tokens) or holds(self.admin_tokens):  # the common case first
            return Verdict.ALLOWED
        return Verdict.UNAUTHENTICATED


def warn_of_open_admin_apis(host: str, tokens: tuple[str, ...], admin_tokens: tuple[str, ...]) -> None:
    """Say at start, once, when a server that others can reach lets any of them unload its models
    (Triton refuses model control unless asked for it; here it is open unless admin tokens close it)."""
    if admin_tokens or _loopback(host):
        return
    who = "every client with a token (--token-file)" if tokens else "every client that reaches the server"
    log.warning("loading and unloading models and changing log settings are open to %s on %s: give "
                "--admin-token-file where others share the network (docs/serving.md, Security)", who, host)


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any address
        return False

"""Bearer tokens: the one check every front door makes (gRPC metadata, HTTP headers).

Two kinds: tokens for every API (``--token-file``), and admin tokens (``--admin-token-file``)
for the APIs that change what the server does rather than ask it something: loading and
unloading models, and log and trace settings (Triton restricts the same groups with
``--grpc-restricted-protocol``). With admin tokens, those APIs take an admin token only; an admin
token is good for every other API too. Health (and the page's static files) take none.

A running server reads the token files again when they change (``TokenRotation``,
serve/rotation.py): a token taken out of the file is refused from then on, without a restart.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import grpc
from prometheus_client import Counter

from resserve.serve.errors import ResserveError
from resserve.serve.rotation import WatchedFiles, read_secret_file
from resserve.serve.settings import ServerSettings

log = logging.getLogger("resserve.serve")

UNAUTHENTICATED_MESSAGE = "missing or invalid bearer token"
# the admin APIs over gRPC (serve/rest/server.py has their HTTP paths)
ADMIN_GRPC_METHODS = frozenset(f"/inference.GRPCInferenceService/{name}"
                               for name in ("RepositoryModelLoad", "RepositoryModelUnload", "LogSettings",
                                            "TraceSetting"))
ADMIN_ONLY_MESSAGE = ("loading and unloading models, log settings and trace settings take an admin token (the "
                      "server's --admin-token-file); this token is not one")
TOKEN_CHARACTERS = re.compile(r"[\x21-\x7e]+")  # visible ASCII: what HTTP headers and gRPC metadata carry


def check_token(token: str, where: str) -> str:
    """``token``, if clients can send it; else one line naming ``where`` (never the token: a
    secret). Before, a token file that was not ASCII text ended the server in a traceback, and a
    client's token with other characters failed every call with gRPC's "Invalid metadata"."""
    if not TOKEN_CHARACTERS.fullmatch(token):
        raise ResserveError(f"{where}: a bearer token is visible ASCII characters without spaces (what HTTP "
                            "headers and gRPC metadata carry), and this one is not")
    return token


def read_tokens(path: Path) -> tuple[str, ...]:
    """The tokens of a token file, one a line (blank lines and surrounding spaces ignored)."""
    lines = read_secret_file(path, "token file").decode(errors="replace").splitlines()  # not text: check_token fails
    tokens = tuple(check_token(line.strip(), f"token file {path}, line {number}")
                   for number, line in enumerate(lines, 1) if line.strip())
    if not tokens:
        raise ResserveError(f"token file {path} holds no token")
    return tokens


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

    @classmethod
    def read(cls, settings: ServerSettings) -> "Access | None":
        """The tokens of ``settings``' token files, each refused in one line if it cannot serve."""
        tokens, admin_tokens = (read_tokens(path) if path else () for path in (settings.token_file,
                                                                                 settings.admin_token_file))
        if set(tokens) & set(admin_tokens):
            raise ResserveError("a token is in both --token-file and --admin-token-file: its holders would be "
                                "admins; give admins tokens of their own")
        return cls.of(tokens, admin_tokens)


class TokenRotation(WatchedFiles[Access]):
    """The token files, read again when they change: an operator revokes a leaked token by taking
    it out of the file (or the Secret it is mounted from), and every front door refuses it from the
    next look on. A file left empty, unreadable, or with a token in both files, keeps the tokens
    read before."""

    what = "the token files"
    kept = "requests are still checked against the tokens read before"

    def __init__(self, settings: ServerSettings, reloads: Counter) -> None:
        super().__init__((settings.token_file, settings.admin_token_file), reloads)
        self.settings = settings
        self.access = self._read()

    @classmethod
    def of(cls, settings: ServerSettings, reloads: Counter) -> "TokenRotation | None":
        """The checked token files (refused in one line before the server listens); None without any."""
        return cls(settings, reloads) if settings.token_file or settings.admin_token_file else None

    def verdict(self, authorization: list[str], admin_api: bool) -> Verdict:
        return self.access.verdict(authorization, admin_api)

    def _read(self) -> Access:
        access = Access.read(self.settings)
        assert access is not None  # a token file holds a token, or is refused
        return access

    def _use(self, read: Access) -> str:
        self.access = read
        return "requests are checked against the tokens they hold now"


def warn_of_open_admin_apis(host: str, tokens: bool, admin_tokens: bool) -> None:
    """Say at start, once, when a server that others can reach lets any of them unload its models
    (Triton refuses model control unless asked for it; here it is open unless admin tokens close it).
    ``tokens``, ``admin_tokens``: whether the server has each kind."""
    if admin_tokens or _loopback(host):
        return
    who = "every client with a token (--token-file)" if tokens else "every client that reaches the server"
    log.warning("loading and unloading models and changing log and trace settings are open to %s on %s: give "
                "--admin-token-file where others share the network (docs/serving.md, Security)", who, host)


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any address
        return False

"""Bearer tokens: the one check every front door makes (gRPC metadata, HTTP headers)."""

from __future__ import annotations

import hmac


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


UNAUTHENTICATED_MESSAGE = "missing or invalid bearer token"

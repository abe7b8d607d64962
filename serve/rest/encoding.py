"""Compressed request bodies (``Content-Encoding: gzip`` or ``deflate``, what tritonclient.http
sends), decompressed here rather than by aiohttp, so that decompression stops at the body cap;
and compressed inference answers, for the clients that ask.

aiohttp's own decompression has no cap on what a body inflates to: after refusing a body over
the cap it goes on reading ("lingering") and inflating the rest for up to 10 s, so a 1 MB gzip
of zeros cost the server 3.4 CPU-seconds (1 GB inflated). The server turns aiohttp's off
(``auto_decompress=False``); it then reads the compressed bytes only, and this inflates at most
one byte past the cap.
"""

from __future__ import annotations

import zlib
from urllib.request import parse_http_list

from aiohttp import web
from aiohttp.web import ContentCoding

from resserve.serve.errors import InvalidInput, TooLarge, UnsupportedMediaType

IDENTITY = "identity"
# Answers from this size on are compressed: the JSON answer for 64 images shrinks by half or more;
# below it the compressed stream's header costs more than it saves.
COMPRESS_FROM_BYTES = 1024
WINDOW_BITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def encoding_of(header: str | None) -> str:
    """The Content-Encoding header, normalised ('identity' when absent)."""
    return (header or IDENTITY).strip().lower() or IDENTITY


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """``body`` as sent before ``encoding``; refuses what inflates past ``limit`` bytes, without
    inflating further."""
    if encoding == IDENTITY:
        return body
    if encoding not in WINDOW_BITS:
        raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not supported; send gzip, deflate or none")
    bits = WINDOW_BITS[encoding]
    if encoding == "deflate" and body and body[0] & 0x0F != 8:
        bits = -zlib.MAX_WBITS  # raw deflate without the zlib header, as some clients send it
    inflater = zlib.decompressobj(bits)
    try:
        inflated = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidInput(f"the body is not valid {encoding} data ({exc})") from None
    if len(inflated) > limit:
        raise TooLarge(f"request body exceeds the limit of {limit:,} bytes (--max-message-bytes) once "
                       f"decompressed ({encoding})")
    if not inflater.eof:
        raise InvalidInput(f"the body is not valid {encoding} data (it ends early)")
    return inflated


def compressed_where_asked(answer: web.Response, accept_encoding: str | None) -> web.Response:
    """An inference answer in JSON, gzip- or deflate-compressed where the request's
    Accept-Encoding asks (tritonclient.http's ``response_compression_algorithm``, browsers).
    Inference answers only, as Triton does: tritonclient.http.aio reads every other answer as it
    comes, and its aiohttp session asks for gzip on every request. JSON only: binary tensors
    (float32 scores) shrink by 5% for the time it takes (64 images: 5,370 bytes to 5,102)."""
    if answer.content_type == "application/json" and (answer.content_length or 0) >= COMPRESS_FROM_BYTES:
        coding = preferred_coding(accept_encoding or "")
        if coding is not ContentCoding.identity:
            answer.enable_compression(coding)
    return answer


def preferred_coding(accept_encoding: str) -> ContentCoding:
    """The coding an answer is sent in, by the q-values of an Accept-Encoding header (RFC 9110,
    12.5.3): gzip or deflate, whichever the client ranks higher (gzip on a tie), unless it refuses
    both or ranks ``identity`` (none) above them. aiohttp's own choice looks for the names only, so
    ``gzip;q=0`` (gzip refused) got gzip."""
    ranked = {}
    for item in parse_http_list(accept_encoding):
        name, _, parameters = item.partition(";")
        name = name.strip().lower()
        ranked["gzip" if name == "x-gzip" else name] = _quality(parameters)
    anything = ranked.get("*")
    identity = ranked.get(IDENTITY, anything or 0.0)  # always acceptable; ranked only where the client ranks it
    quality = {coding: ranked.get(coding.value, anything or 0.0) for coding in (ContentCoding.gzip, ContentCoding.deflate)}
    best = max(quality, key=quality.__getitem__)
    return best if quality[best] > 0 and quality[best] >= identity else ContentCoding.identity


def _quality(parameters: str) -> float:
    """The q-value among a coding's parameters (``q=0.5``): 1 when absent, 0 when it does not parse."""
    for parameter in parameters.split(";"):
        key, _, value = parameter.partition("=")
        if key.strip().lower() == "q":
            try:
                return min(max(float(value), 0.0), 1.0)
            except ValueError:
                return 0.0
    return 1.0

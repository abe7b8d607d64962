"""``GET /openapi.yaml``: the HTTP API described in OpenAPI 3.1 (serve/rest/openapi.yaml).

What API tools take: Swagger UI, Redoc or Postman show and try it, openapi-generator writes a
client in another language, a gateway imports its routes. The description is written by hand,
as KServe's own for the protocol is, and tests/serve/test_openapi.py keeps it true: every route
is in it, and the answers of a real server to real requests match its schemas.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import hdrs, web

DESCRIPTION = Path(__file__).with_name("openapi.yaml")
PATH = "/openapi.yaml"  # beside the page at /, needing no token: it describes, it holds no data
routes = web.RouteTableDef()


@routes.get(PATH)
async def openapi(request: web.Request) -> web.FileResponse:
    # sent as the page's files are; its type named, as Python's mimetypes may not know .yaml
    return web.FileResponse(DESCRIPTION, headers={hdrs.CONTENT_TYPE: "application/yaml; charset=utf-8"})

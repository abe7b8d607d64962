"""The server's log lines, configured once for a single server, the supervisor and each worker:
text for people, or one JSON object a line for log collectors (Loki, Cloud Logging,
Elasticsearch), which then need no parsing rules for resserve."""

from __future__ import annotations

import logging

from pythonjsonlogger.json import JsonFormatter

from resserve.serve.settings import LogFormat, ServerSettings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(settings: ServerSettings, worker: int | None = None) -> None:
    """Log at ``settings.log_level`` in ``settings.log_format`` to stderr; a worker's lines say which
    worker wrote them (``name[worker N]`` in text, a ``worker`` field in JSON)."""
    handler = logging.StreamHandler()
    if settings.log_format is LogFormat.JSON:
        handler.setFormatter(JsonFormatter("%(levelname)s %(name)s %(message)s", rename_fields={"levelname": "level"},
                                           static_fields={} if worker is None else {"worker": worker},
                                           timestamp=True))
    else:
        name = "%(name)s" if worker is None else f"%(name)s[worker {worker}]"
        handler.setFormatter(logging.Formatter(TEXT_FORMAT.replace("%(name)s", name)))
    level = getattr(logging, settings.log_level.value.upper())
    # debug is resserve's own (one line per request answered): grpc's and asyncio's would drown it
    logging.basicConfig(level=max(level, logging.INFO), handlers=[handler], force=True)
    logging.getLogger("resserve").setLevel(level)

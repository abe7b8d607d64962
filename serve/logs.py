"""The server's log lines, configured once for a single server, the supervisor and each worker,
and changeable while it runs (Triton's logging extension: ``LogSettings`` over gRPC, ``GET`` and
``POST /v2/logging`` over HTTP): text for people, or one JSON object a line for log collectors
(Loki, Cloud Logging, Elasticsearch), which then need no parsing rules for resserve."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Mapping

from prometheus_client import Counter
from pythonjsonlogger.json import JsonFormatter

from resserve.serve.errors import InvalidInput
from resserve.serve.settings import LogFormat, LogLevel, ServerSettings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
SettingValue = bool | int | str  # a Triton log setting's value: bool_param, uint32_param or string_param
MAX_VERBOSE_LEVEL = 2**32 - 1  # uint32, as Triton's protocol carries it
REPEAT_WARNING_SECONDS = 60.0
# grpc.aio's words (server.pyx.pxi, _handle_exceptions) for an answer gRPC core would not send
GRPC_CORE_LOGGER = "grpc._cython.cygrpc"
ANSWER_NOT_SENT = "ExecuteBatchError raised in core by servicer method"
log = logging.getLogger("resserve.serve")


@dataclass(frozen=True)
class LogSettings:
    """What the server logs: each severity on or off, verbose lines (resserve's: one per request
    answered, an access log) at ``verbose_level`` 1 and above, and the format. Lines go to stderr
    only: a client cannot choose a file the server writes."""

    info: bool = True
    warning: bool = True
    error: bool = True
    verbose_level: int = 0
    format: LogFormat = LogFormat.TEXT

    @classmethod
    def of(cls, settings: ServerSettings) -> LogSettings:
        """The settings ``--log-level`` and ``--log-format`` start a server with."""
        level = settings.log_level
        return cls(info=level in (LogLevel.DEBUG, LogLevel.INFO), warning=level is not LogLevel.ERROR,
                   verbose_level=int(level is LogLevel.DEBUG), format=settings.log_format)

    def as_triton(self) -> dict[str, SettingValue]:
        """By the names of Triton's logging extension, every setting (as Triton answers)."""
        return {"log_file": "", "log_info": self.info, "log_warning": self.warning, "log_error": self.error,
                "log_verbose_level": self.verbose_level, "log_format": self.format.value}

    def updated(self, changes: Mapping[str, SettingValue | None]) -> LogSettings:
        """These settings with the named ``changes`` (Triton's names; the others stay); InvalidInput
        for a name resserve does not have or a value it does not take, before anything changes."""
        fields = {}
        for name, value in changes.items():
            if name in SEVERITIES:
                fields[SEVERITIES[name]] = _boolean(name, value)
            elif name == "log_verbose_level":
                if type(value) is not int or not 0 <= value <= MAX_VERBOSE_LEVEL:
                    raise InvalidInput(f"log_verbose_level takes a whole number >= 0, got {value!r}")
                fields["verbose_level"] = value
            elif name == "log_format":
                if not isinstance(value, str) or value not in {choice.value for choice in LogFormat}:
                    raise InvalidInput(f"log_format takes {LogFormat.listing(' or ')}, got {value!r}")
                fields["format"] = LogFormat(value)
            elif name == "log_file":
                if value != "":
                    raise InvalidInput('log_file: resserve logs to stderr only, a client may not choose a file '
                                       f'the server writes; "" is the one value, got {value!r}')
            else:
                raise InvalidInput(f"unknown log setting {name[:64]!r}; resserve's: {', '.join(self.as_triton())}")
        return replace(self, **fields)

    def apply(self) -> None:
        """Log as these settings say from now on (this process)."""
        apply_log_settings(self)


SEVERITIES = {"log_info": "info", "log_warning": "warning", "log_error": "error"}


def _boolean(name: str, value: SettingValue | None) -> bool:
    if not isinstance(value, bool):
        raise InvalidInput(f"{name} takes true or false, got {value!r}")
    return value


class _Severities(logging.Filter):
    """Passes the lines of the severities that are on."""

    def __init__(self, settings: LogSettings) -> None:
        super().__init__()
        self.settings = settings

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return self.settings.error
        if record.levelno >= logging.WARNING:
            return self.settings.warning
        if record.levelno >= logging.INFO:
            return self.settings.info
        return self.settings.verbose_level > 0


class _AnswersAfterTheEnd(logging.Filter):
    """Turns grpc.aio's error, with a traceback, for an answer sent as its call ended (the
    deadline passed, or the client cancelled, while the answer went out) into a debug line.
    gRPC core refuses such an answer; grpc.aio says nothing when its notice of the end came
    first and logs an error when it comes after (twice in 40,000 requests with deadlines of 1 ms
    to 1 s, here). The client has its status or is gone, so it is no error.
    Aborts are caught where they are made (``rpc.abort``); this is for answers that grpc.aio
    sends itself, once a handler has returned."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(ANSWER_NOT_SENT):
            return True
        log.debug("the call ended (deadline, or the client went away) before its answer could be sent: %s",
                  message.removeprefix(ANSWER_NOT_SENT).strip())
        return False


@dataclass
class _ProcessLogs:
    handler: logging.Handler
    severities: _Severities
    worker: int | None


_configured: _ProcessLogs | None = None  # this process's: logging is per process
ANSWERS_AFTER_THE_END = _AnswersAfterTheEnd()


def configure_logging(settings: LogSettings, worker: int | None = None) -> None:
    """Log to stderr as ``settings`` say; a worker's lines say which worker wrote them
    (``name[worker N]`` in text, a ``worker`` field in JSON)."""
    global _configured
    severities = _Severities(settings)
    handler = logging.StreamHandler()
    handler.addFilter(severities)
    # info and verbose lines are resserve's own (apply_log_settings): grpc's and asyncio's debug lines
    # would drown them, and other libraries' info is not the server's to say (OpenVINO's import logged
    # "Failed to find location of the openvino_telemetry file." in every worker of the image, whose
    # user has no home directory); their warnings and errors still show
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    logging.getLogger(GRPC_CORE_LOGGER).addFilter(ANSWERS_AFTER_THE_END)
    _configured = _ProcessLogs(handler, severities, worker)
    apply_log_settings(settings)


def current_log_settings() -> LogSettings:
    return _configured.severities.settings if _configured else LogSettings()


def apply_log_settings(settings: LogSettings) -> None:
    """Log as ``settings`` say from now on (this process)."""
    if _configured is None:
        raise RuntimeError("configure_logging first")
    _configured.severities.settings = settings
    _configured.handler.setFormatter(_formatter(settings.format, _configured.worker))
    logging.getLogger("resserve").setLevel(logging.DEBUG if settings.verbose_level else logging.INFO)


def _formatter(format: LogFormat, worker: int | None) -> logging.Formatter:
    if format is LogFormat.JSON:
        return JsonFormatter("%(levelname)s %(name)s %(message)s", rename_fields={"levelname": "level"},
                             static_fields={} if worker is None else {"worker": worker}, timestamp=True)
    name = "%(name)s" if worker is None else f"%(name)s[worker {worker}]"
    return logging.Formatter(TEXT_FORMAT.replace("%(name)s", name))


class RepeatedWarning:
    """A warning about what clients can make happen as often as they like (connections beyond the
    limit, requests that do not parse): logged at most once a minute, with how many times so far,
    so that no client can fill the log; and counted each time in ``counter``, for alerts."""

    def __init__(self, logger: logging.Logger, message: str, counter: Counter) -> None:
        self.logger, self.message, self.counter = logger, message, counter
        self.count = 0
        self._warned_at = -REPEAT_WARNING_SECONDS

    def happened(self, *args: object) -> None:
        self.count += 1
        self.counter.inc()
        now = time.monotonic()
        if now - self._warned_at >= REPEAT_WARNING_SECONDS:
            self._warned_at = now
            self.logger.warning(f"{self.message} ({self.count} so far)", *args)

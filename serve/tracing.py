"""Request traces, as Triton's trace extension has them: ``TraceSetting`` over gRPC, ``GET`` and
``POST /v2[/models/NAME]/trace/setting`` over HTTP, which ``perf_analyzer --trace-level`` and
tritonclient's ``update_trace_settings`` change while the server runs.

One request in ``trace_rate`` (the first after an update, then every rate-th), at most
``trace_count`` of them (-1: no limit; each update starts the count anew), is traced at level
TIMESTAMPS: when it started, was queued, computed (Triton's three compute phases: gathering its
batch's inputs, inference, splitting the outputs) and ended. Each trace is one line of the
server's log (logger ``resserve.trace``, at INFO) holding Triton's trace record as JSON, and, in
JSON logs, a ``trace`` field: like the logs, traces go to stderr only, never to a file a client
names. With ``--trace-mode opentelemetry`` they are OpenTelemetry spans instead (serve/otel.py),
and a request that carries a W3C ``traceparent`` is traced whatever the rate and count, as a
child of its caller's span. The server starts with ``--trace-level``, ``--trace-rate``,
``--trace-count`` and ``--trace-mode`` (which clients may read but not change, as with Triton).

The settings are the server's, and a model's own where set (a model follows the server's in
each setting it has not set); a model with settings of its own counts its requests and traces
apart from the others. Under --workers every worker takes every change, and samples its own
requests: rate and count are per worker. Times are nanoseconds of the monotonic clock, which
all processes of a host share.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Callable, Mapping

from resserve.serve.errors import InvalidInput
from resserve.serve.settings import ServerSettings, TraceLevel, TraceMode

if TYPE_CHECKING:
    from resserve.serve.otel import SpanExport

TraceValue = str | int | list[str]  # as clients send a setting: strings (both protocols), a list for levels
log = logging.getLogger("resserve.trace")


@dataclass(frozen=True)
class TraceSetting:
    """One scope's settings (the server's; a model's, where every unset field is None)."""

    level: TraceLevel | None = TraceLevel.OFF
    rate: int | None = 1000  # one request in ``rate`` is traced
    count: int | None = -1  # traces left to take; -1: no limit
    mode: TraceMode | None = TraceMode.TRITON  # the server's, from its start: a model's follows it

    def over(self, base: TraceSetting) -> TraceSetting:
        """``base`` with the fields set here."""
        return replace(base, **{f.name: value for f in fields(self) if (value := getattr(self, f.name)) is not None})

    def as_triton(self) -> dict[str, list[str] | str]:
        """By Triton's names and in its form (strings; a list for the level), every setting Triton reports."""
        return {"trace_level": [str(self.level)], "trace_rate": str(self.rate), "trace_count": str(self.count),
                "log_frequency": "0", "trace_file": "", "trace_mode": str(self.mode)}


# a model following the server's in everything
MODEL_DEFAULTS = TraceSetting(level=None, rate=None, count=None, mode=None)
FIELDS = {"trace_level": "level", "trace_rate": "rate", "trace_count": "count"}
# Triton's settings resserve takes with one value only: where its traces go and how
FIXED = {"log_frequency": ("0", "each trace is logged as it ends"),
         "trace_file": ("", "traces go to the server's log (stderr), a client may not choose a file the server writes")}


@dataclass(frozen=True)
class TraceSettings:
    """The server's settings, and each model's own."""

    server: TraceSetting = TraceSetting()
    models: Mapping[str, TraceSetting] = field(default_factory=dict)  # model name -> the fields it sets
    updates: int = 0  # how many were made: each starts every count anew, the same values given again too
    startup: TraceSetting = TraceSetting()  # the server's at start: what a setting cleared goes back to

    @classmethod
    def at_start(cls, settings: ServerSettings) -> TraceSettings:
        """The settings ``--trace-level``, ``--trace-rate`` and ``--trace-count`` start a server with."""
        server = TraceSetting(settings.trace_level, settings.trace_rate, settings.trace_count, settings.trace_mode)
        return cls(server=server, startup=server)

    def of(self, model: str) -> TraceSetting:
        """The settings ``model`` ("": the server) traces by."""
        return self.models[model].over(self.server) if model in self.models else self.server

    def updated(self, model: str, changes: Mapping[str, TraceValue | None]) -> TraceSettings:
        """These settings with ``changes`` made to ``model``'s ("": the server's); a change to
        None clears the setting (a model's then follows the server's; the server's is as the
        server started). InvalidInput for a name or value resserve does not take, before anything changes."""
        scope = self.models.get(model, MODEL_DEFAULTS) if model else self.server
        defaults = MODEL_DEFAULTS if model else self.startup
        scope = replace(scope, **{FIELDS[name]: _parsed(name, value) if value is not None else getattr(
            defaults, FIELDS[name]) for name, value in _known(changes, self.server.mode).items()})
        if not model:
            return replace(self, server=scope, updates=self.updates + 1)
        models = {name: setting for name, setting in self.models.items() if name != model}
        return replace(self, models=models if scope == MODEL_DEFAULTS else {**models, model: scope},
                       updates=self.updates + 1)

    def apply(self) -> None:
        """Trace as these settings say from now on (this process)."""
        tracer.apply(self)


def _known(changes: Mapping[str, TraceValue | None], mode: TraceMode) -> dict[str, TraceValue | None]:
    """The changes to the settings resserve changes; the fixed ones (and the mode the server
    started with) checked and dropped."""
    fixed = {**FIXED, "trace_mode": (str(mode), "the server's --trace-mode, set at its start")}
    for name, value in changes.items():
        if name in fixed and value is not None and _one(name, value) != fixed[name][0]:
            only, why = fixed[name]
            raise InvalidInput(f"{name} takes {only!r} only: {why}; got {value!r}"[:300])
        if name not in FIELDS and name not in fixed:
            raise InvalidInput(f"unknown trace setting {name[:64]!r}; resserve's: "
                               f"{', '.join(TraceSetting().as_triton())}")
    return {name: value for name, value in changes.items() if name in FIELDS}


def _parsed(name: str, value: TraceValue) -> TraceLevel | int:
    if name == "trace_level":
        levels = value if isinstance(value, list) else [value]
        known = {level.value for level in TraceLevel}
        if not levels or not all(isinstance(level, str) and level in known for level in levels):  # a dict is no level
            raise InvalidInput(f"trace_level takes OFF or TIMESTAMPS (resserve traces no tensors), got {value!r}"[:300])
        return TraceLevel.TIMESTAMPS if TraceLevel.TIMESTAMPS.value in levels else TraceLevel.OFF
    text = _one(name, value)
    lowest = 1 if name == "trace_rate" else -1
    if not text.lstrip("-").isdigit() or not lowest <= int(text) < 2**31:
        raise InvalidInput(f"{name} takes a whole number >= {lowest}, got {value!r}"[:300])
    return int(text)


def _one(name: str, value: TraceValue) -> str:
    """A setting that takes one value, as text (gRPC sends a list of strings, HTTP a string)."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise InvalidInput(f"{name} takes one value, got {value!r}"[:300])
    return str(value)


@dataclass
class _Sampler:
    """Which of one scope's requests are traced, and how many traces it has left."""

    setting: TraceSetting
    seen: int = 0

    def sample(self) -> bool:
        if self.setting.level is TraceLevel.OFF or self.setting.count == 0:
            return False
        self.seen += 1
        if (self.seen - 1) % self.setting.rate:
            return False
        if self.setting.count > 0:
            self.setting = replace(self.setting, count=self.setting.count - 1)
        return True


Headers = Callable[[], Mapping[str, str]]  # a request's headers or gRPC metadata, read only where needed


class Trace:
    """One traced request's timestamps, logged (or exported as spans) when it ends."""

    _ids = itertools.count(1)

    def __init__(self, model: str, version: str, request_id: str, spans: SpanExport | None = None,
                 parent: object = None) -> None:
        """``spans``: where it goes in OpenTelemetry mode (None: the log); ``parent``: the
        caller's span context, from its ``traceparent``."""
        self.record: dict[str, object] = {"id": next(self._ids), "model_name": model, "model_version": version}
        if request_id:
            self.record["request_id"] = request_id
        self.timestamps: list[dict[str, object]] = []
        self.spans, self.parent = spans, parent
        self.stamp("REQUEST_START")

    def stamp(self, name: str, at: float | None = None) -> None:
        """``name`` happened ``at`` (a time.monotonic() value; None: now)."""
        self.timestamps.append({"name": name, "ns": time.monotonic_ns() if at is None else int(at * 1e9)})

    def computed(self, queued: float, started: float, gathered: float, inferred: float, ended: float) -> None:
        """The batcher's times for this request's batch."""
        for name, at in (("QUEUE_START", queued), ("COMPUTE_START", started), ("COMPUTE_INPUT_END", gathered),
                         ("COMPUTE_OUTPUT_START", inferred), ("COMPUTE_END", ended)):
            self.stamp(name, at)

    def end(self, error: str = "") -> None:
        self.stamp("REQUEST_END")
        record = {**self.record, **({"error": error} if error else {}), "timestamps": self.timestamps}
        if self.spans is not None:
            self.spans.export(record, self.parent)
        else:
            log.info("%s", json.dumps(record), extra={"trace": record})


class Tracer:
    """This process's trace settings and samplers."""

    def __init__(self, settings: TraceSettings = TraceSettings()) -> None:
        self.settings = settings
        self._samplers: dict[str, _Sampler] = {}
        self._spans: SpanExport | None = None  # in OpenTelemetry mode: made in this process as it starts

    def apply(self, settings: TraceSettings) -> None:
        """Trace as ``settings`` say from now on, every scope counting its requests and traces anew;
        unless they are those in use (under --workers, the worker an update came through hears it
        back from the supervisor: it has started counting already)."""
        if settings != self.settings:
            self._samplers.clear()
        self.settings = settings

    def current(self, model: str) -> TraceSetting:
        """``model``'s settings ("": the server's) with the traces left to take."""
        return replace(self.settings.of(model), count=self._sampler(model).setting.count)

    def start(self, model: str, version: str, request_id: str, headers: Headers = dict) -> Trace | None:
        """A trace of this request to ``model``, if it is one to trace: one in the rate, or in
        OpenTelemetry mode one whose ``headers`` carry its caller's span (as with Triton)."""
        sampler = self._sampler(model)
        if sampler.setting.mode != TraceMode.OPENTELEMETRY:
            return Trace(model, version, request_id) if sampler.sample() else None
        if sampler.setting.level is TraceLevel.OFF:
            return None
        spans = self._span_export()
        parent = spans.parent_of(headers())
        if parent is None and not sampler.sample():
            return None
        return Trace(model, version, request_id, spans, parent)

    def prepare(self) -> None:
        """In OpenTelemetry mode, the SDK loaded and its exporter started before the first request:
        loading it takes about 0.1 s, which the first traced request would otherwise wait for
        (and every request beside it on the event loop)."""
        if self.settings.server.mode == TraceMode.OPENTELEMETRY:
            self._span_export()

    def flush(self) -> None:
        """The spans still queued in OpenTelemetry mode, sent before this process exits."""
        if self._spans is not None:
            self._spans.flush()

    def _span_export(self) -> SpanExport:
        if self._spans is None:
            from resserve.serve.otel import SpanExport  # the otel extra, imported in this mode only
            self._spans = SpanExport()
        return self._spans

    def _sampler(self, model: str) -> _Sampler:
        """The sampler of ``model``'s requests: its own where it has settings of its own, else the server's."""
        scope = model if model in self.settings.models else ""
        if scope not in self._samplers:
            self._samplers[scope] = _Sampler(self.settings.of(model))
        return self._samplers[scope]


tracer = Tracer()  # this process's: like its logging, one per server process

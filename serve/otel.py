"""Request traces as OpenTelemetry spans (``--trace-mode opentelemetry``), exported over OTLP/HTTP,
as Triton's OpenTelemetry trace mode has them.

Each traced request is three spans: the request's (``InferRequest``, from its start to its end),
its model's (named after the model; the model's name and version and the request's id as
attributes, ``QUEUE_START`` as an event) and its batch's compute (``compute``, from
``COMPUTE_START`` to ``COMPUTE_END``, the end of gathering the batch's inputs and the start of
splitting its outputs as events). A request that carries a W3C ``traceparent`` (an HTTP header,
or gRPC metadata) is a child of its caller's span, so a gateway's trace continues into the
server. Timestamps are taken on the monotonic clock and written on the wall clock, as spans want.

OpenTelemetry's SDK does the rest, configured by its standard variables: the exporter's
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_ENDPOINT``; default
http://localhost:4318/v1/traces), headers and certificates; the batch span processor's
``OTEL_BSP_*`` (spans are sent from its thread, in batches, never on a request's path); the
resource's ``OTEL_SERVICE_NAME`` (default ``resserve``) and ``OTEL_RESOURCE_ATTRIBUTES``. Spans
still queued when the server stops are sent after its drain, for at most ``FLUSH_SECONDS`` (an
unreachable collector must not hold a pod past its grace period). The SDK comes with the
``otel`` extra and is imported only in this mode.
"""

from __future__ import annotations

import threading
import time
from typing import Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

DEFAULT_SERVICE_NAME = "resserve"
FLUSH_SECONDS = 2.0  # for the spans still queued when the server stops
# the monotonic clock's timestamps (the traces') on the wall clock (the spans'), for this process
WALL_CLOCK_OFFSET_NS = time.time_ns() - time.monotonic_ns()


class SpanExport:
    """This process's tracer provider and exporter (one per server process, made in it)."""

    def __init__(self) -> None:
        resource = Resource.create()  # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, where set
        if resource.attributes.get(SERVICE_NAME, "").startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
        self.provider = TracerProvider(resource=resource)
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self.tracer = self.provider.get_tracer("resserve")
        self.propagator = TraceContextTextMapPropagator()

    def parent_of(self, headers: Mapping[str, str]) -> Context | None:
        """The caller's span, from the W3C ``traceparent`` (and ``tracestate``) in ``headers``,
        if there is a valid one."""
        if "traceparent" not in headers:
            return None
        context = self.propagator.extract(headers)
        return context if trace.get_current_span(context).get_span_context().is_valid else None

    def export(self, record: dict, parent: Context | None) -> None:
        """A finished trace (its Triton record) as its three spans, queued for export."""
        at = {stamp["name"]: stamp["ns"] + WALL_CLOCK_OFFSET_NS for stamp in record["timestamps"]}
        request = self.tracer.start_span("InferRequest", context=parent, start_time=at["REQUEST_START"])
        attributes = {"triton.model_name": record["model_name"], "triton.model_version": record["model_version"],
                      "triton.trace_id": record["id"]}
        if "request_id" in record:
            attributes["triton.request_id"] = record["request_id"]
        model = self.tracer.start_span(str(record["model_name"]), context=trace.set_span_in_context(request),
                                       start_time=at["REQUEST_START"], attributes=attributes)
        if "QUEUE_START" in at:  # computed: not a request refused before it was queued
            model.add_event("QUEUE_START", timestamp=at["QUEUE_START"])
            compute = self.tracer.start_span("compute", context=trace.set_span_in_context(model),
                                             start_time=at["COMPUTE_START"])
            for name in ("COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START"):
                compute.add_event(name, timestamp=at[name])
            compute.end(end_time=at["COMPUTE_END"])
        if error := record.get("error"):
            for span in (model, request):
                span.set_status(Status(StatusCode.ERROR, str(error)))
        model.end(end_time=at["REQUEST_END"])
        request.end(end_time=at["REQUEST_END"])

    def flush(self) -> None:
        """Send the spans still queued, for at most FLUSH_SECONDS: the server is stopping, and
        exits without the SDK's own shutdown (serve/server.py). The SDK's own timeout does not
        bound a flush that retries an unreachable collector (8 s here), so the flush runs in a
        thread the exit leaves behind."""
        flushing = threading.Thread(target=self.provider.force_flush, name="span-flush", daemon=True)
        flushing.start()
        flushing.join(FLUSH_SECONDS)

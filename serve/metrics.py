"""Prometheus metrics of the server, on their own registry (served on the metrics port).

Under ``--workers N`` every worker writes them to prometheus-client's multiprocess files and the
supervisor serves their sum (serve/workers/); gauges say how workers' values combine.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("resserve_requests", "Requests answered, by protocol (grpc, http), API, model "
                                "and status code (gRPC's name, or the HTTP status).",
                                ["protocol", "api", "model", "code"], registry=r)
        self.http_refused = Counter("resserve_http_refused", "HTTP connections closed at --max-connections "
                                    "(reason connection_limit) and requests answered 400 because they do not parse "
                                    "(unparsable): neither reaches a handler, nor resserve_requests.",
                                    ["reason"], registry=r)
        self.tls_reloads = Counter("resserve_tls_reloads", "TLS files found changed and read again, by each "
                                   "worker: served to new connections from then on (result ok), or left for the pair "
                                   "read before (refused: a file missing, or a key that is not the certificate's).",
                                   ["result"], registry=r)
        self.tls_certificate_expiry = Gauge(
            "resserve_tls_certificate_expiry_timestamp_seconds", "When the certificate served to new connections "
            "expires (its notAfter, in Unix time; the earliest of the workers'): alert when it comes near.",
            registry=r, multiprocess_mode="livemin")
        self.token_reloads = Counter("resserve_token_reloads", "Token files found changed and read again, by each "
                                     "worker: checked against from then on (result ok), or left for the tokens read "
                                     "before (refused: a file missing or empty, or a token in both files).",
                                     ["result"], registry=r)
        self.latency = Histogram("resserve_request_latency_seconds", "Time from request to response.",
                                 ["protocol", "api", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("resserve_queue_seconds", "Time a request waited for its batch.",
                                    ["model", "version"], buckets=LATENCY_BUCKETS, registry=r)
        self.inference_time = Histogram("resserve_inference_seconds", "Time one batch took to compute.",
                                        ["model", "version"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("resserve_batch_size", "Images per batch formed by the dynamic batcher.",
                                    ["model", "version"], buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("resserve_queue_depth", "Requests waiting in a model's queue (all workers).",
                                 ["model", "version"], registry=r, multiprocess_mode="livesum")
        self.model_info = Gauge("resserve_model_info", "Loaded models and how they run (value 1).",
                                ["model", "version", "backend", "device", "precision"], registry=r,
                                multiprocess_mode="livemax")

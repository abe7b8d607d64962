"""The server's shared state: its settings, models, metrics, readiness and requests in flight.

Protocol-neutral: every front door (the gRPC services, the HTTP server) admits and counts its
requests here, so readiness, the drain and the answer counts cover all of them alike.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Awaitable, Callable, Literal, Protocol, TypeVar

from resserve.serve.errors import SHUTTING_DOWN_MESSAGE, ShuttingDown
from resserve.serve.logs import LogSettings
from resserve.serve.metrics import Metrics
from resserve.serve.repository import ModelRepository
from resserve.serve.settings import ServerSettings
from resserve.serve.sharedmemory import Region, SharedMemory
from resserve.serve.tracing import TraceSettings

log = logging.getLogger("resserve.serve")
# The ``api`` label of each request's metrics and access-log line says which call it was, so
# that inference rates and latencies are not those of metadata, statistics or model loads:
# these infer (KServe v2 inference, each request on a stream, our Classify) ...
INFERENCE_APIS = frozenset({"kserve", "kserve_stream", "classify"})
# ... and the others read or change the server (kserve_left_out: the parts of the protocol answered 501)
API_LABELS = INFERENCE_APIS | {"kserve_metadata", "kserve_config", "kserve_statistics", "kserve_repository",
                               "kserve_logging", "kserve_trace", "kserve_shared_memory", "kserve_left_out"}


def check_api_label(api: str) -> None:
    """Refuse an ``api`` label not in API_LABELS (docs/serving.md lists them): a new one goes there first."""
    if api not in API_LABELS:
        raise ValueError(f"{api!r} is not an api label; add it to API_LABELS (and docs/serving.md, Metrics)")


ModelAction = Literal["load", "unload"]
SharedSettings = LogSettings | TraceSettings  # what every worker of a server takes on: each has apply()
T = TypeVar("T")


class Peers(Protocol):
    """The other workers of a server run with --workers (serve/workers/), which make the changes
    made through this one's API too."""

    def share_settings(self, settings: SharedSettings) -> None:
        """The log or trace settings changed: every worker is to log or trace so."""

    async def change_model(self, action: ModelAction, name: str, make: Callable[[], Awaitable[T]]) -> T:
        """Load or unload the model called ``name`` through this worker's API: ``make()`` makes the
        change here, in turn with the changes made through other workers, so that every worker
        makes them all in one order; the others then make it too if it was made here. Returns
        what ``make`` returned."""

    async def register_region(self, region: Region, make: Callable[[], Awaitable[None]]) -> None:
        """Register a shared memory region through this worker's API, in turn as change_model."""

    async def unregister_region(self, name: str, make: Callable[[], Awaitable[None]]) -> None:
        """Unregister the shared memory region ``name`` ("": every region), in turn as change_model."""


class _Alone:
    """A server of one process: no one to tell, no one to wait for."""

    def share_settings(self, settings: SharedSettings) -> None:
        pass

    async def change_model(self, action: ModelAction, name: str, make: Callable[[], Awaitable[T]]) -> T:
        return await make()

    async def register_region(self, region: Region, make: Callable[[], Awaitable[None]]) -> None:
        await make()

    async def unregister_region(self, name: str, make: Callable[[], Awaitable[None]]) -> None:
        await make()


ALONE = _Alone()


@dataclass
class ServerState:
    settings: ServerSettings
    metrics: Metrics = field(default_factory=Metrics)
    repository: ModelRepository | None = None  # None while models load
    ready: bool = False  # every model loaded and warmed, and not draining
    accepting: bool = True  # False once the drain is over: new requests get UNAVAILABLE
    in_flight: int = 0  # requests admitted and not yet answered
    answered: Counter = field(default_factory=Counter)  # status code name -> requests answered
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set while nothing is in flight
    peers: Peers = ALONE  # the other workers under --workers
    shared_memory: SharedMemory = field(init=False)  # the regions clients registered (--allow-client-shm)

    def __post_init__(self) -> None:
        self.idle.set()
        self.shared_memory = SharedMemory(self.settings.allow_client_shm)

    def model_label(self, api: str, requested: str) -> str:
        """The metrics label for the model a request to ``api`` names: bounded, so clients cannot
        mint labels. A request to infer that names none is the default model's; any other that
        names none (log settings, every model's statistics) is no model's: ""."""
        if self.repository is None:
            return "unknown"
        if not requested and api not in INFERENCE_APIS:
            return ""
        name = requested or self.repository.default
        return name if name in self.repository else "unknown"

    def models(self) -> ModelRepository:
        if self.repository is None:
            raise ShuttingDown("models are still loading; retry shortly")
        return self.repository

    def admit(self) -> float:
        """Count a request in; returns its start time. Every admitted request is ``finish``ed."""
        self.in_flight += 1
        self.idle.clear()
        return time.monotonic()

    def check_accepting(self) -> None:
        if not self.accepting:
            raise ShuttingDown(SHUTTING_DOWN_MESSAGE)

    def finish(self, protocol: str, api: str, model: str, code: str, started: float, peer: Callable[[], str],
               message: str = "") -> None:
        """Count a request out with the status ``code`` it was answered with (and, at verbose level
        1, log it with the client's address, asked of ``peer`` then only, and the error ``message``
        it was told: an access log)."""
        seconds = time.monotonic() - started
        self.in_flight -= 1
        if not self.in_flight:
            self.idle.set()
        self.answered[code] += 1
        self.metrics.requests.labels(protocol, api, model, code).inc()
        self.metrics.latency.labels(protocol, api, model).observe(seconds)
        if log.isEnabledFor(logging.DEBUG):
            _log_access(AccessRecord(protocol, api, model, code, round(seconds * 1e3, 3), peer(), message))


@dataclass(frozen=True)
class AccessRecord:
    """One request answered, as the access log has it (and, in JSON logs, as its fields)."""

    protocol: str
    api: str
    model: str
    status: str
    ms: float
    peer: str  # the client's address as its front door knows it: ipv4:ADDRESS:PORT over gRPC, ADDRESS over HTTP
    error: str  # the message the client was given with a status other than OK/200; empty otherwise


def _log_access(record: AccessRecord) -> None:
    call = " ".join(part for part in (record.protocol, record.api, record.model) if part)  # model "": none named
    error = f": {record.error}" if record.error else ""
    log.debug("%s: %s in %.2f ms, from %s%s", call, record.status, record.ms, record.peer or "an unknown address",
              error, extra=asdict(record))

"""The supervisor of ``resserve serve --workers N``: holds the ports, starts the workers and
restarts those that die, passes on what one worker's API changed, serves one /metrics for all,
and drains them together on SIGTERM. It runs no event loop and no gRPC."""

from __future__ import annotations

import dataclasses
import enum
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Iterable

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client import Counter as PrometheusCounter
from prometheus_client import multiprocess

from resserve.serve.auth import Access, warn_of_open_admin_apis
from resserve.serve.errors import ResserveError
from resserve.serve.logs import LogSettings, configure_logging
from resserve.serve.metrics import WorkerFilesCollector
from resserve.serve.repository import read_packages
from resserve.serve.server import answer_counts, check_port_free, serve_metrics
from resserve.serve.settings import WORKERS_SHARE_PORTS, ServerSettings, page_note, warn_of_memory_limit
from resserve.serve.sharedmemory import Region
from resserve.serve.state import SharedSettings
from resserve.serve.tls import ssl_context, tls_files
from resserve.serve.tracing import TraceSettings
from resserve.serve.workers.messages import (Change, Failed, Followed, Listen, Loaded, MadeEverywhere, ModelChange,
                                             Ready, RegionRegistered, RegionUnregistered, SettingsChanged, Stopped,
                                             ToSupervisor, ToWorker, Turn, TurnOver, TurnWanted)
from resserve.serve.workers.worker import worker_main

log = logging.getLogger("resserve.serve")

METRICS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus-client in each worker
FIRST_BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 30.0
STABLE_SECONDS = 60.0  # a worker that lived this long starts the backoff afresh when it dies
POLL_SECONDS = 0.2


class WorkerState(enum.Enum):
    """loading -> loaded -> listening -> ready -> stopped (drained or dead)."""

    LOADING = enum.auto()
    LOADED = enum.auto()  # waiting for Listen
    LISTENING = enum.auto()  # told to listen, not ready yet
    READY = enum.auto()
    STOPPED = enum.auto()


@dataclass
class Worker:
    index: int
    process: multiprocessing.Process
    pipe: Connection
    started: float = field(default_factory=time.monotonic)
    state: WorkerState = WorkerState.LOADING
    answered: Counter = field(default_factory=Counter)


class SupervisorMetrics:
    """The supervisor's own metrics, beside the workers' (which it reads from their files)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.restarts = PrometheusCounter("resserve_worker_restarts", "Workers restarted after they died.",
                                          registry=registry)
        self.ready = Gauge("resserve_workers_ready", "Workers ready and listening.", registry=registry)
        self.configured = Gauge("resserve_workers", "Workers configured (--workers).", registry=registry)


class Supervisor:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.context = multiprocessing.get_context("spawn")  # fresh interpreters: never fork gRPC
        self.workers: dict[int, Worker] = {}
        self.restart_at: dict[int, float] = {}  # index -> when a dead worker starts again
        self.backoff: dict[int, float] = {}
        self.stopping = False
        self.signals = 0
        self.held: list[socket.socket] = []  # the shared ports, bound (not listening) while the supervisor runs
        self.worker_settings: ServerSettings | None = None  # set in run(): the ports made concrete
        self.model_names = ""
        self.metrics_dir = ""  # the workers' Prometheus files: made in run(), removed when it ends
        self.registry = CollectorRegistry()
        self.metrics = SupervisorMetrics(self.registry)
        self.logs = LogSettings.of(settings)  # as the workers are to log ...
        self.traces = TraceSettings.at_start(settings)  # ... and trace
        self.unloaded: frozenset[str] = frozenset()  # models the workers are not to load
        self.regions: dict[str, Region] = {}  # shared memory regions registered through the API
        self.turn: Worker | None = None  # the worker making a change now (models, shared memory regions)
        self.waiting_turns: deque[Worker] = deque()  # workers waiting for their turn to make one
        self.passing_on: Change | None = None  # the change of the turn, being made in the other workers
        self.following: set[int] = set()  # the workers yet to make it

    # startup ----------------------------------------------------------------------------------

    def _worker_settings(self) -> ServerSettings:
        """The ports held for the workers (0 made concrete), the CPUs divided, metrics served here."""
        s = self.settings
        port = self._hold(s.port, "--port")
        http_port = self._hold(s.http_port, "--http-port") if s.http_port else 0
        return dataclasses.replace(s, port=port, http_port=http_port, metrics_port=0, threads=s.inference_threads,
                                   workers=1, reuse_port=True)

    def _hold(self, port: int, option: str) -> int:
        """Check ``port`` (of ``option``) is free (one line if not), then hold it for the workers."""
        check_port_free(self.settings.host, port, option)
        family = socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET
        held = socket.socket(family, socket.SOCK_STREAM)
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind((self.settings.host, port))
        self.held.append(held)
        return held.getsockname()[1]

    def _start(self, index: int) -> None:
        parent_end, child_end = self.context.Pipe()
        # the first worker alone looks at the packages (--poll-seconds): what it finds changed, it
        # loads through its API, which makes the change in every worker
        settings = self.worker_settings if index == 1 else dataclasses.replace(self.worker_settings, poll_seconds=0)
        process = self.context.Process(target=worker_main,
                                       args=(settings, index, child_end, self.logs, self.traces,
                                             self.unloaded, tuple(self.regions.values())),
                                       name=f"resserve-worker-{index}", daemon=False)
        process.start()
        child_end.close()
        self.workers[index] = Worker(index, process, parent_end)
        log.info("worker %d started (pid %d)", index, process.pid)

    def run(self) -> None:
        if not WORKERS_SHARE_PORTS:
            raise ResserveError("--workers above 1 needs Linux, whose SO_REUSEPORT spreads a port's connections over "
                                "the workers (here one would take them all): serve with --workers 1")
        packages = read_packages(self.settings)  # a missing or malformed package: one line before any worker starts
        self.model_names = ", ".join(f"{p.name} v{p.version}" for p in packages)
        tls = tls_files(self.settings)  # bad TLS or token files: one line before any worker starts, too
        if tls and self.settings.http_port:
            ssl_context(tls)
        Access.read(self.settings)
        self.worker_settings = self._worker_settings()
        self.metrics_dir = _metrics_dir()
        try:
            self._serve_metrics()
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
            log.info("listening on %s with %d workers, %d inference threads each", self.worker_settings.address,
                     self.settings.workers, self.worker_settings.threads)
            warn_of_open_admin_apis(self.settings.host, bool(self.settings.token_file),
                                    bool(self.settings.admin_token_file))
            warn_of_memory_limit(self.settings)
            for index in range(1, self.settings.workers + 1):
                self._start(index)
            self._loop()
        finally:
            for worker in self.workers.values():
                _kill_group(worker.process)
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
        total = sum((w.answered for w in self.workers.values()), Counter())
        each = "; ".join(f"worker {w.index}: {answer_counts(w.answered)}" for w in self.workers.values())
        log.info("stopped; requests answered: %s (%s)", answer_counts(total), each)

    def _serve_metrics(self) -> None:
        """One Prometheus endpoint for all workers: they write their samples to files in
        ``metrics_dir`` (prometheus-client's multiprocess mode), which this process reads and
        serves beside its own (workers ready, restarts)."""
        if self.settings.metrics_port:
            WorkerFilesCollector(self.registry, self.metrics_dir)
            serve_metrics(self.registry, self.settings.metrics_port, self.settings.host)
        self.metrics.configured.set(self.settings.workers)
        os.environ[METRICS_DIR_VARIABLE] = self.metrics_dir  # inherited by the workers only: imported here already

    # the loop ---------------------------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        self.signals += 1

    def _loop(self) -> None:
        forwarded = 0
        while True:
            if self.signals > forwarded:  # forward each signal: the second cuts the drain short
                forwarded = self.signals
                self._forward(signal.SIGTERM)
            alive = [w for w in self.workers.values() if w.process.is_alive()]
            if self.stopping and not alive:
                return
            wait([w.pipe for w in alive] + [w.process.sentinel for w in alive], POLL_SECONDS)
            for worker in list(self.workers.values()):
                self._read_messages(worker)  # a worker that has exited may still have some: Failed, Stopped
                if not worker.process.is_alive() and worker.state != WorkerState.STOPPED and not self.stopping:
                    self._died(worker)
            self._restart_due()

    def _forward(self, signum: int) -> None:
        if not self.stopping:
            log.info("shutting down: every worker drains (signal again to skip the drain)")
        self.stopping = True
        for worker in self.workers.values():
            if worker.process.is_alive():
                os.kill(worker.process.pid, signum)

    def _read_messages(self, worker: Worker) -> None:
        try:
            while worker.pipe.poll():
                self._message(worker, worker.pipe.recv())
        except (EOFError, OSError):  # it exited and said all it had: its sentinel tells the rest
            pass

    def _message(self, worker: Worker, message: ToSupervisor) -> None:
        match message:
            case Loaded():
                worker.state = WorkerState.LOADED
                self._release_loaded()
            case Ready():
                worker.state = WorkerState.READY
                self._count_ready()
                if not self.stopping and all(w.state == WorkerState.READY for w in self.workers.values()):
                    log.info("ready: %s (%d workers)%s", self.model_names, len(self.workers),
                             page_note(self.worker_settings, self.worker_settings.http_port))
            case Failed(reason) if not self._serving:  # at startup: the server cannot start
                raise ResserveError(reason)
            case Failed(reason):
                log.error("worker %d could not start again: %s", worker.index, reason)
            case Stopped(answered):
                worker.state = WorkerState.STOPPED
                worker.answered.update(answered)
                self._not_awaited(worker)
            case SettingsChanged(settings):
                self._share_settings(settings)
            case TurnWanted():
                self.waiting_turns.append(worker)
                self._give_turn()
            case TurnOver(made):
                self._changed(worker, made)
            case Followed(change) if change == self.passing_on:
                self._not_awaited(worker)

    def _share_settings(self, settings: SharedSettings) -> None:
        """Log or trace settings changed through one worker's API (which logged it): every worker
        takes them, the one they came through too (so when two change at once, all end with the
        later), this process, and the workers started from now on."""
        if isinstance(settings, LogSettings):
            self.logs = settings
        else:
            self.traces = settings
        settings.apply()
        self._tell(self.workers.values(), SettingsChanged(settings))

    def _changed(self, worker: Worker, made: Change | None) -> None:
        """``worker``'s turn is over, with a model loaded or unloaded or a shared memory region
        registered or unregistered through its API (which has made the change), or nothing made (it
        failed there). Every other worker makes the change too, before the next turn is given (those
        still loading take it before they listen, and are not waited for), and the workers started
        from now on start with it (without the models unloaded, with the regions registered)."""
        self.turn = worker
        match made:
            case ModelChange(action, name):
                self.unloaded = self.unloaded - {name} if action == "load" else self.unloaded | {name}
            case RegionRegistered(region):
                self.regions[region.name] = region
            case RegionUnregistered(name):
                self.regions = {n: r for n, r in self.regions.items() if name and n != name}
        if made is None:
            self.turn = None
            self._give_turn()
            return
        others = [w for w in self.workers.values() if w is not worker and w.process.is_alive()]
        self._tell(others, made)
        self.passing_on, self.following = made, {w.index for w in others if w.state is not WorkerState.LOADING}
        self._made_when_followed()

    def _not_awaited(self, worker: Worker) -> None:
        """``worker`` has made the change passed on, or stopped, or died: it is not waited for."""
        self.following.discard(worker.index)
        self._made_when_followed()

    def _made_when_followed(self) -> None:
        """Once every worker that serves has made the change passed on, the worker it came through
        answers its client, and the next turn may go."""
        if self.passing_on is None or self.following:
            return
        self._tell([self.turn], MadeEverywhere())  # gone, if it died meanwhile: nothing to tell
        self.passing_on, self.turn = None, None
        self._give_turn()

    def _give_turn(self) -> None:
        """The next worker waiting to make a change gets its turn, once no one has it."""
        while self.turn is None and self.waiting_turns:
            worker = self.waiting_turns.popleft()
            if worker.process.is_alive():
                self.turn = worker
                self._tell([worker], Turn())

    @staticmethod
    def _tell(workers: Iterable[Worker], message: ToWorker) -> None:
        for worker in workers:
            if worker.process.is_alive():
                try:
                    worker.pipe.send(message)
                except OSError:  # exiting: it is restarted with what the supervisor holds
                    pass

    def _release_loaded(self) -> None:
        """Workers listen once all have loaded; later (a restart), as soon as each has."""
        starting = any(w.state == WorkerState.LOADING for w in self.workers.values()) and not self._serving
        if starting:
            return
        for worker in self.workers.values():
            if worker.state == WorkerState.LOADED:
                worker.pipe.send(Listen())
                worker.state = WorkerState.LISTENING

    def _count_ready(self) -> None:
        self.metrics.ready.set(sum(w.state == WorkerState.READY for w in self.workers.values()))

    @property
    def _serving(self) -> bool:
        return any(w.state == WorkerState.READY for w in self.workers.values())

    def _died(self, worker: Worker) -> None:
        code = worker.process.exitcode
        multiprocess.mark_process_dead(worker.process.pid, self.metrics_dir)
        delay = self.backoff.get(worker.index, FIRST_BACKOFF_SECONDS / 2) * 2
        if time.monotonic() - worker.started > STABLE_SECONDS:
            delay = FIRST_BACKOFF_SECONDS
        delay = min(delay, MAX_BACKOFF_SECONDS)
        self.backoff[worker.index] = delay
        worker.state = WorkerState.STOPPED
        self._count_ready()
        if self.turn is worker and self.passing_on is None:  # it died changing models: the next may go
            self.turn = None
            self._give_turn()
        self._not_awaited(worker)  # restarted, it starts with every change made
        self.restart_at[worker.index] = time.monotonic() + delay
        log.warning("worker %d (pid %d) exited with code %s; restarting it in %.1f s", worker.index,
                    worker.process.pid, code, delay)

    def _restart_due(self) -> None:
        now = time.monotonic()
        for index, at in list(self.restart_at.items()):
            if self.stopping:
                self.restart_at.clear()
                return
            if now >= at:
                del self.restart_at[index]
                self.metrics.restarts.inc()
                self._start(index)


def _kill_group(process: multiprocessing.Process) -> None:
    """Kill a worker and whatever it started (its process group: a library's helper process must
    not outlive it, nor print a traceback when its parent vanishes), then reap it."""
    if process.is_alive():
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:  # not yet in a group of its own
            process.kill()
    process.join()


def _metrics_dir() -> str:
    """A new folder for the workers' metrics files (prometheus-client's multiprocess mode), in the
    temporary directory: one line, not a traceback, where none can be written."""
    try:
        return tempfile.mkdtemp(prefix="resserve-metrics-")
    except OSError as exc:
        raise ResserveError(
            f"the workers write their metrics to a temporary directory, and none can be written here ({exc.strerror}): "
            "on a read-only root filesystem mount one at /tmp (docker run --tmpfs /tmp; in Kubernetes an emptyDir), "
            "set TMPDIR to a writable folder, or serve with --workers 1") from None


def supervise(settings: ServerSettings) -> None:
    """Run ``settings.workers`` workers until SIGTERM/SIGINT; exit 0 when all have drained."""
    configure_logging(LogSettings.of(settings))
    Supervisor(settings).run()

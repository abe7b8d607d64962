"""``resserve serve --workers N``: N server processes on the same ports, under one supervisor.

One process is one event loop: past a few CPUs its Python per-request path, not the model,
bounds what it serves. Each worker here is a whole server (serve/server.py) with its own
backend, batcher and inference threads (the usable CPUs divided among them), listening on the
same gRPC and HTTP ports with SO_REUSEPORT, so the kernel spreads connections over them. The
supervisor (this module, no event loop, no gRPC):

- checks every port before any worker starts (one line if one is in use) and holds the gRPC
  and HTTP ports for the workers (a bound socket that does not listen takes no connections);
- starts the workers; each loads and warms its models and waits, and when all have loaded they
  listen together: the server is ready when every worker is. A worker that restarts listens
  only once it is ready, so no connection reaches a worker that is not;
- restarts a worker that dies, after a backoff that grows while it keeps dying (logged, counted
  in ``resserve_worker_restarts_total``); a worker gets SIGTERM if the supervisor dies
  (PR_SET_PDEATHSIG), so none is left behind;
- forwards SIGTERM/SIGINT: every worker drains as a single server does (not ready, the drain
  window, the grace period), and the supervisor exits 0 after the last, logging the answers of
  all of them;
- serves one Prometheus endpoint for all workers (prometheus-client's multiprocess mode):
  counters and histograms add up, queue depth is summed over live workers;
- passes on log settings changed and models loaded or unloaded through one worker's API
  (Triton's logging and model repository extensions) to every worker, and starts a restarted one
  with them. Models change through one worker at a time, in turns the supervisor gives, so
  every worker makes the same changes in the same order and they end alike.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Awaitable, Callable, Iterable

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client import Counter as PrometheusCounter
from prometheus_client import multiprocess

from resserve.serve.errors import ResserveError, ShuttingDown
from resserve.serve.repository import read_packages
from resserve.serve.logs import LogSettings, apply_log_settings, configure_logging
from resserve.serve.server import answer_counts, check_port_free, serve, serve_metrics
from resserve.serve.settings import ServerSettings
from resserve.serve.state import ModelAction, T
from resserve.serve.tls import ssl_context, tls_files

log = logging.getLogger("resserve.serve")

METRICS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus-client in each worker
FIRST_BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 30.0
STABLE_SECONDS = 60.0  # a worker that lived this long starts the backoff afresh when it dies
POLL_SECONDS = 0.2
PR_SET_PDEATHSIG = 1


# ----------------------------------------------------------------------------------------------
# In the worker


class PipeCoordinator:
    """A worker's side of the supervisor's pipe (the ``Coordinator`` of serve/server.py)."""

    def __init__(self, pipe: Connection, unloaded: frozenset[str]) -> None:
        self.pipe = pipe
        self.unloaded = unloaded
        self._follow: Callable[[ModelAction, str], Awaitable[None]] | None = None
        self._following: set[asyncio.Task] = set()  # model changes under way (a reference keeps each alive)
        self._turns: deque[asyncio.Future] = deque()  # model changes through this worker's API, awaiting their turn

    async def loaded(self, follow: Callable[[ModelAction, str], Awaitable[None]]) -> None:
        self._follow = follow
        try:
            self.pipe.send(("loaded",))
            while (message := await asyncio.to_thread(self.pipe.recv))[0] != "listen":  # every worker has loaded
                self._take(message)
        except (OSError, EOFError):  # the supervisor is gone before this worker served: nothing to drain
            os._exit(0)
        asyncio.get_running_loop().add_reader(self.pipe.fileno(), self._receive)

    def _receive(self) -> None:
        """A message from the supervisor while serving."""
        try:
            self._take(self.pipe.recv())
        except (OSError, EOFError):  # the supervisor is gone: PR_SET_PDEATHSIG brings the SIGTERM
            asyncio.get_running_loop().remove_reader(self.pipe.fileno())

    def _take(self, message: tuple) -> None:
        """A change made through another worker (or, for log settings, through this one too), or
        this worker's turn to change models."""
        kind, *payload = message
        if kind == "log_settings":
            apply_log_settings(payload[0])
        elif kind == "model":
            task = asyncio.get_running_loop().create_task(self._follow(*payload))
            self._following.add(task)
            task.add_done_callback(self._following.discard)
        elif kind == "model_turn":
            self._turns.popleft().set_result(None)

    def share_log_settings(self, settings: LogSettings) -> None:
        self._send(("log_settings", settings))

    async def change_model(self, action: ModelAction, name: str, make: Callable[[], Awaitable[T]]) -> T:
        """One worker changes models at a time: the supervisor gives the turns, and passes each
        change made on to the other workers before it gives the next turn. So a change made through
        another worker has reached this one (and is queued before ``make`` in ModelControl) when
        its turn comes, and every worker makes every change in the order of the turns."""
        turn = asyncio.get_running_loop().create_future()
        self._turns.append(turn)
        if not self._send(("model_turn",)):
            self._turns.remove(turn)
            raise ShuttingDown("the server is shutting down")
        await turn  # the caller shields this: a turn given is always handed back
        made = None
        try:
            result = await make()
            made = (action, name)
            return result
        finally:
            self._send(("model_done", made))

    def _send(self, message: tuple) -> bool:
        try:
            self.pipe.send(message)
            return True
        except OSError:  # the supervisor is gone: this worker drains and exits
            return False

    def ready(self) -> None:
        self.pipe.send(("ready",))

    def stopped(self, answered: Counter) -> None:
        try:
            self.pipe.send(("stopped", dict(answered)))
        except OSError:  # the supervisor is gone (it was killed): say it here
            log.info("stopped; requests answered: %s", answer_counts(answered))


def _follow_the_supervisor() -> None:
    """Signals come from the supervisor only: a process group of its own, so a terminal's Ctrl-C
    or a group-wide SIGTERM is not delivered twice (a second signal cuts the drain short); and
    SIGTERM (a drain, then exit) when the supervisor dies, however it dies (Linux)."""
    os.setpgid(0, 0)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the supervisor refuses --workers there anyway
        pass


def worker_main(settings: ServerSettings, index: int, pipe: Connection, logs: LogSettings,
                unloaded: frozenset[str]) -> None:
    """A worker process: a whole server on the shared ports, coordinated over ``pipe``, logging
    as ``logs`` say and without the models ``unloaded`` (the state of the moment: either may have
    changed through the API since the server started)."""
    _follow_the_supervisor()
    configure_logging(logs, worker=index)
    try:
        asyncio.run(serve(settings, PipeCoordinator(pipe, unloaded)))
    except ResserveError as exc:  # the supervisor says it, once, for the first worker that fails to start
        pipe.send(("failed", str(exc)))
        sys.exit(exc.exit_code)


# ----------------------------------------------------------------------------------------------
# In the supervisor


@dataclass
class Worker:
    index: int
    process: multiprocessing.Process
    pipe: Connection
    started: float = field(default_factory=time.monotonic)
    state: str = "loading"  # loading -> loaded -> listening -> ready -> stopped (drained or dead)
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
        self.logs = LogSettings.of(settings)  # as the workers are to log
        self.unloaded: frozenset[str] = frozenset()  # models the workers are not to load
        self.turn: Worker | None = None  # the worker changing models now
        self.waiting_turns: deque[Worker] = deque()  # workers waiting for their turn to change models

    # startup ----------------------------------------------------------------------------------

    def _worker_settings(self) -> ServerSettings:
        """The ports held for the workers (0 made concrete), the CPUs divided, metrics served here."""
        s = self.settings
        port = self._hold(s.port)
        http_port = self._hold(s.http_port) if s.http_port else 0
        return dataclasses.replace(s, port=port, http_port=http_port, metrics_port=0, threads=s.inference_threads,
                                   workers=1, reuse_port=True)

    def _hold(self, port: int) -> int:
        """Check ``port`` is free (one line if not), then hold it for the workers."""
        check_port_free(self.settings.host, port)
        family = socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET
        held = socket.socket(family, socket.SOCK_STREAM)
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind((self.settings.host, port))
        self.held.append(held)
        return held.getsockname()[1]

    def _start(self, index: int) -> None:
        parent_end, child_end = self.context.Pipe()
        process = self.context.Process(target=worker_main,
                                       args=(self.worker_settings, index, child_end, self.logs, self.unloaded),
                                       name=f"resserve-worker-{index}", daemon=False)
        process.start()
        child_end.close()
        self.workers[index] = Worker(index, process, parent_end)
        log.info("worker %d started (pid %d)", index, process.pid)

    def run(self) -> None:
        if not hasattr(socket, "SO_REUSEPORT"):
            raise ResserveError("--workers above 1 needs SO_REUSEPORT (Linux); run one worker per container instead")
        packages = read_packages(self.settings)  # a missing or malformed package: one line before any worker starts
        self.model_names = ", ".join(f"{p.name} v{p.version}" for p in packages)
        tls = tls_files(self.settings)
        if tls and self.settings.http_port:
            ssl_context(tls)
        self.worker_settings = self._worker_settings()
        self.metrics_dir = tempfile.mkdtemp(prefix="resserve-metrics-")
        try:
            self._serve_metrics()
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
            log.info("listening on %s with %d workers, %d inference threads each", self.worker_settings.address,
                     self.settings.workers, self.worker_settings.threads)
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
            from prometheus_client.multiprocess import MultiProcessCollector

            MultiProcessCollector(self.registry, path=self.metrics_dir)
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
                self._read_messages(worker)  # a worker that has exited may still have some: "failed", "stopped"
                if not worker.process.is_alive() and worker.state != "stopped" and not self.stopping:
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
                self._message(worker, *worker.pipe.recv())
        except (EOFError, OSError):  # it exited and said all it had: its sentinel tells the rest
            pass

    def _message(self, worker: Worker, kind: str, *payload) -> None:
        if kind == "loaded":
            worker.state = "loaded"
            self._release_loaded()
        elif kind == "ready":
            worker.state = "ready"
            self.metrics.ready.set(sum(w.state == "ready" for w in self.workers.values()))
            if all(w.state == "ready" for w in self.workers.values()):
                log.info("ready: %s (%d workers)", self.model_names, len(self.workers))
        elif kind == "failed" and not self._serving:  # at startup: the server cannot start
            raise ResserveError(payload[0])
        elif kind == "failed":
            log.error("worker %d could not start again: %s", worker.index, payload[0])
        elif kind == "stopped":
            worker.state = "stopped"
            worker.answered.update(payload[0])
        elif kind == "log_settings":
            self._share_log_settings(payload[0])
        elif kind == "model_turn":
            self.waiting_turns.append(worker)
            self._give_turn()
        elif kind == "model_done":
            self._model_changed(worker, payload[0])

    def _share_log_settings(self, settings: LogSettings) -> None:
        """Log settings changed through one worker's API (which logged it): every worker takes
        them, the one they came through too (so when two change at once, all end with the
        later), this process, and the workers started from now on."""
        self.logs = settings
        apply_log_settings(settings)
        self._tell(self.workers.values(), ("log_settings", settings))

    def _model_changed(self, worker: Worker, made: tuple[ModelAction, str] | None) -> None:
        """``worker``'s turn to change models is over, with a model loaded or unloaded through its
        API (which has made it), or nothing made (it failed there). Every other worker makes the
        change too, before the next turn is given, and the workers started from now on start
        without the models unloaded."""
        if self.turn is worker:
            self.turn = None
        if made is not None:
            action, name = made
            self.unloaded = self.unloaded - {name} if action == "load" else self.unloaded | {name}
            self._tell([w for w in self.workers.values() if w is not worker], ("model", action, name))
        self._give_turn()

    def _give_turn(self) -> None:
        """The next worker waiting to change models gets its turn, once no one has it."""
        while self.turn is None and self.waiting_turns:
            worker = self.waiting_turns.popleft()
            if worker.process.is_alive():
                self.turn = worker
                self._tell([worker], ("model_turn",))

    @staticmethod
    def _tell(workers: Iterable[Worker], message: tuple) -> None:
        for worker in workers:
            if worker.process.is_alive():
                try:
                    worker.pipe.send(message)
                except OSError:  # exiting: it is restarted with what the supervisor holds
                    pass

    def _release_loaded(self) -> None:
        """Workers listen once all have loaded; later (a restart), as soon as each has."""
        starting = any(w.state == "loading" for w in self.workers.values()) and not self._serving
        if starting:
            return
        for worker in self.workers.values():
            if worker.state == "loaded":
                worker.pipe.send(("listen",))
                worker.state = "listening"

    @property
    def _serving(self) -> bool:
        return any(w.state == "ready" for w in self.workers.values())

    def _died(self, worker: Worker) -> None:
        code = worker.process.exitcode
        multiprocess.mark_process_dead(worker.process.pid, self.metrics_dir)
        delay = self.backoff.get(worker.index, FIRST_BACKOFF_SECONDS / 2) * 2
        if time.monotonic() - worker.started > STABLE_SECONDS:
            delay = FIRST_BACKOFF_SECONDS
        delay = min(delay, MAX_BACKOFF_SECONDS)
        self.backoff[worker.index] = delay
        worker.state = "stopped"
        self.metrics.ready.set(sum(w.state == "ready" for w in self.workers.values()))
        if self.turn is worker:  # it died changing models: the next may go
            self.turn = None
            self._give_turn()
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


def supervise(settings: ServerSettings) -> None:
    """Run ``settings.workers`` workers until SIGTERM/SIGINT; exit 0 when all have drained."""
    configure_logging(LogSettings.of(settings))
    Supervisor(settings).run()

"""``resserve serve --workers N``: N server processes on the same ports, under one supervisor.

One process is one event loop: past a few CPUs its Python per-request path, not the model,
bounds what it serves. Each worker here is a whole server (serve/server.py) with its own
backend, batcher and inference threads (the usable CPUs divided among them), listening on the
same gRPC and HTTP ports with SO_REUSEPORT, so the kernel spreads connections over them. The
supervisor (supervisor.py; no event loop, no gRPC):

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
- passes on log settings changed, models loaded or unloaded and shared memory regions registered
  or unregistered through one worker's API (Triton's logging, model repository and shared memory
  extensions) to every worker, and starts a restarted one with them. Models and regions change
  through one worker at a time, in turns the supervisor gives, so every worker makes the same
  changes in the same order and they end alike.

A worker (worker.py) reports to the supervisor and hears from it over a pipe, in the typed
messages of messages.py.
"""

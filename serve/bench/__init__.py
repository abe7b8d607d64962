"""``resserve bench serve`` and the in-process measurements the benchmarks share.

- clients.py: the Python load clients (ours and tritonclient's), one connection per client, per API;
  a load level and what it measured on the load generator's side
- perf_analyzer.py: Triton's C++ perf_analyzer as the load instead
- load.py: closed- and open-loop load over load processes, and one level's row: the load's side
  and the server's (its metrics and its CPU time)
- limits.py: the in-process limit a server is measured against (and ``bench model``'s runners)
- report.py: the typed results (rows, summaries, the report), printed as tables and plotted
- sweep.py: the servers a run starts and the whole sweep
"""

"""Inside a container's limits: the server and torch count the CPUs of a CPU quota, the server and
training the memory of a memory limit, on cgroup v2 and v1 alike, in a real cgroup made for the
test (as root; skipped where this process may not make one).

Both are read at every level of the process's cgroup path: until 2026-12-05 only cgroup v2's
file at the root of /sys/fs/cgroup was, which a host on cgroup v1 (as this project's own
machines) or a systemd unit's quota never shows: each test below failed on that code (the server
served, with 2 threads and no word of its memory; torch ran 2 threads; training started and was
OOM-killed).
"""

import json
import os
import re

import pytest

from helpers import ServerProcess, limited_cgroup, run_cli


def test_a_server_in_a_one_cpu_quota_counts_one_cpu():
    with limited_cgroup(cpu=1.0) as join:
        result = run_cli("serve", "--threads", "2", "--port", "0", "--http-port", "0", "--metrics-port", "0",
                         preexec=join, timeout=60)  # not refused: it would serve until the timeout
    assert result.returncode == 1, result.stderr[-500:]
    assert result.stderr.strip() == ("error: --threads 2 is more than the 1 CPUs this server may use (spinning threads "
                                     "beyond them starve the rest; --cpus raises the count)")


def test_a_server_in_one_cpu_and_1_gib_runs_one_inference_thread_and_warns_of_its_budgets():
    """The default in-flight budgets may take a worker to 1.6 GB (docs/serving.md "Limits"): more
    than a 1 GiB limit holds, which the log says before the kernel kills the server under load."""
    with limited_cgroup(cpu=1.0, memory=2**30) as join, ServerProcess(preexec=join) as server:
        log = "".join(server.lines)
    assert re.search(r"model\.onnx on \w+ \(cpu, \w+, 1 thread\)", log), log
    assert re.search(r"1 worker may hold up to 1\.6 GB at its in-flight budgets' worst, more than the [01]\.\d GB this "
                     r"server's memory limit leaves: lower --max-inflight-bytes, or raise the limit", log), log


def test_torch_runs_as_many_threads_as_a_cpu_quota_allows(tmp_path):
    """Torch counts the affinity mask, not the quota: `bench train` reports the threads it ran."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU here: a quota of one changes nothing")
    with limited_cgroup(cpu=1.0) as join:
        result = run_cli("bench", "train", "--steps", "1", "--warmup", "1", "--batch-size", "8",
                         "--json", str(tmp_path / "bench.json"), preexec=join, timeout=300)
    assert result.returncode == 0, result.stderr[-500:]
    assert json.loads((tmp_path / "bench.json").read_text())["threads"] == 1


def test_training_in_a_memory_limit_is_refused_what_the_limit_cannot_hold(tmp_path):
    """A batch of 1,024 of the lecture ResNet holds at least 1.3 GB of activations: more than a 1 GiB
    limit leaves (less the ~0.3 GB that torch and the data take), however much the machine has."""
    with limited_cgroup(memory=2**30) as join:
        result = run_cli("train", "--batch-size", "1024", "--epochs", "1", "--out", str(tmp_path / "m.pt"),
                         preexec=join, timeout=300)
    assert result.returncode == 1, result.stderr[-500:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training this network needs at least 1.3 GB (1 MB for its weights, their "
                           "gradients and momentum; 1.3 GB for a batch of 1,024 images), more than the "), last
    assert last.endswith(" MB free on cpu: lower --batch-size or the network's size"), last
    assert not (tmp_path / "m.pt").exists()

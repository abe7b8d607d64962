"""The GPU check (issues 14 and 15): run in one go on a machine with an NVIDIA GPU, results as JSON.

    tests/gpu/stage.sh                            # here: ../shared/gpu/stage.sh, serving wheels, perf_analyzer
    # on the GPU machine, the commands it prints (device `run`, with `carry`), the last:
    source /tmp/gpu-stage/base/on-gpu.sh          # ../shared/gpu/README.md: onnxruntime-gpu, MNIST
    export PATH=$PWD/.gpu/perf-analyzer/bin:$PATH  # carried with this command
    python3 tests/gpu/check.py --out "$OUT/gpu-check.json"
    python3 tests/gpu/check.py --device cpu --quick --out /tmp/cpu-dry-run.json   # the same, on a CPU first
    python3 tests/gpu/check.py --parts cpu_cost --out "$OUT/gpu-cost.json"        # in a call of its own

Four parts, each written to the JSON as soon as it is done (a timeout keeps what finished):
1. parity: the shipped ONNX artifact on ``--device`` against the CPU fp32 run, on the 10,000
   MNIST test images: max |logit difference| and both accuracies;
2. in process: batch-1 latency and batch 64/256/1024 throughput on the CPU, and on CUDA without
   and with CUDA graphs, and with graphs and TF32 (`resserve bench model --device cuda`'s rows);
3. served: a server on ``--device`` with its defaults (on CUDA: batches up to 256, shape
   buckets, CUDA graphs, --workers auto), loaded with 1-image requests at C=1, 16, 64 and
   64-image requests at C=16 (our closed-loop load generator, and Triton's perf_analyzer where it
   runs), and the first 200 requests at each of several batch sizes (the slowest against the
   median: no shape-dependent compile after ready);
4. workers (issue 15): 1-image requests at C=64 against 1, 4 and 6 workers on ``--device`` and 4
   and 8 on the CPU, beside the CPU's in-process limit at batch 1, 8, 16 and 64; on ``--device``
   also from Triton's perf_analyzer where it runs; on the CPU also one client and 64-image
   requests, which say whether more workers than ``--workers auto``'s one per 4 CPUs should be
   the default there (8 served 1.30-1.46x 4's images/s at C=64 in runs 1 and 4).

And ``--parts cpu_cost``, in a device call of its own (the four parts fill one): the server's CPU
per 1-image request at C=1 and C=64, with its defaults, its inference threads not spinning, one
inference thread, and 4 workers with and without one thread each (COST_VARIANTS): whether the
CPU a GPU server burns beside the GPU can go to its front ends.

After each part, ``targets`` in the JSON judges every acceptance target of the two issues that
the finished parts can judge (figure, and met or not); the end of the run prints them.

The server is started from this checkout's modules, not the `resserve` command, so the check
works where the project is on PYTHONPATH without being installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from resserve.serve.backends import open_backend
from resserve.serve.bench.clients import Level, LoadSpec
from resserve.serve.bench.limits import cuda_runners, in_process_limit, measure_runners
from resserve.serve.bench.load import measure_level
from resserve.serve.errors import ResserveError
from resserve.serve.package import load_package

SERVER = "import typer; from resserve.serve.cli import serve; typer.run(serve)"
FIRST_REQUEST_SIZES = (1, 2, 3, 5, 8, 13, 21, 34, 64, 100, 256)  # every CUDA bucket, 1 to 256
IN_PROCESS_SIZES = (64, 256, 1024)
LOAD_PROCESSES = 4  # the load generator's processes: 16 CPUs on the GPU machine
# known since runs 1 and 4: 8 CUDA workers serve less than 4, and one CPU worker 0.2x in process
WORKERS = {"cuda": (1, 4, 6), "cpu": (4, 8)}
QUICK_WORKERS = {"cuda": (1, 2), "cpu": (1, 2)}
CPU_WORKER_SWEEP = ((1, (1, 64)), (64, (16,)))  # (images per request, concurrencies)
# the cpu_cost part's servers, 1-image requests at C=1 and C=64: (workers, server options); the
# defaults first. On a GPU the server spent 1.7 ms of CPU per C=1 request in run 4 (ONNX Runtime's
# intra-op threads beside a session they have no work in, or the CUDA runtime's spin-wait?), and
# CPU is what bounds 4-6 workers short of 8,000 images/s: freed, it goes to the front ends
COST_VARIANTS = ((1, ()), (1, ("--no-thread-spinning",)), (1, ("--threads", "1")), (4, ()), (4, ("--threads", "1")))
PARTS = ("parity", "in_process", "cpu_in_process", "served", "workers", "cpu_cost")
DEFAULT_PARTS = tuple(part for part in PARTS if part != "cpu_cost")  # the whole check fits one device call
# the key a load's rows go under: batch{N}, then these for its API and client
SUFFIXES = {"kserve": "", "kserve-stream": "_stream", "resserve": "", "perf_analyzer": "_perf_analyzer"}


def mnist_test() -> tuple[np.ndarray, np.ndarray]:
    from resserve.train.data import load_mnist

    test = load_mnist().test
    return test.images[:, None].astype(np.float32) / 255.0, test.labels


def parity(device: str, images: np.ndarray, labels: np.ndarray, onnx: bytes) -> dict:
    cpu = open_backend(onnx, "onnx", "onnxruntime", "cpu", "fp32")
    other = open_backend(onnx, "onnx", "onnxruntime", device, "fp32")
    run = lambda backend: np.concatenate([backend.infer(images[i:i + 500])["logits"] for i in range(0, len(images), 500)])
    reference, logits = run(cpu), run(other)
    return {"device": other.device, "max_abs_logit_difference": float(np.abs(reference - logits).max()),
            "accuracy_cpu": float((reference.argmax(1) == labels).mean()),
            "accuracy_device": float((logits.argmax(1) == labels).mean())}


def in_process(device: str, onnx: bytes, images: np.ndarray, seconds: float) -> list[dict]:
    """`resserve bench model --device cuda`'s ONNX Runtime rows (the CPU, CUDA, CUDA graphs),
    without torch: the GPU machine has no torchvision."""
    runners = {"ONNX Runtime fp32, CPU": open_backend(onnx, "onnx", "onnxruntime", "cpu", "fp32").infer}
    if device == "cuda":
        runners.update(cuda_runners(onnx, IN_PROCESS_SIZES))
    return [dataclasses.asdict(row) for row in measure_runners(runners, images[:512], IN_PROCESS_SIZES, seconds)]


def start_server(device: str, port: int, metrics_port: int, workers: int | None,
                 options: tuple[str, ...] = ()) -> subprocess.Popen:
    """A server on ``device`` with ``workers`` (None: its default, --workers auto), the device's
    batch size and buckets, and ``options`` besides."""
    command = [sys.executable, "-c", SERVER, "--host", "127.0.0.1", "--port", str(port), "--http-port", "0",
               "--metrics-port", str(metrics_port), "--backend", "onnxruntime", "--device", device,
               "--drain-seconds", "0", *(["--workers", str(workers)] if workers else []), *options]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        print(line, end="", file=sys.stderr)
        if " ready: " in line:
            threading.Thread(target=process.stderr.read, daemon=True).start()
            return process
    raise RuntimeError(f"the server on {device} ({workers or 'auto'} workers) did not start (exit {process.wait()})")


def first_requests(target: str, images: np.ndarray, count: int) -> dict:
    """Latencies of the first ``count`` requests of each size, sent one after another."""
    import grpc

    from resserve.serve.stubs import grpc_service_pb2 as pb
    from resserve.serve.stubs import grpc_service_pb2_grpc as pb_grpc

    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(target))
    stub.ServerLive(pb.ServerLiveRequest(), timeout=30)  # connected first: a handshake is no compile
    result = {}
    for size in FIRST_REQUEST_SIZES:
        request = pb.ModelInferRequest(model_name="resnet-mnist")
        request.inputs.add(name="input", datatype="FP32", shape=[size, 1, 28, 28])
        request.raw_input_contents.append(images[:size].tobytes())
        latencies = []
        for _ in range(count):
            started = time.perf_counter()
            stub.ModelInfer(request, timeout=60)
            latencies.append(time.perf_counter() - started)
        median = statistics.median(latencies)
        slowest = sorted(range(count), key=latencies.__getitem__, reverse=True)[:3]  # 0 first: the shape's cost
        result[size] = {"median_ms": median * 1e3, "max_ms": max(latencies) * 1e3, "max_over_median": max(latencies) / median,
                        "slowest": [{"request": i, "ms": latencies[i] * 1e3} for i in slowest]}
    return result


def served(device: str, images: np.ndarray, duration: float, workers: int | None = None,
           sweep: tuple[tuple[int, tuple[int, ...]], ...] = ((1, (1, 16, 64)), (64, (16,))),
           first: int = 200, apis: tuple[str, ...] = ("kserve",), clients: tuple[str, ...] = ("resserve",),
           options: tuple[str, ...] = ()) -> dict:
    """A server on ``device`` with ``workers`` (None: the default) and ``options`` under load:
    (images per request, concurrencies) for each of ``sweep``, after timing the ``first`` requests
    of each size (0: none), over each of ``apis`` from each of ``clients`` (the rows of
    kserve-stream under ``batch{N}_stream``, of perf_analyzer under ``batch{N}..._perf_analyzer``)."""
    port, metrics_port = 18901, 18902
    process = start_server(device, port, metrics_port, workers, options)
    target, metrics = f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        report: dict = {"device": device, "workers": workers or "auto", "options": list(options)}
        if first:
            report["first_requests"] = first_requests(target, images, first)
        for (batch, levels), api, client in itertools.product(sweep, apis, clients):
            spec = LoadSpec(target, "", "resnet-mnist", api, batch, duration, 2.0, client)
            key = f"batch{batch}" + SUFFIXES[api] + SUFFIXES[client]
            try:
                report[key] = [dataclasses.asdict(measure_level(spec, Level(c), metrics, process.pid, LOAD_PROCESSES))
                               for c in levels]
            except ResserveError as exc:  # perf_analyzer stops at a failed request: the rest still runs
                report[f"{key}_failed"] = str(exc)
                print(f"gpu check: {key}: {exc}", file=sys.stderr)
        return report
    finally:
        process.terminate()
        process.wait(60)


def perf_analyzer_runs() -> bool:
    """Whether Triton's perf_analyzer is on PATH and starts (tests/gpu/stage.sh carries it)."""
    try:
        return subprocess.run(["perf_analyzer", "--version"], capture_output=True, timeout=30).returncode == 0
    except OSError:
        return False


def worker_sweep(device: str, images: np.ndarray, duration: float, counts: dict[str, tuple[int, ...]]) -> list[dict]:
    """Issue 15's figures: 1-image requests at C=64 against servers with each worker count, on
    ``device`` and on the CPU (whose in-process limit is the ``cpu_in_process`` part), a call per
    request and on streams (Triton's ModelStreamInfer, one per client); on ``device`` also from
    perf_analyzer where it runs, so that thousands of requests a second are not bounded by a
    Python load generator; on the CPU also at C=1 and with 64-image requests (CPU_WORKER_SWEEP)."""
    extra = ("perf_analyzer",) if perf_analyzer_runs() else ()
    if not extra:
        print("gpu check: no perf_analyzer here: the workers sweep loads from Python only", file=sys.stderr)
    return [_served_or_failed(name, images, duration, workers,
                              sweep=CPU_WORKER_SWEEP if name == "cpu" else ((1, (64,)),),
                              apis=("kserve", "kserve-stream"),
                              clients=("resserve", *extra) if name == device else ("resserve",))
            for name in dict.fromkeys((device, "cpu")) for workers in counts[name]]


def _served_or_failed(device: str, images: np.ndarray, duration: float, workers: int,
                      options: tuple[str, ...] = (), **load) -> dict:
    """``served``'s report without timing first requests, or what failed: one server that does not
    start (or refuses an option) leaves the others' figures."""
    try:
        return served(device, images, duration, workers, first=0, options=options, **load)
    except Exception as exc:  # noqa: BLE001 - whatever stopped it is the run's figure
        print(f"gpu check: {device}, {' '.join((_workers(workers), *options))}: {exc}", file=sys.stderr)
        return {"device": device, "workers": workers, "options": list(options), "failed": str(exc)}


def cpu_cost(device: str, images: np.ndarray, duration: float) -> list[dict]:
    """What a 1-image request costs the server in CPU, and what freeing it buys: each of
    COST_VARIANTS at C=1 and C=64 (server CPU ms per request beside images/s and p50)."""
    runs = [_served_or_failed(device, images, duration, workers, options, sweep=((1, (1, 64)),))
            for workers, options in COST_VARIANTS]
    for run in runs:
        for row in run.get("batch1", []):
            print(f"gpu check: cpu_cost: {_workers(run['workers'])} {' '.join(run['options']) or '(defaults)'}, "
                  f"C={row['concurrency']}: {row['images_per_second']:,.0f} images/s, p50 {row['p50_ms']:.2f} ms, "
                  f"server CPU {row['server_cpu_ms_per_request'] or 0:.2f} ms/request", file=sys.stderr)
    return runs


def _nearest(rows: list[dict], batch: float) -> dict:
    """The row measured at the batch size closest (by ratio) to ``batch``."""
    return min(rows, key=lambda row: abs(np.log(row["batch"] / max(batch, 1.0))))


def _device_rows(results: dict) -> list[dict]:
    """The in-process fp32 rows of the checked device: CUDA's (with and without graphs), or the
    CPU's; what a server runs by default (TF32's row is for the record)."""
    label = "CUDA" if results["device"] == "cuda" else "CPU"
    return [row for row in results["in_process"] if label in row["config"] and "fp32" in row["config"]]


def _target(issue: int, target: str, measured: str, met: bool) -> dict:
    return {"issue": issue, "target": target, "measured": measured, "met": bool(met)}


def _serving_targets(results: dict) -> list[dict]:
    """Issue 14's targets for the served sweep, against the device's in-process rows."""
    served, device = results["served"], _device_rows(results)
    by_c = {row["concurrency"]: row for row in served["batch1"]}
    errors = {c: sum(row["errors"].values()) for c, row in by_c.items()}  # status code -> count
    targets = [_target(14, f"1-image requests, C={c}: p99 <= 25 ms, 0 errors",
                       f"p99 {by_c[c]['p99_ms']:.1f} ms, {errors[c]} errors",
                       by_c[c]["p99_ms"] <= 25 and not errors[c]) for c in (16, 64) if c in by_c]
    worst = max(served["first_requests"].items(), key=lambda item: item[1]["max_over_median"])
    targets.append(_target(14, "first 200 requests of each size: slowest <= 3x the median",
                           f"worst {worst[1]['max_over_median']:.2f}x (batch {worst[0]})", worst[1]["max_over_median"] <= 3))
    big = served["batch64"][0]
    sizes = [{"batch": size, "ips": max(row["images_per_second"][size] for row in device)} for size in IN_PROCESS_SIZES]
    reference = _nearest(sizes, big["mean_batch_size"])
    ratio = big["images_per_second"] / reference["ips"]
    targets.append(_target(14, "64-image requests: served >= 0.8x in process at the batch formed",
                           f"{ratio:.2f}x ({big['images_per_second']:,.0f} against {reference['ips']:,.0f} images/s at "
                           f"batch {reference['batch']}; mean batch {big['mean_batch_size']:.0f})", ratio >= 0.8))
    if 1 in by_c:
        fastest = min(row["batch1_latency_ms"] for row in device)
        # from our client, and from perf_analyzer where it ran: a C++ client adds less of its own
        p50s = {"": by_c[1]["p50_ms"], **{"perf_analyzer": row["p50_ms"] for row in served.get("batch1_perf_analyzer", [])
                                          if row["concurrency"] == 1}}
        figures = ", ".join(f"{label + ' ' if label else ''}+{p50 - fastest:.2f} ms (p50 {p50:.2f})"
                            for label, p50 in p50s.items())
        targets.append(_target(14, "C=1: p50 <= in-process batch-1 latency + 1.0 ms",
                               f"{figures} against {fastest:.2f} ms", min(p50s.values()) - fastest <= 1.0))
    return targets


def _workers(count: int) -> str:
    return f"{count} worker{'s' * (count > 1)}"


def _worker_targets(results: dict) -> list[dict]:
    """Issue 15's targets on this machine: the CPU server against the CPU's in-process limit, and
    the device's peak with 1-image requests; each worker count listed (with its figure on streams,
    where measured), the verdict the best's with a call per request."""
    targets = []
    for name in dict.fromkeys((results["device"], "cpu")):
        runs = [run for run in results["workers"] if run["device"] == name and "failed" not in run]
        if not runs:
            continue
        if name == "cpu" and "cpu_in_process" in results:
            # against the CPU's best in process, not the batch one worker formed: N workers run N
            # sessions at once, and 8 workers' batches of 3 are no 16-thread session's batch of 1
            best = max(row["images_per_second"] for row in results["cpu_in_process"])
            figures = [(run["workers"], _figures(run, lambda row: row["images_per_second"] / best)) for run in runs]
            targets.append(_target(15, "CPU, 1-image requests, C=64: >= 0.7x in process at its best batch",
                                   _listed(figures, "{:.2f}x"), _best_call(figures) >= 0.7))
        elif name != "cpu":
            figures = [(run["workers"], _figures(run, lambda row: row["images_per_second"])) for run in runs]
            targets.append(_target(15, f"{name}, 1-image requests, C=64: >= 8,000 images/s",
                                   _listed(figures, "{:,.0f}"), _best_call(figures) >= 8000))
    return targets


# a worker run's C=64 rows by what loaded them: a call per request from our client first
LOADS = {"batch1": "", "batch1_perf_analyzer": "perf_analyzer", "batch1_stream": "streams",
         "batch1_stream_perf_analyzer": "perf_analyzer streams"}
CALL_PER_REQUEST = ("", "perf_analyzer")


def _figures(run: dict, figure) -> dict[str, float]:
    """A worker run's figure at C=64 under each load measured (see LOADS)."""
    return {label: figure(next(row for row in run[key] if row["concurrency"] == 64))
            for key, label in LOADS.items() if key in run}


def _best_call(figures: list[tuple[int, dict[str, float]]]) -> float:
    """The verdict's figure: the best with a call per request, from either client."""
    return max(value for _, loads in figures for label, value in loads.items() if label in CALL_PER_REQUEST)


def _listed(figures: list[tuple[int, dict[str, float]]], form: str) -> str:
    """"1 worker 0.37x (streams 0.52x), 4 workers 0.80x": each worker count's figures."""
    def one(workers: int, loads: dict[str, float]) -> str:
        others = ", ".join(f"{label} {form.format(value)}" for label, value in loads.items() if label)
        return f"{_workers(workers)} {form.format(loads[''])}" + (f" ({others})" if others else "")

    return ", ".join(one(workers, loads) for workers, loads in figures)


def targets(results: dict) -> list[dict]:
    """Every acceptance target of issues 14 and 15 that the finished parts can judge."""
    found = []
    if "parity" in results:
        parity = results["parity"]
        found.append(_target(14, "outputs within 1e-3 of the CPU's (logits), identical accuracy",
                             f"max |diff| {parity['max_abs_logit_difference']:.1e}, accuracy {parity['accuracy_device']:.4f} "
                             f"against {parity['accuracy_cpu']:.4f}", parity["max_abs_logit_difference"] <= 1e-3
                             and parity["accuracy_device"] == parity["accuracy_cpu"]))
    graphs = [row for row in results.get("in_process", []) if row["config"] == "ONNX Runtime fp32, CUDA graphs"]
    if graphs:
        found.append(_target(14, "in process, CUDA graphs, batch 1 <= 0.6 ms with host copies",
                             f"{graphs[0]['batch1_latency_ms']:.3f} ms", graphs[0]["batch1_latency_ms"] <= 0.6))
    if "served" in results and "in_process" in results:
        found += _serving_targets(results)
    if "workers" in results:
        found += _worker_targets(results)
    return found


def environment() -> dict:
    """What the figures were measured on: the machine, the GPU (nvidia-smi) and the libraries."""
    import onnxruntime

    from resserve.serve.bench.limits import machine_description

    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip() or None
    except OSError:
        gpu = None
    return {"machine": machine_description(), "gpu": gpu, "python": sys.version.split()[0],
            "onnxruntime": onnxruntime.__version__, "providers": onnxruntime.get_available_providers()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, help="where the results go, as JSON (needed to run the check)")
    parser.add_argument("--quick", action="store_true", help="short timings: a dry run")
    parser.add_argument("--parts", default=",".join(DEFAULT_PARTS),
                        help=f"which of {','.join(PARTS)} to run (all but cpu_cost, which takes its own call)")
    parser.add_argument("--judge", type=Path, help="judge a run's JSON again (docs/gpu/), measuring nothing")
    args = parser.parse_args()
    if args.judge:
        report(targets(json.loads(args.judge.read_text(), object_hook=_sizes_as_numbers)))
        return
    if not args.out:
        parser.error("--out is needed to run the check (or --judge, to judge a run's JSON)")
    seconds = 0.5 if args.quick else 3.0
    package = load_package()
    onnx = package.read_verified(package.find("onnx"))
    images, labels = mnist_test()
    results: dict = {"device": args.device, "environment": environment()}
    for name, run in (("parity", lambda: parity(args.device, images, labels, onnx)),
                      ("in_process", lambda: in_process(args.device, onnx, images, seconds)),
                      ("cpu_in_process", lambda: [dataclasses.asdict(row) for row in in_process_limit(package, [1, 8, 16, 64])]),
                      ("served", lambda: served(args.device, images, seconds * 2, first=20 if args.quick else 200,
                                                clients=("resserve", *(("perf_analyzer",) if perf_analyzer_runs() else ())))),
                      ("workers", lambda: worker_sweep(args.device, images, seconds * 2,
                                                       QUICK_WORKERS if args.quick else WORKERS)),
                      ("cpu_cost", lambda: cpu_cost(args.device, images, seconds * 2))):
        if name not in args.parts.split(","):
            continue
        print(f"gpu check: {name} ...", file=sys.stderr)
        try:
            results[name] = run()
        except Exception as exc:  # the parts after it still run: one device session may be all there is
            results[f"{name}_failed"] = f"{type(exc).__name__}: {exc}"
            print(f"gpu check: {name} failed: {exc}", file=sys.stderr)
        results["targets"] = targets(results)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    report(results["targets"])


def report(found: list[dict]) -> None:
    """Each target judged, one line each: met or MISSED, the target, the figures."""
    for target in found:
        print(f"issue {target['issue']}: {'met   ' if target['met'] else 'MISSED'} {target['target']}: "
              f"{target['measured']}", file=sys.stderr)


def _sizes_as_numbers(mapping: dict) -> dict:
    """JSON's keys are strings: the batch sizes keyed in the results are numbers again."""
    return {int(key) if key.isdigit() else key: value for key, value in mapping.items()}


if __name__ == "__main__":
    main()

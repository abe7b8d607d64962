"""The GPU check's verdicts: each acceptance target judged from the figures the check writes.

The check itself needs a GPU machine (and minutes); its judging is plain arithmetic on its JSON,
tested here on figures chosen on both sides of each line.
"""

from gpu.check import targets


def level(concurrency: int, images_per_second: float, p50: float, p99: float, batch: float, errors: int = 0) -> dict:
    return {"concurrency": concurrency, "images_per_second": images_per_second, "p50_ms": p50, "p99_ms": p99,
            "mean_batch_size": batch, "errors": {"UNAVAILABLE": errors} if errors else {}}


def results() -> dict:
    in_process = [{"config": "ONNX Runtime fp32, CPU", "batch1_latency_ms": 1.0,
                   "images_per_second": {64: 4000, 256: 4200, 1024: 4300}},
                  {"config": "ONNX Runtime fp32, CUDA", "batch1_latency_ms": 1.03,
                   "images_per_second": {64: 32000, 256: 52000, 1024: 65000}},
                  {"config": "ONNX Runtime fp32, CUDA graphs", "batch1_latency_ms": 0.56,
                   "images_per_second": {64: 43000, 256: 59000, 1024: 60000}},
                  # for the record only: a server runs fp32 unless told (--cuda-tf32)
                  {"config": "ONNX Runtime tf32, CUDA graphs", "batch1_latency_ms": 0.40,
                   "images_per_second": {64: 45000, 256: 90000, 1024: 95000}}]
    return {
        "device": "cuda",
        "parity": {"device": "cuda", "max_abs_logit_difference": 2e-4, "accuracy_cpu": 0.9956, "accuracy_device": 0.9956},
        "in_process": in_process,
        "cpu_in_process": [{"batch": 1, "images_per_second": 1000}, {"batch": 16, "images_per_second": 3400},
                           {"batch": 64, "images_per_second": 3500}],
        "served": {
            "first_requests": {"1": {"max_over_median": 1.4}, "64": {"max_over_median": 3.5}},
            "batch1": [level(1, 600, 1.5, 2.0, 1), level(16, 9000, 1.8, 12.0, 16), level(64, 9500, 7.0, 30.0, 60, errors=2)],
            "batch64": [level(16, 50000, 20.0, 30.0, 256)],
        },
        "workers": [{"device": "cuda", "workers": 1, "batch1": [level(64, 2500, 25, 40, 60)]},
                    {"device": "cuda", "workers": 4, "batch1": [level(64, 7900, 8, 15, 60)],
                     "batch1_perf_analyzer": [level(64, 8100, 8, 15, 60)],  # the Python load held it back
                     "batch1_stream_perf_analyzer": [level(64, 9000, 7, 12, 60)]},
                    {"device": "cpu", "workers": 1, "batch1": [level(64, 1300, 50, 80, 60)]},
                    {"device": "cpu", "workers": 4, "batch1": [level(1, 900, 1.1, 1.5, 1), level(64, 2800, 22, 40, 60)],
                     "batch1_stream": [level(64, 3200, 19, 30, 60)]}],
    }


def test_each_target_is_judged_on_its_own_figures():
    verdicts = {t["target"]: t for t in targets(results())}
    met = {name for name, t in verdicts.items() if t["met"]}
    assert met == {
        "outputs within 1e-3 of the CPU's (logits), identical accuracy",
        "in process, CUDA graphs, batch 1 <= 0.6 ms with host copies",
        "1-image requests, C=16: p99 <= 25 ms, 0 errors",
        "64-image requests: served >= 0.8x in process at the batch formed",  # 50,000 against 59,000 at 256
        "C=1: p50 <= in-process batch-1 latency + 1.0 ms",  # 1.5 against the graphs' 0.56 ms
        "CPU, 1-image requests, C=64: >= 0.7x in process at its best batch",  # 4 workers: 2,800 / 3,500
        "cuda, 1-image requests, C=64: >= 8,000 images/s",
    }
    assert verdicts["1-image requests, C=64: p99 <= 25 ms, 0 errors"]["measured"] == "p99 30.0 ms, 2 errors"
    assert verdicts["first 200 requests of each size: slowest <= 3x the median"]["measured"] == "worst 3.50x (batch 64)"
    assert verdicts["C=1: p50 <= in-process batch-1 latency + 1.0 ms"]["measured"] == "+0.94 ms (p50 1.50) against 0.56 ms"
    assert verdicts["CPU, 1-image requests, C=64: >= 0.7x in process at its best batch"]["measured"] == \
        "1 worker 0.37x, 4 workers 0.80x (streams 0.91x)"
    assert verdicts["cuda, 1-image requests, C=64: >= 8,000 images/s"]["measured"] == \
        "1 worker 2,500, 4 workers 7,900 (perf_analyzer 8,100, perf_analyzer streams 9,000)"


def test_the_latency_at_one_client_is_judged_on_the_better_client():
    figures = results()
    figures["served"]["batch1"][0]["p50_ms"] = 1.9  # our Python client: +1.34 ms
    figures["served"]["batch1_perf_analyzer"] = [level(1, 700, 1.5, 2.0, 1), level(16, 9000, 1.8, 12.0, 16)]
    verdict = {t["target"]: t for t in targets(figures)}["C=1: p50 <= in-process batch-1 latency + 1.0 ms"]
    assert verdict["met"]
    assert verdict["measured"] == "+1.34 ms (p50 1.90), perf_analyzer +0.94 ms (p50 1.50) against 0.56 ms"


def test_several_cpu_workers_are_judged_against_the_cpus_best_batch():
    figures = results()  # eight workers each forming batches of 2: one session's batch 1 is no measure of that
    figures["workers"].append({"device": "cpu", "workers": 8, "batch1": [level(64, 2400, 25, 40, 2)]})
    name = "CPU, 1-image requests, C=64: >= 0.7x in process at its best batch"
    verdict = {t["target"]: t for t in targets(figures)}[name]
    assert verdict["measured"] == "1 worker 0.37x, 4 workers 0.80x (streams 0.91x), 8 workers 0.69x"  # 2,400 / 3,500
    (four,) = [run for run in figures["workers"] if run["device"] == "cpu" and run["workers"] == 4]
    four["batch1"][-1]["images_per_second"] = 2400  # its C=64 row; the C=1 row judges nothing here
    assert not {t["target"]: t for t in targets(figures)}[name]["met"]


def test_a_run_cut_short_is_judged_on_what_finished():
    partial = {key: value for key, value in results().items() if key in ("device", "parity", "in_process")}
    partial["parity"]["accuracy_device"] = 0.9955  # one image answered differently
    verdicts = targets(partial)
    assert [t["met"] for t in verdicts] == [False, True]
    assert [t["issue"] for t in verdicts] == [14, 14]


def test_the_workers_verdict_is_on_a_call_per_request_from_either_client():
    figures = results()
    (four,) = [run for run in figures["workers"] if run["device"] == "cuda" and run["workers"] == 4]
    four["batch1_perf_analyzer"] = [level(64, 7950, 8, 15, 60)]  # streams alone reach 9,000
    verdict = {t["target"]: t for t in targets(figures)}["cuda, 1-image requests, C=64: >= 8,000 images/s"]
    assert not verdict["met"]


def test_a_server_that_did_not_start_leaves_the_other_runs_judged():
    figures = results()
    figures["workers"].insert(0, {"device": "cuda", "workers": 8, "failed": "the server on cuda with 8 workers did not start"})
    del figures["cpu_in_process"]  # that part failed: the CPU's ratio has nothing to stand on
    figures["in_process_failed"] = "RuntimeError: no CUDA"
    del figures["in_process"]
    verdicts = {t["target"]: t for t in targets(figures)}
    assert list(verdicts) == ["outputs within 1e-3 of the CPU's (logits), identical accuracy",
                              "cuda, 1-image requests, C=64: >= 8,000 images/s"]
    assert verdicts["cuda, 1-image requests, C=64: >= 8,000 images/s"]["measured"].startswith("1 worker 2,500, 4 workers")

"""``resserve serve --workers N`` as real processes: N workers on one port, one answers for all of
them in metrics and in the final count, a killed worker comes back, SIGTERM drains them all, and
nothing is left behind."""

import collections
import json
import multiprocessing
import os
import re
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection

import grpc
import numpy as np
import pytest
import tritonclient.http as triton_http
import tritonclient.utils.shared_memory as shared_memory
from tritonclient.utils import InferenceServerException

from helpers import (ServerProcess, free_port, metric_value, own_cpu_seconds, run_cli, running, stat_fields,
                     tree_resident_bytes, write_hanging_package)
from resserve.serve.errors import ResserveError
from resserve.serve.package import SHIPPED_PACKAGE
from resserve.serve.settings import ServerSettings, auto_workers, worker_peak_memory
from resserve.serve.stubs import grpc_service_pb2 as kserve_pb2
from resserve.serve.stubs import grpc_service_pb2_grpc as kserve_grpc
from resserve.serve.sharedmemory import Region
from resserve.serve.workers.messages import (Followed, MadeEverywhere, ModelChange, RegionRegistered,
                                             RegionUnregistered, Stopped, ToWorker, Turn, TurnOver, TurnWanted)
from resserve.serve.workers.supervisor import Supervisor, Worker, WorkerState

MODEL = "resnet-mnist"
INFER_BODY = (b'{"inputs":[{"name":"input","shape":[1,1,28,28],"datatype":"FP32","data":[' +
              b",".join([b"0"] * 784) + b"]}]}")


SHARED_INFER_BODY = json.dumps({"inputs": [{  # the input in shared memory
    "name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
    "parameters": {"shared_memory_region": "digit", "shared_memory_byte_size": 3136}}]}).encode()


def http_status(server, body: bytes = INFER_BODY) -> int:
    """One inference over a connection of its own: the kernel picks the worker."""
    connection = HTTPConnection(server.http_target, timeout=30)
    try:
        connection.request("POST", f"/v2/models/{MODEL}/infer", body=body)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def statuses(server, count: int = 16, body: bytes = INFER_BODY) -> set[int]:
    """Over a connection each: the kernel spreads them over the workers."""
    return {http_status(server, body) for _ in range(count)}


def kill_and_await_restart(server, index: int) -> None:
    """SIGKILL worker ``index`` and wait until the one started in its place is ready."""
    killed = worker_pids(server)[index]
    os.kill(killed, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while worker_pids(server)[index] == killed or metric_value(server.metrics(), "resserve_workers_ready") < 2:
        assert time.monotonic() < deadline, "".join(server.lines)
        time.sleep(0.2)


def worker_pids(server) -> dict[int, int]:
    """Worker index -> pid of its latest start, from the supervisor's log."""
    return {int(i): int(pid) for i, pid in re.findall(r"worker (\d+) started \(pid (\d+)\)", "".join(server.lines))}


def final_counts(server) -> tuple[dict[str, int], str]:
    """The supervisor's last line: the answers of all workers, and the per-worker part."""
    line = next(line for line in reversed(server.lines) if "stopped; requests answered: " in line)
    total, _, each = line.split("requests answered: ")[1].partition(" (")
    return {code: int(n) for code, n in re.findall(r"(\w+) (\d+)", total)}, each


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return stat_fields(pid)[0] != "Z"
    except FileNotFoundError:
        return False


def test_auto_workers_is_one_per_four_cpus_and_at_least_one():
    assert [auto_workers(n) for n in (1, 2, 3, 4, 8, 16, 1000)] == [1, 1, 1, 1, 2, 4, 64]


def test_auto_workers_on_cuda_is_at_most_four_sharing_the_gpu():
    assert [auto_workers(n, "cuda") for n in (2, 8, 16, 64, 1000)] == [1, 2, 4, 4, 4]


def test_auto_workers_are_no_more_than_a_memory_limit_holds():
    assert [auto_workers(16, fitting=n) for n in (8, 4, 2, 0)] == [4, 4, 2, 1]
    assert auto_workers(64, "cuda", fitting=100) == 4
    # a worker at its worst, as docs/serving.md "Limits" measured it with the default 256 MiB budgets:
    # 1,022 MB with gRPC's full, 1,409 MB with HTTP's full too (rounded up, within a fifth)
    assert 1.022e9 <= worker_peak_memory(256 * 2**20, http=False) <= 1.2 * 1.022e9
    assert 1.409e9 <= worker_peak_memory(256 * 2**20, http=True) <= 1.2 * 1.409e9


def test_where_workers_cannot_share_ports_auto_is_one_and_more_are_refused(monkeypatch):
    # macOS and the BSDs: SO_REUSEPORT exists there, but one socket of a port takes its every connection
    for module in ("settings", "workers.supervisor"):
        monkeypatch.setattr(f"resserve.serve.{module}.WORKERS_SHARE_PORTS", False)
    assert [auto_workers(n) for n in (2, 16, 1000)] + [auto_workers(64, "cuda")] == [1, 1, 1, 1]
    with pytest.raises(ResserveError) as refused:
        Supervisor(ServerSettings(workers=2, port=0, http_port=0, metrics_port=0)).run()
    assert str(refused.value) == ("--workers above 1 needs Linux, whose SO_REUSEPORT spreads a port's connections "
                                  "over the workers (here one would take them all): serve with --workers 1")


def test_two_workers_share_one_port_and_metrics_add_up(tmp_path):
    with ServerProcess("--workers", "2", env={"TMPDIR": str(tmp_path)}) as server:
        assert "ready: resnet-mnist v1 (2 workers)" in "".join(server.lines)
        assert [d.name[:17] for d in tmp_path.iterdir()] == ["resserve-metrics-"]  # the workers' metrics files
        statuses = collections.Counter(http_status(server) for _ in range(60))
        metrics = server.metrics()
        assert metric_value(metrics, "resserve_workers_ready") == 2
        assert metric_value(metrics, "resserve_requests_total", protocol="http", code="200") == 60
        assert metric_value(metrics, "resserve_batch_size_count") == 60  # each worker's batches, summed
        assert metric_value(metrics, "nv_inference_request_success", model=MODEL) == 60  # Triton's names too
        assert "_created" not in metrics  # the supervisor's own counters as one worker's: the same series
        # a worker starting creates its file, then sizes it: a scrape in between answered 500
        (next(tmp_path.iterdir()) / "counter_4194304.db").touch()
        assert metric_value(server.metrics(), "resserve_requests_total", protocol="http", code="200") == 60
        # the server's memory is the supervisor's and its workers' (prometheus-client's own sees one process)
        assert metric_value(metrics, "process_resident_memory_bytes") == pytest.approx(
            tree_resident_bytes(server.process.pid), rel=0.2)
        # and its open files are those of the process nearest its limit, which each process has
        held = [len(os.listdir(f"/proc/{pid}/fd")) for pid in (server.process.pid, *worker_pids(server).values())]
        assert abs(metric_value(metrics, "process_open_fds") - max(held)) <= 5, held
        stub = kserve_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.target))
        assert stub.ServerReady(kserve_pb2.ServerReadyRequest(), timeout=10).ready
        assert server.stop() == 0
    assert statuses == {200: 60}
    total, each = final_counts(server)
    assert total == {"200": 60}
    per_worker = [int(n) for n in re.findall(r"worker \d+: 200 (\d+)", each)]
    assert len(per_worker) == 2 and all(n > 0 for n in per_worker) and sum(per_worker) == 60  # both answered
    assert list(tmp_path.iterdir()) == []  # removed at exit


def test_a_killed_worker_comes_back_while_the_other_keeps_answering():
    with ServerProcess("--workers", "2") as server:
        first = worker_pids(server)
        statuses = collections.Counter()

        def client(stop: threading.Event) -> None:
            while not stop.is_set():
                try:
                    statuses[http_status(server)] += 1
                except OSError:  # a connection the dead worker had accepted
                    statuses["reset"] += 1

        with running(client):
            time.sleep(0.5)
            killed_cpu = own_cpu_seconds(first[1])
            kill_and_await_restart(server, 1)
            time.sleep(0.5)
        log = "".join(server.lines)
        assert f"worker 1 (pid {first[1]}) exited with code -9; restarting it in 1.0 s" in log
        assert metric_value(server.metrics(), "resserve_worker_restarts_total") == 1
        assert alive(first[2]) and worker_pids(server)[2] == first[2]  # the other was never touched
        assert statuses[200] > 20 and statuses["reset"] <= 2, statuses
        assert set(statuses) <= {200, "reset"}, statuses
        # Triton's counters keep what the killed worker counted, as counters must (rate() reads a drop as a
        # reset); a connection reset may be an answer counted that the kill kept from leaving the worker
        succeeded = metric_value(server.metrics(), "nv_inference_request_success")
        assert statuses[200] <= succeeded <= statuses[200] + statuses["reset"], statuses
        # and so does the server's CPU time: the live processes' and the killed worker's
        live_cpu = sum(map(own_cpu_seconds, [server.process.pid, *worker_pids(server).values()]))
        assert metric_value(server.metrics(), "process_cpu_seconds_total") >= live_cpu + killed_cpu


def test_a_worker_whose_backend_hung_is_started_again_and_the_other_keeps_answering(tmp_path):
    package = write_hanging_package(tmp_path / "hangs")
    with ServerProcess(str(package), "--workers", "2", "--backend", "onnxruntime", "--batch-timeout", "2") as server:
        first = worker_pids(server)
        stub = kserve_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.target))

        def infer(pixel: float) -> grpc.StatusCode:
            request = kserve_pb2.ModelInferRequest(model_name="hangs")
            request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 28, 28])
            request.raw_input_contents.append(np.full((1, 1, 28, 28), pixel, np.float32).tobytes())
            try:
                stub.ModelInfer(request, timeout=60)
                return grpc.StatusCode.OK
            except grpc.RpcError as exc:
                return exc.code()

        assert infer(1.0) == grpc.StatusCode.UNAVAILABLE  # its worker hung, then exited
        hung = server.wait_for_line("the backend hung; exiting with status 3")
        index = int(re.search(r"\[worker (\d)\]", hung).group(1))
        deadline = time.monotonic() + 30
        while worker_pids(server)[index] == first[index] or metric_value(server.metrics(), "resserve_workers_ready") < 2:
            assert time.monotonic() < deadline, "".join(server.lines)
            time.sleep(0.2)
        assert f"worker {index} (pid {first[index]}) exited with code 3; restarting it in 1.0 s" in "".join(server.lines)
        assert metric_value(server.metrics(), "resserve_worker_restarts_total") == 1
        assert worker_pids(server)[3 - index] == first[3 - index]  # the other was never touched
        assert {infer(0.0) for _ in range(8)} == {grpc.StatusCode.OK}


@pytest.mark.slow
def test_sigterm_under_load_drains_every_worker_and_answers_only_ok_or_unavailable():
    request = kserve_pb2.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 28, 28])
    request.raw_input_contents.append(np.zeros((1, 1, 28, 28), np.float32).tobytes())
    with ServerProcess("--workers", "2", "--grace-seconds", "5", drain_seconds=1.0) as server:
        pids = list(worker_pids(server).values())
        codes = collections.Counter()

        def client(stop: threading.Event) -> None:  # a connection of its own per client, so both workers get some
            channel = grpc.insecure_channel(server.target, options=[("grpc.use_local_subchannel_pool", 1)])
            stub = kserve_grpc.GRPCInferenceServiceStub(channel)
            while not stop.is_set():
                try:
                    stub.ModelInfer(request, timeout=10)
                    codes["OK"] += 1
                except grpc.RpcError as exc:
                    codes[exc.code().name] += 1
                    time.sleep(0.01)

        with running(*[client] * 8):
            time.sleep(1.0)
            server.process.send_signal(signal.SIGTERM)
            assert server.process.wait(timeout=60) == 0
            time.sleep(0.2)
    assert set(codes) <= {"OK", "UNAVAILABLE"} and codes["OK"] > 0, codes  # never CANCELLED
    total, _ = final_counts(server)
    assert set(total) <= {"OK", "UNAVAILABLE"} and total["OK"] == codes["OK"]  # every OK sent arrived
    assert not any(alive(pid) for pid in pids)


@pytest.mark.parametrize("loading", [False, True])
def test_workers_die_with_a_killed_supervisor(tmp_path, loading):
    """Serving, or still loading: workers whose warm-up hung outlived a killed supervisor, spinning."""
    package = ([str(write_hanging_package(tmp_path / "hangs", on_warm_up=True)), "--backend", "onnxruntime"]
               if loading else [])
    with ServerProcess(*package, "--workers", "2", env={"TMPDIR": str(tmp_path)},  # a kill leaves its metrics dir
                       wait_ready=not loading) as server:
        if loading:
            server.wait_for_line("model hangs runs on onnxruntime", seconds=60, count=2)  # both workers are loading it
            time.sleep(1)  # and its warm-up spins
        pids = list(worker_pids(server).values())
        server.process.kill()
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in pids):
            assert time.monotonic() < deadline, "workers outlived their supervisor"
            time.sleep(0.2)


def test_a_port_in_use_is_one_line_before_any_worker_starts(tmp_path):
    with ServerProcess() as first:
        result = run_cli("serve", "--host", "127.0.0.1", "--port", str(first.port), "--http-port", str(free_port()),
                         "--metrics-port", "0", "--workers", "2", env={"TMPDIR": str(tmp_path)}, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: cannot listen on 127.0.0.1:{first.port}: Address already in use (choose another --port)"]
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_a_worker_that_cannot_start_stops_the_server_with_its_reason():
    result = run_cli("serve", "--port", "0", "--http-port", "0", "--metrics-port", "0", "--workers", "2",
                     "--device", "cuda", timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: --device cuda: this ONNX Runtime is the CPU build")
    assert "Traceback" not in result.stderr


def test_workers_must_be_auto_or_a_count():
    result = run_cli("serve", "--workers", "many", timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: --workers must be auto or a number of processes, got 'many'"


def test_json_logs_are_one_object_a_line_and_name_the_worker():
    with ServerProcess("--workers", "2", "--log-format", "json", wait_ready=False) as server:
        deadline = time.monotonic() + 60
        while not any('"message": "ready: ' in line for line in server.lines):
            assert time.monotonic() < deadline and server.process.poll() is None, "".join(server.lines)
            time.sleep(0.1)
        assert http_status(server) == 200
        assert server.stop() == 0
        while not server.lines[-1].startswith('{"level": "INFO", "name": "resserve.serve", "message": "stopped'):
            assert time.monotonic() < deadline, "".join(server.lines)
            time.sleep(0.1)
    records = [json.loads(line) for line in server.lines]  # every line, the supervisor's and the workers'
    assert all({"level", "name", "message", "timestamp"} <= set(record) for record in records)
    assert {record.get("worker") for record in records} == {None, 1, 2}
    page = f"http://127.0.0.1:{server.http_port}/"  # a person at the server is told where the page is
    assert {"message": f"ready: resnet-mnist v1 (2 workers); draw a digit at {page}", "level": "INFO"}.items() <= next(
        record for record in records if record["message"].startswith("ready: ")).items()
    assert records[-1]["message"].startswith("stopped; requests answered: 200 1 ")


def test_log_and_trace_settings_changed_through_one_worker_reach_every_worker_and_a_restarted_one():
    def access_logged_by(lines: list[str]) -> set[int]:
        """The workers that logged a request answered, and traced one, as JSON."""
        records = [json.loads(line) for line in lines if line.startswith("{")]
        answered = {r["worker"] for r in records if r["level"] == "DEBUG" and r["message"].startswith("http kserve ")}
        traced = {r["worker"] for r in records  # a trace's record is a field of its JSON line too
                  if r["name"] == "resserve.trace" and r["trace"]["timestamps"][-2]["name"] == "COMPUTE_END"}
        return answered & traced

    def until_logged_by(workers: set[int], since: int) -> None:
        deadline = time.monotonic() + 30
        while access_logged_by(server.lines[since:]) != workers:
            assert http_status(server) == 200 and time.monotonic() < deadline, "".join(server.lines)

    with ServerProcess("--workers", "2") as server:
        changed = triton_http.InferenceServerClient(server.http_target).update_log_settings(
            {"log_verbose_level": 1, "log_format": "json"})  # through one connection: one worker
        assert changed["log_verbose_level"] == 1 and changed["log_format"] == "json"
        traced = triton_http.InferenceServerClient(server.http_target).update_trace_settings(
            settings={"trace_level": ["TIMESTAMPS"], "trace_rate": "1"})  # perhaps through the other
        assert traced["trace_level"] == ["TIMESTAMPS"] and traced["trace_rate"] == "1"
        until_logged_by({1, 2}, since=0)
        restart = len(server.lines)
        kill_and_await_restart(server, 2)
        until_logged_by({1, 2}, since=restart)
        assert server.stop() == 0
    assert all(line.startswith("{") for line in server.lines[restart:])  # the new worker's start too


def test_a_model_unloaded_through_one_worker_is_unloaded_in_every_worker_and_a_restarted_one(tmp_path):
    package = tmp_path / MODEL
    shutil.copytree(SHIPPED_PACKAGE, package)
    with ServerProcess(str(package), "--workers", "2") as server:
        triton_http.InferenceServerClient(server.http_target).unload_model(MODEL)  # one connection: one worker
        assert statuses(server) == {404}  # answered once the other worker had unloaded it too
        kill_and_await_restart(server, 1)
        assert statuses(server) == {404}  # the restarted worker started without it
        triton_http.InferenceServerClient(server.http_target).load_model(MODEL)
        assert statuses(server) == {200}
        assert server.stop() == 0


def test_with_poll_seconds_the_first_worker_looks_and_every_worker_follows(tmp_path):
    folder = tmp_path / "models"
    shutil.copytree(SHIPPED_PACKAGE, folder / MODEL)
    with ServerProcess(str(folder), "--workers", "2", "--poll-seconds", "0.2") as server:
        staging = folder / ".v2"  # built hidden, then renamed into place, as `resserve export` does
        shutil.copytree(SHIPPED_PACKAGE, staging)
        manifest = staging / "manifest.json"
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "version": "2"}))
        staging.rename(folder / "v2")
        server.wait_for_line(f"serving model {MODEL} at version 1, 2 from now on", count=2)  # in both workers
        versions = set()
        for _ in range(16):  # over a connection each: both workers
            connection = HTTPConnection(server.http_target, timeout=30)
            connection.request("GET", f"/v2/models/{MODEL}")
            versions.add(tuple(json.loads(connection.getresponse().read())["versions"]))
            connection.close()
        assert versions == {("1", "2")}
        assert sum(f"the packages of model {MODEL} changed" in line for line in server.lines) == 1  # one looked
        assert server.stop() == 0


def test_opposite_model_changes_made_at_once_through_both_workers_leave_them_alike(tmp_path):
    """Unloads and loads at the same moment, each over a connection of its own (so through either
    worker): every worker makes them all in one order, so both end serving, or both not. A change
    that fails where it was asked holds no later change up."""
    package = tmp_path / MODEL
    shutil.copytree(SHIPPED_PACKAGE, package)

    def change(action: str) -> None:
        client = triton_http.InferenceServerClient(server.http_target, network_timeout=60)
        getattr(client, f"{action}_model")(MODEL)
        client.close()

    with ServerProcess(str(package), "--workers", "2") as server:
        for _ in range(4):
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(change, ["unload", "load"] * 4))
            answers = statuses(server)  # every change was answered once made in both workers
            assert len(answers) == 1 and answers <= {200, 404}, f"the workers differ: {answers}"
        artifact = package / "model.onnx"
        intact = artifact.read_bytes()
        artifact.write_bytes(intact[:-1] + bytes([intact[-1] ^ 1]))
        with pytest.raises(InferenceServerException, match="sha256"):
            change("load")
        artifact.write_bytes(intact)
        change("unload")
        assert statuses(server) == {404}
        assert server.stop() == 0


@pytest.fixture
def supervisor_of_three():
    """A supervisor's bookkeeping over three real processes (sleeping, not servers) and the worker
    ends of their pipes: what the workers would read."""
    supervisor, context = Supervisor(ServerSettings()), multiprocessing.get_context("spawn")
    ends = {}
    for index in (1, 2, 3):
        process = context.Process(target=time.sleep, args=(60,))
        process.start()
        supervisor_end, ends[index] = context.Pipe()
        supervisor.workers[index] = Worker(index, process, supervisor_end, state=WorkerState.READY)
    yield supervisor, ends
    for worker in supervisor.workers.values():
        worker.process.kill()
        worker.process.join()


def received(end) -> list[ToWorker]:
    messages = []
    while end.poll(0.2):
        messages.append(end.recv())
    return messages


def test_a_change_is_made_in_every_other_worker_before_its_client_is_answered_and_the_next_turn_goes(
        supervisor_of_three):
    """Its client answered while the other workers had not yet made the change, a request through
    another connection could find the model still served there, or a region not yet registered."""
    supervisor, ends = supervisor_of_three
    first, second, third = supervisor.workers.values()
    supervisor._message(first, TurnWanted())
    supervisor._message(second, TurnWanted())
    assert received(ends[1]) == [Turn()] and received(ends[2]) == []  # one at a time
    unload = ModelChange("unload", MODEL)
    supervisor._message(first, TurnOver(unload))
    assert received(ends[2]) == received(ends[3]) == [unload] and received(ends[1]) == []
    assert supervisor.unloaded == {MODEL}  # a worker started from now on starts without it
    supervisor._message(third, Followed(unload))
    supervisor._message(second, Followed(ModelChange("load", MODEL)))  # not the change passed on: not counted
    assert received(ends[1]) == received(ends[2]) == []
    supervisor._message(second, Followed(unload))
    assert received(ends[1]) == [MadeEverywhere()] and received(ends[2]) == [Turn()]  # made everywhere: both go
    supervisor._message(second, TurnOver(None))  # failed where it was asked: nothing passed on
    assert received(ends[1]) == received(ends[3]) == [] and supervisor.unloaded == {MODEL}


def test_a_worker_that_stops_or_dies_before_it_makes_a_change_is_not_waited_for(supervisor_of_three):
    supervisor, ends = supervisor_of_three
    first, second, third = supervisor.workers.values()
    supervisor._message(first, TurnWanted())
    region = Region("in", "/input0", 0, 3136)
    supervisor._message(first, TurnOver(RegionRegistered(region)))
    supervisor._message(second, Stopped({}))  # drained (SIGTERM): it serves no more
    assert received(ends[1]) == [Turn()]
    third.process.kill()
    third.process.join()
    supervisor._died(third)  # restarted, it starts with the region
    assert received(ends[1]) == [MadeEverywhere()]


def test_shared_memory_regions_change_in_turns_as_models_do(supervisor_of_three):
    """A region registered through one worker while every region is unregistered through another:
    made in one order in every worker, so the workers end alike (each made its own at once before)."""
    supervisor, ends = supervisor_of_three
    first, second, _ = supervisor.workers.values()
    region = Region("in", "/input0", 0, 3136)
    supervisor._message(first, TurnWanted())
    supervisor._message(second, TurnWanted())
    assert received(ends[1]) == [Turn()] and received(ends[2]) == []
    supervisor._message(first, TurnOver(RegionRegistered(region)))
    assert received(ends[2]) == received(ends[3]) == [RegionRegistered(region)]
    assert supervisor.regions == {"in": region}  # a worker started from now on starts with it
    for worker in (second, supervisor.workers[3]):
        supervisor._message(worker, Followed(RegionRegistered(region)))
    assert received(ends[1]) == [MadeEverywhere()] and received(ends[2]) == [Turn()]
    supervisor._message(second, TurnOver(RegionUnregistered("")))
    assert received(ends[1]) == received(ends[3]) == [RegionUnregistered("")] and supervisor.regions == {}


def test_a_worker_that_dies_in_its_turn_to_change_models_hands_it_on(supervisor_of_three):
    supervisor, ends = supervisor_of_three
    first, second, _ = supervisor.workers.values()
    supervisor._message(first, TurnWanted())
    supervisor._message(second, TurnWanted())
    assert received(ends[1]) == [Turn()]
    first.process.kill()
    first.process.join()
    supervisor._died(first)
    assert received(ends[2]) == [Turn()] and received(ends[3]) == []


def test_a_shared_memory_region_registered_through_one_worker_is_in_every_worker_and_a_restarted_one():
    handle = shared_memory.create_shared_memory_region("digit", "/resserve-test-workers", 3136)
    try:
        with ServerProcess("--workers", "2", "--allow-client-shm") as server:
            client = triton_http.InferenceServerClient(server.http_target)  # one connection: one worker
            client.register_system_shared_memory("digit", "/resserve-test-workers", 3136)
            assert statuses(server, body=SHARED_INFER_BODY) == {200}  # answered once in both workers
            kill_and_await_restart(server, 2)
            assert statuses(server, body=SHARED_INFER_BODY) == {200}  # the restarted worker started with it
            triton_http.InferenceServerClient(server.http_target).unregister_system_shared_memory()
            assert statuses(server, body=SHARED_INFER_BODY) == {404}
            assert server.stop() == 0
    finally:
        shared_memory.destroy_shared_memory_region(handle)

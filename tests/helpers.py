"""Test helpers: the installed `resserve` command, and a real server process on loopback."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

RESSERVE = Path(sys.executable).parent / "resserve"
PERF_ANALYZER = shutil.which("perf_analyzer")  # Triton's, from tests/install-perf-analyzer.sh
# outside CI a test that needs it skips; in CI (.ci/run installs it) it runs, and fails without it
needs_perf_analyzer = pytest.mark.skipif(PERF_ANALYZER is None and not os.environ.get("CI"),
                                         reason="no perf_analyzer here: bash tests/install-perf-analyzer.sh; .ci/run does")

# A 64x64 HEIC photo of a "1" (a black stroke on white), the format an iPhone camera saves by
# default; written with pillow-heif 1.8.1 (libheif), which resserve does not depend on.
HEIC_PHOTO = base64.b64decode(
    "AAAAHGZ0eXBoZWljAAAAAG1pZjFoZWljbWlhZgAAAVZtZXRhAAAAAAAAACFoZGxyAAAAAAAAAABwaWN0AAAAAAAAAAAAAAAA"
    "AAAAACJpbG9jAAAAAERAAAEAAQAAAAABegABAAAAAAAAAEkAAAAjaWluZgAAAAAAAQAAABVpbmZlAgAAAAABAABodmMxAAAA"
    "AA5waXRtAAAAAAABAAAA1mlwcnAAAAC3aXBjbwAAAHhodmNDAQNwAAAAkAAAAAAAHvAA/P34+AAADwNgAAEAGEABDAH//wNw"
    "AAADAJAAAAMAAAMAHroCQGEAAQArQgEBA3AAAAMAkAAAAwAAAwAeoCCBBZbqSSmubgIaDAgAAAMAyAAAAwAIQGIAAQAHRAHB"
    "crAiQAAAABNjb2xybmNseAABAA0ABoAAAAAUaXNwZQAAAAAAAABAAAAAQAAAABBwaXhpAAAAAAMICAgAAAAXaXBtYQAAAAAA"
    "AAABAAEEgQIDBAAAAFFtZGF0AAAARSgBrxOA2+1HqHgrbKvDWO+i5q6lsQYunUB6Bf1uqlKqwck4Bfuw83ZCxrOFPJREdfYd"
    "T4ivBYUjpyltGB4j25r6BwtdgA==")



def _tiff_with_a_rational_strip_offset() -> bytes:
    """A 2x2 TIFF whose StripOffsets tag is a RATIONAL (1/1), so Pillow raises TypeError when it
    seeks there, and whose ImageWidth holds two values, so Pillow warns first (a file of the kind
    that fuzzing Pillow's readers through the server's preprocessing turned up)."""
    rational_at = 8 + 2 + 3 * 12 + 4  # after the header, the entry count, three entries and the next-IFD offset
    entries = [(0x0100, 3, 2, 2 | 2 << 16),  # ImageWidth: two SHORTs, 2 and 2
               (0x0101, 4, 1, 2),  # ImageLength: one LONG
               (0x0111, 5, 1, rational_at)]  # StripOffsets: one RATIONAL
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *entry) for entry in entries)
    return b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + struct.pack("<II", 1, 1)


MALFORMED_TIFF = _tiff_with_a_rational_strip_offset()


def write_hanging_package(out: Path, name: str = "hangs", on_warm_up: bool = False) -> Path:
    """A model package whose ONNX graph spins in a Loop of (largest pixel x 1e9) trips: a batch of
    zeros (the warm-up's) is instant, one with a white pixel computes for about 15 minutes, as a
    hung backend would (ONNX Runtime releases the GIL meanwhile, as when a GPU stops answering).
    ``on_warm_up``: (largest pixel + 1) x 1e9 trips, so loading never ends. The outputs have the
    contract's shapes; the manifest is the shipped one's, for this file."""
    import hashlib
    import json

    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from resserve.serve.package import SHIPPED_PACKAGE

    scalar = [("i", TensorProto.INT64), ("cond", TensorProto.BOOL), ("spun", TensorProto.FLOAT)]
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond"], ["cond_out"]), helper.make_node("Add", ["spun", "one"], ["spun_out"])],
        "spin", [helper.make_tensor_value_info(n, t, []) for n, t in scalar],
        [helper.make_tensor_value_info(n, t, []) for n, t in (("cond_out", TensorProto.BOOL),
                                                              ("spun_out", TensorProto.FLOAT))],
        [numpy_helper.from_array(np.array(1.0, np.float32), "one")])
    nodes = [helper.make_node("ReduceMax", ["input"], ["peak"], keepdims=0),
             helper.make_node("Add", ["peak", "base"], ["raised"]),
             helper.make_node("Mul", ["raised", "billion"], ["scaled"]),
             helper.make_node("Cast", ["scaled"], ["trips"], to=TensorProto.INT64),
             helper.make_node("Loop", ["trips", "", "zero"], ["spun"], body=body),
             helper.make_node("Flatten", ["input"], ["flat"]),
             helper.make_node("MatMul", ["flat", "weights"], ["scores"]),
             helper.make_node("Mul", ["spun", "zero"], ["nothing"]),  # the loop's result is used: not pruned
             helper.make_node("Add", ["scores", "nothing"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)]
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 10]) for n in ("logits", "probabilities")],
        [numpy_helper.from_array(np.array(1e9, np.float32), "billion"),
         numpy_helper.from_array(np.array(float(on_warm_up), np.float32), "base"),
         numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
         numpy_helper.from_array(np.full((784, 10), 0.01, np.float32), "weights")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    out.mkdir(parents=True)
    onnx.save(model, out / "model.onnx")
    manifest = json.loads((SHIPPED_PACKAGE / "manifest.json").read_text())
    artifact = next(a for a in manifest["artifacts"] if a["file"] == "model.onnx")
    data = (out / "model.onnx").read_bytes()
    artifact.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    manifest.update(name=name, artifacts=[artifact])
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def command_environment(env: dict | None = None) -> dict[str, str]:
    """What a command the tests start sees: this process's environment and ``env``, less the gRPC
    log level conftest.py sets for this process alone (each command chooses its own: serve/app.py)."""
    return {**{name: value for name, value in os.environ.items() if name != "GRPC_VERBOSITY"}, **(env or {})}


def run_cli(*args: str, env: dict | None = None, timeout: float = 600, stdin=None,
            memory_gib: float | None = None, preexec: Callable[[], None] | None = None) -> subprocess.CompletedProcess:
    """Run the installed console script as a user would (``stdin``: an open file piped in); returns
    the finished process. ``memory_gib``: the address space it may take, so that a command that
    should stop reading fails the test, not the machine, where it does not; ``preexec``: what the
    child runs before the command (joining a cgroup: ``limited_cgroup``)."""
    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (int(memory_gib * 2**30),) * 2)

    return subprocess.run([str(RESSERVE), *args], capture_output=True, text=True, timeout=timeout,
                          env=command_environment(env), stdin=stdin,
                          preexec_fn=limit_memory if memory_gib else preexec)


CGROUP_LIMITS = {  # controller -> (v2 file, v1 file, what each is given for the limit asked)
    "cpu": ("cpu.max", "cpu.cfs_quota_us", lambda cpus: (f"{int(cpus * 100_000)} 100000", str(int(cpus * 100_000)))),
    "memory": ("memory.max", "memory.limit_in_bytes", lambda size: (str(size), str(size))),
}


@contextlib.contextmanager
def limited_cgroup(**limits: float) -> Iterator[Callable[[], None]]:
    """A new cgroup below this process's, limited as a container is (``cpu=1.0``: a quota of one
    CPU; ``memory=2**30``: bytes), on whichever cgroup version holds each controller; yields what
    moves a child process into it (a ``preexec``). Skips the test where this process may not
    make one (not root, a read-only /sys/fs/cgroup, a controller not delegated to it)."""
    made: list[Path] = []
    try:
        try:
            for controller, limit in limits.items():
                _limit(controller, limit, made)
        except OSError as exc:
            pytest.skip(f"cannot make a cgroup with these limits here: {exc}")

        def join() -> None:
            for group in made:
                (group / "cgroup.procs").write_text(str(os.getpid()))

        yield join
    finally:
        for group in reversed(made):
            group.rmdir()


def _limit(controller: str, limit: float, made: list[Path]) -> None:
    """Make (once) this test's cgroup in ``controller``'s hierarchy, and set its limit there."""
    from resserve.serve.cgroups import levels

    found = levels(controller)
    if not found:
        pytest.skip(f"no cgroup hierarchy with the {controller} controller here")
    v2_file, v1_file, values = CGROUP_LIMITS[controller]
    parent = found[0]
    group = parent / f"resserve-test-{os.getpid()}"
    if group not in made:
        group.mkdir()
        made.append(group)
    v2 = (parent / "cgroup.subtree_control").exists()
    if v2:
        (parent / "cgroup.subtree_control").write_text(f"+{controller}")
    (group / (v2_file if v2 else v1_file)).write_text(values(limit)[0 if v2 else 1])


def wait_until(condition: Callable[[], bool], seconds: float = 30) -> None:
    """Return once ``condition()`` holds; fail the test when it still does not after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def room_for_sockets(count: int = 4096) -> Iterator[None]:
    """This test process's soft open-file limit raised to ``count`` (within the hard one), then restored."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, count)), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def hold_connections(port: int, count: int, first_bytes: bytes = b"") -> list[socket.socket]:
    """``count`` connections to ``port`` that send ``first_bytes`` and then wait (the server may close them)."""
    held = []
    for _ in range(count):
        connection = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            connection.sendall(first_bytes)
        except OSError:  # closed by the server already
            pass
        held.append(connection)
    return held


class ServerProcess:
    """``with ServerProcess(args) as server: server.target`` -> "127.0.0.1:PORT"."""

    def __init__(self, *args: str, env: dict | None = None, wait_ready: bool = True, drain_seconds: float = 0,
                 executable: Path = RESSERVE, open_files: tuple[int, int] | None = None,
                 preexec: Callable[[], None] | None = None) -> None:
        self.executable, self.extra_args, self.drain_seconds = executable, args, drain_seconds
        self.open_files = open_files  # the server's open-file limits (ulimit -Sn, -Hn)
        self.preexec = preexec  # what else the server's process runs first (joining a cgroup: limited_cgroup)
        self.env = command_environment(env)
        self.wait_ready = wait_ready
        self._prepare_start()

    def _prepare_start(self) -> None:
        """Ports the server may take (chosen again for a retry), its command line, and a clean slate."""
        self.metrics_port, self.http_port = free_port(), free_port()
        # one worker unless a test asks for more: `auto` would give several on a machine with 8+ CPUs
        self.args = [str(self.executable), "serve", "--host", "127.0.0.1", "--port", "0", "--http-port",
                     str(self.http_port), "--metrics-port", str(self.metrics_port), "--drain-seconds",
                     str(self.drain_seconds), "--workers", "1", *self.extra_args]
        self.lines: list[str] = []
        self.port: int | None = None
        self._ready = threading.Event()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_target(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def url(self) -> str:
        return f"http://{self.http_target}"

    def _pump(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line)
            if match := re.search(r"listening on (?:[\d.]+|\[[\da-f:]+\]):(\d+)", line):  # IPv4 or [IPv6]
                self.port = int(match.group(1))
            if " ready: " in line:
                self._ready.set()

    def __enter__(self) -> "ServerProcess":
        # a port free_port() chose may be taken by another process before the server binds it: choose again
        for attempts_left in (2, 1, 0):
            self.process = subprocess.Popen(self.args, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                            env=self.env,
                                            preexec_fn=self._before_exec if self.open_files or self.preexec else None)
            self._pump_thread = threading.Thread(target=self._pump, daemon=True)
            self._pump_thread.start()
            if not self.wait_ready or self._became_ready():
                return self
            if not (attempts_left and self._port_was_taken()):
                raise RuntimeError("server did not become ready:\n" + "".join(self.lines))
            self._prepare_start()

    def _before_exec(self) -> None:
        if self.open_files:
            resource.setrlimit(resource.RLIMIT_NOFILE, self.open_files)
        if self.preexec:
            self.preexec()

    def _became_ready(self, timeout: float = 60) -> bool:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self.process.poll() is not None or time.monotonic() > deadline:
                return False
        return True

    def _port_was_taken(self) -> bool:
        self._pump_thread.join(5)  # the server has exited: all it said is read
        return self.process.poll() is not None and "Address already in use" in "".join(self.lines)

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def wait_for_line(self, text: str, since: int = 0, seconds: float = 10, count: int = 1) -> str:
        """The last line holding ``text`` among those written after the first ``since`` (a module's
        server may have written the same line for earlier tests), once ``count`` such lines are
        there (one from each of ``count`` workers, say)."""
        deadline = time.monotonic() + seconds
        while len(found := [line for line in self.lines[since:] if text in line]) < count:
            assert time.monotonic() < deadline, f"fewer than {count} lines with {text!r}:\n" + "".join(self.lines)
            time.sleep(0.05)
        return found[-1]

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return response.read().decode()


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name, read here apart from serve/processes.py so that tests
    check the server's numbers against the kernel's: state is [0], utime and stime [11] and [12]."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def own_cpu_seconds(pid: int) -> float:
    """User and system time of ``pid`` alone (its threads; not its children), as /proc/PID/stat says."""
    fields = stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def resident_bytes(pid: int) -> int:
    """VmRSS of ``pid``, as /proc/PID/status says."""
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())[1]) * 1024


def tree_resident_bytes(pid: int) -> int:
    """VmRSS of ``pid`` and every live process below it."""
    children = [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    return resident_bytes(pid) + sum(map(tree_resident_bytes, children))


def triton_infer(client, images, model: str = "resnet-mnist", version: str = ""):
    """One request of FP32 ``images`` [N,1,28,28] from either tritonclient (gRPC or HTTP): its result."""
    import tritonclient.http as triton_http
    import tritonclient.grpc as triton_grpc

    module = triton_http if isinstance(client, triton_http.InferenceServerClient) else triton_grpc
    tensor = module.InferInput("input", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    return client.infer(model, [tensor], model_version=version)


def traces(lines: list[str]) -> list[dict]:
    """The trace records among a server's text log lines."""
    return [json.loads(line.split(" resserve.trace: ", 1)[1]) for line in lines if " resserve.trace: " in line]


def logged_since(server: ServerProcess, said: int) -> list[dict]:
    """The traces ``server`` logged since its line ``said``, once every answer given has been
    logged (the log line of a settings change made now comes after them); traces are off after."""
    import tritonclient.http as triton_http

    changes = sum("trace settings of the server set" in line for line in server.lines[said:])
    triton_http.InferenceServerClient(server.http_target).update_trace_settings(settings={"trace_level": ["OFF"]})
    server.wait_for_line("trace settings of the server set", since=said, count=changes + 1)
    return traces(server.lines[said:])


@contextlib.contextmanager
def running(*clients: Callable[[threading.Event], None]) -> Iterator[threading.Event]:
    """Each of ``clients`` on a thread of its own, called with an event that is set when the block
    ends, however it ends, and the threads then joined. A client loops until the event is set:
    left looping after a failed assertion, against a server gone, one spun on its retries for the
    rest of the session (slowing every test after it) and kept pytest from exiting."""
    stop = threading.Event()
    threads = [threading.Thread(target=client, args=(stop,), daemon=True) for client in clients]
    for thread in threads:
        thread.start()
    try:
        yield stop
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)


@contextlib.contextmanager
def http_app(route) -> Iterator[str]:
    """An HTTP server on a loopback port whose every request ``route`` (an aiohttp handler) answers;
    yields its URL."""
    app, loop = web.Application(), asyncio.new_event_loop()
    app.router.add_route("*", "/{path:.*}", route)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


@contextlib.contextmanager
def ingress(upstream: str, prefix: str) -> Iterator[str]:
    """An ingress that routes ``prefix``/... to the server whose HTTP port is at ``upstream``, taking
    the prefix off, and answers 404 elsewhere; yields its URL, prefix included. With no prefix it
    is also an HTTP proxy to that server, whatever host a request names."""
    async def route(request: web.Request) -> web.Response:
        if not request.path.startswith(prefix + "/"):
            return web.Response(status=404, text="<html><body>404 Not Found</body></html>", content_type="text/html")
        async with aiohttp.ClientSession() as session, session.request(
                request.method, upstream + request.path_qs.removeprefix(prefix), data=await request.read(),
                headers=_end_to_end(request.headers)) as answer:
            return web.Response(status=answer.status, body=await answer.read(), headers=_end_to_end(answer.headers))

    with http_app(route) as url:
        yield url + prefix


def _end_to_end(headers) -> dict[str, str]:
    """The headers a proxy passes on: not those of one connection, or of the body it frames anew."""
    return {name: value for name, value in headers.items() if name.lower() not in HOP_BY_HOP}


HOP_BY_HOP = {"host", "connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "upgrade"}

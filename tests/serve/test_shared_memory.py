"""Triton's system shared memory extension against a real server started with --allow-client-shm:
tritonclient's own shared memory helpers (POSIX shm objects in /dev/shm) over gRPC and HTTP, the
answers those of the same digits sent in the request, and every misuse a precise error that
leaves the server serving."""

import contextlib
import json
import os
import socket
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from helpers import ServerProcess, triton_infer
from resserve.serve.rpc import peer_host
from resserve.serve.sharedmemory import MAX_REGIONS, is_loopback

MODEL = "resnet-mnist"
PROTOCOLS = {"grpc": triton_grpc, "http": triton_http}


@pytest.fixture(scope="module")
def server():
    """Listening on every address, so a client can also come from one that is not loopback."""
    with ServerProcess("--allow-client-shm", "--host", "0.0.0.0") as process:
        yield process


@pytest.fixture(scope="module")
def digits(mnist) -> tuple[np.ndarray, np.ndarray]:
    return mnist.test.images[:8, None].astype(np.float32) / 255.0, mnist.test.labels[:8]


def client_of(server, protocol: str):
    module = PROTOCOLS[protocol]
    return module.InferenceServerClient(server.target if protocol == "grpc" else server.http_target)


@contextlib.contextmanager
def shm_object(key: str, byte_size: int):
    """A POSIX shared memory object made by tritonclient (as a client does), removed afterwards."""
    handle = shm.create_shared_memory_region(key.strip("/"), key, byte_size)
    try:
        yield handle
    finally:
        shm.destroy_shared_memory_region(handle)


def regions_of(client) -> list[dict]:
    """The regions registered, as Triton's HTTP status lists them, from either client."""
    status = client.get_system_shared_memory_status()
    if isinstance(client, triton_http.InferenceServerClient):
        return status
    return [{"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size}
            for r in status.regions.values()]


def refusal(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value


def status_of(error: InferenceServerException) -> str:
    """gRPC's status code name, or the HTTP status as a string."""
    return str(error.status()).removeprefix("StatusCode.")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_tensors_in_shared_memory_get_the_answers_of_tensors_sent(server, digits, protocol):
    """Input and output in one object, each a region at an offset, the tensors at offsets within
    them: what the extension's offsets are for, and where an error would show."""
    images, labels = digits
    module, client = PROTOCOLS[protocol], client_of(server, protocol)
    out_bytes = len(images) * 10 * 4
    key = f"/resserve-test-{protocol}"
    with shm_object(key, 64 + 16 + images.nbytes + 32 + out_bytes) as handle:
        shm.set_shared_memory_region(handle, [images], offset=64 + 16)
        client.register_system_shared_memory("in", key, 16 + images.nbytes, offset=64)
        client.register_system_shared_memory("out", key, 32 + out_bytes, offset=64 + 16 + images.nbytes)
        try:
            assert sorted(regions_of(client), key=lambda r: r["name"]) == [
                {"name": "in", "key": key, "offset": 64, "byte_size": 16 + images.nbytes},
                {"name": "out", "key": key, "offset": 64 + 16 + images.nbytes, "byte_size": 32 + out_bytes}]

            tensor = module.InferInput("input", list(images.shape), "FP32")
            tensor.set_shared_memory("in", images.nbytes, offset=16)
            output = module.InferRequestedOutput("probabilities")
            output.set_shared_memory("out", out_bytes, offset=32)
            result = client.infer(MODEL, [tensor], outputs=[output])
            written = shm.get_contents_as_numpy(handle, np.float32, [len(images), 10],
                                                offset=64 + 16 + images.nbytes + 32)
            sent = triton_infer(client, images).as_numpy("probabilities")
            np.testing.assert_allclose(written, sent, rtol=0, atol=1e-6)
            assert (written.argmax(1) == labels).sum() >= 7
            (answered,) = result.get_response()["outputs"] if protocol == "http" else [
                {"name": o.name, "shape": list(o.shape)} for o in result.get_response().outputs]
            assert answered["name"] == "probabilities" and answered["shape"] == [8, 10] and "data" not in answered
        finally:
            client.unregister_system_shared_memory()
        assert regions_of(client) == []


def test_metadata_lists_system_shared_memory_and_cuda_has_nothing_to_unregister(server):
    client = client_of(server, "http")
    assert "system_shared_memory" in client.get_server_metadata()["extensions"]
    assert client.get_cuda_shared_memory_status() == []
    client.unregister_cuda_shared_memory()  # what perf_analyzer does when it ends: nothing to do
    error = refusal(lambda: client.register_cuda_shared_memory("gpu", b"handle", 0, 64))
    assert status_of(error) == "501" and "CUDA shared memory" in error.message()


def test_misused_regions_get_precise_errors_and_the_server_serves_on(server, digits, tmp_path):
    images, _ = digits
    client = client_of(server, "grpc")
    http = client_of(server, "http")
    register = client.register_system_shared_memory
    with shm_object("/resserve-test-misuse", images.nbytes) as handle:
        shm.set_shared_memory_region(handle, [images])
        cases = [
            (lambda: register("a", "/resserve-test-none", 64), "INVALID_ARGUMENT", "no shared memory object"),
            (lambda: register("a", "/../etc/passwd", 64), "INVALID_ARGUMENT", "is not one"),
            (lambda: register("a", "/resserve-test-misuse", images.nbytes, offset=1), "INVALID_ARGUMENT",
             "run past"),
            (lambda: register("", "/resserve-test-misuse", 64), "INVALID_ARGUMENT", "needs a name"),
            (lambda: http.register_system_shared_memory("a", "/resserve-test-none", 64), "400",
             "no shared memory object"),
        ]
        link = "/dev/shm/resserve-test-link"
        with contextlib.suppress(FileNotFoundError):
            os.remove(link)
        os.symlink(tmp_path / "a-file", link)
        (tmp_path / "a-file").write_bytes(b"\0" * 64)
        try:
            cases.append((lambda: register("a", "/resserve-test-link", 64), "INVALID_ARGUMENT", "symbolic link"))
            for call, code, words in cases:
                error = refusal(call)
                assert status_of(error) == code and words in error.message(), (code, words, error.message())
        finally:
            os.remove(link)

        register("in", "/resserve-test-misuse", images.nbytes)
        try:
            for client_of_protocol, code in ((client, "ALREADY_EXISTS"), (http, "409")):
                error = refusal(lambda: client_of_protocol.register_system_shared_memory(
                    "in", "/resserve-test-misuse", 64))
                assert status_of(error) == code and "registered already" in error.message()

            def infer(byte_size=images.nbytes, offset=0, region="in", output_size=None):
                tensor = triton_grpc.InferInput("input", list(images.shape), "FP32")
                tensor.set_shared_memory(region, byte_size, offset=offset)
                outputs = None
                if output_size is not None:
                    outputs = [triton_grpc.InferRequestedOutput("probabilities")]
                    outputs[0].set_shared_memory("in", output_size)
                return client.infer(MODEL, [tensor], outputs=outputs)

            for call, code, words in [
                (lambda: infer(byte_size=images.nbytes - 4), "INVALID_ARGUMENT", "needs 25088"),
                (lambda: infer(offset=4), "INVALID_ARGUMENT", "run past its end"),
                (lambda: infer(region="nowhere"), "NOT_FOUND", "no shared memory region 'nowhere'"),
                (lambda: infer(output_size=8 * 10 * 4 - 4), "INVALID_ARGUMENT", "needs 320 bytes"),
            ]:
                error = refusal(call)
                assert status_of(error) == code and words in error.message(), error.message()
            classified = {"inputs": [{"name": "input", "shape": list(images.shape), "datatype": "FP32",
                                      "parameters": {"shared_memory_region": "in",
                                                     "shared_memory_byte_size": images.nbytes}}],
                          "outputs": [{"name": "probabilities", "parameters": {
                              "classification": 3, "shared_memory_region": "in", "shared_memory_byte_size": 320}}]}
            post = urllib.request.Request(f"{server.url}/v2/models/{MODEL}/infer", json.dumps(classified).encode())
            with pytest.raises(urllib.error.HTTPError) as answer:
                urllib.request.urlopen(post, timeout=30)
            assert answer.value.code == 400 and "both classified and written" in json.load(answer.value)["error"]
            unsized = {"inputs": [{"name": "input", "shape": list(images.shape), "datatype": "FP32",
                                   "parameters": {"shared_memory_region": "in"}}]}  # no byte size
            post = urllib.request.Request(f"{server.url}/v2/models/{MODEL}/infer", json.dumps(unsized).encode())
            with pytest.raises(urllib.error.HTTPError) as answer:
                urllib.request.urlopen(post, timeout=30)
            assert answer.value.code == 400 and json.load(answer.value)["error"] == (
                "input 'input': shared_memory_byte_size is missing; shared memory needs the region and its byte size")

            os.truncate("/dev/shm/resserve-test-misuse", 100)  # the client shrinks its object: no SIGBUS here
            error = refusal(infer)
            assert status_of(error) == "INVALID_ARGUMENT" and "has shrunk" in error.message()
        finally:
            client.unregister_system_shared_memory("in")
    client.unregister_system_shared_memory("in")  # again: nothing to do, as Triton
    assert triton_infer(client, images).as_numpy("probabilities").shape == (8, 10)
    assert server.process.poll() is None


def non_loopback_address() -> str | None:
    """This machine's address on its default route (no packet is sent), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


def test_only_a_client_on_loopback_may_register_or_name_a_region(server):
    """A client elsewhere has no memory on the server's host, and naming a local client's region
    would read its inputs through the model and overwrite its outputs."""
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no address but loopback")
    local = client_of(server, "http")
    with shm_object("/resserve-test-remote", 3136):
        local.register_system_shared_memory("local", "/resserve-test-remote", 3136)
        try:
            for module, port in ((triton_grpc, server.port), (triton_http, server.http_port)):
                remote = module.InferenceServerClient(f"{address}:{port}")
                tensor = module.InferInput("input", [1, 1, 28, 28], "FP32")
                tensor.set_shared_memory("local", 3136)
                for call in (lambda: remote.register_system_shared_memory("r", "/resserve-test-remote", 64),
                             lambda: remote.infer(MODEL, [tensor])):
                    error = refusal(call)
                    assert status_of(error) in ("PERMISSION_DENIED", "403") and address in error.message()
            assert [r["name"] for r in local.get_system_shared_memory_status()] == ["local"]
        finally:
            local.unregister_system_shared_memory()


@pytest.mark.parametrize("peer, local", [
    ("ipv4:127.0.0.1:5000", True), ("ipv6:[::1]:5000", True), ("ipv6:%5B::1%5D:5000", True),
    ("ipv6:%5B::ffff:127.0.0.1%5D:5000", True),  # IPv4 on a dual-stack socket (--host ::)
    ("ipv4:10.1.2.3:5000", False), ("ipv6:%5B::ffff:10.1.2.3%5D:5000", False), ("unix:/tmp/socket", False)])
def test_which_grpc_peers_are_on_loopback(peer, local):
    assert is_loopback(peer_host(peer)) is local


def test_regions_are_bounded(server):
    """Each region holds a file descriptor: past MAX_REGIONS a client is told so, not the server's limit."""
    client = client_of(server, "grpc")
    with shm_object("/resserve-test-many", 64):
        try:
            for index in range(MAX_REGIONS):
                client.register_system_shared_memory(f"r{index}", "/resserve-test-many", 64)
            error = refusal(lambda: client.register_system_shared_memory("one-more", "/resserve-test-many", 64))
            assert status_of(error) == "INVALID_ARGUMENT" and f"{MAX_REGIONS} shared memory regions" in error.message()
        finally:
            client.unregister_system_shared_memory()
    assert regions_of(client) == []

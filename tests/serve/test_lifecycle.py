"""Overload, deadlines, cancellation, SIGTERM, startup errors, TLS and tokens, each on its own server."""

import datetime as dt
import functools
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from helpers import (RESSERVE, ServerProcess, free_port, hold_connections, metric_value, room_for_sockets, run_cli,
                     running, wait_until, write_hanging_package)
from resserve.serve.client import ClientError, DigitClient
from resserve.serve.client.base import CLOSED_AT_LIMIT
from resserve.serve.metrics import Metrics
from resserve.serve.package import SHIPPED_PACKAGE
from resserve.serve.settings import ServerSettings
from resserve.serve.stubs import grpc_service_pb2 as kserve_pb2
from resserve.serve.stubs import grpc_service_pb2_grpc as kserve_grpc
from resserve.serve.tls import CertificateRotation

MODEL = "resnet-mnist"


def request_of(images: np.ndarray) -> kserve_pb2.ModelInferRequest:
    request = kserve_pb2.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="input", datatype="FP32", shape=list(images.shape))
    request.raw_input_contents.append(np.ascontiguousarray(images, dtype=np.float32).tobytes())
    return request


def logits_of(response) -> np.ndarray:
    return np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(-1, 10)


@pytest.fixture(scope="module")
def digits(mnist):
    return mnist.test.images[:1024, None].astype(np.float32) / 255.0


def health_status(target: str, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_a_full_queue_answers_unavailable_and_the_server_stays_healthy(digits):
    with ServerProcess("--max-queue-size", "2", "--max-batch-size", "16") as server:
        stub = kserve_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.target))
        futures = [stub.ModelInfer.future(request_of(digits[:512])) for _ in range(12)]
        codes = []
        for future in futures:
            try:
                future.result(timeout=120)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    assert "queue full" in exc.details()
        assert grpc.StatusCode.UNAVAILABLE in codes and grpc.StatusCode.OK in codes
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}
        assert health_status(server.target, "") == health_pb2.HealthCheckResponse.SERVING
        assert logits_of(stub.ModelInfer(request_of(digits[:2]))).shape == (2, 10)


def test_an_expired_deadline_is_answered_without_computing(digits):
    with ServerProcess("--max-batch-size", "64") as server:
        stub = kserve_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.target))
        before = metric_value(server.metrics(), "resserve_batch_size_sum")
        busy = [stub.ModelInfer.future(request_of(digits)) for _ in range(3)]  # 3 x 1024 images queued
        time.sleep(0.05)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request_of(digits[:1]), timeout=0.05)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        for future in busy:
            future.result(timeout=120)
        computed = metric_value(server.metrics(), "resserve_batch_size_sum") - before
        assert computed == 3 * 1024  # the expired request's image never ran


def test_a_cancelled_request_does_not_disturb_its_batch_mates(digits):
    with ServerProcess("--max-batch-size", "64", "--max-queue-delay-us", "20000") as server:
        stub = kserve_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.target))
        busy = stub.ModelInfer.future(request_of(digits))
        time.sleep(0.02)
        mates = [stub.ModelInfer.future(request_of(digits[i:i + 1])) for i in range(6)]
        mates[2].cancel()
        busy.result(timeout=120)
        for i, future in enumerate(mates):
            if i == 2:
                assert future.cancelled()
                continue
            expected = logits_of(stub.ModelInfer(request_of(digits[i:i + 1])))
            assert np.allclose(logits_of(future.result(timeout=60)), expected, atol=1e-5)


def test_sigterm_under_load_loses_no_accepted_request(digits):
    with ServerProcess("--grace-seconds", "20", drain_seconds=1.5) as server:
        outcomes = []

        def client_loop(offset: int, stop: threading.Event) -> None:
            stub = kserve_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.target))
            while not stop.is_set():
                batch = digits[offset:offset + 16]
                try:
                    response = stub.ModelInfer(request_of(batch), timeout=30)
                    expected_shape = logits_of(response).shape == (16, 10)
                    outcomes.append(("OK" if expected_shape else "WRONG", time.monotonic()))
                except grpc.RpcError as exc:
                    outcomes.append((exc.code().name, time.monotonic()))
                    time.sleep(0.05)

        with running(*(functools.partial(client_loop, 16 * i) for i in range(8))):
            time.sleep(1.0)
            signalled = time.monotonic()
            server.process.send_signal(15)
            time.sleep(0.5)  # draining: not ready, still alive, still answering
            assert health_status(server.target, "resserve.readiness") == health_pb2.HealthCheckResponse.NOT_SERVING
            assert health_status(server.target, "resserve.liveness") == health_pb2.HealthCheckResponse.SERVING
            assert server.process.wait(timeout=60) == 0
    # Every request the server accepted was answered, and the clients got exactly those answers.
    # (A request racing the listener's close can still be refused by gRPC itself, UNAVAILABLE or
    # CANCELLED, before the server accepts it: that one was never accepted, and retrying is safe.)
    log = "".join(server.lines)
    answered = dict((code, int(n)) for code, n in re.findall(r"(\w+) (\d+)", log.split("requests answered: ")[1]))
    assert set(answered) <= {"OK", "UNAVAILABLE"}, answered  # no accepted request cancelled or failed
    assert answered["OK"] == sum(kind == "OK" for kind, _ in outcomes)
    assert "WRONG" not in {kind for kind, _ in outcomes}
    assert any(kind == "OK" and at > signalled + 0.2 for kind, at in outcomes)  # served while draining


def test_a_port_in_use_is_a_startup_error():
    port = free_port()
    with ServerProcess("--port", str(port)) as first:
        second = ServerProcess("--port", str(port), wait_ready=False)
        with second:
            assert second.process.wait(timeout=60) == 1
        time.sleep(0.2)  # the output pump reaches the end
        lines = "".join(second.lines).strip().splitlines()
        # and no log line of gRPC's own
        assert lines == [f"error: cannot listen on 127.0.0.1:{port}: Address already in use (choose another --port)"]
        assert "fork_posix" not in "".join(first.lines)  # gRPC's fork warning is not printed either


def test_device_cuda_without_cuda_is_a_clear_startup_error():
    result = run_cli("serve", "--device", "cuda", "--port", "0", "--http-port", "0", "--metrics-port", "0", timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --device cuda: this ONNX Runtime is the CPU build; install the CUDA build in its place: "
        "pip uninstall -y onnxruntime && pip install 'resserve[gpu]'")


def test_an_artifact_failing_its_checksum_refuses_to_start(tmp_path):
    package = tmp_path / "tampered"
    shutil.copytree(SHIPPED_PACKAGE, package)
    with open(package / "model.onnx", "ab") as f:
        f.write(b"\0")
    result = run_cli("serve", str(package), "--port", "0", "--http-port", "0", "--metrics-port", "0", timeout=60)
    assert result.returncode == 1
    assert "refusing to load it" in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------------------------
# TLS, mutual TLS, bearer tokens


def not_after(certificate) -> float:
    """A PEM certificate file's expiry, in Unix time."""
    from cryptography import x509

    return x509.load_pem_x509_certificate(certificate.read_bytes()).not_valid_after_utc.timestamp()


def test_tls_accepts_clients_that_trust_the_ca_and_refuses_plaintext(pki, mnist, tmp_path):
    image = tmp_path / "digit.png"
    from PIL import Image

    Image.fromarray(mnist.test.images[0]).save(image)
    with ServerProcess("--tls-cert", str(pki / "server.crt"), "--tls-key", str(pki / "server.key")) as server:
        with DigitClient(server.target, tls_ca=pki / "ca.crt") as client:
            assert client.classify([image.read_bytes()])[0].digit == mnist.test.labels[0]
        with pytest.raises(ClientError), DigitClient(server.target, timeout=3) as plain:
            plain.classify([image.read_bytes()])
        result = run_cli("classify", str(image), "--server", server.target, "--tls-ca", str(pki / "ca.crt"))
        assert result.returncode == 0 and result.stdout.startswith(f"{image}: {mnist.test.labels[0]}")
        for args, hint in (((), "(a TLS server closes plaintext connections: --tls-ca names the CA that signed its "
                                f"certificate{CLOSED_AT_LIMIT})"),
                           (("--tls-ca", str(pki / "client.crt")),
                            "(the server's certificate is not signed by the CA in --tls-ca)")):
            refused = run_cli("health", "--server", server.target, *args)
            assert refused.returncode == 1 and refused.stderr.strip().endswith(hint), refused.stderr
            assert len(refused.stderr.strip().splitlines()) == 1  # gRPC core's own log lines stay out
        # HTTP on the same certificate: https only
        trusting = ssl.create_default_context(cafile=pki / "ca.crt")
        with urllib.request.urlopen(f"https://127.0.0.1:{server.http_port}/v2/health/ready", context=trusting,
                                    timeout=5) as response:
            assert response.status == 200
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/v2/health/ready", timeout=5)
        # resserve's client commands over HTTPS, and what they say where the URL or the CA is wrong
        https = f"https://127.0.0.1:{server.http_port}"
        result = run_cli("classify", str(image), "--server", https, "--tls-ca", str(pki / "ca.crt"))
        assert result.returncode == 0 and result.stdout.startswith(f"{image}: {mnist.test.labels[0]}")
        for url, args, hint in (
                (https, ("--tls-ca", str(pki / "client.crt")), "(the server's certificate is not signed by the CA in "
                                                                "--tls-ca)"),
                (https, (), "(the server's certificate is not signed by a CA this machine trusts: --tls-ca names the "
                            "one that signed it)"),
                (f"http://127.0.0.1:{server.http_port}", (), "(a TLS server closes plaintext connections: give an "
                                                             f"https:// URL{CLOSED_AT_LIMIT})")):
            refused = run_cli("health", "--server", url, *args)
            assert refused.returncode == 1 and refused.stderr.strip().endswith(hint), refused.stderr
            assert len(refused.stderr.strip().splitlines()) == 1


def test_a_certificate_that_does_not_name_the_host_connected_to_is_said_so_over_both_transports(pki):
    # the renewed certificate names 127.0.0.1 alone: localhost reaches the same server, but is not a name of it
    with ServerProcess("--tls-cert", str(pki / "renewed.crt"), "--tls-key", str(pki / "renewed.key")) as server:
        trust = ("--tls-ca", str(pki / "ca2.crt"))
        assert run_cli("health", "--server", f"https://127.0.0.1:{server.http_port}", *trust).stdout == "SERVING\n"
        for address in (f"localhost:{server.port}", f"https://localhost:{server.http_port}"):
            refused = run_cli("health", "--server", address, *trust)
            assert refused.returncode == 1 and refused.stderr.strip().endswith(
                "(the server's certificate does not name the host in --server or RESSERVE_SERVER)"), refused.stderr
            assert len(refused.stderr.strip().splitlines()) == 1


def test_a_renewed_certificate_reaches_new_connections_without_a_restart(pki, tmp_path):
    """cert-manager renews a certificate in place, in the Secret's files: the server read them once
    and served the old certificate until it expired. Now it reads them again when they change,
    and keeps the old pair while the new one is half written."""
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(pki / "server.crt", cert)
    shutil.copy(pki / "server.key", key)
    with ServerProcess("--tls-cert", str(cert), "--tls-key", str(key)) as server:
        server.wait_for_line(f"listening on 127.0.0.1:{server.port} (TLS, the certificate valid until "
                             f"{dt.datetime.fromtimestamp(not_after(cert), dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC)")

        def live(ca: str) -> bool:
            channel = grpc.secure_channel(server.target, grpc.ssl_channel_credentials((pki / ca).read_bytes()))
            try:
                return kserve_grpc.GRPCInferenceServiceStub(channel).ServerLive(kserve_pb2.ServerLiveRequest(),
                                                                               timeout=5).live
            except grpc.RpcError:
                return False
            finally:
                channel.close()

        def served_over_http() -> str:
            return ssl.get_server_certificate(("127.0.0.1", server.http_port), timeout=5)

        def replace(path, source) -> None:  # whole at once, as Kubernetes updates a Secret's files
            shutil.copy(source, path.with_suffix(".new"))
            path.with_suffix(".new").replace(path)

        assert live("ca.crt") and not live("ca2.crt")
        expiry = "resserve_tls_certificate_expiry_timestamp_seconds"  # what alerts watch, before renewals fail
        assert metric_value(server.metrics(), expiry) == not_after(pki / "server.crt")
        replace(cert, pki / "renewed.crt")  # the new certificate before its key: a pair that does not match
        server.wait_for_line(f"the TLS files changed, but --tls-key {key} is not the (unencrypted) key of "
                             f"--tls-cert {cert}", seconds=30)
        assert live("ca.crt") and not live("ca2.crt")  # the old pair still
        replace(key, pki / "renewed.key")
        server.wait_for_line(f"the TLS files changed: new connections get the certificate now in {cert} (valid until "
                             f"{dt.datetime.fromtimestamp(not_after(cert), dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC)",
                             seconds=30)
        assert live("ca2.crt") and not live("ca.crt")
        assert ssl.DER_cert_to_PEM_cert(ssl.PEM_cert_to_DER_cert(served_over_http())) == \
            ssl.DER_cert_to_PEM_cert(ssl.PEM_cert_to_DER_cert((pki / "renewed.crt").read_text()))
        metrics = server.metrics()  # a refused rotation is there for alerts, not only in the log
        assert [metric_value(metrics, "resserve_tls_reloads_total", result=result) for result in ("refused", "ok")] \
            == [1, 1]
        assert metric_value(metrics, expiry) == not_after(pki / "renewed.crt")


def test_a_renewal_that_arrives_expired_keeps_the_certificate_that_serves(pki, tmp_path, caplog):
    caplog.set_level("INFO", logger="resserve.serve")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(pki / "server.crt", cert)
    shutil.copy(pki / "server.key", key)
    metrics = Metrics()
    rotation = CertificateRotation(ServerSettings(tls_cert=cert, tls_key=key), metrics.tls_reloads,
                                   metrics.tls_certificate_expiry)
    for name in ("key", "crt"):
        shutil.copy(pki / f"expired.{name}", tmp_path / f"tls.{name}.new")
        (tmp_path / f"tls.{name}.new").replace(tmp_path / f"tls.{name}")
    assert not rotation.renew()
    expired = dt.datetime.fromtimestamp(not_after(pki / "expired.crt"), dt.timezone.utc)
    assert [record.getMessage() for record in caplog.records] == [
        f"the TLS files changed, but --tls-cert {cert} expired on {expired:%Y-%m-%d %H:%M:%S} UTC: every client would "
        "refuse it; renew it; new connections still get the certificate read before"]
    assert rotation.files.cert_pem == (pki / "server.crt").read_bytes()
    assert metrics.registry.get_sample_value("resserve_tls_certificate_expiry_timestamp_seconds") == \
        not_after(pki / "server.crt")


@pytest.mark.parametrize("cert, key, message", [
    ("server.crt", "client.key", "--tls-key {pki}/client.key is not the (unencrypted) key of --tls-cert "
                                 "{pki}/server.crt: KEY_VALUES_MISMATCH"),
    ("expired.crt", "expired.key", "--tls-cert {pki}/expired.crt expired on {expired} UTC: every client would "
                                   "refuse it; renew it"),
])
def test_a_server_certificate_that_cannot_serve_is_one_line_before_listening(pki, cert, key, message):
    result = run_cli("serve", "--port", "0", "--http-port", "0", "--metrics-port", "0", "--tls-cert",
                     str(pki / cert), "--tls-key", str(pki / key), timeout=60)
    assert result.returncode == 1
    expired = dt.datetime.fromtimestamp(not_after(pki / "expired.crt"), dt.timezone.utc)
    assert result.stderr.strip().splitlines() == [
        "error: " + message.format(pki=pki, expired=f"{expired:%Y-%m-%d %H:%M:%S}")]


def test_mutual_tls_requires_a_client_certificate(pki):
    args = ("--tls-cert", str(pki / "server.crt"), "--tls-key", str(pki / "server.key"),
            "--tls-client-ca", str(pki / "ca.crt"))
    with ServerProcess(*args) as server:
        ca = (pki / "ca.crt").read_bytes()

        def live(credentials) -> bool:
            stub = kserve_grpc.GRPCInferenceServiceStub(grpc.secure_channel(server.target, credentials))
            return stub.ServerLive(kserve_pb2.ServerLiveRequest(), timeout=5).live

        assert live(grpc.ssl_channel_credentials(ca, (pki / "client.key").read_bytes(), (pki / "client.crt").read_bytes()))
        with pytest.raises(grpc.RpcError) as info:
            live(grpc.ssl_channel_credentials(ca))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # resserve's own client commands, with and without their certificate
        trust = ("--server", server.target, "--tls-ca", str(pki / "ca.crt"))
        mine = ("--tls-cert", str(pki / "client.crt"), "--tls-key", str(pki / "client.key"))
        assert run_cli("health", *trust, *mine).stdout.strip() == "SERVING"
        assert run_cli("models", *trust, env={"RESSERVE_CLIENT_CERT": mine[1], "RESSERVE_CLIENT_KEY": mine[3]}
                       ).stdout.startswith("resnet-mnist\t1\tREADY")
        refused = run_cli("health", *trust)
        assert refused.returncode == 1 and refused.stderr.strip().endswith(
            f"(a server with mutual TLS closes connections without a client certificate: give --tls-cert and --tls-key"
            f"{CLOSED_AT_LIMIT})")
        strange = run_cli("health", *trust, "--tls-cert", str(pki / "stranger.crt"), "--tls-key", str(pki / "stranger.key"))
        assert strange.returncode == 1 and strange.stderr.strip().endswith(
            f"(the server did not accept the certificate in --tls-cert: is it signed by the server's --tls-client-ca?"
            f"{CLOSED_AT_LIMIT})")
        mismatched = run_cli("health", *trust, "--tls-cert", str(pki / "client.crt"), "--tls-key", str(pki / "ca.key"))
        assert mismatched.returncode == 1 and mismatched.stderr.strip() == (
            f"error: --tls-key {pki / 'ca.key'} is not the (unencrypted) key of --tls-cert {pki / 'client.crt'}: "
            "KEY_VALUES_MISMATCH")
        # HTTP: the same rule
        url = f"https://127.0.0.1:{server.http_port}/v2/health/live"
        with_cert = ssl.create_default_context(cafile=pki / "ca.crt")
        with_cert.load_cert_chain(pki / "client.crt", pki / "client.key")
        with urllib.request.urlopen(url, context=with_cert, timeout=5) as response:
            assert response.status == 200
        with pytest.raises(OSError):
            urllib.request.urlopen(url, context=ssl.create_default_context(cafile=pki / "ca.crt"), timeout=5).read()
        # and resserve's client commands over HTTPS
        trust = ("--server", f"https://127.0.0.1:{server.http_port}", "--tls-ca", str(pki / "ca.crt"))
        assert run_cli("models", *trust, *mine).stdout.startswith("resnet-mnist\t1\tREADY")
        for args, hint in (((), "(a server with mutual TLS closes connections without a client certificate: give "
                                f"--tls-cert and --tls-key{CLOSED_AT_LIMIT})"),
                           (("--tls-cert", str(pki / "stranger.crt"), "--tls-key", str(pki / "stranger.key")),
                            "(the server did not accept the certificate in --tls-cert: is it signed by the server's "
                            f"--tls-client-ca?{CLOSED_AT_LIMIT})")):
            refused = run_cli("models", *trust, *args)
            assert refused.returncode == 1 and refused.stderr.strip().endswith(hint), refused.stderr


def test_connections_that_never_start_their_tls_handshake_are_held_to_the_limit(pki):
    # asyncio reports a TLS connection only once its handshake is done: before, a flood of
    # connections that never sent a ClientHello went uncounted, took every file descriptor of
    # the server (open-file limit 600 here), and asyncio logged a traceback per failed accept
    with room_for_sockets(), ServerProcess("--tls-cert", str(pki / "server.crt"), "--tls-key",
                                           str(pki / "server.key"), open_files=(600, 600)) as server:
        held = hold_connections(server.http_port, 700)
        try:
            health = run_cli("health", "--server", server.target, "--tls-ca", str(pki / "ca.crt"))
            assert health.stdout.strip() == "SERVING", health.stderr
        finally:
            for connection in held:
                connection.close()
        time.sleep(1)
        trusting = ssl.create_default_context(cafile=pki / "ca.crt")
        with urllib.request.urlopen(f"https://127.0.0.1:{server.http_port}/v2/health/ready", context=trusting,
                                    timeout=5) as response:
            assert response.status == 200
        log = "".join(server.lines)
    assert "out of system resource" not in log and "closing new ones" in log


def test_bearer_tokens_guard_the_apis_but_not_health_and_are_read_again_when_their_file_changes(tmp_path, mnist):
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret-one\ns3cret-two\n")
    with ServerProcess("--token-file", str(tokens)) as server:
        stub = kserve_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.target))
        request = request_of(mnist.test.images[:1, None].astype(np.float32) / 255)
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", "s3cret-one"),)):
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(request, metadata=metadata)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert logits_of(stub.ModelInfer(request, metadata=(("authorization", "Bearer s3cret-two"),))).shape == (1, 10)
        assert health_status(server.target, "") == health_pb2.HealthCheckResponse.SERVING
        with DigitClient(server.target, token="s3cret-one") as client:
            assert client.health() == "SERVING"
        for address, refusal in ((server.target, "UNAUTHENTICATED"), (server.url, "HTTP 401")):  # gRPC, HTTP
            result = run_cli("classify", str(_png_of(mnist.test.images[0], tmp_path)), "--server", address)
            assert result.returncode == 1 and refusal in result.stderr  # the CLI without --token
            result = run_cli("classify", str(_png_of(mnist.test.images[0], tmp_path)), "--server", address,
                             "--token", "s3cret-two")
            assert result.returncode == 0 and f": {mnist.test.labels[0]} (" in result.stdout

        # a leaked token revoked by taking it out of the file (as an operator edits the Secret it is
        # mounted from): refused over both protocols within the server's next look, without a restart
        tokens.with_suffix(".new").write_text("s3cret-two\ns3cret-three\n")
        tokens.with_suffix(".new").replace(tokens)
        server.wait_for_line("the token files changed: requests are checked against the tokens they hold now",
                             seconds=30)

        def answered(token: str) -> tuple[grpc.StatusCode, int]:
            try:
                stub.ModelInfer(request, metadata=(("authorization", f"Bearer {token}"),))
                over_grpc = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                over_grpc = exc.code()
            asked = urllib.request.Request(f"{server.url}/v2/models/resnet-mnist",
                                           headers={"Authorization": f"Bearer {token}"})
            try:
                with urllib.request.urlopen(asked, timeout=5) as response:
                    return over_grpc, response.status
            except urllib.error.HTTPError as exc:
                return over_grpc, exc.code

        assert answered("s3cret-one") == (grpc.StatusCode.UNAUTHENTICATED, 401)
        assert answered("s3cret-three") == answered("s3cret-two") == (grpc.StatusCode.OK, 200)
        assert metric_value(server.metrics(), "resserve_token_reloads_total", result="ok") == 1


def _png_of(image: np.ndarray, directory):
    from PIL import Image

    path = directory / "digit.png"
    Image.fromarray(image).save(path)
    return path


def test_health_wait_asks_until_a_starting_server_is_ready():
    port = free_port()
    target = f"127.0.0.1:{port}"
    waiting = subprocess.Popen([str(RESSERVE), "health", "--server", target, "--service", "resserve.readiness",
                                "--wait", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with ServerProcess("--port", str(port)):  # started after the health command: nothing listens at first
        out, err = waiting.communicate(timeout=60)
        assert waiting.returncode == 0 and out.strip() == "SERVING", err
        typo = run_cli("health", "--server", target, "--service", "resserve.readyness", "--wait", "60")
        assert typo.returncode == 1 and typo.stderr.strip() == (
            f"error: {target}: NOT_FOUND: no health service 'resserve.readyness'; resserve's are '' (the server), "
            "resserve.liveness and resserve.readiness")  # at once: a name that will never be SERVING
    gone = run_cli("health", "--server", target, "--wait", "0.5")
    assert gone.returncode == 1 and gone.stderr.startswith(f"error: {target}: UNAVAILABLE: ")


def test_log_level_warning_keeps_the_info_lines_out():
    port = free_port()
    with ServerProcess("--log-level", "warning", "--port", str(port), wait_ready=False) as server:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{server.url}/v2/health/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                assert time.monotonic() < deadline and server.process.poll() is None, "".join(server.lines)
                time.sleep(0.2)
        server.port = port
        assert health_status(server.target, "") == health_pb2.HealthCheckResponse.SERVING
        assert server.stop() == 0
    assert not [line for line in server.lines if " INFO " in line]


def test_log_level_debug_logs_each_request_answered(digits):
    with ServerProcess("--log-level", "debug") as server:
        stub = kserve_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.target))
        stub.ModelInfer(request_of(digits[:1]), timeout=30)
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(kserve_pb2.ModelInferRequest(model_name="nope"), timeout=30)
        deadline = time.monotonic() + 10
        while len([line for line in server.lines if " DEBUG resserve.serve: grpc kserve " in line]) < 2:
            assert time.monotonic() < deadline, "".join(server.lines)
            time.sleep(0.1)
    answered = [line.split(": ", 1)[1] for line in server.lines if " DEBUG resserve.serve: grpc kserve " in line]
    assert [re.sub(r"[\d.]+ ms, from ipv4:127.0.0.1:\d+", "N ms, from ADDRESS", line.strip()) for line in answered] == [
        "grpc kserve resnet-mnist: OK in N ms, from ADDRESS",
        "grpc kserve unknown: NOT_FOUND in N ms, from ADDRESS: unknown model 'nope'; this server has resnet-mnist"]


def test_a_missing_package_is_one_line_before_anything_listens(tmp_path):
    (tmp_path / "lost+found").mkdir()  # a volume's, no package in it
    for path, error in (("/nonexistent/pkg", "model package /nonexistent/pkg does not exist"),
                        (str(tmp_path), f"{tmp_path} is neither a model package (no manifest.json) nor a folder of "
                                        f"them (no subfolder holds one); make one with `resserve export --out "
                                        f"{tmp_path}/NAME`")):
        result = run_cli("serve", path, "--port", "0", "--http-port", "0", "--metrics-port", "0", timeout=60)
        assert (result.returncode, result.stderr.strip().splitlines()) == (1, [f"error: {error}"])


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="this machine has no IPv6 loopback")
def test_an_ipv6_host_serves_grpc_and_http():
    with ServerProcess("--host", "::1") as server:  # gRPC needs [::1]:PORT, which the server now writes
        assert health_status(f"[::1]:{server.port}", "resserve.readiness") == health_pb2.HealthCheckResponse.SERVING
        with urllib.request.urlopen(f"http://[::1]:{server.http_port}/v2/health/ready", timeout=5) as response:
            assert response.status == 200
    assert any(f"listening on [::1]:{server.port}" in line for line in server.lines)


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="this machine has no IPv6 loopback")
def test_every_interface_of_both_families_is_served_on_the_ipv6_wildcard():
    """``--host ::`` took IPv4 clients over gRPC and refused them over HTTP (asyncio listened on IPv6 only)."""
    with ServerProcess("--host", "::") as server:
        for host in ("127.0.0.1", "[::1]"):
            serving = health_status(f"{host}:{server.port}", "resserve.readiness")
            assert serving == health_pb2.HealthCheckResponse.SERVING
            with urllib.request.urlopen(f"http://{host}:{server.http_port}/v2/health/ready", timeout=5) as response:
                assert response.status == 200


def test_a_hung_backend_ends_the_process_so_it_is_started_again(tmp_path):
    """A batch that never finished left a server that passed every health check while each
    request waited out its deadline. Now the process exits with status 3 past --batch-timeout."""
    package = write_hanging_package(tmp_path / "hangs")
    with ServerProcess(str(package), "--backend", "onnxruntime", "--batch-timeout", "2") as server:
        stub = kserve_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.target))
        request = request_of(np.zeros((1, 1, 28, 28), np.float32))
        request.model_name = "hangs"
        assert stub.ModelInfer(request, timeout=10).model_name == "hangs"  # zeros: no time at all
        request.raw_input_contents[0] = np.ones((1, 1, 28, 28), np.float32).tobytes()  # about 15 minutes
        asked = time.monotonic()
        with pytest.raises(grpc.RpcError) as hung:
            stub.ModelInfer(request, timeout=60)
        assert hung.value.code() == grpc.StatusCode.UNAVAILABLE  # the connection ended with the process
        assert server.process.wait(timeout=10) == 3
        assert time.monotonic() - asked < 10
        server.wait_for_line("past --batch-timeout (2 s): the backend hung; exiting with status 3 to be started again")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_signal_while_the_models_load_ends_the_server_at_once(tmp_path, workers):
    """SIGTERM used to wait for loading to end (a large model, a backend warming up: minutes, or for
    ever when the warm-up hangs), then the server said ready, and only then drained."""
    package = write_hanging_package(tmp_path / "hangs", on_warm_up=True)
    with ServerProcess(str(package), "--backend", "onnxruntime", "--workers", workers, wait_ready=False) as server:
        server.wait_for_line("model hangs runs on onnxruntime", seconds=60, count=int(workers))  # each process is loading it
        time.sleep(1)  # and its warm-up spins
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=10) == 0
    server.wait_for_line("shutting down while loading: never ready, so nothing to drain")
    assert not any(re.search(r"resserve.serve: ready: ", line) for line in server.lines), "".join(server.lines)


def test_a_second_signal_cuts_the_drain_short():
    with ServerProcess(drain_seconds=60) as server:
        server.process.send_signal(15)
        time.sleep(0.5)
        signalled = time.monotonic()
        server.process.send_signal(15)
        assert server.process.wait(timeout=20) == 0
        assert time.monotonic() - signalled < 10  # not the 60 s drain


def test_a_connection_past_its_max_age_is_ended_and_the_client_goes_on_over_a_new_one():
    """--max-connection-age (the Deployment's 300 s, so clients re-resolve as pods come and go)
    ends a connection that old with GOAWAY; the channel connects again and calls go on. A grace
    longer than gRPC counts in milliseconds (about 24 days) is taken as the longest it counts: it
    was an OverflowError at startup."""
    with ServerProcess("--max-connection-age", "1", "--grace-seconds", "1e7") as server:
        states, ages = [], []
        with grpc.insecure_channel(server.target) as channel:
            channel.subscribe(states.append)
            stub = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service="resserve.readiness")
            ready, idle = grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.IDLE
            for _ in range(2):
                seen, connected = len(states), time.monotonic()
                assert stub.Check(check, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
                # the server said GOAWAY: since this connection, the channel was READY, then IDLE (its
                # states come from a thread of their own, some time after the call's answer)
                wait_until(lambda: [s for s in states[seen:] if s in (ready, idle)][-2:] == [ready, idle], seconds=5)
                ages.append(time.monotonic() - connected)
        assert all(0.8 < age < 3 for age in ages), ages  # 1 s, and gRPC's +-10% jitter


def test_shape_buckets_are_all_warmed_before_ready_and_padding_never_reaches_a_client(mnist):
    from resserve.serve.backends import open_backend
    from resserve.serve.package import load_package

    with ServerProcess("--backend", "onnxruntime", "--batch-buckets", "1,4,16,64") as server:
        log = "".join(server.lines)
        assert "warmed up at batch 1,4,16,64" in log
        assert log.index("warmed up at batch") < log.index(" ready: ")
        stub = kserve_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.target))
        images = mnist.test.images[:7, None].astype(np.float32) / 255  # 7 rows: padded to 16
        served = logits_of(stub.ModelInfer(request_of(images), timeout=30))
        batches = metric_value(server.metrics(), "resserve_batch_size_sum")
    package = load_package()
    backend = open_backend(package.read_verified(package.find("onnx")), "onnx", "onnxruntime", "cpu", "fp32")
    assert served.shape == (7, 10) and batches == 7  # the client's rows only, counted as 7 images
    assert np.allclose(served, backend.infer(images)["logits"], atol=1e-5)

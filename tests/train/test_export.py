"""resserve export: folding keeps the function, artifacts match the eager network on real MNIST,
the manifest tells the truth, and a failed export leaves nothing behind."""

import dataclasses
import json
import signal
import subprocess

import numpy as np
import onnx
import pytest
import torch
from google.protobuf import text_format
from torch import nn
from torchvision.ops import StochasticDepth
from tritonclient.grpc import model_config_pb2

from helpers import RESSERVE, run_cli
from resserve.serve.backends.onnxruntime import OnnxRuntimeBackend
from resserve.serve.backends.torchscript import TorchScriptBackend
from resserve.serve.package import PackageError, load_package, sha256_of
from resserve.train import export as export_module
from resserve.train.checkpoint import save_checkpoint
from resserve.train.config import ExportError, ExportOptions
from resserve.train.export import export_package
from resserve.train.fold import ChannelAffine, DropBlocksError, choose_blocks_to_drop, fold_for_inference
from resserve.train.config import ARCHITECTURES, ModelConfig
from resserve.train.models import build_model
from resserve.train.triton import write_triton_repository


def _with_trained_looking_statistics(model: nn.Module) -> nn.Module:
    """Random BN statistics and affine parameters, so folding has real work to do."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=generator) - 0.5)
    return model.eval()


CONFIGS = {
    "resnet": ModelConfig(blocks=3, widths=(8,)),
    "plain": ModelConfig(arch="plain", blocks=3, widths=(8,)),
    "preact-sd-B": ModelConfig(arch="preact", blocks=2, widths=(8, 16), shortcut="B", survival_prob=0.5),
    "resnet-sd-A": ModelConfig(blocks=2, widths=(8, 16), shortcut="A", survival_prob=0.5),
    "highway": ModelConfig(arch="highway", blocks=2, widths=(8, 16), shortcut="B"),
    "crelu": ModelConfig(arch="crelu", blocks=2, widths=(8,)),
}
assert {c.arch for c in CONFIGS.values()} == set(ARCHITECTURES)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_folding_removes_batchnorm_and_stochastic_depth_and_keeps_the_function(name):
    torch.manual_seed(0)
    model = _with_trained_looking_statistics(build_model(CONFIGS[name]))
    folded = fold_for_inference(model)
    assert not any(isinstance(m, (nn.BatchNorm2d, StochasticDepth)) for m in folded.modules())
    x = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5, rtol=1e-5)


def test_preactivation_bn_before_a_relu_becomes_a_channel_affine():
    folded = fold_for_inference(_with_trained_looking_statistics(build_model(CONFIGS["preact-sd-B"])))
    assert isinstance(folded.resblocks[0].bn1, ChannelAffine)
    assert isinstance(folded.final_bn, ChannelAffine)


def test_stochastic_depth_models_drop_their_least_likely_blocks_first():
    model = build_model(ModelConfig(blocks=4, widths=(8,), survival_prob=0.5))
    indices, method = choose_blocks_to_drop(model, 2, accuracy_of=lambda m: pytest.fail("no lesion needed"))
    assert indices == [2, 3] and method == "lowest survival probability"


def test_lesion_study_drops_the_block_whose_removal_costs_least():
    model = build_model(ModelConfig(blocks=3, widths=(8,)))
    # block 1 is the one whose removal hurts least in this scoring
    scores = iter([0.5, 0.9, 0.7])
    indices, method = choose_blocks_to_drop(model, 1, accuracy_of=lambda m: next(scores))
    assert indices == [1] and "lesion" in method


def test_dropping_every_droppable_block_needs_no_lesion_study():
    model = build_model(ModelConfig(blocks=3, widths=(8,)))
    indices, method = choose_blocks_to_drop(model, 3, accuracy_of=lambda m: pytest.fail("nothing to choose"))
    assert indices == [0, 1, 2] and method == "every droppable block"


def test_only_shape_keeping_blocks_of_residual_networks_can_be_dropped():
    staged = build_model(ModelConfig(blocks=2, widths=(8, 16)))  # block 2 downsamples
    with pytest.raises(DropBlocksError, match="more than the 3 droppable blocks"):
        choose_blocks_to_drop(staged, 4, accuracy_of=lambda m: 0.0)
    with pytest.raises(DropBlocksError, match="more than the 0 droppable"):
        choose_blocks_to_drop(build_model(ModelConfig(arch="plain", blocks=2, widths=(8,))), 1, lambda m: 0.0)


# ----------------------------------------------------------------------------------------------
# A full export of a small network, shared by the tests below


@pytest.fixture(scope="module")
def exported(tmp_path_factory, mnist):
    root = tmp_path_factory.mktemp("export")
    config = ModelConfig(blocks=3, widths=(8,))
    torch.manual_seed(0)
    model = _with_trained_looking_statistics(build_model(config))
    checkpoint = save_checkpoint(root / "small.pt", model, config)
    manifest = export_package(checkpoint, root / "pkg", ExportOptions(drop_blocks=1, quantize="int8"), mnist,
                              log=lambda _: None)
    return root, checkpoint, manifest, model


def test_package_holds_verified_onnx_and_torchscript_artifacts(exported):
    root, checkpoint, manifest, _ = exported
    package = load_package(root / "pkg")
    assert {(a.format, a.precision) for a in package.artifacts} >= {("onnx", "fp32"), ("torchscript", "fp32")}
    assert package.manifest == manifest  # what export wrote is what a reader gets back
    for entry in manifest.artifacts:
        if entry.precision == "fp32":
            assert entry.max_abs_logit_diff <= 1e-4
            assert entry.test_accuracy == manifest.accuracy.test
        assert sha256_of(root / "pkg" / entry.file) == entry.sha256
    assert manifest.source_checkpoint.sha256 == sha256_of(checkpoint)
    assert manifest.accuracy.test_images == 10_000
    assert manifest.name == "small" and manifest.version == "1" and manifest.labels == tuple("0123456789")
    assert manifest.versions["opset"] == 18
    assert manifest.output_names == ["logits", "probabilities"]
    assert not list(root.glob(".pkg.*"))  # no staging directory left behind


def test_onnx_graph_has_no_batchnorm_and_both_formats_take_any_batch(exported):
    root, _, manifest, _ = exported
    graph = onnx.load(str(root / "pkg" / "model.onnx"))
    assert "BatchNormalization" not in {n.op_type for n in graph.graph.node}
    for backend in (OnnxRuntimeBackend(root / "pkg" / "model.onnx"), TorchScriptBackend(root / "pkg" / "model.ts")):
        for batch in (1, 7, 64, 513):
            out = backend.infer(np.random.rand(batch, 1, 28, 28).astype(np.float32))
            assert out["logits"].shape == (batch, 10)
            assert np.allclose(out["probabilities"].sum(1), 1.0, atol=1e-5)


def test_artifacts_match_the_eager_model_with_dropped_blocks(exported):
    root, _, manifest, model = exported
    dropped = manifest.dropped_blocks
    assert len(dropped.indices) == 1 and "lesion" in dropped.method
    for report in (dropped.before, dropped.after):
        assert 0.0 <= report.test_accuracy <= 1.0 and 0.0 <= report.validation_accuracy <= 1.0
    assert dropped.eager_batch64_latency_ms.after > 0
    from resserve.train.fold import drop_blocks

    reference = drop_blocks(model, dropped.indices)
    x = np.random.default_rng(0).random((9, 1, 28, 28), dtype=np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    for backend in (OnnxRuntimeBackend(root / "pkg" / "model.onnx"), TorchScriptBackend(root / "pkg" / "model.ts")):
        assert np.abs(backend.infer(x)["logits"] - expected).max() <= 1e-4


def test_int8_results_are_recorded_whether_or_not_it_is_kept(exported):
    root, _, manifest, _ = exported
    int8 = manifest.int8
    assert int8.accuracy_loss == pytest.approx(manifest.accuracy.test - int8.test_accuracy)
    assert set(int8.batch64_images_per_second) == {"int8", "fp32"}
    assert (root / "pkg" / "model.int8.onnx").exists() == int8.kept
    assert any(a.precision == "int8" for a in manifest.artifacts) == int8.kept


def test_an_artifact_whose_sha256_does_not_match_is_refused(exported, tmp_path):
    import shutil

    root = exported[0]
    copy = tmp_path / "pkg"
    shutil.copytree(root / "pkg", copy)
    with open(copy / "model.onnx", "ab") as f:
        f.write(b"\0")
    package = load_package(copy)
    with pytest.raises(PackageError, match="refusing to load it"):
        package.read_verified(package.find("onnx"))


def test_triton_repository_config_parses_as_a_triton_model_config(exported, tmp_path):
    model_dir = write_triton_repository(load_package(exported[0] / "pkg"), tmp_path / "repo")
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.platform == "onnxruntime_onnx"
    assert config.name == "small"  # the checkpoint's file stem
    assert [i.name for i in config.input] == ["input"] and list(config.input[0].dims) == [1, 28, 28]
    assert [o.name for o in config.output] == ["logits", "probabilities"]
    assert config.max_batch_size > 0 and config.HasField("dynamic_batching")
    assert config.input[0].format == model_config_pb2.ModelInput.FORMAT_NCHW
    assert {o.label_filename for o in config.output} == {"labels.txt"}
    assert (model_dir / "labels.txt").read_text().split() == [str(d) for d in range(10)]
    assert (model_dir / "1" / "model.onnx").read_bytes() == (exported[0] / "pkg" / "model.onnx").read_bytes()


def test_a_network_with_huge_logits_exports_its_fp32_rounding_within_the_tolerance(tmp_path, mnist):
    """Logits of 10^3 and more (a pre-activation network at initialization: nothing normalizes its
    last block's sum) round in fp32 by more than 1e-4 in absolute terms, ONNX and eager alike:
    export refused the artifact as not matching (4e-3 against 1e-4 at 25 blocks, 2e-1 at 50)."""
    config = ModelConfig(arch="preact", blocks=25)
    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / "preact.pt", build_model(config), config)
    manifest = export_package(checkpoint, tmp_path / "pkg", ExportOptions(formats=("onnx",)),
                              dataclasses.replace(mnist, test=mnist.test.head(500)), log=lambda _: None)
    (artifact,) = manifest.artifacts
    assert 1e-4 < artifact.max_abs_logit_diff and artifact.prediction_agreement == 1.0


def test_a_failed_verification_writes_nothing(exported, tmp_path, monkeypatch, mnist):
    monkeypatch.setattr(export_module, "FP32_TOLERANCE", -1.0)  # no artifact can pass
    with pytest.raises(ExportError, match="does not match the eager model"):
        export_package(exported[1], tmp_path / "pkg", ExportOptions(formats=("onnx",)), mnist, log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_reexport_replaces_a_package_in_place(exported, tmp_path, mnist):
    out = tmp_path / "pkg"
    export_package(exported[1], out, ExportOptions(formats=("onnx",)), mnist, log=lambda _: None)
    first = json.loads((out / "manifest.json").read_text())
    export_package(exported[1], out, ExportOptions(formats=("onnx",), version="2"), mnist, log=lambda _: None)
    assert json.loads((out / "manifest.json").read_text())["version"] == "2" != first["version"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_an_export_stopped_by_sigterm_says_so_and_leaves_nothing_behind(exported, tmp_path, mnist):
    """SIGTERM (docker stop, a Kubernetes Job's pod deleted) ended export where it stood, and its
    staging folder stayed beside the package it was writing."""
    export = subprocess.Popen([str(RESSERVE), "export", str(exported[1]), "--out", str(tmp_path / "pkg"),
                               "--data-dir", str(mnist.path.parent)], stderr=subprocess.PIPE, text=True)
    for line in export.stderr:
        if line.startswith("onnx:"):  # written and verified in the staging folder; TorchScript comes next
            export.send_signal(signal.SIGTERM)
            break
    rest = export.stderr.read()
    assert export.wait(timeout=60) == 143 and rest.strip().splitlines()[-1] == "terminated", rest
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["export", "/nonexistent.pt"], "error: no checkpoint at /nonexistent.pt"),
    (["export", "--format", "tflite"], "error: unknown format tflite; choose from onnx, torchscript"),
    (["export", "--format", "onnx,onnx"], "error: --format names a format twice: onnx,onnx"),  # was a traceback
    (["export", "--quantize", "int4"], "error: --quantize supports int8 only, got 'int4'"),
    (["export", "--drop-blocks", "26"], "error: --drop-blocks 26 is more than the 25 droppable blocks"),
    (["export", "--name", ""], "error: model name '' must be 1-128 letters"),
    (["export", "--version", "1/../2"], "error: model version '1/../2' must be 1-64 letters"),
    (["export", "--triton-repo", "/proc/no-such"], "error: cannot write the Triton repository /proc/no-such"),
    (["export", "--format", "torchscript", "--triton-repo", "triton"], "error: --triton-repo serves the ONNX artifact"),
])
def test_export_bad_input_is_one_line(args, message, tmp_path):
    result = run_cli(*args, "--out", str(tmp_path / "pkg"))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert len(result.stderr.strip().splitlines()) <= 2  # at most a progress line before it
    assert not (tmp_path / "pkg").exists()


def test_export_refuses_an_unwritable_destination_and_a_non_checkpoint(tmp_path, exported):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run_cli("export", str(exported[1]), "--out", str(blocker / "pkg"))
    assert result.returncode == 1 and result.stderr.strip() == f"error: cannot create {blocker}: File exists"
    junk = tmp_path / "junk.pt"
    torch.save({"weights": torch.zeros(3)}, junk)  # a PyTorch file, but no resserve checkpoint
    result = run_cli("export", str(junk), "--out", str(tmp_path / "pkg"))
    assert result.returncode == 1 and "is not a resserve checkpoint" in result.stderr
    spaced = tmp_path / "my model.pt"
    spaced.write_bytes(exported[1].read_bytes())
    result = run_cli("export", str(spaced), "--out", str(tmp_path / "pkg"))
    assert result.returncode == 1 and result.stderr.strip().endswith("(it is the checkpoint's file name: --name sets another)")

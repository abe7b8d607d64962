"""resserve experiment: every experiment runs end to end with --quick on real MNIST and leaves a
figure and numbers that make sense; the measurements behind them are checked on known signals."""

import json
import math
import signal
import subprocess

import numpy as np
import pytest
import torch

from helpers import RESSERVE, run_cli
from resserve.train.checkpoint import save_checkpoint
from resserve.train.config import ModelConfig
from resserve.train.experiments.shattered import autocorrelation, calibrated, line_gradient
from resserve.train.fold import DropBlocksError, drop_blocks, remove_blocks, shape_preserving_blocks
from resserve.train.models import build_model
from resserve.train.training import to_input

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_quick(name: str, out, *args: str) -> tuple[dict, str]:
    """The report of ``resserve experiment NAME --quick``, checked, and what the command logged."""
    result = run_cli("experiment", name, "--quick", "--quiet", "--out", str(out), *args)
    assert result.returncode == 0, result.stderr
    assert f"wrote {out / (name + '.png')} and {out / (name + '.json')}" in result.stdout
    assert (out / f"{name}.png").read_bytes().startswith(PNG_SIGNATURE)
    report = json.loads((out / f"{name}.json").read_text())
    assert report["experiment"] == name and report["quick"] is True
    assert report["data_source"].startswith("cache") and report["seconds"] > 0
    assert report["command"].startswith(f"resserve experiment {name} --quick")
    return report, result.stderr


def in_unit_interval(*values: float) -> bool:
    return all(0.0 <= v <= 1.0 for v in values)


def test_depth_trains_plain_and_residual_networks_at_each_depth_and_resumes_a_stopped_run(tmp_path):
    depths = ("--depths", "2,25")  # 2 blocks: a fraction of a second; the stop comes while plain-25 trains
    stopped = subprocess.Popen([str(RESSERVE), "experiment", "depth", "--quick", "--quiet", "--out", str(tmp_path),
                                *depths], stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal does
    for line in stopped.stderr:
        if line.startswith("plain-2:"):
            stopped.send_signal(signal.SIGINT)  # Ctrl-C
            break
    said = stopped.stderr.read()
    assert stopped.wait(timeout=120) == 130, said
    kept = tmp_path / "depth.resume"
    assert said.strip() == (f"error: interrupted before the report was written; 1 network finished, kept in {kept}: "
                            "the same command with --resume goes on from it")
    assert [p.name for p in kept.iterdir()] == ["plain-2.pt"] and not (tmp_path / "depth.json").exists()

    refused = run_cli("experiment", "depth", "--quick", "--out", str(tmp_path), *depths, "--resume", "--seed", "1")
    assert refused.returncode == 1 and refused.stderr.splitlines()[-1] == (
        f"error: {kept / 'plain-2.pt'} is of a run with other options (seed 0, not 1): resume with the options it was "
        "started with, or delete it to start afresh")

    report, logged = run_quick("depth", tmp_path, *depths, "--resume")
    networks = report["results"]["networks"]
    assert [(n["arch"], n["blocks"]) for n in networks] == [("plain", 2), ("plain", 25), ("resnet", 2), ("resnet", 25)]
    assert f"resuming from {kept}: 1 network finished there" in logged
    assert [entry.split(":")[0] for entry in logged.splitlines() if "finished in the stopped run" in entry] == [
        "plain-2"]
    plain_2 = networks[0]["training"]  # the stopped run's network, as it was
    assert line == (f"plain-2: 512 images in {plain_2['seconds']:.0f} s, train error "
                    f"{plain_2['final_train_error']:.4f}, validation error {plain_2['final_val_error']:.4f}\n")
    assert not kept.exists()  # the report holds them now
    for network in networks:
        points = network["training"]["curve"]
        assert len(points) == report["settings"]["curve_points"] == 2
        assert [p["images"] for p in points] == [256, 512]  # 2 steps of 128 images per point
        assert in_unit_interval(*(p[k] for p in points for k in ("train_error", "val_error")))
        assert all(math.isfinite(p["train_loss"]) for p in points)
    params = {(n["arch"], n["blocks"]): n["training"]["params"] for n in networks}
    assert params[("plain", 25)] == params[("resnet", 25)] > params[("resnet", 2)]  # skips add no parameters
    assert set(report["results"]["degradation"]) == {"plain", "resnet"}


def test_lesion_deletes_blocks_of_the_shipped_resnet_and_of_a_plain_network(tmp_path):
    report, _ = run_quick("lesion", tmp_path)
    residual, plain = report["results"]["residual"], report["results"]["plain"]
    assert (residual["arch"], plain["arch"]) == ("resnet", "plain")
    for network in (residual, plain):
        assert network["deletable_blocks"] == list(range(25))
        assert len(network["single"]) == 25 and in_unit_interval(network["intact"], *network["single"])
        assert [row["k"] for row in network["random"]] == list(range(1, 26))
        assert all(row["min"] <= row["mean"] <= row["max"] and in_unit_interval(*row["accuracies"])
                   for row in network["random"])
    assert residual["origin"] == "given" and plain["origin"].startswith("trained here for 256 images")
    # the shipped network (99.56% on the test set) survives losing any one of most blocks
    assert residual["intact"] > 0.97
    assert np.median(residual["single"]) > 0.95


def test_shattered_gradients_decorrelate_with_depth_in_plain_networks_only(tmp_path):
    report, _ = run_quick("shattered", tmp_path)
    networks = {(n["arch"], n["blocks"]): n for n in report["results"]["networks"]}
    assert set(networks) == {(a, d) for a in ("plain", "resnet", "crelu") for d in (1, 8)}
    for network in networks.values():
        assert network["autocorrelation"][0] == pytest.approx(1.0)
        assert len(network["first_line_gradient"]) == 256
        assert all(-1.0 - 1e-9 <= r <= 1.0 + 1e-9 for r in network["autocorrelation"])
    assert networks[("plain", 8)]["lag1_autocorrelation"] < networks[("resnet", 8)]["lag1_autocorrelation"]
    assert networks[("crelu", 8)]["autocorrelation"] == pytest.approx([1.0] * 17)  # linear at init


def test_gates_measures_highway_gates_and_stochastic_depth(tmp_path):
    report, _ = run_quick("gates", tmp_path)
    highway, depth = report["results"]["highway"], report["results"]["stochastic_depth"]
    assert len(highway["mean_gate"]) == len(highway["mean_gate_at_init"]) == 3
    assert all(0.0 < t < 1.0 for t in highway["mean_gate"])
    assert highway["gate_at_init"] == pytest.approx(1 / (1 + math.exp(3)))
    assert np.mean(highway["mean_gate_at_init"]) == pytest.approx(highway["gate_at_init"], abs=0.03)
    assert (depth["without"]["survival_prob"], depth["with"]["survival_prob"]) == (1.0, 0.5)
    assert in_unit_interval(highway["test_accuracy"], depth["with"]["test_accuracy"], depth["without"]["test_accuracy"])
    assert all(len(run["training"]["curve"]) == 1 for run in (highway, depth["with"], depth["without"]))


def test_autocorrelation_tells_white_from_brown_noise():
    rng = np.random.default_rng(0)
    white = rng.standard_normal(256)
    brown = np.cumsum(white)
    assert autocorrelation(white, 8)[0] == pytest.approx(1.0)
    assert abs(autocorrelation(white, 8)[1]) < 0.15
    assert autocorrelation(brown, 8)[1] > 0.8
    assert autocorrelation(np.full(256, 3.7), 4).tolist() == [1.0] * 5


def test_looks_linear_crelu_network_has_a_constant_gradient_along_a_line(mnist):
    images = to_input(torch.from_numpy(mnist.test.images[:64]))
    model = calibrated(ModelConfig(arch="crelu", blocks=6), images, seed=0)
    gradient = line_gradient(model, images[0], images[1], logit=3, points=32)
    assert np.ptp(gradient) <= 1e-4 * np.abs(gradient).max()
    plain = calibrated(ModelConfig(arch="plain", blocks=6), images, seed=0)
    gradient = line_gradient(plain, images[0], images[1], logit=3, points=32)
    assert np.ptp(gradient) > 1e-2 * np.abs(gradient).max()


def test_a_lesion_may_remove_plain_blocks_but_export_may_not_drop_them():
    plain = build_model(ModelConfig(arch="plain", blocks=3, widths=(8, 16))).eval()
    assert shape_preserving_blocks(plain) == [0, 1, 2, 4, 5]  # block 3 downsamples to 16 channels
    lesioned = remove_blocks(plain, [1])
    assert isinstance(lesioned.resblocks[1], torch.nn.Identity)
    assert not isinstance(plain.resblocks[1], torch.nn.Identity)  # the network lesioned is left whole
    assert lesioned.resblocks[0] is plain.resblocks[0] and lesioned.conv0 is not plain.conv0  # kept blocks shared
    assert lesioned(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(DropBlocksError, match=r"blocks \[3\] change the tensor shape"):
        remove_blocks(plain, [3])
    with pytest.raises(DropBlocksError):
        drop_blocks(plain, [1])


@pytest.mark.parametrize("args, message", [
    (["depth", "--depths", "4,0"], "--depths takes comma-separated positive integers like 4,12,25"),
    (["depth", "--depths", "4,12,4"], "--depths names a value more than once: 4,12,4"),
    (["shattered", "--depths", "8,8"], "--depths names a value more than once: 8,8"),
    (["depth", "--depths", "4,30000"], "at most 1,000 residual blocks (He et al.'s deepest, 1,202 layers, had 600), "
                                       "got 30,000"),  # before the first network trains, not minutes into it
    pytest.param(["gates", "--device", "cuda"], "--device cuda asked for, but torch sees no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    (["gates", "--survival-prob", "0"], "survival probability must be in (0, 1]"),
    (["depth", "--device", "tpu"], "device must be auto, cpu or cuda"),
    (["lesion", "/nonexistent/model.pt"], "no checkpoint at /nonexistent/model.pt"),
    (["lesion", "--plain", "/nonexistent/plain.pt"], "no checkpoint at /nonexistent/plain.pt"),
])
def test_bad_experiment_input_is_one_line(args, message):
    result = run_cli("experiment", *args, "--quick")
    assert result.returncode != 0
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_lesion_refuses_a_plain_model_and_out_that_is_a_file(tmp_path):
    path = tmp_path / "plain.pt"
    config = ModelConfig(arch="plain", blocks=2)
    save_checkpoint(path, build_model(config), config)
    result = run_cli("experiment", "lesion", str(path), "--quick", "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error: the lesion study compares a residual network with a plain one; MODEL is a plain network "
        "(give a resnet, preact or highway checkpoint)")
    result = run_cli("experiment", "depth", "--quick", "--out", str(path))
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: --out {path} is a file; give a directory for the JSON and PNG"
    result = run_cli("experiment", "depth", "--quick", "--out", str(path / "figures"))
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: cannot create --out {path / 'figures'}: Not a directory"

"""Checkpoints round-trip, and anything that is not one is refused without running code."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resserve.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from resserve.train.config import ModelConfig, TrainConfig
from resserve.train.models import build_model
from resserve.train.record import EpochRecord, TrainingRecord
from resserve.train.resume import ResumeState


@pytest.fixture
def small_checkpoint(tmp_path):
    config = ModelConfig(arch="preact", blocks=2, widths=(8, 16), shortcut="B", survival_prob=0.9)
    torch.manual_seed(0)
    model = build_model(config).eval()
    path = save_checkpoint(tmp_path / "small.pt", model, config, _record(config))
    return path, model, config


def _record(config: ModelConfig) -> TrainingRecord:
    return TrainingRecord(
        arch=config.arch, model_config=config, params=1, command=None, train_images=100, best_epoch=1,
        val_accuracy=None, test_accuracy=0.5, test_loss=1.5, train_seconds=1.0, data_source="test", device="cpu",
        precision="fp32", train_config=TrainConfig(epochs=1, validation_size=0), versions={"torch": "x"},
        history=[EpochRecord(1, 2.0, 0.4, None, None, 1.0, 100.0)])


def test_round_trip_rebuilds_the_same_network_from_the_file_alone(small_checkpoint):
    path, model, config = small_checkpoint
    loaded = load_checkpoint(path)
    assert loaded.config == config
    assert loaded.metrics == _record(config)
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded.build()(x), model(x))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_checkpoint_carrying_a_pickled_callable_is_refused(tmp_path, small_checkpoint):
    path = tmp_path / "evil.pt"
    payload = torch.load(small_checkpoint[0], weights_only=True)
    payload["metrics"] = {"hook": _Exploit()}
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="pickled objects other than tensors"):
        load_checkpoint(path)


def test_a_truncated_checkpoint_is_refused(tmp_path, small_checkpoint):
    path = tmp_path / "cut.pt"
    path.write_bytes(small_checkpoint[0].read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)


def test_a_plain_state_dict_is_not_a_resserve_checkpoint(tmp_path):
    path = tmp_path / "state.pt"
    torch.save(build_model(ModelConfig(blocks=1)).state_dict(), path)
    with pytest.raises(CheckpointError, match="not a resserve checkpoint"):
        load_checkpoint(path)


def _altered(tmp_path, small_checkpoint, change) -> Path:
    """The small checkpoint, written again with ``change(payload)`` made to it."""
    payload = torch.load(small_checkpoint[0], weights_only=True)
    change(payload)
    path = tmp_path / "altered.pt"
    torch.save(payload, path)
    return path


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path, small_checkpoint):
    path = _altered(tmp_path, small_checkpoint, lambda payload: payload["config"].update(blocks=3))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(path).build()


@pytest.mark.parametrize("config, problem", [
    ({"blocks": 500}, "it has 1000 blocks, the checkpoint 71 tensors"),  # (more than 1,000: an invalid config)
    ({"kernel_size": 20_001}, "size mismatch for resblocks.0.conv1.weight"),
    ({"widths": [100_000, 16]}, "size mismatch for conv0.weight"),
    ({"num_classes": 1_000_000_000}, "size mismatch for fc.weight"),
])
def test_a_config_that_asks_for_a_huge_network_is_refused_before_any_memory_is_allocated(
        tmp_path, small_checkpoint, config, problem):
    path = _altered(tmp_path, small_checkpoint, lambda payload: payload["config"].update(config))
    with pytest.raises(CheckpointError, match=f"weights do not fit the preact config: {problem}") as refused:
        load_checkpoint(path).build()  # before the check: minutes and gigabytes, or a failed allocation
    assert "\n" not in str(refused.value)


def test_a_config_deeper_than_any_network_is_refused_as_it_loads(tmp_path, small_checkpoint):
    path = _altered(tmp_path, small_checkpoint, lambda payload: payload["config"].update({"blocks": 1_000_000}))
    with pytest.raises(CheckpointError, match=r"invalid model config: a network has at most 1,000 residual blocks .*"
                                              r"got 2,000,000 \(1,000,000 per stage x 2 stages\)$"):
        load_checkpoint(path)


@pytest.mark.parametrize("field, value, wanted", [
    ("blocks", 2.5, "an integer"), ("blocks", True, "an integer"), ("kernel_size", 3.0, "an integer"),
    ("widths", "16", "a list of integers"), ("widths", [8, None], "a list of integers"),
    ("arch", None, "a str"), ("survival_prob", "0.9", "a number"), ("zero_init_residual", 1, "a bool"),
])
def test_a_config_field_of_the_wrong_type_is_refused_in_one_line(tmp_path, small_checkpoint, field, value, wanted):
    path = _altered(tmp_path, small_checkpoint, lambda payload: payload["config"].update({field: value}))
    with pytest.raises(CheckpointError, match=f"invalid model config: model config field {field} must be {wanted}"):
        load_checkpoint(path)


def test_a_weight_that_is_not_a_tensor_is_refused(tmp_path, small_checkpoint):
    path = _altered(tmp_path, small_checkpoint, lambda payload: payload["state_dict"].update({"fc.weight": 3}))
    with pytest.raises(CheckpointError, match='do not fit the preact config: While copying the parameter named "fc.weight"'):
        load_checkpoint(path).build()


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nope.pt")


def test_a_checkpoint_without_weights_is_refused_in_one_line(tmp_path):
    path = tmp_path / "empty.pt"
    torch.save({"format": "resserve-checkpoint", "format_version": 1, "config": {}}, path)
    with pytest.raises(CheckpointError, match="without a valid state_dict"):
        load_checkpoint(path)


@pytest.mark.parametrize("text", ["epoch 1: loss 0.3\n", "export not an image", "(]}", "hello", "tu"])
def test_a_text_file_is_not_a_pytorch_file(tmp_path, text):
    path = tmp_path / "train.log"
    path.write_text(text)
    with pytest.raises(CheckpointError, match="is truncated or not a PyTorch file"):
        load_checkpoint(path)


def test_training_refuses_an_output_it_cannot_write_before_training(tmp_path):
    from helpers import run_cli

    result = run_cli("train", "--out", "/proc/no-such/m.pt", "--epochs", "1", "--train-limit", "256")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot write /proc/no-such/m.pt")
    assert "training" not in result.stderr  # refused before any training


def test_a_checkpoint_whose_training_metrics_do_not_read_is_refused_in_one_line(tmp_path, small_checkpoint):
    path = tmp_path / "odd-metrics.pt"
    payload = torch.load(small_checkpoint[0], weights_only=True)
    payload["metrics"] = {**payload["metrics"], "history": [{"epoch": 1}]}
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="invalid training metrics") as refused:
        load_checkpoint(path)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("payload, said", [
    ({"format": "resserve-resume", "format_version": 1, "model_config": {}},
     "is a damaged resume state (no train_config)"),
    ({"format": "resserve-resume", "format_version": 2}, "has resume state format 2, this resserve reads 1"),
    ({"format": "resserve-checkpoint", "format_version": 1}, "is not a resserve resume state"),
    ({"hook": _Exploit()}, "carries pickled objects other than tensors"),
])
def test_a_resume_state_that_is_not_one_is_refused_in_one_line_that_says_how_to_start_afresh(tmp_path, payload, said):
    path = tmp_path / "model.resume.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError) as refused:
        ResumeState.load(path)
    message = str(refused.value)
    assert message.startswith(f"{path} {said}") and message.endswith("; delete it to start afresh")


def test_a_checkpoint_loads_and_evaluates_without_torchvision_and_torch_dynamo():
    """Their imports take 1.5 s (torchvision's detection ops import torch._dynamo): eval and every
    refusal of a checkpoint paid them at each start. torchvision comes in where a block may be dropped."""
    code = ("import sys, torch; from resserve.train.checkpoint import load_checkpoint;"
            "from resserve.train.files import SHIPPED_MODEL; model = load_checkpoint(SHIPPED_MODEL).build();"
            "model(torch.zeros(1, 1, 28, 28)); print(sorted({'torchvision', 'torch._dynamo'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[]", result.stderr[-2000:]

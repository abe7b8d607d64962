"""A short real training run lowers the loss; augmentation and batching behave."""

import json
import re
from dataclasses import replace
import resource

import pytest
import torch

from helpers import run_cli

from resserve.train.checkpoint import load_checkpoint
from resserve.train.config import ModelConfig, TrainConfig
from resserve.train.files import CheckpointError
from resserve.train.memory import training_memory
from resserve.train.models import build_model, count_parameters
from resserve.train.record import TrainingRecord
from resserve.train.training import TrainingInterrupted, evaluate, predict_logits, random_shift, train


def test_what_training_needs_follows_from_the_network_and_a_run_that_cannot_fit_is_one_line(tmp_path):
    """At least: the lecture ResNet's 117,802 parameters in three fp32 copies (weights, gradients,
    momentum), and its 51 convolutions' 16x28x28 outputs an image, at bf16's 2 bytes. A network
    that needs more than the machine has is refused before anything is allocated: --channels
    100000 was a traceback from torch's allocator."""
    need = training_memory(ModelConfig(), 128)
    assert (need.weights, need.activations) == (3 * 4 * 117_802, 128 * 51 * 16 * 28 * 28 * 2)
    result = run_cli("train", "--channels", "100000", "--out", str(tmp_path / "m.pt"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: training this network needs at least 55,023.8 GB (54,000.2 GB for its weights, their gradients and "
        "momentum; 1,023.6 GB for a batch of 128 images), more than the ")
    assert "Traceback" not in result.stderr and not (tmp_path / "m.pt").exists()


def test_short_training_on_a_real_mnist_subset_lowers_the_loss_and_writes_its_metrics(mnist, tmp_path):
    config = ModelConfig(blocks=2, widths=(8,))
    out = tmp_path / "tiny.pt"
    record = train(config, TrainConfig(epochs=2, train_limit=3000, validation_size=1000, batch_size=64, seed=1),
                   mnist, out, log=lambda _: None, show_progress=False)
    first, last = record.history[0], record.history[-1]
    assert last.train_loss < first.train_loss
    assert last.train_loss < 2.0  # chance level is ln(10) = 2.30
    assert 0.2 < record.test_accuracy <= 1.0  # twice chance after ~100 steps of a 9x9-receptive-field net
    assert record.params == count_parameters(build_model(config))
    assert record.val_accuracy == max(epoch.val_accuracy for epoch in record.history)
    written = json.loads(out.with_suffix(".metrics.json").read_text())
    assert written["test_accuracy"] == record.test_accuracy
    assert TrainingRecord.from_dict(written) == record == load_checkpoint(out).metrics
    card = out.with_suffix(".card.md").read_text()
    assert f"**test accuracy** | {record.test_accuracy:.4f}" in card
    assert "seed 1" in card and "2 epochs" in card and "last 1,000 of the training set for validation" in card
    # the checkpoint holds the selected epoch: evaluating it again gives the reported accuracy
    again = evaluate(load_checkpoint(out).build(), mnist.test)
    assert abs(again.accuracy - record.test_accuracy) < 1e-6


def test_training_without_a_validation_split_keeps_the_last_epoch_and_says_so(mnist, tmp_path):
    out = tmp_path / "no-validation.pt"
    record = train(ModelConfig(blocks=1, widths=(4,)), TrainConfig(epochs=2, train_limit=256, validation_size=0),
                   mnist, out, log=lambda _: None, show_progress=False)
    assert record.best_epoch == 2 and record.val_accuracy is None
    assert [epoch.val_accuracy for epoch in record.history] == [None, None]
    card = out.with_suffix(".card.md").read_text()
    assert "no validation split" in card and "| **validation accuracy** | none |" in card
    assert "| selected epoch | 2 (the last: no validation split) |" in card


def test_same_seed_gives_the_same_weights(mnist, tmp_path):
    runs = []
    for name in ("a", "b"):
        train(ModelConfig(blocks=1, widths=(4,)), TrainConfig(epochs=1, train_limit=512, validation_size=256,
                                                              seed=7, precision="fp32"),
              mnist, tmp_path / f"{name}.pt", log=lambda _: None, show_progress=False)
        runs.append(load_checkpoint(tmp_path / f"{name}.pt").state_dict)
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_random_shift_moves_each_image_by_at_most_the_shift():
    image = torch.zeros(1, 28, 28, dtype=torch.uint8)
    image[0, 14, 14] = 255
    shifted = random_shift(image.repeat(200, 1, 1), 2, torch.Generator().manual_seed(0))
    ys, xs = torch.nonzero(shifted, as_tuple=True)[1:]
    assert len(ys) == 200  # the ink survives every shift
    assert ys.min() >= 12 and ys.max() <= 16 and xs.min() >= 12 and xs.max() <= 16
    assert len(set(zip(ys.tolist(), xs.tolist()))) > 10  # and the shifts vary


def test_evaluation_reuses_freed_tensor_memory_instead_of_faulting_pages_in(mnist):
    """Without train/allocator.py, glibc mmaps and unmaps each ~25 MB activation: about 1,600 page
    faults per image, and as much time in the kernel as in the convolutions."""
    network = build_model(ModelConfig())  # the lecture ResNet's shape: 16 channels at 28x28, 25 blocks
    images = mnist.test.images[:500]
    predict_logits(network, images)  # the first pass grows the heap
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    predict_logits(network, images)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 50 * len(images), f"{faults} page faults evaluating {len(images)} images"


def test_resume_states_of_other_options_or_that_do_not_fit_are_one_line_and_unasked_ones_are_replaced(mnist, tmp_path):
    out, state = tmp_path / "tiny.pt", tmp_path / "tiny.resume.pt"
    config, recipe = ModelConfig(blocks=1, widths=(4,)), TrainConfig(epochs=2, train_limit=256, validation_size=256)

    def stop_after_the_first_epoch(line: str) -> None:
        if line.startswith("epoch 1:"):
            raise KeyboardInterrupt  # as Ctrl-C would, once the epoch's state is written

    with pytest.raises(TrainingInterrupted, match="--resume goes on after epoch 1$"):
        train(config, recipe, mnist, out, log=stop_after_the_first_epoch, show_progress=False)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(state))} is of a run with other options \(lr 0.1, "
                                              r"not 0.05; seed 0, not 1\): resume with the options it was started "
                                              "with, or delete it to start afresh$"):
        train(config, replace(recipe, lr=0.05, seed=1), mnist, out, log=lambda _: None, show_progress=False,
              resume=True)
    payload = torch.load(state, weights_only=True)
    del payload["random"]["batches"]  # as another resserve might have written it
    torch.save(payload, state)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(state))} does not fit this run \('batches'\); "
                                              "delete it to start afresh$"):
        train(config, recipe, mnist, out, log=lambda _: None, show_progress=False, resume=True)
    said = []
    train(config, recipe, mnist, out, log=said.append, show_progress=False)  # afresh: no --resume
    assert said[0] == f"replacing {state}, a stopped run's state, as this one trains (--resume would have continued it)"
    assert not state.exists()  # the run ended

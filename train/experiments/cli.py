"""``resserve experiment depth | lesion | shattered | gates``.

Torch-free at import, like the other training commands: each command imports its experiment
when it runs. Defaults come from train/experiments/settings.py.
"""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from resserve.serve.app import HELP_STYLE
from resserve.train.cli_shared import DataDir, log as _log, start_torch
from resserve.train.config import ModelConfig, TrainConfig, check_depth, parse_ints
from resserve.train.experiments.settings import DepthSettings, GatesSettings, LesionSettings, ShatteredSettings
from resserve.train.files import existing_checkpoint, prepare_output, resolve_model_path

experiment_app = typer.Typer(
    rich_markup_mode=HELP_STYLE,
    help="Reproduce the lecture's findings on MNIST. Each experiment writes NAME.png and NAME.json into "
    "--out, takes at most 15 minutes at its default size on a 2-core CPU with bf16 (AMX; longer in fp32: lesion about "
    "35 minutes on a 2-core AVX2 CPU), and seconds with --quick.",
    no_args_is_help=True)

OutDir = Annotated[Path, typer.Option("--out", "-o", help="Directory for NAME.json and NAME.png (created if missing).")]
Quick = Annotated[bool, typer.Option(
    "--quick", help="A tiny version that runs in seconds: checks the pipeline, its numbers mean nothing.")]
Seed = Annotated[int, typer.Option(help="Seeds initialization, shuffling and augmentation.")]
Device = Annotated[str, typer.Option(help="auto | cpu | cuda.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars (log lines only).")]
Resume = Annotated[bool, typer.Option(
    "--resume", help="Take the networks a stopped run of this command finished (kept in OUT/NAME.resume, removed "
    "once the report is written) instead of training them again; starts afresh when there are none. Same "
    "options as the run it continues.")]
DEFAULT_OUT = Path("experiments")


def _depths(text: Optional[str]) -> Optional[tuple[int, ...]]:
    """--depths: blocks per network, each depth once (None: the experiment's own); all checked
    before the first network trains."""
    if not text:
        return None
    depths = parse_ints(text, "--depths", example="4,12,25", distinct=True)
    for blocks in depths:
        check_depth(blocks)
    return depths


def _sized(settings: Any, **overrides: Any) -> Any:
    """``settings`` with the options the user gave (None: keep the default or quick size)."""
    return replace(settings, **{k: v for k, v in overrides.items() if v is not None})


def _checked_options(out: Path, seed: int, device: str) -> tuple[TrainConfig, Path]:
    """The recipe and the output directory (created), checked before torch loads (2-4 s), so that
    a mistake in them answers at once."""
    recipe = TrainConfig(seed=seed, device=device)
    recipe.validate()
    return recipe, prepare_output(out)


class _Run:
    """Shared by every experiment: data, trainer, timing and the report at the end."""

    def __init__(self, name: str, settings: Any, out: Path, quick: bool, seed: int, device: str,
                 data_dir: Optional[Path], quiet: bool, resume: bool = False) -> None:
        self.recipe, self.out = _checked_options(out, seed, device)
        start_torch()
        from resserve.train.data import load_mnist
        from resserve.train.experiments.report import pyplot
        from resserve.train.training import resolve_device

        resolve_device(device)  # --device cuda where there is none: one line now, before the data is loaded
        pyplot()  # fail now, not after 15 minutes, if matplotlib is missing
        self.name, self.settings, self.quick, self.started = name, settings, quick, time.monotonic()
        self.show_progress = not quiet
        from resserve.train.experiments.report import describe

        _log(f"experiment {name}{' (--quick: checks the pipeline, its numbers mean little)' if quick else ''}: "
             f"{describe(settings)}")
        self.mnist = load_mnist(data_dir, log=_log)
        self.resume, self.finished = resume, None

    def trainer(self, budget):
        from resserve.train.experiments.finished import FinishedNetworks
        from resserve.train.experiments.runs import Trainer

        self.finished = FinishedNetworks(self.out, self.name, self.resume, _log)
        return Trainer(self.mnist, self.recipe, budget, self.finished, _log, self.show_progress)

    def finish(self, compute: Callable[[], Any], draw: Callable, trainer: Any = None) -> None:
        """Run the experiment (``compute`` returns its results dataclass) and write NAME.json and
        NAME.png. Stopped on the way, it says what it kept for --resume, in one line."""
        from resserve.serve.app import Terminated
        from resserve.train.experiments.report import ExperimentReport, write_report
        from resserve.train.training import TrainingInterrupted, TrainingTerminated, library_versions

        try:
            results = compute()
        except (KeyboardInterrupt, Terminated) as exc:
            kind, what = (TrainingTerminated, "terminated (SIGTERM)") if isinstance(exc, Terminated) else (
                TrainingInterrupted, "interrupted")
            raise kind(f"{what} before the report was written"
                       + (self.finished.how_to_resume if self.finished else "")) from None
        seconds = time.monotonic() - self.started
        report = ExperimentReport(
            self.name, command=shlex.join(["resserve", *sys.argv[1:]]), quick=self.quick, seconds=round(seconds, 1),
            seed=self.recipe.seed, device=str(trainer.device) if trainer else "cpu",
            precision=trainer.precision if trainer else "fp32", data_source=self.mnist.source,
            settings=self.settings, versions=library_versions(), results=results)
        json_path, png_path = write_report(self.out, report, draw)
        if self.finished:
            self.finished.done()
        typer.echo(f"wrote {png_path} and {json_path} in {seconds:.0f} s")


@experiment_app.command()
def depth(
    out: OutDir = DEFAULT_OUT,
    quick: Quick = False,
    depths: Annotated[Optional[str], typer.Option(
        help=f"Residual blocks per network, comma-separated [default: {','.join(map(str, DepthSettings.depths))}].",
        show_default=False)] = None,
    train_images: Annotated[Optional[int], typer.Option(
        min=1, help=f"Training images per network [default: {DepthSettings.train_images:,}].", show_default=False)] = None,
    seed: Seed = TrainConfig.seed, device: Device = TrainConfig.device, data_dir: DataDir = None, quiet: Quiet = False,
    resume: Resume = False,
) -> None:
    """Plain versus residual networks of increasing depth, same recipe and budget (He et al. 2015).

    Plots training and validation error curves per depth: deeper plain networks train worse
    (degradation), deeper residual networks do not.
    """
    settings = _sized(DepthSettings.quick() if quick else DepthSettings(),
                      depths=_depths(depths), train_images=train_images)
    run = _Run("depth", settings, out, quick, seed, device, data_dir, quiet, resume)
    from resserve.train.experiments import depth as experiment

    trainer = run.trainer(settings.budget)
    run.finish(lambda: experiment.run(settings, trainer), experiment.draw, trainer)


@experiment_app.command()
def lesion(
    model: Annotated[Optional[Path], typer.Argument(
        help="A trained residual network (checkpoint) [default: the shipped lecture ResNet].", show_default=False)] = None,
    plain: Annotated[Optional[Path], typer.Option(
        help="A trained plain network of the same depth [default: train one for --plain-train-images].",
        show_default=False)] = None,
    out: OutDir = DEFAULT_OUT,
    quick: Quick = False,
    draws: Annotated[Optional[int], typer.Option(
        min=1, help=f"Random sets of k blocks per k [default: {LesionSettings.draws}].", show_default=False)] = None,
    plain_train_images: Annotated[Optional[int], typer.Option(
        min=1, help=f"Training budget of the plain network [default: {LesionSettings.plain_train_images:,}].",
        show_default=False)] = None,
    seed: Seed = TrainConfig.seed, device: Device = TrainConfig.device, data_dir: DataDir = None, quiet: Quiet = False,
    resume: Resume = False,
) -> None:
    """Delete residual blocks at test time (Veit et al. 2016), for MODEL and a plain network.

    Measures test accuracy with each single block deleted and with k random blocks deleted
    (k = 1..N, several draws): residual networks degrade smoothly, plain ones collapse.
    """
    settings = _sized(LesionSettings.quick() if quick else LesionSettings(), draws=draws,
                      plain_train_images=plain_train_images)

    residual_path = resolve_model_path(model)
    plain_path = existing_checkpoint(plain) if plain is not None else None
    _checked_options(out, seed, device)
    start_torch()
    from resserve.train.checkpoint import load_checkpoint
    from resserve.train.experiments import lesion as experiment

    residual = load_checkpoint(residual_path).build()
    experiment.check_residual(residual)
    plain_model = None
    if plain_path is not None:
        plain_model = load_checkpoint(plain_path).build()
        experiment.check_plain(plain_model, residual)
    run = _Run("lesion", settings, out, quick, seed, device, data_dir, quiet, resume)
    trainer = run.trainer(settings.budget)
    residual, plain_model = trainer.place(residual), plain_model and trainer.place(plain_model)
    run.finish(lambda: experiment.run(settings, trainer, residual, plain_model, run.mnist.test), experiment.draw,
               trainer)


@experiment_app.command()
def shattered(
    out: OutDir = DEFAULT_OUT,
    quick: Quick = False,
    depths: Annotated[Optional[str], typer.Option(
        help=f"Blocks per network, comma-separated [default: {','.join(map(str, ShatteredSettings.depths))}].",
        show_default=False)] = None,
    lines: Annotated[Optional[int], typer.Option(
        min=1, help=f"Image pairs to walk between [default: {ShatteredSettings.lines}].", show_default=False)] = None,
    seed: Seed = ShatteredSettings.seed, data_dir: DataDir = None, quiet: Quiet = False,
) -> None:
    """Shattered gradients at initialization (Balduzzi et al. 2017): plain, residual, CReLU looks-linear.

    The derivative of a logit along a line between two MNIST images (256 points) and its
    autocorrelation: white-noise-like for deep plain networks, correlated for residual ones,
    constant for looks-linear CReLU networks (linear at initialization).
    """
    settings = _sized(ShatteredSettings.quick() if quick else ShatteredSettings(),
                      depths=_depths(depths), lines=lines, seed=seed)
    run = _Run("shattered", settings, out, quick, seed, "cpu", data_dir, quiet)
    from resserve.train.experiments import shattered as experiment

    train_split, _ = run.mnist.train_validation(run.recipe.validation_size)
    run.finish(lambda: experiment.run(settings, train_split, _log), experiment.draw)


@experiment_app.command()
def gates(
    out: OutDir = DEFAULT_OUT,
    quick: Quick = False,
    train_images: Annotated[Optional[int], typer.Option(
        min=1, help=f"Training images per network [default: {GatesSettings.train_images:,}].", show_default=False)] = None,
    survival_prob: Annotated[Optional[float], typer.Option(
        help=f"Stochastic depth's p_L [default: {GatesSettings.survival_prob}].", show_default=False)] = None,
    seed: Seed = TrainConfig.seed, device: Device = TrainConfig.device, data_dir: DataDir = None, quiet: Quiet = False,
    resume: Resume = False,
) -> None:
    """Highway transform gates after training, and stochastic depth against none at equal budget.

    Trains a highway network (mean gate T per block, against ~0.05 at initialization) and the
    lecture ResNet with and without stochastic depth (Huang et al. 2016); reports test accuracy.
    """
    settings = _sized(GatesSettings.quick() if quick else GatesSettings(), train_images=train_images,
                      survival_prob=survival_prob)
    ModelConfig(blocks=settings.blocks, survival_prob=settings.survival_prob)  # a bad p_L fails now, not in 10 min
    run = _Run("gates", settings, out, quick, seed, device, data_dir, quiet, resume)
    from resserve.train.experiments import gates as experiment

    trainer = run.trainer(settings.budget)
    run.finish(lambda: experiment.run(settings, trainer, run.mnist.test), experiment.draw, trainer)

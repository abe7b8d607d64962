"""What every experiment leaves in ``--out``: ``NAME.json`` (settings, environment, numbers) and
``NAME.png`` (the figure), each written whole or not at all."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from resserve.serve.errors import ResserveError
from resserve.train.files import atomic_file


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ResserveError("experiments draw their figures with matplotlib: pip install 'resserve[train]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def shades(plt, count: int) -> list:
    """``count`` colours from light to dark: one per depth, deeper is darker."""
    return list(plt.cm.viridis_r([0.15 + 0.8 * i / max(count - 1, 1) for i in range(count)]))


def plain_log_ticks(plt, axis) -> None:
    """Tick labels of a log-scale y axis as plain numbers: 92, not 9.2x10^1."""
    plain = plt.matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
    axis.yaxis.set_major_formatter(plain)
    axis.yaxis.set_minor_formatter(plain)


def describe(settings: Any) -> str:
    """Settings as a line a person reads: ``depths 2, 4; train images 2,000; ...``."""
    def value(v: Any) -> str:
        if isinstance(v, (tuple, list)):
            return ", ".join(value(item) for item in v)
        return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)

    return "; ".join(f"{key.replace('_', ' ')} {value(v)}" for key, v in asdict(settings).items())


@dataclass(frozen=True)
class ExperimentReport:
    """What ``NAME.json`` holds: what ran, where and for how long, its settings and its findings."""

    experiment: str
    command: str  # as typed, to run it again
    quick: bool
    seconds: float
    seed: int
    device: str
    precision: str
    data_source: str  # where MNIST came from
    settings: Any  # the experiment's settings (a dataclass of settings.py)
    versions: dict[str, str]
    results: Any  # the experiment's results (a dataclass of its module)


def write_report(out: Path, report: ExperimentReport, draw: Callable[[Any, Any], Any]) -> tuple[Path, Path]:
    """Write ``out/NAME.json`` and ``out/NAME.png``; ``draw(plt, report.results)`` returns the figure."""
    json_path, png_path = out / f"{report.experiment}.json", out / f"{report.experiment}.png"
    plt = pyplot()
    figure = draw(plt, report.results)
    if report.quick:
        figure.suptitle("--quick run: it checks the pipeline; its numbers mean little", color="tab:red")
    with atomic_file(png_path) as handle:
        figure.savefig(handle, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    with atomic_file(json_path) as handle:
        handle.write((json.dumps(asdict(report), indent=2) + "\n").encode())
    return json_path, png_path

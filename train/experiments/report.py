"""What every experiment leaves in ``--out``: ``NAME.json`` (settings, environment, numbers) and
``NAME.png`` (the figure), each written whole or not at all."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from resserve.serve.errors import ResserveError
from resserve.train.files import atomic_file
from resserve.train.training import library_versions


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


def describe(settings: Any) -> str:
    """Settings as a line a person reads: ``depths 2, 4; train images 2,000; ...``."""
    def value(v: Any) -> str:
        if isinstance(v, (tuple, list)):
            return ", ".join(value(item) for item in v)
        return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)

    return "; ".join(f"{key.replace('_', ' ')} {value(v)}" for key, v in asdict(settings).items())


def write_report(out: Path, name: str, settings: Any, context: dict, results: dict,
                 draw: Callable[[Any, dict], Any]) -> tuple[Path, Path]:
    """Write ``out/NAME.json`` and ``out/NAME.png``; ``draw(plt, results)`` returns the figure."""
    payload = {"experiment": name, **context, "settings": asdict(settings), "versions": library_versions(),
               "results": results}
    json_path, png_path = out / f"{name}.json", out / f"{name}.png"
    plt = pyplot()
    figure = draw(plt, results)
    if context.get("quick"):
        figure.suptitle("--quick run: it checks the pipeline; its numbers mean little", color="tab:red")
    with atomic_file(png_path) as handle:
        figure.savefig(handle, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    with atomic_file(json_path) as handle:
        handle.write((json.dumps(payload, indent=2) + "\n").encode())
    return json_path, png_path

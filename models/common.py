"""What every model module shares: the command line, the timed fit, figures, the report.

A model module looks like::

    def run(num_steps=2000, seed=0, output_dir=None, progress_bar=False) -> dict:
        result, seconds = common.timed_fit(model, None, data, key=jax.random.key(seed), ...)
        metrics = common.metrics("maximum_likelihood", None, "test_nll", value, seconds)
        if output_dir is not None:
            metrics["figure"] = common.save_figure(figure, output_dir, "name")
        return metrics

    def main(argv=None):
        parser = common.parser(__doc__, num_steps=2000)
        args = parser.parse_args(argv)
        common.report("name", run(**common.run_kwargs(args)))

Models with latent sites add ``--estimator`` with ``common.parser(..., estimators=True)``
and turn its value into an estimator with :func:`estimator_from_name`.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_OUTPUT_DIR = "outputs"

ESTIMATOR_NAMES = ("default", "pathwise", "score_function", "measure_valued", "disarm")


def estimator_from_name(name: str | None):
    """``"pathwise"`` / ``"score_function"`` / ``"measure_valued"`` → an mcgrad estimator;
    ``None`` or ``"default"`` → ``None`` (mcgrad's per-site default,
    :func:`mcgrad.estimators.choice.preferred`)."""
    import mcgrad as mg

    if name in (None, "default"):
        return None
    if name == "pathwise":
        return mg.pathwise()
    if name == "score_function":
        return mg.score_function(baseline=mg.baselines.leave_one_out())
    if name == "measure_valued":
        return mg.measure_valued()
    if name == "disarm":
        return mg.disarm()
    raise ValueError(f"unknown estimator '{name}'; choose one of {ESTIMATOR_NAMES}.")


def parser(description: str | None, num_steps: int | None, seed: int = 0, estimators: bool = False) -> argparse.ArgumentParser:
    """The shared command line: ``--num-steps``, ``--seed``, ``--output-dir``, ``--no-progress``
    (and ``--estimator`` for models with latent sites). Add model-specific flags to it."""
    first_line = (description or "").strip().splitlines()[0] if description else None
    p = argparse.ArgumentParser(description=first_line)
    steps_help = f"optimizer steps (default {num_steps})" if num_steps is not None else "optimizer steps (default: the model's)"
    p.add_argument("--num-steps", type=int, default=num_steps, help=steps_help)
    p.add_argument("--seed", type=int, default=seed, help=f"random seed (default {seed})")
    p.add_argument(
        "--output-dir", default=DEFAULT_OUTPUT_DIR, help=f"where the PNG goes (default ./{DEFAULT_OUTPUT_DIR})"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    if estimators:
        p.add_argument(
            "--estimator",
            choices=ESTIMATOR_NAMES,
            default="default",
            help="gradient estimator of the latent sites (default: pathwise where possible, else score function)",
        )
    return p


def run_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed command line as keyword arguments of ``run`` (``--no-progress`` → ``progress_bar``)."""
    kwargs = vars(args).copy()
    kwargs["progress_bar"] = not kwargs.pop("no_progress", False)
    return kwargs


def timed_fit(*args, **kwargs):
    """:func:`mcgrad.fit` and its wall time in seconds (compilation included), blocking on the result."""
    import jax

    import mcgrad as mg

    start = time.perf_counter()
    result = mg.fit(*args, **kwargs)
    jax.block_until_ready(result.params)
    return result, time.perf_counter() - start


def timed(fn: Callable, *args, **kwargs) -> tuple[Any, float]:
    """``fn(*args, **kwargs)`` and its wall time in seconds."""
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - start


def metrics(objective: str, estimator: str | None, metric_name: str, metric: float, fit_seconds: float, **extra) -> dict:
    """The metrics dict every ``run`` returns (the benchmark reads these keys), plus extras."""
    out = {
        "objective": objective,
        "estimator": estimator if estimator is not None else "-",
        "metric_name": metric_name,
        "metric": float(metric),
        "fit_seconds": float(fit_seconds),
    }
    out.update({k: _plain(v) for k, v in extra.items()})
    return out


def _plain(value):
    if isinstance(value, (np.floating, np.integer)) or (hasattr(value, "shape") and np.ndim(value) == 0):
        return value.item() if hasattr(value, "item") else value
    return value


def save_figure(figure, output_dir: str | Path, name: str) -> str:
    """Save a matplotlib figure as ``output_dir/name.png`` (folders created), close it, return the path."""
    import matplotlib.pyplot as plt

    path = Path(output_dir) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return str(path)


def new_figure(num_cols: int = 1, num_rows: int = 1, size: float = 3.5):
    """A headless (Agg) figure with a grid of axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(num_rows, num_cols, figsize=(size * num_cols, size * num_rows), squeeze=False)
    return figure, axes


def image_grid(images: np.ndarray, num_cols: int = 10, side: int = 8) -> np.ndarray:
    """Tile ``[N, side*side]`` images into one ``[rows*side, num_cols*side]`` array (blank padding)."""
    images = np.asarray(images).reshape(-1, side, side)
    num_rows = -(-len(images) // num_cols)
    grid = np.ones((num_rows * (side + 1) - 1, num_cols * (side + 1) - 1)) * np.nan
    for index, image in enumerate(images):
        row, col = divmod(index, num_cols)
        grid[row * (side + 1) : row * (side + 1) + side, col * (side + 1) : col * (side + 1) + side] = image
    return grid


def report(name: str, result: dict) -> None:
    """Print a model's metrics, one per line, and the figure path."""
    print(f"{name}: {result['metric_name']} = {result['metric']:.4g}  (fit {result['fit_seconds']:.1f}s)")
    for key, value in result.items():
        if key in ("metric_name", "metric", "fit_seconds"):
            continue
        print(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")


def to_json(result: dict) -> str:
    return json.dumps({k: _plain(v) for k, v in result.items()}, indent=2, default=str)

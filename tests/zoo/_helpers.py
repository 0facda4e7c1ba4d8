"""Checks every model test shares."""

import math
from pathlib import Path

REQUIRED_KEYS = ("objective", "estimator", "metric_name", "metric", "fit_seconds")


def check_metrics(metrics: dict, figure_dir=None) -> None:
    """The keys the benchmark reads are present, numbers finite, and the PNG written when asked."""
    for key in REQUIRED_KEYS:
        assert key in metrics, f"run() returned no '{key}'"
    for key, value in metrics.items():
        if isinstance(value, float):
            assert math.isfinite(value), f"metric '{key}' is {value}"
    if figure_dir is not None:
        figure = Path(metrics["figure"])
        assert figure.parent == Path(figure_dir) and figure.suffix == ".png"
        assert figure.stat().st_size > 1000

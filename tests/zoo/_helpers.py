"""Checks every model test shares."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

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


def run_as_users_do(module: str, **kwargs) -> dict:
    """``models.<module>.run(**kwargs)``'s numeric metrics, from a process with XLA's default
    flags, as ``python -m models.<module>`` runs (the suite compiles at LLVM level 0, see
    the root conftest.py). For a quality check of a chaotic fit (a GAN's mode count), whose
    outcome follows the rounding of the program: it checks the run the docs report."""
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_backend_optimization_level" not in f)
    code = (f"import json; from models import {module}; m = {module}.run(**{kwargs!r}); "
            "print(json.dumps({k: v for k, v in m.items() if isinstance(v, (int, float, str))}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, XLA_FLAGS=flags),
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])

"""The model zoo side by side: every model's ``run()`` with its defaults → JSON + a markdown table.

    python -m benchmarks.models                 # every registered model
    python -m benchmarks.models gaussian flow   # only these (merged into the existing results)

Writes ``benchmarks/results/models.json`` (one entry per model, merged with earlier runs)
and ``benchmarks/results/models.md`` (the table in ``docs/models.md``); each model's PNG
goes to ``docs/img/``.

Adding a model: one line in :data:`BENCHMARKS`, ``"name": model_run("name")`` where
``models/name.py`` has ``run(output_dir=None, progress_bar=False, **defaults) -> dict``
returning at least ``objective``, ``estimator``, ``metric_name``, ``metric``,
``fit_seconds`` (see :func:`models.common.metrics`); or any zero-argument callable
returning such a dict.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_JSON = ROOT / "benchmarks" / "results" / "models.json"
RESULTS_MARKDOWN = ROOT / "benchmarks" / "results" / "models.md"
FIGURE_DIR = ROOT / "docs" / "img"

REQUIRED_KEYS = ("objective", "estimator", "metric_name", "metric", "fit_seconds")


def model_run(module: str, **overrides) -> Callable[[], dict]:
    """The benchmark of ``models.<module>``: its ``run()`` with defaults (plus ``overrides``),
    figure saved into ``docs/img``."""

    def run() -> dict:
        model = importlib.import_module(f"models.{module}")
        return model.run(output_dir=str(FIGURE_DIR), progress_bar=False, **overrides)

    run.module = f"models.{module}"
    return run


# name -> zero-argument callable returning the metrics dict. Explicit models first, then
# latent-variable and implicit models (vae, discrete_vae, gan, wgan, discrete_gan, blr).
BENCHMARKS: dict[str, Callable[[], dict]] = {
    "gaussian": model_run("gaussian"),
    "mixture": model_run("mixture"),
    "autoregressive": model_run("autoregressive"),
    "flow": model_run("flow"),
    "flow_moons": model_run("flow", data="moons"),
    "vae": model_run("vae"),
    "discrete_vae": model_run("discrete_vae"),  # DisARM, its default
    "discrete_vae_measure_valued": model_run("discrete_vae", estimator="measure_valued", variance_estimators=None),
    "gan": model_run("gan"),
    "gan_digits": model_run("gan", data="digits"),
    "wgan": model_run("wgan"),
    "wgan_digits": model_run("wgan", data="digits"),
    "discrete_gan": model_run("discrete_gan"),  # DisARM on the pixels, its default
    "blr": model_run("blr"),
}


def markdown_table(results: dict[str, dict]) -> str:
    """One row per model: objective, estimator, metric, its value, fit time, comparison."""
    lines = [
        "| model | objective | estimator | metric | value | baseline | fit time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        baseline = r.get("baseline")
        baseline = f"{baseline:.4g} ({r.get('baseline_name', 'baseline')})" if isinstance(baseline, (int, float)) else "-"
        lines.append(
            f"| {name} | {r['objective']} | {r['estimator']} | {r['metric_name']} | {r['metric']:.4g} | "
            f"{baseline} | {r['fit_seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def run_benchmarks(names: list[str]) -> dict[str, dict]:
    """Run ``names``; return their metrics."""
    results = {}
    for name in names:
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        metrics = BENCHMARKS[name]()
        missing = [k for k in REQUIRED_KEYS if k not in metrics]
        if missing:
            raise ValueError(f"benchmark '{name}' returned no {missing}")
        metrics["total_seconds"] = time.perf_counter() - start
        metrics["machine"] = f"{platform.machine()} {platform.system()}, python {sys.version.split()[0]}"
        if "figure" in metrics:
            metrics["figure"] = str(Path(metrics["figure"]).resolve().relative_to(ROOT))
        results[name] = metrics
        print(json.dumps(metrics, indent=2, default=str), flush=True)
    return results


def merge_results(new: dict[str, dict]) -> dict[str, dict]:
    """The saved results with ``new`` replacing their entries (read just before writing, so
    runs of different models do not drop each other's rows), in registry order."""
    results = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else {}
    results.update(new)
    ordered = {n: results[n] for n in BENCHMARKS if n in results}
    ordered.update({n: r for n, r in results.items() if n not in ordered})
    return ordered


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"models to run (default all: {', '.join(BENCHMARKS)})")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown models {unknown}; registered: {list(BENCHMARKS)}")
    results = merge_results(run_benchmarks(args.names or list(BENCHMARKS)))
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(json.dumps(results, indent=2, default=str) + "\n")
    RESULTS_MARKDOWN.write_text(markdown_table(results))
    print(markdown_table(results))


if __name__ == "__main__":
    main()

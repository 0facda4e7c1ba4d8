"""benchmarks/models.py: the registry points at runnable models; the table renders."""

import importlib
import inspect

from benchmarks import models as benchmark


def test_every_registered_model_has_a_run_function():
    for name, run in benchmark.BENCHMARKS.items():
        assert callable(run), name
    modules = {run.module for run in benchmark.BENCHMARKS.values() if hasattr(run, "module")}
    for module in modules:
        model = importlib.import_module(module)
        parameters = inspect.signature(model.run).parameters
        assert "output_dir" in parameters and "progress_bar" in parameters, module


def test_markdown_table_has_one_row_per_model():
    results = {
        "gaussian": {"objective": "maximum_likelihood", "estimator": "-", "metric_name": "err", "metric": 1e-7, "fit_seconds": 2.0},
        "made": {
            "objective": "maximum_likelihood", "estimator": "-", "metric_name": "test_nll", "metric": 16.6,
            "fit_seconds": 20.0, "baseline": 24.5, "baseline_name": "Bernoulli",
        },
    }
    table = benchmark.markdown_table(results).splitlines()
    assert len(table) == 4
    assert table[3].startswith("| made | maximum_likelihood | - | test_nll | 16.6 | 24.5 (Bernoulli) | 20.0 |")

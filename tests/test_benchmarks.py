"""benchmarks/estimators.py in --quick mode: the JSON and markdown it writes."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def benchmark_module():
    spec = importlib.util.spec_from_file_location("benchmark_estimators", ROOT / "benchmarks" / "estimators.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_benchmark(benchmark_module, tmp_path):
    """One --quick run (one test, so that xdist runs it once): the JSON and the table."""
    async_dispatch = jax.config.read("jax_cpu_enable_async_dispatch")
    try:
        with jax.numpy_rank_promotion("allow"):  # NumPyro broadcasts batch shapes implicitly
            assert benchmark_module.main(["--quick", "--output-dir", str(tmp_path)]) == 0
    finally:
        jax.config.update("jax_cpu_enable_async_dispatch", async_dispatch)
    data = json.loads((tmp_path / "estimators.json").read_text())

    # Structure.
    assert set(data) == {"meta", "results"}
    assert data["meta"]["quick"] is True
    for key in ["jax", "backend", "device", "cpu_count", "timing_samples", "cost", "date"]:
        assert key in data["meta"], key
    rows = data["results"]
    assert {row["estimator"] for row in rows} == set(benchmark_module.MCGRAD_ESTIMATORS)
    for row in rows:
        for key in [
            "estimator",
            "D",
            "N",
            "baseline",
            "num_evaluations",
            "mcgrad_seconds",
            "mcgrad_cpu_seconds",
            "mcgrad_unchecked_seconds",
            "baseline_seconds",
            "baseline_cpu_seconds",
            "ratio",
            "ratio_cpu",
            "ratio_unchecked",
            "target",
            "within_target",
            "mcgrad_memory_bytes",
            "baseline_memory_bytes",
        ]:
            assert key in row, key
        assert row["mcgrad_seconds"] > 0 and row["baseline_seconds"] > 0
        assert math.isclose(row["ratio_of_medians"], row["mcgrad_seconds"] / row["baseline_seconds"])
        assert row["ratio"] > 0
        assert isinstance(row["within_target"], bool)
    for name in ("measure_valued", "measure_valued_batch1"):
        measure_valued = [row for row in rows if row["estimator"] == name]
        assert [row["target"] for row in measure_valued] == [1.1, 1.5]
        first = measure_valued[0]
        assert first["num_evaluations"] == first["N"] * (1 + 2 * 2 * first["D"])  # N + 2·(2D)·N

    # The hand-written references draw the same random numbers as mcgrad: same gradient.
    for row in rows:
        if row["baseline"] == "reference":
            assert row["max_abs_difference"] < 1e-4, row["estimator"]

    # The markdown table.
    text = (tmp_path / "estimators.md").read_text(encoding="utf-8")
    assert "| estimator | D | N |" in text
    assert text.count("| measure_valued |") == 2
    assert text.count("| measure_valued_batch1 |") == 2

"""benchmarks/fit_speed.py in --quick mode: the JSON and markdown it writes."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quick_fit_speed_benchmark(tmp_path):
    spec = importlib.util.spec_from_file_location("benchmark_fit_speed", ROOT / "benchmarks" / "fit_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--quick", "--output-dir", str(tmp_path)])

    data = json.loads((tmp_path / "fit_speed.json").read_text())
    assert data == json.loads(json.dumps(results))
    blr = data["blr"]
    assert set(blr["methods"]) == {
        "mcgrad", "numpyro_svi", "pure_jax", "mcgrad_no_bar", "mcgrad_no_bar_no_diagnostics", "numpyro_svi_no_bar"
    }
    for name, method in blr["methods"].items():
        # A call's compile time is part of it; the run estimate is a difference, so any sign.
        assert 0 < method["compile_seconds"] < method["end_to_end_seconds"], name
        assert math.isfinite(method["run_seconds"]) and math.isfinite(method["final_loss"]), name
    # The same model, guide, optimizer and keys: the progress bar changes nothing but time
    # (one program, bit for bit), and neither do the diagnostics, whose extra estimates take
    # keys of their own. With and without them the programs differ, so XLA fuses the update
    # with different neighbours and it may round differently in the last bit: the same
    # trajectory up to rounding (a key shared with the training steps would move it by far more).
    final = {name: blr["methods"][name]["final_loss"] for name in ("mcgrad", "mcgrad_no_bar", "mcgrad_no_bar_no_diagnostics")}
    assert final["mcgrad"] == final["mcgrad_no_bar"]
    assert final["mcgrad_no_bar_no_diagnostics"] == pytest.approx(final["mcgrad_no_bar"], rel=1e-5)
    memory = blr["temp_memory_bytes"]
    assert 0 < memory["mcgrad_no_diagnostics"] <= memory["mcgrad_diagnostics_every_1"]
    particles = data["particles"]["particles"]
    assert all(row["temp_bytes_per_step"] > 0 and math.isfinite(row["recorded_variance"]) for row in particles.values())
    assert all(math.isfinite(r) and r > 0 for name, r in blr["ratios"].items() if "end_to_end" in name)

    discrete = data["discrete"]
    assert discrete["gradient_variance_at_init"]["mcgrad"] > 0
    assert all(math.isfinite(v) for v in discrete["final_exact_elbo"].values())

    table = (tmp_path / "fit_speed.md").read_text()
    assert "| mcgrad |" in table and "(target ≤ 1.1)" in table and "(target ≥ 1)" in table
    assert "### Memory in the number of particles" in table

"""benchmarks/auto.py: a --quick run of the mixture (auto on two sites against every fixed
combination of two candidates each) and the arithmetic of its timings."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def benchmark_module():
    spec = importlib.util.spec_from_file_location("benchmark_auto", ROOT / "benchmarks" / "auto.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_benchmark(benchmark_module, tmp_path):
    results = benchmark_module.main(["--quick", "--problems", "mixture", "--output-dir", str(tmp_path)])
    data = json.loads((tmp_path / "auto.json").read_text())
    assert data == json.loads(json.dumps({k: v for k, v in results.items() if k != "figure"}))
    assert data["quick"] is True and set(data["problems"]) == {"mixture"}
    problem = data["problems"]["mixture"]
    candidates = benchmark_module.QUICK_CANDIDATES
    combinations = {f"loc={a}, z={b}" for a in candidates["loc"] for b in candidates["z"]}
    assert set(problem["methods"]) == combinations | {"auto"}
    rows = problem["methods"]
    default = "loc=pathwise, z=measure_valued"  # the labels, one per plate slice, summed over exactly
    assert [name for name, row in rows.items() if row["is_default"]] == [default]
    num_steps = problem["settings"]["num_steps"]
    for name, row in rows.items():
        assert 0 < row["compile_seconds"] and row["compile_seconds"] <= row["end_to_end_seconds"] + 1e-6, name
        assert row["seconds_per_step"] > 0 and math.isfinite(row["final_loss"]), name
        # The phases of the first call add up to its wall time.
        phases = row["calls"][0]
        assert sum(p["wall_seconds"] for p in phases) == pytest.approx(row["end_to_end_seconds"])
        if row["steps_to_target"] is not None:
            assert 0 < row["time_to_target_seconds"], name
        if not row["is_auto"]:  # a fixed call: setup, its compiled steps, wrap-up; the parts add up
            assert [p["phase"] for p in phases] == ["setup", "steps", "wrapup"], name
            assert row["setup_run_seconds"] + row["seconds_per_step"] * num_steps <= row["run_seconds"] * 1.0001 + 1e-9
    # The reference reaches its own final smoothed loss + tolerance.
    assert rows[default]["steps_to_target"] is not None

    auto = rows["auto"]
    segments, decisions = auto["segments"], auto["decisions"]
    schedule = [0, 6, 25, 50, 75]  # a quarter of the run, and a sixteenth: those the run affords
    starts = [s["step"] for s in segments]
    assert sum(s["steps"] for s in segments) == num_steps and starts[0] == 0 and set(starts) <= set(schedule)
    assert [d["step"] for d in decisions] == starts  # the time before each segment
    decided = sorted({row["step"] for row in problem["choices"]})
    assert decided[0] == 0 and set(decided) <= set(starts)
    for segment in segments:
        assert segment["choices"]["loc"] in candidates["loc"] and segment["choices"]["z"] in candidates["z"]
    assert auto["run_seconds"] == pytest.approx(
        auto["setup_run_seconds"] + auto["measurement_run_seconds"] + auto["segment_run_seconds"])
    assert auto["overhead"] == pytest.approx(auto["measurement_run_seconds"] / auto["segment_run_seconds"])
    # Every decision is recorded: a row per (step, site, candidate).
    choices = problem["choices"]
    assert len(choices) == len(decided) * (len(candidates["loc"]) + len(candidates["z"]))
    assert {"step", "site", "candidate", "variance", "seconds", "efficiency", "chosen"} <= set(choices[0])

    checks = problem["targets"]
    assert checks["auto_time_ratio"]["reference"] in combinations
    paired = checks["auto_time_ratio"]["head_to_head"]  # auto and the reference, called again in turn
    assert paired["reference"] == checks["auto_time_ratio"]["reference"] and paired["calls"] == 1
    # (a time never reached counts as infinite, written as null: a 100-step run may leave
    # auto short of the target)
    ratio = benchmark_module.time_ratio(paired["auto_seconds"], paired["reference_seconds"])
    assert checks["auto_time_ratio"]["value"] == (pytest.approx(ratio) if math.isfinite(ratio) else None)
    assert {"value", "met", "measurement_compile_seconds"} <= set(checks["overhead"])
    assert checks["default_vs_auto"]["default"] == default
    text = (tmp_path / "auto.md").read_text(encoding="utf-8")
    assert "| **auto** |" in text and "### Targets" in text and "### The default estimators against auto" in text
    png = Path(results["figure"])
    assert png.parent == tmp_path and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_time_to_target_of_fixed_and_auto(benchmark_module):
    """A fixed estimator: its setup and wrap-up, and steps × s/step. Auto: its setup, the
    decisions before the step and the segments up to it (pro rata in the one the step
    falls in)."""
    fixed = {"seconds_per_step": 0.01, "setup_run_seconds": 0.05}
    assert benchmark_module.time_to_step(fixed, 30, 100, is_auto=False) == pytest.approx(0.05 + 0.3)
    assert math.isnan(benchmark_module.time_to_step(fixed, None, 100, is_auto=False))
    auto = {
        "setup_run_seconds": 0.5,
        "decisions": [{"step": 0, "run_seconds": 1.0}, {"step": 50, "run_seconds": 2.0}],
        "segments": [{"step": 0, "steps": 50, "run_seconds": 0.4}, {"step": 50, "steps": 50, "run_seconds": 0.8}],
    }
    assert benchmark_module.time_to_step(auto, 25, 100, is_auto=True) == pytest.approx(0.5 + 1.0 + 0.2)
    assert benchmark_module.time_to_step(auto, 50, 100, is_auto=True) == pytest.approx(0.5 + 1.0 + 0.4)
    assert benchmark_module.time_to_step(auto, 75, 100, is_auto=True) == pytest.approx(0.5 + 3.0 + 0.4 + 0.4)


def test_auto_phases_are_timed_over_the_calls_that_had_them(benchmark_module):
    """A repeated call can decide elsewhere: a stop counts where it decided alike at the same
    step; a segment runs at the lowest seconds a step of the calls' segments of the same
    choices and no more steps."""
    def call(*phases):
        return [dict(p, compile_seconds=0.0) for p in phases]

    pw = {"z": "pathwise"}
    first = call({"phase": "measure", "step": 0, "decided": True, "wall_seconds": 0.05},
                 {"phase": "segment", "step": 0, "steps": 100, "choices": pw, "wall_seconds": 1.0})
    split = call({"phase": "measure", "step": 0, "decided": True, "wall_seconds": 0.01},
                 {"phase": "segment", "step": 0, "steps": 50, "choices": pw, "wall_seconds": 0.3},
                 {"phase": "measure", "step": 50, "decided": True, "wall_seconds": 0.01},
                 {"phase": "segment", "step": 50, "steps": 50, "choices": pw, "wall_seconds": 0.3})
    alike = call({"phase": "measure", "step": 0, "decided": True, "wall_seconds": 0.02},
                 {"phase": "segment", "step": 0, "steps": 100, "choices": pw, "wall_seconds": 0.8})
    summary = benchmark_module.summarize_auto([first, split, alike], 100)
    assert [m["run_seconds"] for m in summary["decisions"]] == [0.01]
    # split's 50-step segments ran the program at 6 ms a step, below the others' 8 and 10
    assert summary["segments"][0]["run_seconds"] == pytest.approx(0.6) and summary["segments"][0]["calls_timed"] == 4
    # but a longer segment's rate (alike's 8 ms at 100 steps) never sets a shorter one's
    faster = call({"phase": "measure", "step": 0, "decided": True, "wall_seconds": 0.02},
                  {"phase": "segment", "step": 0, "steps": 100, "choices": pw, "wall_seconds": 0.5})
    short = benchmark_module.summarize_auto([split, faster], 100)["segments"]
    assert [s["run_seconds"] for s in short] == pytest.approx([0.3, 0.3])
    other = call({"phase": "measure", "step": 0, "decided": True, "wall_seconds": 0.02},
                 {"phase": "segment", "step": 0, "steps": 100, "choices": {"z": "sf"}, "wall_seconds": 0.1})
    assert benchmark_module.summarize_auto([first, other], 100)["segments"][0]["run_seconds"] == pytest.approx(1.0)
    # The same choices throughout, however the calls were cut: they chose alike.
    assert summary["choices_per_call"] == [[{"step": 0, "choices": pw}]] * 3
    assert summary["decided_per_call"] == [[0], [0, 50], [0]]

"""benchmarks/labels.py in --quick mode: the default sums over the labels, and what it writes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark(tmp_path):
    spec = importlib.util.spec_from_file_location("benchmark_labels", ROOT / "benchmarks" / "labels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--quick", "--output-dir", str(tmp_path)])
    data = json.loads((tmp_path / "labels.json").read_text())
    assert data == json.loads(json.dumps(results))
    assert set(data["problems"]) == {"2", "3"}
    for problem in data["problems"].values():
        rows = problem["methods"]
        # mg.fit's default at a label per datum: the exact sum over its values
        assert rows["default"]["estimator"] == "measure_valued"
        assert rows["score_function_loo"]["estimator"] == "score_function"
        assert problem["target"] == rows["default"]["final"] + module.TOLERANCE
        assert rows["default"]["steps_to_target"] is not None  # it reaches its own final loss
        for row in rows.values():
            assert row["seconds_per_step"] > 0 and row["compile_seconds"] > 0
    text = (tmp_path / "labels.md").read_text()
    assert "| 3 | default | `measure_valued` |" in text

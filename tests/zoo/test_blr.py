import pytest

from models import blr
from tests.zoo._helpers import check_metrics


def test_smoke(tmp_path):
    metrics = blr.run(num_steps=5, num_warmup=20, num_samples=20, output_dir=tmp_path)
    check_metrics(metrics, tmp_path)
    assert len(metrics["table"]) == 31


@pytest.mark.slow
def test_guide_means_agree_with_nuts():
    # Mean-field VI recovers the posterior means of this near-Gaussian posterior: every
    # coefficient within half a NUTS posterior sd (typically max ~0.25), while it
    # underestimates the spread of the correlated coefficients (sd ratio < 1).
    metrics = blr.run(num_steps=1500, num_warmup=300, num_samples=300)
    assert metrics["metric"] < 0.5, metrics
    assert 0.2 < metrics["median_sd_ratio"] < 1.1


def test_cli_passes_its_flags_to_run(monkeypatch, capsys):
    seen = {}

    def fake_run(**kwargs):
        seen.update(kwargs)
        return {"metric_name": "m", "metric": 0.1, "fit_seconds": 0.0, "table": [{"coefficient": "w[0]", "mean_deviation": 0.1}]}

    monkeypatch.setattr(blr, "run", fake_run)
    blr.main(["--num-steps", "7", "--num-warmup", "10", "--num-samples", "11", "--batch-size", "32"])
    assert (seen["num_steps"], seen["num_warmup"], seen["num_samples"], seen["batch_size"]) == (7, 10, 11, 32)
    assert "w[0]" in capsys.readouterr().out

import numpy as np
import pytest

from models import gaussian
from tests.zoo._helpers import check_metrics


def test_smoke(tmp_path):
    metrics = gaussian.run(num_steps=5, output_dir=tmp_path)
    check_metrics(metrics, tmp_path)


def test_cli(tmp_path, capsys):
    gaussian.main(["--num-steps", "3", "--output-dir", str(tmp_path), "--no-progress"])
    assert "covariance_max_error" in capsys.readouterr().out
    assert (tmp_path / "gaussian.png").exists()


def test_closed_form_mle():
    x = np.array([[0.0, 1.0], [2.0, 1.0], [1.0, 4.0]])
    loc, covariance = gaussian.closed_form_mle(x)
    np.testing.assert_allclose(loc, [1.0, 2.0])
    np.testing.assert_allclose(covariance, np.cov(x.T, bias=True))


def test_fit_matches_the_closed_form_mle():
    metrics = gaussian.run()
    assert metrics["loc_max_error"] < 1e-4
    assert metrics["metric"] < 1e-4  # covariance entries
    assert metrics["test_nll"] == pytest.approx(metrics["closed_form_test_nll"], abs=1e-4)

"""`mcgrad compare blr`: the paper's findings on Bayesian logistic regression (§8.3)."""

import numpy as np

from mcgrad import cli
from mcgrad.experiments import blr


def test_data_is_the_papers():
    data = blr.load_breast_cancer()
    assert data.features.shape == (569, 31)
    np.testing.assert_allclose(data.features[:, :30].mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(data.features[:, :30].std(axis=0), 1.0, atol=1e-4)
    assert set(np.unique(data.labels)) == {0.0, 1.0}


def test_findings_reproduce(tmp_path):
    """Pathwise ≪ score function in variance; control variates help (delta method more than a
    moving average); coupled measure-valued matches pathwise at 1 + 2·62 evaluations per sample."""
    assert cli.main(["compare", "blr", "--num-steps", "400", "--no-progress", "--output-dir", str(tmp_path)]) == 0
    table = (tmp_path / "blr_comparison.csv").read_text()
    assert (tmp_path / "blr_comparison.png").stat().st_size > 10_000
    import pandas as pd

    rows = pd.read_csv(tmp_path / "blr_comparison.csv").set_index("estimator")
    variance = rows["median gradient variance"]
    assert variance["pathwise"] * 20 < variance["score function"], table
    assert variance["score function + moving average"] < variance["score function"], table
    assert variance["score function + delta method"] < variance["score function + moving average"], table
    assert variance["measure-valued (coupled)"] < 3 * variance["pathwise"], table
    assert rows.loc["measure-valued (coupled)", "evaluations per sample"] == 1 + 2 * 62
    assert (rows["accuracy"] > 0.9).all(), table
    assert rows["final ELBO"]["pathwise"] > rows["final ELBO"]["score function"], table

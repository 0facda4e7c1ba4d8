import numpy as np

from models import data, mixture
from tests.zoo._helpers import check_metrics


def test_smoke(tmp_path):
    metrics = mixture.run(num_steps=5, output_dir=tmp_path)
    check_metrics(metrics, tmp_path)
    assert -1.0 <= metrics["metric"] <= 1.0


def test_kmeans_init_shapes_and_valid_covariances():
    features, _ = data.iris()
    logits, locs, scale_trils = mixture.kmeans_init(features, 3)
    assert logits.shape == (3,) and locs.shape == (3, 4) and scale_trils.shape == (3, 4, 4)
    np.testing.assert_allclose(np.exp(np.asarray(logits)).sum(), 1.0, rtol=1e-5)
    assert np.all(np.diagonal(np.asarray(scale_trils), axis1=1, axis2=2) > 0)


def test_clusters_iris_well_above_chance():
    metrics = mixture.run()
    assert metrics["metric"] > 0.75  # ARI; chance is 0
    assert metrics["metric"] >= metrics["kmeans_init_ari"]  # fitting improved on its initialisation

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import discrete_gan
from tests.zoo._helpers import check_metrics


def test_smoke(tmp_path):
    metrics = discrete_gan.run(num_steps=5, batch_size=16, num_particles=2, hidden=16, num_eval_samples=400, output_dir=tmp_path)
    check_metrics(metrics, tmp_path)


def test_cli_passes_its_flags_to_run(monkeypatch, capsys):
    seen = {}

    def fake_run(**kwargs):
        seen.update(kwargs)
        return {"metric_name": "m", "metric": 0.1, "fit_seconds": 0.0}

    monkeypatch.setattr(discrete_gan, "run", fake_run)
    discrete_gan.main(["--num-particles", "2", "--estimator", "score_function", "--pack", "1"])
    assert seen["num_particles"] == 2 and seen["estimator"] == "score_function" and seen["pack"] == 1


def test_pixels_are_a_score_function_site():
    # The pixels have no rsample: mcgrad picks the score function for them by default.
    import optax

    import mcgrad as mg

    generator, critic = discrete_gan.make_networks(4, 8, jax.random.key(0))
    objective = mg.adversarial(critic, data=jnp.zeros((10, 64)), site="x", num_particles=2)
    training = mg.trainer(generator.model, None, 8, key=jax.random.key(1), objective=objective, optimizer=optax.adam(1e-3))
    assert training.estimators["x"].name == "score_function"
    assert training.estimators["noise"].name == "pathwise"


def test_pixel_mean_error():
    assert discrete_gan.pixel_mean_error(np.ones((3, 64)), np.zeros((2, 64))) == 1.0


@pytest.mark.slow
def test_pixel_means_approach_the_data():
    # Untrained: ~0.30 mean absolute error of the pixel means; after 1000 score-function
    # steps ~0.045 (the training pixel means themselves: 0.012).
    metrics = discrete_gan.run(num_steps=1000)
    assert metrics["initial_pixel_mean_error"] > 0.2
    assert metrics["metric"] < 0.1, metrics
    assert metrics["c2st_accuracy"] < 0.95


def test_the_script_defaults_to_disarm(monkeypatch):
    seen = {}
    monkeypatch.setattr(discrete_gan, "run", lambda **kwargs: seen.update(kwargs) or {"metric": 0.0})
    monkeypatch.setattr(discrete_gan.common, "report", lambda *args: None)
    discrete_gan.main([])
    assert seen["estimator"] == "disarm"

import jax
import jax.numpy as jnp
import pytest

from models import data, discrete_vae
from tests.zoo._helpers import check_metrics


def test_smoke(tmp_path):
    metrics = discrete_vae.run(
        num_steps=5, batch_size=8, num_eval_samples=4, num_repeats=4, output_dir=tmp_path,
        variance_estimators=("score_function",),
    )
    check_metrics(metrics, tmp_path)
    assert metrics["variance_score_function"] > 0


def test_cli_passes_its_flags_to_run_and_prints_the_variances(monkeypatch, capsys):
    seen = {}

    def fake_run(**kwargs):
        seen.update(kwargs)
        variances = {f"variance_{name}": 1.0 + i for i, name in enumerate(discrete_vae.ESTIMATORS)}
        seconds = {f"seconds_{name}": 0.001 for name in discrete_vae.ESTIMATORS}
        return {"metric_name": "m", "metric": 1.0, "fit_seconds": 0.0, **variances, **seconds}

    monkeypatch.setattr(discrete_vae, "run", fake_run)
    discrete_vae.main(["--num-steps", "3", "--estimator", "measure_valued", "--batch-size", "4", "--no-progress"])
    assert seen["estimator"] == "measure_valued" and seen["batch_size"] == 4 and seen["progress_bar"] is False
    out = capsys.readouterr().out
    assert "Gradient variance" in out and "measure_valued" in out and "score_function_none" in out


@pytest.mark.slow
def test_trains_well_with_leave_one_out():
    # From ~45 nats at initialization to below the factorized Bernoulli baseline (24.5).
    metrics = discrete_vae.run(num_steps=800, estimator="score_function", num_eval_samples=20, variance_estimators=None)
    assert metrics["initial_nll_bound"] > 40
    assert metrics["metric"] < metrics["baseline"], metrics


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["score_function_none", "moving_average", "measure_valued", "disarm", "arm"])
def test_every_estimator_improves_the_bound(estimator):
    # Unbiased estimators all move the bound down: clearly within 100 small steps.
    metrics = discrete_vae.run(
        num_steps=100, estimator=estimator, batch_size=8, num_eval_samples=10, variance_estimators=None
    )
    assert metrics["metric"] < metrics["initial_nll_bound"] - 5.0, metrics


def test_baselines_and_measure_valued_lower_the_variance():
    # Same params, same minibatch, same keys: leave-one-out, a warmed-up moving average and
    # measure-valued gradients of the encoder vary far less than the plain score function
    # (observed at these keys: ~3700x, ~3600x and ~10^6x less).
    vae = discrete_vae.make_discrete_vae(key=jax.random.key(0))
    params = discrete_vae.initial_params(vae)
    batch = jnp.asarray(data.binarized_digits().train[:8])
    table = discrete_vae.compare_variances(
        vae, params, batch, jax.random.key(1), num_repeats=32,
        names=("score_function_none", "score_function", "moving_average", "measure_valued"),
    )
    variance = table["encoder_variance"]
    assert variance["score_function"] < 0.3 * variance["score_function_none"], table
    assert variance["moving_average"] < 0.3 * variance["score_function_none"], table
    assert variance["measure_valued"] < 0.3 * variance["score_function_none"], table
    # The decoder's gradient does not go through the estimator: similar across estimators.
    decoder = table["decoder_variance"]
    assert decoder.max() < 3.0 * decoder.min(), table


def test_disarm_is_the_default():
    assert discrete_vae.DEFAULT_ESTIMATOR == "disarm"
    assert discrete_vae.estimator_from_name("default").name == "disarm"
    assert discrete_vae.estimator_from_name("straight_through_gumbel").bias is not None
    assert {"disarm", "arm", "straight_through_gumbel"} <= set(discrete_vae.ESTIMATORS)


def test_gradient_variance_refuses_params_of_another_shape():
    vae = discrete_vae.make_discrete_vae(latent_dim=3, hidden=8, key=jax.random.key(0))
    batch = jnp.asarray(data.binarized_digits().train[:4])
    estimator = discrete_vae.estimator_from_name("score_function")
    with pytest.raises(ValueError, match="initial_params"):
        discrete_vae.gradient_variance(vae, {"encoder$params": 0.0}, batch, estimator, jax.random.key(3))

"""mcgrad.diagnostics against the exact variances of REFERENCE.md.

Problem: x ~ N(μ = 1, σ = 1), f(x) = x² (k = 0, a = μ − k = 1). Exact single-sample
variances (μ / σ): score function 30 / 136, pathwise 4 / 12, coupled measure-valued
(16/π − 4) / 8. The variance of an N-sample estimate is that divided by N. Tolerances are
5 standard errors of the variance estimate, from the fourth central moment of an
independent set of estimates.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pandas as pd
import pytest
from matplotlib.figure import Figure

import mcgrad as mg

NUM_SAMPLES = 10
NUM_REPEATS = 2000
PARAMS = {"loc": 1.0, "scale": 1.0}
EXACT_GRADIENT = {"loc": 2.0, "scale": 2.0}  # ∇ E[x²] = (2μ, 2σ)
EXACT_VARIANCE = {  # single sample, (μ, σ)
    "score_function": (30.0, 136.0),
    "pathwise": (4.0, 12.0),
    "measure_valued": (16.0 / math.pi - 4.0, 8.0),
}
ESTIMATORS = {
    "score_function": mg.score_function,
    "pathwise": mg.pathwise,
    "measure_valued": mg.measure_valued,
}


def cost(x):
    return x**2


def normal(params):
    return dist.Normal(params["loc"], params["scale"])


def variance_standard_error(samples: np.ndarray) -> float:
    """Standard error of the sample variance: sqrt((m₄ − v²) / R)."""
    centred = samples - samples.mean()
    fourth, variance = np.mean(centred**4), np.mean(centred**2)
    return float(np.sqrt((fourth - variance**2) / len(samples)))


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_diagnose_against_exact(name):
    """Variance, bias, SNR and cost of one estimator (one test per estimator, so that
    xdist computes its estimates once)."""
    estimator = ESTIMATORS[name]()
    result = mg.diagnose(
        cost,
        normal,
        estimator,
        PARAMS,
        key=jax.random.key(0),
        num_samples=NUM_SAMPLES,
        num_repeats=NUM_REPEATS,
        exact=EXACT_GRADIENT,
        num_timing_runs=2,
    )
    grad_fn = mg.grad(cost, normal, estimator=estimator, num_samples=NUM_SAMPLES)
    keys = jax.random.split(jax.random.key(1), NUM_REPEATS)
    independent = jax.tree.map(np.asarray, jax.jit(jax.vmap(grad_fn, in_axes=(None, 0)))(PARAMS, keys))

    # Variance against the exact single-sample variance / N.
    for index, parameter in enumerate(["loc", "scale"]):
        exact = EXACT_VARIANCE[name][index] / NUM_SAMPLES
        tolerance = 5 * variance_standard_error(independent[parameter])
        assert abs(float(result.variance[parameter]) - exact) < tolerance, (name, parameter)
    assert float(result.total_variance) == pytest.approx(
        float(result.variance["loc"] + result.variance["scale"]), rel=1e-6
    )
    total = sum(EXACT_VARIANCE[name]) / NUM_SAMPLES
    assert abs(float(result.total_variance) - total) < 5 * math.hypot(
        *(variance_standard_error(independent[p]) for p in ("loc", "scale"))
    )

    # Unbiased within 5 standard errors, and the standard error is sqrt(V / R).
    for parameter in ("loc", "scale"):
        standard_error = float(result.bias_standard_error[parameter])
        assert standard_error == pytest.approx(math.sqrt(float(result.variance[parameter]) / NUM_REPEATS), rel=1e-5)
        assert abs(float(result.bias[parameter])) < 5 * standard_error, (name, parameter)
        assert float(result.mean[parameter]) == pytest.approx(2.0 + float(result.bias[parameter]), abs=1e-5)

    # SNR and cost.
    for parameter in ("loc", "scale"):
        expected = abs(float(result.mean[parameter])) / math.sqrt(float(result.variance[parameter]))
        assert float(result.snr[parameter]) == pytest.approx(expected, rel=1e-5)
    expected_evaluations = NUM_SAMPLES * (1 + 2 * 2) if name == "measure_valued" else NUM_SAMPLES
    assert result.num_evaluations == expected_evaluations
    assert result.seconds > 0
    assert result.efficiency == pytest.approx(1.0 / (float(result.total_variance) * result.seconds))
    assert (result.num_samples, result.num_repeats) == (NUM_SAMPLES, NUM_REPEATS)


def test_gradient_statistics_by_hand():
    gradients = {"a": jnp.array([[1.0, 2.0], [3.0, 2.0], [5.0, 2.0]]), "b": jnp.array([0.0, 1.0, 2.0])}
    stats = jax.jit(mg.gradient_statistics)(gradients, {"a": jnp.array([2.0, 2.0]), "b": 1.0})
    np.testing.assert_allclose(stats.mean["a"], [3.0, 2.0])
    np.testing.assert_allclose(stats.variance["a"], [4.0, 0.0])
    np.testing.assert_allclose(stats.variance["b"], 1.0)
    np.testing.assert_allclose(stats.total_variance, 5.0)
    np.testing.assert_allclose(stats.snr["a"][0], 1.5)
    assert np.isinf(stats.snr["a"][1])  # no noise at all
    np.testing.assert_allclose(stats.bias["a"], [1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(stats.bias_standard_error["a"], [2.0 / math.sqrt(3.0), 0.0], atol=1e-6)
    without_exact = mg.gradient_statistics(gradients)
    assert without_exact.bias is None and without_exact.bias_standard_error is None


def test_gradient_statistics_needs_two():
    with pytest.raises(ValueError, match="at least 2"):
        mg.gradient_statistics(jnp.ones((1, 3)))


def test_count_evaluations():
    assert mg.count_evaluations(cost, normal, mg.pathwise(), PARAMS, num_samples=7) == 7
    vector = lambda p: dist.Normal(p["loc"], p["scale"]).to_event(1)
    params = {"loc": jnp.zeros(3), "scale": jnp.ones(3)}
    with jax.numpy_rank_promotion("allow"):  # NumPyro broadcasts batch shapes implicitly
        count = mg.count_evaluations(lambda x: jnp.sum(x), vector, mg.measure_valued(), params, num_samples=4)
    assert count == 4 + 2 * 6 * 4


def test_compare_table_and_figure():
    estimators = {"score function": mg.score_function(), "pathwise": mg.pathwise()}
    result = mg.compare(
        cost,
        normal,
        estimators,
        PARAMS,
        key=jax.random.key(2),
        num_samples=NUM_SAMPLES,
        num_repeats=200,
        exact=EXACT_GRADIENT,
        num_timing_runs=2,
    )
    assert isinstance(result.table, pd.DataFrame)
    assert list(result.table.index) == list(estimators)
    for column in [
        "num_samples",
        "num_evaluations",
        "seconds",
        "total_variance",
        "efficiency",
        "mean_snr",
        "variance[loc]",
        "variance[scale]",
        "snr[loc]",
        "snr[scale]",
        "bias_norm",
        "max_bias_z",
    ]:
        assert column in result.table.columns, column
    assert result.table["total_variance"].idxmin() == "pathwise"
    assert isinstance(result.figure, Figure) and len(result.figure.axes) == 3
    assert set(result.diagnostics) == set(estimators)
    row = result.table.loc["pathwise"]
    assert row["variance[loc]"] == pytest.approx(float(result.diagnostics["pathwise"].variance["loc"]))


def test_variance_sweep_pathwise_is_exact():
    """Pathwise's per-sample ∂μ of (x − k)² is 2(x − k): variance 4σ² for every k,
    with standard error 4·sqrt(2/N) (Gaussian)."""
    num_samples = 20_000
    grid = jnp.array([-2.0, 0.0, 3.0])
    table = mg.variance_sweep(
        {"quadratic": lambda x, k: (x - k) ** 2},
        normal,
        {"pathwise": mg.pathwise()},
        PARAMS,
        {"quadratic": grid},
        key=jax.random.key(3),
        num_samples=num_samples,
    )
    assert list(table.columns) == [
        "cost",
        "k",
        "estimator",
        "parameter",
        "mean",
        "variance",
        "evaluations_per_sample",
        "variance_x_evaluations",
    ]
    assert len(table) == len(grid) * 2
    loc = table[table["parameter"] == "loc"]
    np.testing.assert_allclose(loc["variance"], 4.0, atol=5 * 4.0 * math.sqrt(2.0 / num_samples))
    np.testing.assert_allclose(loc["mean"], 2.0 * (1.0 - np.asarray(grid)), atol=5 * 2.0 / math.sqrt(num_samples))
    assert (table["evaluations_per_sample"] == 1.0).all()


def test_coordinate_names():
    params = {"w": jnp.zeros((2, 2)), "b": 0.0}
    assert mg.diagnostics.coordinate_names(params) == ["b", "w[0,0]", "w[0,1]", "w[1,0]", "w[1,1]"]
    assert mg.diagnostics.coordinate_names(1.0) == ["params"]


def test_noiseless_estimator_has_infinite_efficiency():
    """The delta method (coefficient 1) makes the score function exact on a quadratic:
    zero variance up to float rounding."""
    estimator = mg.with_control_variate(mg.score_function(), mg.control_variates.delta_method(), coefficient=1.0)
    result = mg.diagnose(
        cost, normal, estimator, PARAMS, key=jax.random.key(4), num_samples=5, num_repeats=4, num_timing_runs=1
    )
    assert float(result.total_variance) < 1e-8
    assert result.efficiency > 1e6


def test_biased_relaxations_are_flagged_and_measured_against_an_unbiased_reference():
    # No exact gradient given: the Gumbel rows' bias is measured against enumeration, and
    # they are left out of the ranking however small their variance.
    bernoulli = lambda p: dist.Bernoulli(logits=p).to_event(1)  # noqa: E731
    estimators = {"disarm": mg.disarm(), "straight_through": mg.gumbel_softmax(0.5, straight_through=True)}
    with jax.numpy_rank_promotion("allow"):
        result = mg.compare(
            lambda b: jnp.sum((b - 0.45) ** 2), bernoulli, estimators, jnp.array([0.0, 2.0, -2.0]),
            key=jax.random.key(0), num_samples=2, num_repeats=400,
        )
    table = result.table
    assert table.loc["straight_through", "flag"].startswith("biased")
    assert table.loc["straight_through", "max_bias_z"] > 5  # measurably off the reference
    assert np.isnan(table.loc["straight_through", "rank"]) and result.best == "disarm"
    assert table.loc["disarm", "flag"] == ""


def test_a_noisy_reference_widens_the_bias_standard_error():
    biased = mg.pathwise()._replace(bias="biased: for the test")  # unbiased in fact; not enumerable
    d = mg.diagnose(lambda x: x ** 2, lambda p: dist.Normal(p, 1.0), biased, 1.0,
                    key=jax.random.key(0), num_samples=4, num_repeats=400)
    assert d.flag == "biased: for the test" and math.isnan(d.efficiency)
    assert abs(d.bias) < 5 * d.bias_standard_error
    assert d.bias_standard_error > np.sqrt(d.variance / 400)  # the score-function reference's noise

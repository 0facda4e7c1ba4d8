"""Variance: REFERENCE.md's single-sample variance table for the quadratic cost, and the
orderings theory guarantees (coupling lowers the measure-valued variance).

For f(x) = (x − k)², x ~ N(μ, σ²), a = μ − k, the per-sample gradients of each estimator
have the variances below (both ∂μ and ∂σ). The empirical variance of ``N`` i.i.d.
per-sample gradients is compared with them within 5 standard errors of a sample
variance, ``SE = sqrt((m4 − s⁴) / N)`` with ``m4`` the fourth central moment.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import mcgrad as mg

from .problems import FAST_COMPILE

NUM_SAMPLES = 200_000


def exact_variances(mu, sigma, k):
    a = mu - k
    return {
        "score_function": (
            a**4 / sigma**2 + 14 * a**2 + 15 * sigma**2,
            2 * a**4 / sigma**2 + 60 * a**2 + 74 * sigma**2,
        ),
        "score_function-baseline_Ef": (8 * a**2 + 10 * sigma**2, 40 * a**2 + 56 * sigma**2),
        "pathwise": (4 * sigma**2, 4 * a**2 + 8 * sigma**2),
        "measure_valued": ((16 / math.pi - 4) * a**2, 4 * a**2 + 4 * sigma**2),
    }


def variance_and_se(samples):
    """Unbiased sample variance and its standard error from the fourth central moment."""
    x = np.asarray(samples, np.float64)
    centred = x - x.mean()
    variance = centred.var(ddof=1)
    m4 = np.mean(centred**4)
    return variance, math.sqrt(max(m4 - variance**2, 0.0) / x.size)


def normal(params):
    return dist.Normal(params["loc"], params["scale"])


def _per_sample_quadratic(params, k, key):
    """Per-sample gradients of every estimator of the table (plus uncoupled MV) on (x − k)²."""
    cost = lambda x: (x - k) ** 2  # noqa: E731
    expected = (params["loc"] - k) ** 2 + params["scale"] ** 2
    estimators = {
        "score_function": mg.score_function(),
        "score_function-baseline_Ef": mg.score_function(mg.baselines.constant(jax.lax.stop_gradient(expected))),
        "pathwise": mg.pathwise(),
        "measure_valued": mg.measure_valued(),
        "measure_valued-uncoupled": mg.measure_valued(coupling=False),
    }
    return {
        name: mg.per_sample_grads(cost, normal, estimator=estimator, num_samples=NUM_SAMPLES)(params, key)
        for name, estimator in estimators.items()
    }


_compiled = jax.jit(_per_sample_quadratic, compiler_options=FAST_COMPILE)

POINTS = [(1.0, 1.0, 0.0), (-0.5, 1.5, 1.0)]  # (μ, σ, k): REFERENCE.md's point, and a = −1.5


@pytest.mark.parametrize("point", POINTS, ids=lambda p: "mu={}, sigma={}, k={}".format(*p))
def test_variances(point):
    """One set of per-sample gradients per point, shared by the checks below."""
    mu, sigma, k = point
    params = {"loc": jnp.float32(mu), "scale": jnp.float32(sigma)}
    point_and_grads = point, _compiled(params, jnp.float32(k), jax.random.key(7))
    check_variance_table(point_and_grads)
    check_coupling_lowers_measure_valued_variance(point_and_grads)
    check_baseline_Ef_and_pathwise_beat_plain_score_function(point_and_grads)


def check_variance_table(point_and_grads):
    (mu, sigma, k), grads = point_and_grads
    lines, failures = [], []
    for name, (var_mu, var_sigma) in exact_variances(mu, sigma, k).items():
        for parameter, exact in (("loc", var_mu), ("scale", var_sigma)):
            empirical, se = variance_and_se(grads[name][parameter])
            line = f"{name} ∂{parameter}: empirical {empirical:.4f} exact {exact:.4f} se {se:.4f}"
            lines.append(line)
            # A zero exact variance (coupled MV ∂μ at a = 0) must come out zero.
            if abs(empirical - exact) > 5 * se + 1e-6 * (1 + exact):
                failures.append(line)
    print("\n".join(lines))
    assert not failures, "\n".join(failures)


def test_reference_point_values():
    """The table's own numbers at μ = σ = 1, k = 0."""
    table = exact_variances(1.0, 1.0, 0.0)
    assert table["score_function"] == (30.0, 136.0)
    assert table["pathwise"] == (4.0, 12.0)
    assert table["measure_valued"][0] == pytest.approx(1.093, abs=1e-3)
    assert table["measure_valued"][1] == 8.0


def variance_gap_and_se(higher, lower):
    """Var(higher) − Var(lower) and its SE, from paired per-sample gradients (same draws)."""
    a, b = (np.asarray(v, np.float64) for v in (higher, lower))
    d = (a - a.mean()) ** 2 - (b - b.mean()) ** 2
    return d.mean(), d.std(ddof=1) / math.sqrt(d.size)


def check_coupling_lowers_measure_valued_variance(point_and_grads):
    _, grads = point_and_grads
    for parameter in ("loc", "scale"):
        gap, se = variance_gap_and_se(grads["measure_valued-uncoupled"][parameter], grads["measure_valued"][parameter])
        assert gap > 5 * se, (parameter, gap, se)


def check_baseline_Ef_and_pathwise_beat_plain_score_function(point_and_grads):
    _, grads = point_and_grads
    for parameter in ("loc", "scale"):
        for better in ("score_function-baseline_Ef", "pathwise"):
            gap, se = variance_gap_and_se(grads["score_function"][parameter], grads[better][parameter])
            assert gap > 5 * se, (better, parameter, gap, se)

"""``mg.diagnose`` / ``mg.compare``: clear errors for invalid counts, and a non-differentiable
cost flagged for pathwise instead of silently ranked best with zero variance.

For a step ``f(x) = 1[x > 0]`` under ``N(μ, σ)`` the exact gradient is
``∂μ Φ(μ/σ) = φ(μ/σ)/σ`` (and ``−μ φ(μ/σ)/σ²`` in σ), but every pathwise estimate is
exactly ``0`` (the derivative of a step is ``0`` wherever it exists): variance ``0``,
efficiency ``inf``, and biased.
"""

import math

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
import pytest

import mcgrad as mg

PARAMS = {"loc": 0.3, "scale": 1.0}


def normal(params):
    return dist.Normal(params["loc"], params["scale"])


def step(x):
    return jnp.where(x > 0, 1.0, 0.0)


def density(z):
    return math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


EXACT = {"loc": density(0.3), "scale": -0.3 * density(0.3)}  # φ(μ/σ)/σ, −μ φ(μ/σ)/σ² at σ = 1
RUN = {"key": jax.random.key(0), "num_samples": 10, "num_repeats": 100, "num_timing_runs": 1}


@pytest.mark.parametrize("field, value", [("num_samples", 0), ("num_samples", -3), ("num_samples", 2.5),
                                          ("num_samples", True), ("num_repeats", 1), ("num_repeats", 0),
                                          ("num_timing_runs", 0)])
def test_invalid_counts_are_clear_errors(field, value):
    with pytest.raises(ValueError, match=rf"{field} must be a whole number >= \d, got {value!r}"):
        mg.diagnose(step, normal, mg.score_function(), PARAMS, **{**RUN, field: value})
    with pytest.raises(ValueError, match=rf"{field} must be a whole number"):
        mg.compare(step, normal, {"score function": mg.score_function()}, PARAMS, **{**RUN, field: value})


def test_count_evaluations_needs_a_sample():
    with pytest.raises(ValueError, match=r"num_samples must be a whole number >= 1, got 0"):
        mg.count_evaluations(step, normal, mg.pathwise(), PARAMS, num_samples=0)


def test_variance_sweep_needs_two_samples():
    with pytest.raises(ValueError, match=r"num_samples must be a whole number >= 2"):
        mg.variance_sweep({"step": lambda x, k: step(x - k)}, normal, {"pathwise": mg.pathwise()}, PARAMS,
                          {"step": jnp.array([0.0])}, key=jax.random.key(0), num_samples=1)


@pytest.mark.parametrize("cost_fn", [step, jnp.floor], ids=["step", "floor"])
def test_compare_flags_pathwise_on_a_non_differentiable_cost(cost_fn):
    estimators = {"score function": mg.score_function(), "pathwise": mg.pathwise(), "measure-valued": mg.measure_valued()}
    with pytest.warns(UserWarning, match=r"estimator 'pathwise'.*biased for non-differentiable costs") as caught:
        result = mg.compare(cost_fn, normal, estimators, PARAMS, **RUN)
    flagged = [w for w in caught if "non-differentiable" in str(w.message)]
    assert len(flagged) == 1 and flagged[0].filename == __file__  # one warning, at the caller's line
    table = result.table
    assert table.loc["pathwise", "flag"] == "biased: non-differentiable cost"
    assert table.loc["pathwise", "total_variance"] == 0.0  # what made it look best
    assert math.isnan(table.loc["pathwise", "efficiency"]) and math.isnan(table.loc["pathwise", "rank"])
    assert (table.loc[["score function", "measure-valued"], "flag"] == "").all()
    assert sorted(table["rank"].dropna()) == [1.0, 2.0]
    assert result.best in ("score function", "measure-valued") and table.loc[result.best, "rank"] == 1.0
    assert result.diagnostics["pathwise"].flag == "biased: non-differentiable cost"


def test_diagnose_flags_pathwise_and_not_score_function():
    with pytest.warns(UserWarning, match=r"estimator 'pathwise'.*mg.score_function\(\) or mg.measure_valued\(\)"):
        flagged = mg.diagnose(step, normal, mg.pathwise(), PARAMS, exact=EXACT, **RUN)
    assert flagged.flag == "biased: non-differentiable cost" and math.isnan(flagged.efficiency)
    assert float(flagged.bias["loc"]) == pytest.approx(-EXACT["loc"])  # every estimate 0: biased by −∇
    fine = mg.diagnose(step, normal, mg.score_function(), PARAMS, exact=EXACT, **{**RUN, "num_repeats": 400})
    assert fine.flag == "" and fine.efficiency > 0
    assert abs(float(fine.bias["loc"])) < 5 * float(fine.bias_standard_error["loc"])


def test_differentiable_and_constant_costs_are_not_flagged(recwarn):
    """A smooth cost, and a constant one (its gradient is truly 0), rank as before."""
    result = mg.compare(lambda x: x**2, normal, {"pathwise": mg.pathwise(), "score function": mg.score_function()},
                        PARAMS, **RUN)
    assert (result.table["flag"] == "").all() and result.best == "pathwise"
    constant = mg.diagnose(lambda x: 0.0 * x + 1.0, normal, mg.pathwise(), PARAMS, **RUN)
    assert constant.flag == "" and constant.efficiency == math.inf
    assert not [w for w in recwarn if "non-differentiable" in str(w.message)]

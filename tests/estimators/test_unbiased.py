"""Unbiasedness: every estimator × every problem × every cost, within 5 standard errors.

One compiled program per problem runs every applicable estimator on every cost (see
``problems.estimate_all``). Estimators whose per-sample terms are i.i.d. take their SE
from the per-sample gradients (``mg.per_sample_grads``); those whose terms are coupled
(leave-one-out and optimal-constant baselines, the control variates' leave-one-out
coefficient, measure-valued's leave-one-out score fallback) or that carry state
(moving-average and learned baselines, stepped a few times first) take it from repeated
independent estimates (``jax.vmap`` over keys of ``mg.estimate``).

Not in the matrix, because the estimator is biased there by construction:

* the score function (any baseline) on Uniform: its support depends on θ, so
  E[∇θ log p] ≠ 0 and the boundary term of the derivative is missing;
* pathwise with the step cost: its pathwise derivative is zero almost everywhere;
* a per-coordinate baseline (``optimal_constant``) on raw Categorical probabilities:
  ``log_prob`` is not normalised off the simplex, so E[∂ log p / ∂p_k] = 1, not 0, and a
  different constant per coordinate shifts the estimate off the tangent space (there
  b_k = f(k) exactly and the estimate is 0); logits and normalised weights
  (``categorical_logits``, ``categorical_weights``) are in the matrix;
* the delta method on Categorical (NumPyro gives it no mean).

Raw Categorical probabilities (``categorical_probs``) are compared on the simplex: the
expectation is only defined there, so only the gradient's tangent component
``g − mean(g)`` is; measure-valued returns ``f(k) − E f`` and the score function ``f(k)``,
which agree there. ``categorical_weights`` (probs = w / Σw) checks the full gradient
through the normalisation.
"""

import jax
import pytest

from .problems import ESTIMATORS, PROBLEMS, assert_within_se, estimate_all, exact_gradient

NUM_SAMPLES = 50_000  # i.i.d. per-sample gradients
NUM_REPEATS, REPEAT_SAMPLES = 400, 64  # repeated independent estimates


def applicable(problem):
    specs = [spec for spec in ESTIMATORS if spec.applies(problem)]
    if problem.projected:
        specs = [spec for spec in specs if spec.name != "score_function-optimal_constant"]
    return specs


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.name)
def test_unbiased(problem):
    specs = applicable(problem)
    results = estimate_all(
        problem,
        specs,
        jax.random.key(20200101),
        num_samples=NUM_SAMPLES,
        num_repeats=NUM_REPEATS,
        repeat_samples=REPEAT_SAMPLES,
    )
    failures = []
    for spec in specs:
        estimates = results[spec.name]
        for cost in spec.costs():
            exact = problem.project(exact_gradient(problem.name, cost.name))
            try:
                assert_within_se(
                    estimates.mean[cost.name], estimates.se[cost.name], exact, f"{spec.name} / {cost.name}: "
                )
            except AssertionError as error:
                failures.append(str(error))
    assert not failures, f"{len(failures)} biased (estimator, cost) pairs on {problem.name}:\n" + "\n".join(failures)


def test_matrix_covers_the_acceptance_list():
    """Every estimator runs on every family it applies to (guards the registry itself)."""
    covered = {(spec.name, problem.name) for problem in PROBLEMS for spec in applicable(problem)}
    families = [
        "normal",
        "bernoulli_probs",
        "bernoulli_logits",
        "categorical_probs",
        "categorical_logits",
        "poisson",
        "exponential",
        "gamma",
        "weibull",
        "uniform",
    ]
    for spec in ESTIMATORS:
        for family in families:
            problem = next(p for p in PROBLEMS if p.name == family)
            expected = spec.applies(problem) and not (problem.projected and spec.name.endswith("optimal_constant"))
            assert ((spec.name, family) in covered) == expected
    for family in ["gamma", "beta", "dirichlet"]:
        assert ("pathwise", family) in covered
    for name in ["measure_valued", "measure_valued-uncoupled"]:
        assert all((name, f) in covered for f in families)
    assert all(("score_function", f) in covered for f in families if f != "uniform")

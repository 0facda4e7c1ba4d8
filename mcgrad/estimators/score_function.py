"""The score-function (REINFORCE, likelihood-ratio) estimator."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpyro

from mcgrad import baselines as baselines_lib
from mcgrad.estimators.base import (
    EstimatorInfo,
    GradientEstimator,
    Problem,
    describe,
    evaluate_costs,
    gradient_only,
    linear_surrogate,
)


def sample_log_probs(distribution, samples: jax.Array) -> jax.Array:
    """``log p(x_i)`` of the distribution's own samples, summed over every non-sample axis:
    shape ``[N]``.

    NumPyro's support check (on by default: values outside the support get ``-inf``) is
    skipped: these samples are in the support by construction, and at small sizes the
    check is about a third of a score-function estimate.
    """
    with numpyro.validation_enabled(False):
        log_probs = distribution.log_prob(samples)
    return jnp.reshape(log_probs, (samples.shape[0], -1)).sum(axis=1)


def _depends_on_inputs(jaxpr) -> bool:
    """Whether any output of ``jaxpr`` is computed from its inputs (conservatively: an
    equation with a dependent input makes all its outputs dependent)."""
    dependent = set(jaxpr.invars)

    def is_dependent(var) -> bool:
        return isinstance(var, jax.extend.core.Var) and var in dependent

    for equation in jaxpr.eqns:
        if any(is_dependent(var) for var in equation.invars):
            dependent.update(equation.outvars)
    return any(is_dependent(var) for var in jaxpr.outvars)


def require_fixed_support(problem: Problem, params) -> None:
    """Raise a clear error when the support of ``dist_fn(params)`` moves with ``params``
    (``Uniform(0, θ)``, ``Pareto``'s scale): the score-function identity then misses the
    boundary term and the estimate is biased."""

    def bounds(p):
        support = problem.dist_fn(p).support
        while hasattr(support, "base_constraint"):
            support = support.base_constraint
        return [jnp.asarray(getattr(support, name)) for name in ("lower_bound", "upper_bound") if hasattr(support, name)]

    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), params)
    if _depends_on_inputs(jax.make_jaxpr(bounds)(abstract).jaxpr):
        name = describe(problem.dist_fn(params))
        raise ValueError(
            f"score_function() at site '{problem.site}': the support of {name} depends on the "
            "parameters, so the score-function estimate would be biased (it misses the moving "
            "boundary). Use mg.measure_valued() (weak derivatives are registered for Uniform) "
            "or mg.pathwise()."
        )


def score_function(baseline: baselines_lib.Baseline | None = None) -> GradientEstimator:
    r"""Score-function (REINFORCE) gradient estimator with an optional baseline.

    .. math::  ∇_θ E_{p_θ}[f] ≈ \frac1N \sum_i \big(f(x_i) − b_i\big)\, ∇_θ \log p_θ(x_i)

    The learning signal ``f(x_i)`` passes through ``baseline`` (see :mod:`mcgrad.baselines`)
    before it multiplies the score; a baseline independent of ``x_i`` keeps it unbiased.

    Requires: ``log_prob`` differentiable in θ. Works for discrete and continuous ``x`` and
    for costs that are not differentiable (or not even continuous).
    Cost: ``N`` evaluations of ``f``, no derivative of ``f``.

    Args:
        baseline: a :class:`mcgrad.baselines.Baseline`; ``None`` for none.

    Example:
        >>> import jax, mcgrad as mg, numpyro.distributions as dist
        >>> estimator = mg.score_function(baseline=mg.baselines.leave_one_out())
        >>> g = mg.grad(lambda x: 1.0 * x, lambda p: dist.Bernoulli(probs=p),
        ...             estimator=estimator, num_samples=1000)(0.3, jax.random.key(0))
        >>> bool(abs(g - 1.0) < 0.1)   # ∂p E[x] = 1
        True

    Reference: Williams (1992); Mohamed et al. (2020), §4.
    """
    baseline = baseline if baseline is not None else baselines_lib.none()

    def surrogate(key: jax.Array, params, state, problem: Problem):
        require_fixed_support(problem, params)
        distribution = problem.dist_fn(params)
        samples = jax.lax.stop_gradient(distribution.sample(key, (problem.num_samples,)))
        costs = evaluate_costs(problem.cost_fn, samples, problem.site)

        def log_probs(p):
            return sample_log_probs(problem.dist_fn(p), samples)

        def scores():
            num_coordinates = sum(jnp.size(leaf) for leaf in jax.tree.leaves(params))
            jacobian = jax.jacfwd if num_coordinates < problem.num_samples else jax.jacrev
            return jacobian(log_probs)(params)

        context = baselines_lib.BaselineContext(scores=scores, num_samples=problem.num_samples)
        signal, new_state = baseline.update(jax.lax.stop_gradient(costs), state, context)
        if isinstance(signal, jax.Array) and signal.shape == costs.shape:
            s = costs + jax.lax.stop_gradient(signal) * gradient_only(log_probs(params))
        else:  # a per-parameter signal: gradients G_i = signal_i ⊙ ∇θ log p(x_i)
            per_sample = jax.tree.map(lambda b, j: _broadcast_mul(b, j), signal, scores())
            s = linear_surrogate(costs, params, per_sample)
        info = EstimatorInfo(jax.lax.stop_gradient(costs), problem.num_samples)
        return s, (new_state, info)

    return GradientEstimator(baseline.init, surrogate, {"name": "score_function", "baseline": baseline})


def _broadcast_mul(signal: jax.Array, scores: jax.Array) -> jax.Array:
    signal = jnp.reshape(signal, signal.shape + (1,) * (scores.ndim - signal.ndim))
    return signal * scores

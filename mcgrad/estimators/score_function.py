"""The score-function (REINFORCE, likelihood-ratio) estimator."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mcgrad import baselines as baselines_lib
from mcgrad.estimators.base import (
    GradientEstimator,
    Site,
    SiteInfo,
    check_instance,
    draw_without_gradient,
    gradient_only,
    linear_terms,
    row_sum,
)
from mcgrad.estimators.distributions import describe, own_log_prob, sum_to_shape


def require_fixed_support(distribution, site: str) -> None:
    """Raise a clear error when the support of ``distribution`` moves with traced values
    (``Uniform(0, θ)``, ``Pareto``'s scale): the score-function identity then misses the
    boundary term and the estimate is biased. Constant bounds pass."""
    support = distribution.support
    while hasattr(support, "base_constraint"):
        support = support.base_constraint
    bounds = [getattr(support, name) for name in ("lower_bound", "upper_bound") if hasattr(support, name)]
    if any(isinstance(bound, jax.core.Tracer) for bound in bounds):
        raise ValueError(
            f"score_function() at site '{site}': the support of {describe(distribution)} depends on the "
            "parameters, so the score-function estimate would be biased (it misses the moving "
            "boundary). Use mg.measure_valued() (weak derivatives are registered for Uniform) "
            "or mg.pathwise()."
        )


def score_function(baseline: baselines_lib.Baseline | None = None) -> GradientEstimator:
    r"""Score-function (REINFORCE) gradient estimator with an optional baseline.

    .. math::  ∇_θ E_{p_θ}[f] ≈ \frac1N \sum_i \big(f(x_i) − b_i\big)\, ∇_θ \log p_θ(x_i)

    The learning signal ``f(x_i)`` passes through ``baseline`` (see :mod:`mcgrad.baselines`)
    before it multiplies the score; a baseline independent of ``x_i`` keeps it unbiased.
    At a sample site of a model, ``f(x_i)`` is the Rao-Blackwellized cost of the site's
    row (per plate slice), and ``∇θ log p`` flows through the site's distribution.

    Requires: ``log_prob`` differentiable in θ and a support that does not move with θ.
    Works for discrete and continuous ``x`` and for costs that are not differentiable (or
    not even continuous).
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
    check_instance(baseline, baselines_lib.Baseline, "score_function(baseline=...)", "mg.baselines.leave_one_out()")

    def terms(key: jax.Array, state, site: Site):
        num_rows = site.num_rows

        def log_probs(parameters):  # [N, *s], summed down to the learning signal's shape
            per_row = site.map(own_log_prob, parameters, site.value)
            return sum_to_shape(per_row, site.cost.shape)

        def scores():
            return site.jacobian(lambda p: row_sum(log_probs(p), num_rows), site.parameters)

        context = baselines_lib.BaselineContext(
            scores=scores if site.free_parameters else _no_scores, num_samples=num_rows, leave_one_out=site.leave_one_out
        )
        signal, new_state = baseline.update(site.cost, state, context)
        if isinstance(signal, jax.Array) and signal.shape == site.cost.shape:
            terms = row_sum(jax.lax.stop_gradient(signal) * gradient_only(log_probs(site.parameters)), num_rows)
        else:  # a per-parameter signal: per-row gradients signal_i ⊙ ∇ log p(x_i)
            per_row = jax.tree.map(_broadcast_mul, signal, scores())
            terms = linear_terms(site.parameters, per_row, num_rows)
        return terms, new_state, SiteInfo()

    return GradientEstimator(baseline.init, draw_without_gradient, terms, require_fixed_support, "score_function")


def _no_scores():
    raise ValueError(
        "baselines.optimal_constant() needs per-sample scores with respect to free parameters, which a "
        "sample site of a model does not expose (its distribution's parameters may be constrained, e.g. "
        "probabilities on a simplex); use leave_one_out(), moving_average() or learned() there."
    )


def _broadcast_mul(signal: jax.Array, scores: jax.Array) -> jax.Array:
    signal = jnp.reshape(signal, signal.shape + (1,) * (scores.ndim - signal.ndim))
    return signal * scores

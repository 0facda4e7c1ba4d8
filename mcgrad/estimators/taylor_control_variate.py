r"""The double control variate for Bernoulli sites: leave-one-out plus a Taylor term.

With ``K ≥ 2`` rows ``b_1 … b_K`` of a Bernoulli site (logits ``φ``, ``θ = σ(φ)``), the
leave-one-out score function uses the other rows' mean cost as the baseline. The double
control variate adds a second, *global* one: a first-order Taylor term of the cost built
from the other rows' gradients ``g_{−k} = mean_{j≠k} ∇_b f(b_j)`` (the cost
differentiated with respect to the latent at its binary value),

.. math::

    F_k = f(b_k) + α\, g_{−k}ᵀ (b_k − θ),\qquad
    ĝ = \frac1K \sum_k \Big(F_k − \frac{1}{K−1}\sum_{j≠k} F_j\Big)(b_k − θ) \;−\; α\,\bar g ⊙ θ(1 − θ),

where ``ḡ`` is the mean of all rows' gradients: the last term is the exact expectation
of what the Taylor terms add, so ``ĝ`` is unbiased for any ``α``. The scalar ``α`` lives
in the estimator state and takes one optimizer step per estimate down ``Σ ĝ²`` (the
variance of the logits' gradient, up to a constant).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpyro
import optax

from mcgrad.estimators.base import (
    GradientEstimator,
    Site,
    SiteInfo,
    draw_without_gradient,
    gradient_only,
    per_coordinate,
    row_sum,
)
from mcgrad.estimators.distributions import bernoulli_logits, check_bernoulli

Array = jax.Array


class TaylorState(NamedTuple):
    """The Taylor term's weight ``α`` and its optimizer's state."""

    alpha: Array
    optimizer: Any


def _leave_one_out_mean(x: Array) -> Array:
    """Row ``k``: the mean of the other rows (leading axis)."""
    return (jnp.sum(x, axis=0, keepdims=True) - x) / (x.shape[0] - 1)


def double_control_variate(alpha: float = 0.0, learning_rate: float = 1e-2) -> GradientEstimator:
    r"""Leave-one-out score function with a second, Taylor-expansion control variate.

    See :mod:`mcgrad.estimators.taylor_control_variate` for the estimator. With
    ``α = 0`` it is the leave-one-out score function; ``α`` is learned inside the fit.

    Requires: a Bernoulli site, at least 2 rows (``num_samples`` or ``num_particles``),
    and a cost differentiable in the latent's value (a model that uses it arithmetically;
    evaluated at the binary draws themselves, never at relaxed values).
    Unbiased for any ``α``.
    Cost: ``K`` evaluations and one backward pass with respect to the draws per estimate
    (one re-cost of the rows, with its gradient).

    Example:
        >>> import jax, jax.numpy as jnp, mcgrad as mg, numpyro.distributions as dist
        >>> g = mg.grad(lambda b: jnp.sum((b - 0.45) ** 2), lambda p: dist.Bernoulli(logits=p),
        ...             estimator=mg.double_control_variate(alpha=1.0), num_samples=4000)(jnp.zeros(2), jax.random.key(0))
        >>> bool(jnp.all(jnp.abs(g - 0.025) < 0.003))
        True

    Reference: Titsias & Shi (2022), "Double Control Variates for Gradient Estimation in
    Discrete Latent Variable Models".
    """
    optimizer = optax.adam(learning_rate)

    def init(params):
        del params
        start = jnp.asarray(alpha, jnp.float32)
        return TaylorState(start, optimizer.init(start))

    def terms(key: Array, state: TaylorState, site: Site):
        del key
        num_rows, value_shape = site.num_rows, site.value.shape[1:]
        if num_rows < 2:
            raise ValueError(
                f"double_control_variate() needs at least 2 rows at site '{site.name}' (num_samples >= 2 "
                "in mg.grad, num_particles >= 2 in a model): its baseline leaves one row out."
            )
        logits = site.map(lambda d: bernoulli_logits(d, value_shape), site.parameters)
        theta = jax.nn.sigmoid(jax.lax.stop_gradient(logits))
        b = site.value.astype(theta.dtype)
        with numpyro.validation_enabled(False):
            gradients = jax.lax.stop_gradient(jax.grad(lambda v: jnp.sum(site.recost(v)))(b))  # ∇_b f(b_k)
        cost = per_coordinate(site.cost, value_shape)  # each coordinate sees its slice's cost
        others = _leave_one_out_mean(gradients)
        slice_axes = tuple(1 + a for a in range(len(value_shape)) if a not in site.slice_axes())

        def estimate(weight):  # ĝ per row and coordinate, [N, *value_shape]
            taylor = jnp.sum(weight * others * (b - theta), axis=slice_axes, keepdims=True)
            adjusted = cost + taylor
            signal = adjusted - _leave_one_out_mean(adjusted)
            correction = weight * jnp.mean(gradients, axis=0, keepdims=True) * theta * (1.0 - theta)
            return signal * (b - theta) - correction

        def variance(weight):
            return jnp.sum(jnp.mean(estimate(weight), axis=0) ** 2)

        gradient = estimate(state.alpha)
        updates, optimizer_state = optimizer.update(jax.grad(variance)(state.alpha), state.optimizer, state.alpha)
        new_state = jax.lax.stop_gradient(TaylorState(optax.apply_updates(state.alpha, updates), optimizer_state))
        terms = row_sum(jax.lax.stop_gradient(gradient) * gradient_only(logits), num_rows)
        return terms, new_state, SiteInfo(num_evaluations=num_rows)

    def check(distribution, site):
        check_bernoulli(distribution, site, "double_control_variate")

    return GradientEstimator(init, draw_without_gradient, terms, check, "double_control_variate")

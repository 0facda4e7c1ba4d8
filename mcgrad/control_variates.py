r"""Control variates that wrap any gradient estimator.

A control variate is a function ``h`` whose expectation ``E_{p_θ}[h]`` is known in
closed form. Applying the same estimator to ``f`` and to ``h`` with the same samples gives
``ĝ_f`` and ``ĝ_h``; then

.. math::  ĝ = ĝ_f − c ⊙ (ĝ_h − ∇_θ E_{p_θ}[h])

is unbiased for any ``c`` independent of the sample it weights, and has lower variance
the more ``ĝ_h`` is correlated with ``ĝ_f``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpyro.distributions as dist

from mcgrad.estimators.base import (
    GradientEstimator,
    Params,
    Problem,
    describe,
    linear_surrogate,
    surrogate_jacobian,
)
from mcgrad.estimators.measure_valued import unwrap


class ControlVariate(NamedTuple):
    """``build(cost_fn, distribution) -> (h, expected_h)``.

    ``h`` is one sample -> scalar, with coefficients frozen (no gradient);
    ``expected_h(distribution) -> E[h]`` is differentiable in the distribution's
    parameters.
    """

    build: Callable[[Callable, dist.Distribution], tuple[Callable, Callable[[dist.Distribution], jax.Array]]]


def _independent_coordinates(distribution: dist.Distribution) -> bool:
    """Whether the coordinates of one draw are independent: a family with scalar events,
    possibly inside ``expand`` / ``to_event`` wrappers."""
    return unwrap(distribution).event_shape == ()


def _moments(distribution: dist.Distribution, site: str) -> tuple[jax.Array, jax.Array, bool]:
    """Mean and covariance (or variance, for independent coordinates), flattened."""
    try:
        mean = jnp.ravel(distribution.mean)
        if isinstance(distribution, dist.MultivariateNormal):
            return mean, distribution.covariance_matrix, True
        variance = jnp.ravel(distribution.variance)
    except (NotImplementedError, AttributeError) as error:
        raise ValueError(
            f"delta_method() needs the mean and variance of the distribution at site '{site}', "
            f"but {describe(distribution)} does not provide them ({error})."
        ) from error
    if not _independent_coordinates(distribution):
        # Its coordinates are correlated (Dirichlet, say): E[h] from the variances alone
        # would miss the cross terms of the Hessian and bias the estimate.
        raise ValueError(
            f"delta_method() needs the covariance of the distribution at site '{site}', but "
            f"{describe(distribution)} has correlated coordinates within an event and no "
            "covariance_matrix; only MultivariateNormal and families with scalar events "
            "(expand / to_event included) are supported."
        )
    return mean, variance, False


def delta_method(order: int = 2, site: str = "x") -> ControlVariate:
    r"""The delta-method control variate: a Taylor expansion of the cost about the mean.

    With ``μ̂ = stop_gradient(E[x])``,

    .. math::  h(x) = f(μ̂) + ∇f(μ̂)ᵀ(x − μ̂) + \tfrac12 (x − μ̂)ᵀ ∇²f(μ̂) (x − μ̂)

    (the last term for ``order=2``) and, for mean ``μ_θ`` and covariance ``Σ_θ``,

    .. math::  E[h] = f(μ̂) + ∇f(μ̂)ᵀ(μ_θ − μ̂) + \tfrac12\big[(μ_θ−μ̂)ᵀ∇²f(μ̂)(μ_θ−μ̂) + \operatorname{tr}(∇²f(μ̂) Σ_θ)\big].

    The expectation is exact for any distribution with that mean and covariance (a
    Gaussian — Normal or MultivariateNormal — in the usual case); coordinates of
    non-MultivariateNormal distributions are taken independent. For a quadratic cost
    ``h = f`` and the residual variance is zero.

    Requires: ``f`` twice differentiable at the mean; the distribution's ``mean`` and
    ``variance`` (or ``covariance_matrix``). Cost: one Hessian of ``f`` per estimate.

    Example:
        >>> import jax, jax.numpy as jnp, mcgrad as mg, numpyro.distributions as dist
        >>> estimator = mg.with_control_variate(mg.score_function(), mg.control_variates.delta_method())
        >>> g = mg.per_sample_grads(lambda x: (x - 2.0) ** 2, lambda p: dist.Normal(p, 1.0),
        ...                         estimator=estimator, num_samples=50)(1.0, jax.random.key(0))
        >>> bool(jnp.allclose(g, -2.0, atol=1e-4))   # every sample gives the exact ∂μ
        True
    """
    if order not in (1, 2):
        raise ValueError(f"delta_method(order=...) must be 1 or 2, got {order}.")

    def build(cost_fn, distribution):
        mean, covariance, full = _moments(jax.lax.stop_gradient(distribution), site)
        shape = jnp.shape(distribution.mean)

        def flat_cost(v):
            return cost_fn(jnp.reshape(v, shape))

        value = flat_cost(mean)
        if jnp.shape(value) != ():  # before jax.grad's own, less helpful, TypeError
            raise ValueError(
                f"cost_fn must return a scalar for one sample of site '{site}', but for a sample "
                f"of shape {shape} it returned shape {jnp.shape(value)}. Reduce it to a scalar, "
                "e.g. `jnp.sum(...)`."
            )
        gradient = jax.grad(flat_cost)(mean)
        hessian = jax.hessian(flat_cost)(mean) if order == 2 else None
        value, gradient, hessian = jax.lax.stop_gradient((value, gradient, hessian))

        def h(x):
            delta = jnp.ravel(x).astype(mean.dtype) - mean
            out = value + gradient @ delta
            if hessian is not None:
                out = out + 0.5 * delta @ hessian @ delta
            return out

        def expected_h(current):
            current_mean, current_covariance, _ = _moments(current, site)
            delta = current_mean - mean
            out = value + gradient @ delta
            if hessian is not None:
                spread = jnp.sum(hessian * current_covariance) if full else jnp.sum(jnp.diag(hessian) * current_covariance)
                out = out + 0.5 * (delta @ hessian @ delta + spread)
            return out

        return h, expected_h

    return ControlVariate(build)


def _leave_one_out_coefficient(gradients_f: jax.Array, gradients_h: jax.Array) -> jax.Array:
    """``c_i = Cov(g_f, g_h) / Var(g_h)`` per coordinate, from all samples but ``i``."""
    n = gradients_f.shape[0]
    m = n - 1
    sum_f = jnp.sum(gradients_f, axis=0, keepdims=True) - gradients_f
    sum_h = jnp.sum(gradients_h, axis=0, keepdims=True) - gradients_h
    sum_fh = jnp.sum(gradients_f * gradients_h, axis=0, keepdims=True) - gradients_f * gradients_h
    sum_hh = jnp.sum(gradients_h**2, axis=0, keepdims=True) - gradients_h**2
    covariance = sum_fh - sum_f * sum_h / m
    variance = sum_hh - sum_h**2 / m
    tiny = jnp.finfo(variance.dtype).tiny
    return jnp.where(variance > tiny, covariance / jnp.where(variance > tiny, variance, 1.0), 0.0)


def with_control_variate(
    estimator: GradientEstimator,
    control_variate: ControlVariate,
    coefficient: Literal["optimal"] | float = "optimal",
) -> GradientEstimator:
    r"""Wrap ``estimator`` with a control variate, reusing the same samples.

    Per sample, ``G_i = ĝ_{f,i} − c_i ⊙ (ĝ_{h,i} − ∇θ E[h])``. With ``"optimal"``, ``c_i``
    is the variance-minimising ``Cov(ĝ_f, ĝ_h)/Var(ĝ_h)`` per parameter coordinate,
    estimated from the other ``N − 1`` samples so the estimate stays unbiased; a float
    fixes it.

    Requires: ``N ≥ 3`` for ``"optimal"``. Cost: the wrapped estimator twice (on ``f``
    and ``h``, same samples) and the per-sample gradients of both (``N`` backward passes).

    Args:
        estimator: any :class:`GradientEstimator`.
        control_variate: e.g. :func:`delta_method`.
        coefficient: ``"optimal"`` or a fixed number.

    Example:
        >>> import jax, mcgrad as mg, numpyro.distributions as dist
        >>> estimator = mg.with_control_variate(mg.pathwise(), mg.control_variates.delta_method(), 1.0)
        >>> g = mg.grad(lambda x: x ** 2, lambda p: dist.Normal(p, 1.0),
        ...             estimator=estimator, num_samples=10)(1.0, jax.random.key(0))
        >>> round(float(g), 4)   # h = f for a quadratic: 2x − (2x − 2μ) = 2μ, with no noise
        2.0

    Reference: Mohamed et al. (2020), §7.
    """

    def surrogate(key: jax.Array, params: Params, state, problem: Problem):
        if coefficient == "optimal" and problem.num_samples < 3:
            raise ValueError("with_control_variate(coefficient='optimal') needs num_samples >= 3.")
        frozen = problem.dist_fn(jax.lax.stop_gradient(params))
        h, expected_h = control_variate.build(problem.cost_fn, frozen)
        control_problem = problem._replace(cost_fn=h)

        gradients_f, (s_f, new_state, info) = surrogate_jacobian(estimator, key, params, state, problem)
        gradients_h, _ = surrogate_jacobian(estimator, key, params, state, control_problem)
        exact_h = jax.grad(lambda p: expected_h(problem.dist_fn(p)))(params)

        def combine(g_f, g_h, e_h):
            c = _leave_one_out_coefficient(g_f, g_h) if coefficient == "optimal" else coefficient
            return g_f - c * (g_h - jnp.expand_dims(e_h, 0))

        per_sample = jax.tree.map(combine, gradients_f, gradients_h, exact_h)
        s = linear_surrogate(jax.lax.stop_gradient(s_f), params, per_sample)
        num_evaluations = 2 * info.num_evaluations
        return s, (new_state, info._replace(num_evaluations=num_evaluations))

    return GradientEstimator(estimator.init, surrogate)

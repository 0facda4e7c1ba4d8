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
    Site,
    SiteInfo,
    check_estimator,
    check_instance,
    linear_terms,
)
from mcgrad.estimators.distributions import describe, unwrap


class ControlVariate(NamedTuple):
    """``build(site) -> (h, expected_h)``, per row of a :class:`~mcgrad.Site`.

    ``h``: ``values [N, ...] -> [N]``, each row's control variate at a value (its
    coefficients frozen, no gradient); ``expected_h``: ``parameters -> [N]``, each row's
    ``E[h]`` under the distribution those parameters give, differentiable in them.
    """

    build: Callable[[Site], tuple[Callable[[jax.Array], jax.Array], Callable[[Any], jax.Array]]]


def _independent_coordinates(distribution: dist.Distribution) -> bool:
    """Whether the coordinates of one draw are independent: a family with scalar events,
    possibly inside ``expand`` / ``to_event`` wrappers."""
    return unwrap(distribution).event_shape == ()


def _moments(distribution: dist.Distribution, site: str) -> tuple[jax.Array, jax.Array, bool]:
    """Mean and covariance (or variance, for independent coordinates) of one draw, flattened."""
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


def delta_method(order: int = 2) -> ControlVariate:
    r"""The delta-method control variate: a Taylor expansion of the cost about the mean.

    For each row, with ``μ̂ = stop_gradient(E[x])`` of that row's distribution,

    .. math::  h(x) = f(μ̂) + ∇f(μ̂)ᵀ(x − μ̂) + \tfrac12 (x − μ̂)ᵀ ∇²f(μ̂) (x − μ̂)

    (the last term for ``order=2``) and, for mean ``μ_θ`` and covariance ``Σ_θ``,

    .. math::  E[h] = f(μ̂) + ∇f(μ̂)ᵀ(μ_θ − μ̂) + \tfrac12\big[(μ_θ−μ̂)ᵀ∇²f(μ̂)(μ_θ−μ̂) + \operatorname{tr}(∇²f(μ̂) Σ_θ)\big].

    The expectation is exact for any distribution with that mean and covariance (a
    Gaussian — Normal or MultivariateNormal — in the usual case); coordinates of
    non-MultivariateNormal distributions are taken independent. For a quadratic cost
    ``h = f`` and the residual variance is zero. At a sample site of a model, ``f`` is
    the particle's cost as a function of the site's value (every other draw kept).

    Requires: ``f`` twice differentiable at the mean; the distribution's ``mean`` and
    ``variance`` (or ``covariance_matrix``). Cost: one gradient and ``D`` Hessian-vector
    products of the cost per row (``D`` the size of one draw).

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

    def build(site: Site):
        num_rows = site.num_rows
        value_shape = site.value.shape[1:]
        frozen = jax.lax.stop_gradient(site.parameters)
        means, covariances, full = _row_moments(site, frozen)  # [N, D], [N, D(, D)]

        def row_costs(flat):  # [N, D] -> [N]
            costs = site.recost(jnp.reshape(flat, site.value.shape).astype(site.value.dtype))
            if jnp.shape(costs) != (num_rows,):  # before jax.grad's own, less helpful, TypeError
                raise ValueError(
                    f"cost_fn must return a scalar for one sample of site '{site.name}', but for a "
                    f"sample of shape {value_shape} it returned shape {jnp.shape(costs)[1:]}. Reduce it "
                    "to a scalar, e.g. `jnp.sum(...)`."
                )
            return costs

        def gradient_fn(flat):  # per-row gradients: rows do not interact
            return jax.grad(lambda m: jnp.sum(row_costs(m)))(flat)

        value = row_costs(means)
        gradient = gradient_fn(means)
        hessian = None
        if order == 2:
            size = means.shape[1]
            directions = jnp.broadcast_to(jnp.eye(size, dtype=means.dtype)[:, None, :], (size, num_rows, size))
            columns = jax.vmap(lambda t: jax.jvp(gradient_fn, (means,), (t,))[1])(directions)  # [D, N, D]
            hessian = jnp.transpose(columns, (1, 2, 0))
        value, gradient, hessian = jax.lax.stop_gradient((value, gradient, hessian))

        def h(values):
            delta = jnp.reshape(values, (num_rows, -1)).astype(means.dtype) - means
            out = value + jnp.sum(gradient * delta, axis=1)
            if hessian is not None:
                out = out + 0.5 * jnp.einsum("nd,nde,ne->n", delta, hessian, delta)
            return out

        def expected_h(parameters):
            current_means, current_covariances, _ = _row_moments(site, parameters)
            delta = current_means - means
            out = value + jnp.sum(gradient * delta, axis=1)
            if hessian is not None:
                if full:
                    spread = jnp.sum(hessian * current_covariances, axis=(1, 2))
                else:
                    spread = jnp.sum(jnp.diagonal(hessian, axis1=1, axis2=2) * current_covariances, axis=1)
                out = out + 0.5 * (jnp.einsum("nd,nde,ne->n", delta, hessian, delta) + spread)
            return out

        return h, expected_h

    return ControlVariate(build)


def _row_moments(site: Site, parameters) -> tuple[jax.Array, jax.Array, bool]:
    """Each row's flattened mean and covariance (or variances): ``[N, D]``, ``[N, D(, D)]``."""
    fulls = []

    def moments(distribution):
        mean, covariance, full = _moments(distribution, site.name)
        fulls.append(full)
        return mean, covariance

    means, covariances = site.map(moments, parameters)
    return means, covariances, fulls[0]


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

    Per row, ``G_i = ĝ_{f,i} − c ⊙ (ĝ_{h,i} − ∇ E_i[h])``, gradients with respect to the
    parameters of the site's distribution (pulled back to the user's parameters by
    autodiff). With ``"optimal"``, ``c`` is the variance-minimising
    ``Cov(ĝ_f, ĝ_h)/Var(ĝ_h)`` per parameter coordinate, estimated from the other
    ``N − 1`` rows so the estimate stays unbiased; a float fixes it. Works wherever the
    wrapped estimator does: in :func:`mcgrad.grad` and per site in :func:`mcgrad.fit`.

    Requires: ``N ≥ 3`` rows for ``"optimal"``. Cost: the wrapped estimator twice (on
    ``f`` and ``h``, same draws) and the per-row gradients of both.

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

    check_estimator(estimator, "with_control_variate(estimator, ...)")
    check_instance(control_variate, ControlVariate, "with_control_variate(..., control_variate)",
                   "mg.control_variates.delta_method()")

    def sample(key, distribution, sample_shape=()):
        # The draw carries no gradient: the per-row gradients below are the whole estimate.
        return jax.lax.stop_gradient(estimator.sample(key, distribution, sample_shape))

    def terms(key: jax.Array, state, site: Site):
        num_rows = site.num_rows
        if coefficient == "optimal" and num_rows < 3:
            raise ValueError(
                f"with_control_variate(coefficient='optimal') needs at least 3 rows at site '{site.name}' "
                "(num_samples >= 3 in mg.grad, num_particles >= 3 in a model)."
            )
        h, expected_h = control_variate.build(site)
        control_site = site._replace(cost=h(site.value), recost=h)

        def per_row(one_site: Site):
            def fn(parameters):
                value = one_site.resample(estimator.sample, parameters)
                costs = one_site.recost(value)
                extra, new_state, info = estimator.terms(
                    key, state, one_site._replace(parameters=parameters, value=jax.lax.stop_gradient(value))
                )
                return costs + extra, (new_state, info)

            return fn

        def jacobian_with_aux(fn):
            aux = []

            def only_values(parameters):
                values, extra = fn(parameters)
                aux.append(extra)
                return values

            return site.jacobian(only_values, site.parameters), aux[0]

        gradients_f, (new_state, info) = jacobian_with_aux(per_row(site))
        gradients_h, _ = jacobian_with_aux(per_row(control_site))
        exact_h = site.jacobian(expected_h, site.parameters)

        def combine(g_f, g_h, e_h):
            c = _leave_one_out_coefficient(g_f, g_h) if coefficient == "optimal" else coefficient
            return g_f - c * (g_h - e_h)

        per_row_gradients = jax.tree.map(combine, gradients_f, gradients_h, exact_h)
        terms = linear_terms(site.parameters, per_row_gradients, num_rows)
        return terms, new_state, SiteInfo(2 * info.num_evaluations + num_rows)

    return GradientEstimator(
        estimator.init, sample, terms, estimator.check, f"{estimator.name}+control_variate"
    )

r"""Antithetic estimators for Bernoulli sites: ARM and DisARM.

Both draw a site's Bernoulli coordinates from uniforms, ``b = 1[u < σ(φ)]``, and cost the
antithetic partner ``b̃ = 1[1 − u < σ(φ)]`` as well (every other draw of the row kept),
so each row costs two evaluations. With ``f`` the row's cost (per plate slice at a model
site), the per-coordinate estimates of ``∂/∂φ_d E[f(b)]`` are

.. math::

    \text{ARM:}\quad (f(b̃) − f(b))\,(u_d − ½),
    \qquad
    \text{DisARM:}\quad ½\,(f(b̃) − f(b))\;1[b_d ≠ b̃_d]\;(−1)^{b_d}\;σ(|φ_d|).

DisARM integrates ARM's ``u`` out given the pair, so its variance is never larger; both
are unbiased for any ``f``. Each row's pair is independent of the other rows', so ``N``
rows (particles) average ``N`` pairs.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpyro.distributions as dist

from mcgrad.estimators.base import (
    GradientEstimator,
    Site,
    SiteInfo,
    gradient_only,
    init_empty_state,
    per_coordinate,
    row_sum,
)
from mcgrad.estimators.distributions import describe, unwrap

Array = jax.Array
# (f(b̃) − f(b)) per coordinate, u, b, b̃, φ (no gradient) -> the per-coordinate ∂/∂φ estimate
PairRule = Callable[[Array, Array, Array, Array, Array], Array]


def check_bernoulli(distribution: dist.Distribution, site: str, name: str) -> None:
    """Raise a clear error unless ``distribution`` is a (possibly expanded, ``to_event``)
    Bernoulli."""
    if not isinstance(unwrap(distribution), (dist.BernoulliLogits, dist.BernoulliProbs)):
        raise ValueError(
            f"{name}() applies to Bernoulli sites, but site '{site}' is {describe(distribution)}. "
            "For other discrete families use mg.score_function(baseline=mg.baselines.leave_one_out()), "
            "mg.measure_valued() or mg.enumerate()."
        )


def _logits(distribution: dist.Distribution, shape: tuple[int, ...]) -> Array:
    """The Bernoulli logits inside ``distribution``, broadcast to one draw's ``shape``."""
    return jnp.broadcast_to(unwrap(distribution).logits, shape)


def _uniforms(key: Array, distribution: dist.Distribution, sample_shape: tuple[int, ...]) -> Array:
    """The uniforms behind a draw: the same for ``b`` and its antithetic partner."""
    return jax.random.uniform(key, tuple(sample_shape) + distribution.shape())


def _draw(key: Array, distribution: dist.Distribution, sample_shape: tuple[int, ...] = ()) -> Array:
    """``b = 1[u < σ(φ)]``, integers as NumPyro's own Bernoulli draws are."""
    u = _uniforms(key, distribution, sample_shape)
    b = u < jax.nn.sigmoid(_logits(distribution, u.shape))
    return jax.lax.stop_gradient(b.astype(jax.dtypes.canonicalize_dtype(jnp.int_)))


def _antithetic(name: str, rule: PairRule) -> GradientEstimator:
    def terms(key: Array, state, site: Site):
        del key
        value_shape = site.value.shape[1:]
        logits = site.map(lambda d: _logits(d, value_shape), site.parameters)  # [N, *value_shape]
        frozen = jax.lax.stop_gradient(logits)
        u = jax.lax.stop_gradient(site.resample(_uniforms, site.parameters))
        b = site.value.astype(frozen.dtype)
        partner = (1.0 - u < jax.nn.sigmoid(frozen)).astype(frozen.dtype)
        cost = per_coordinate(site.cost, value_shape)
        partner_cost = per_coordinate(site.recost_like_cost(partner.astype(site.value.dtype)), value_shape)
        gradient = rule(jax.lax.stop_gradient(partner_cost - cost), u, b, partner, frozen)
        terms = row_sum(jax.lax.stop_gradient(gradient) * gradient_only(logits), site.num_rows)
        return terms, state, SiteInfo(num_evaluations=site.num_rows)

    def check(distribution, site):
        check_bernoulli(distribution, site, name)

    return GradientEstimator(init_empty_state, _draw, terms, check, name)


def _arm_rule(difference, u, b, partner, logits):
    del b, partner, logits
    return difference * (u - 0.5)


def _disarm_rule(difference, u, b, partner, logits):
    del u
    sign = 1.0 - 2.0 * b  # (−1)^b
    return 0.5 * difference * (b != partner) * sign * jax.nn.sigmoid(jnp.abs(logits))


def arm() -> GradientEstimator:
    r"""The ARM (augment-REINFORCE-merge) estimator for Bernoulli sites.

    .. math::  ∂_{φ_d} E[f(b)] ≈ (f(b̃) − f(b))\,(u_d − ½),\quad b = 1[u < σ(φ)],\ b̃ = 1[1 − u < σ(φ)]

    Requires: a Bernoulli site (logits or probs; ``expand`` and ``to_event`` are fine).
    ``f`` need not be differentiable. Unbiased. Prefer :func:`disarm`, which has the same
    cost and never more variance.
    Cost: 2 evaluations of ``f`` per row (the draw and its antithetic partner).

    Example:
        >>> import jax, jax.numpy as jnp, mcgrad as mg, numpyro.distributions as dist
        >>> g = mg.grad(lambda b: jnp.sum((b - 0.45) ** 2), lambda p: dist.Bernoulli(logits=p),
        ...             estimator=mg.arm(), num_samples=4000)(jnp.zeros(2), jax.random.key(0))
        >>> bool(jnp.all(jnp.abs(g - 0.025) < 0.003))   # exact (1 − 2t)·θ(1 − θ) = 0.025
        True

    Reference: Yin & Zhou (2019), "ARM: Augment-REINFORCE-Merge Gradient for Stochastic
    Binary Networks".
    """
    return _antithetic("arm", _arm_rule)


def disarm() -> GradientEstimator:
    r"""The DisARM estimator for Bernoulli sites: ARM with its uniform integrated out.

    .. math::  ∂_{φ_d} E[f(b)] ≈ ½\,(f(b̃) − f(b))\;1[b_d ≠ b̃_d]\;(−1)^{b_d}\;σ(|φ_d|)

    for the antithetic pair ``b = 1[u < σ(φ)]``, ``b̃ = 1[1 − u < σ(φ)]``. Coordinates
    where the pair agrees contribute nothing, and where it disagrees the weight is a
    constant instead of ARM's ``u − ½``: variance never above ARM's, and zero at ``D = 1``.
    At a model site inside a ``plate`` each slice's difference is its own cost's.

    Requires: a Bernoulli site (logits or probs; ``expand`` and ``to_event`` are fine).
    ``f`` need not be differentiable. Unbiased.
    Cost: 2 evaluations of ``f`` per row (the draw and its antithetic partner).

    Example:
        >>> import jax, jax.numpy as jnp, mcgrad as mg, numpyro.distributions as dist
        >>> g = mg.per_sample_grads(lambda b: jnp.sum((b - 0.499) ** 2), lambda p: dist.Bernoulli(logits=p),
        ...                         estimator=mg.disarm(), num_samples=100)(jnp.zeros(1), jax.random.key(0))
        >>> bool(jnp.allclose(g, 5e-4, atol=1e-9))   # one coordinate: every pair gives the exact gradient
        True

    Reference: Dong, Mnih & Tucker (2020), "DisARM: An Antithetic Gradient Estimator for
    Binary Latent Variables".
    """
    return _antithetic("disarm", _disarm_rule)

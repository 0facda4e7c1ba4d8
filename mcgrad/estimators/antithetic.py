r"""Antithetic estimators for Bernoulli and Categorical sites: ARM and DisARM.

Both draw a site's Bernoulli coordinates in antithetic pairs from one set of uniforms,
``b = 1[u < σ(φ)]`` and ``b̃ = 1[1 − u < σ(φ)]``: rows ``i`` and ``i + N/2`` (in a model,
particles ``i`` and ``i + M/2``) are a pair, so ``N = 2`` is one pair and two
evaluations. Each member is an ordinary draw, so each row's cost is a plain sample of the
objective and a model's other parameters (a decoder) learn from both. With ``f`` each
member's cost (per plate slice at a model site), the per-coordinate estimates of
``∂/∂φ_d E[f(b)]`` are

.. math::

    \text{ARM:}\quad (f(b̃) − f(b))\,(u_d − ½),
    \qquad
    \text{DisARM:}\quad ½\,(f(b̃) − f(b))\;1[b_d ≠ b̃_d]\;(−1)^{b_d}\;σ(|φ_d|).

DisARM integrates ARM's ``u`` out given the pair, so its variance is never larger; both
are unbiased for any ``f``. Both members of a pair carry the pair's estimate, and pairs
are independent of each other, so ``N`` rows average ``N/2`` pairs.

A Categorical draw over ``K`` categories is made of ``K − 1`` independent binary
decisions by stick breaking (Dong, Mnih & Tucker 2021): decision ``k`` says yes with
probability ``p_k / Σ_{j≥k} p_j`` and the draw is the first category whose decision says
yes (the last when none does). ``E[f(c)]`` is then an expectation over independent
Bernoullis, and the same pair estimates apply to the decisions' logits, pulled back to the
Categorical's parameters by autodiff. (The paper's refinements, importance weighting and
ordering the categories by logit, are not applied.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpyro.distributions as dist

from mcgrad.estimators.base import (
    GradientEstimator,
    Site,
    SiteInfo,
    gradient_only,
    init_empty_state,
    paired_rows,
    per_coordinate,
    row_sum,
)
from mcgrad.estimators.distributions import (
    bernoulli_logits,
    describe,
    is_bernoulli,
    unwrap,
)

Array = jax.Array
# (f(b̃) − f(b)) per coordinate, u, b, b̃, φ (no gradient) -> the per-coordinate ∂/∂φ estimate
PairRule = Callable[[Array, Array, Array, Array, Array], Array]


def check_bernoulli_or_categorical(distribution: dist.Distribution, site: str, name: str) -> None:
    """Raise a clear error unless ``distribution`` is a Bernoulli or a Categorical with scalar
    events (``expand`` and ``to_event`` wrappers allowed)."""
    base = unwrap(distribution)
    if _is_categorical(distribution) and base.event_shape == ():
        return
    if not is_bernoulli(base):
        raise ValueError(
            f"{name}() applies to Bernoulli and Categorical sites, but site '{site}' is {describe(distribution)}. "
            "For other discrete families use mg.score_function(baseline=mg.baselines.leave_one_out()) or "
            "mg.measure_valued(); for a family with rsample, mg.pathwise()."
        )


def _is_categorical(distribution: dist.Distribution) -> bool:
    return isinstance(unwrap(distribution), (dist.CategoricalLogits, dist.CategoricalProbs))


def _binary_logits(distribution: dist.Distribution, shape: tuple[int, ...]) -> Array:
    """The logits of the independent binary decisions behind one draw of ``shape``: the
    Bernoulli's own, or a Categorical's stick-breaking logits ``[*shape, K − 1]``,
    ``η_k = log p_k − log Σ_{j>k} p_j`` (category ``k`` is taken where the first decision
    says yes; the last category where none does)."""
    if not _is_categorical(distribution):
        return bernoulli_logits(distribution, shape)
    logits = unwrap(distribution).logits  # normalised log-probabilities
    later = jax.lax.cumlogsumexp(logits[..., ::-1], axis=logits.ndim - 1)[..., ::-1]  # log Σ_{j≥k} p_j
    eta = logits[..., :-1] - later[..., 1:]
    return jnp.broadcast_to(eta, tuple(shape) + eta.shape[-1:])


def _uniforms(key: Array, distribution: dist.Distribution, sample_shape: tuple[int, ...]) -> Array:
    """The uniforms behind a draw, one per binary decision: the same for ``b`` and its
    antithetic partner."""
    shape = tuple(sample_shape) + distribution.shape()
    if _is_categorical(distribution):
        shape = shape + (unwrap(distribution).logits.shape[-1] - 1,)
    return jax.random.uniform(key, shape)


def _value(decisions: Array, categorical: bool) -> Array:
    """A draw from its binary decisions: the decisions (Bernoulli), or the first category
    whose decision is yes (Categorical), as integers like NumPyro's own draws."""
    if categorical:
        num_decisions = decisions.shape[-1]
        value = jnp.where(jnp.any(decisions, axis=-1), jnp.argmax(decisions, axis=-1), num_decisions)
    else:
        value = decisions
    return jax.lax.stop_gradient(value.astype(jax.dtypes.canonicalize_dtype(jnp.int_)))


def _draw(key: Array, distribution: dist.Distribution, sample_shape: tuple[int, ...] = (), flip: Any = False) -> Array:
    """``b = 1[u < σ(η)]`` for the binary decisions (``1[1 − u < σ(η)]`` for the antithetic
    partner, where ``flip``: a boolean, traced or not), and the draw they make."""
    u = _uniforms(key, distribution, sample_shape)
    u = jnp.where(flip, 1.0 - u, u)
    value_shape = u.shape[:-1] if _is_categorical(distribution) else u.shape
    return _value(u < jax.nn.sigmoid(_binary_logits(distribution, value_shape)), _is_categorical(distribution))


def _pair_decisions(site: Site, logits: Array, half: int, needs_uniforms: bool) -> tuple[Array | None, Array, Array]:
    """``(u, b, b̃)`` for every row, ``[N, *decisions]``: the uniforms and the decisions of
    the row's pair. A Bernoulli's decisions are its rows' values (row ``i`` drew ``b``, row
    ``i + N/2`` drew ``b̃`` from the same key), so only a rule that needs ``u`` (ARM) or a
    Categorical (whose value does not show every decision) draws the uniforms again."""
    if needs_uniforms or logits.shape[1:] != site.value.shape[1:]:
        u = jax.lax.stop_gradient(site.resample(_uniforms, site.parameters))  # equal within a pair
        threshold = jax.nn.sigmoid(logits)
        return u, u < threshold, 1.0 - u < threshold
    first, partner = site.value[:half], site.value[half:]
    return None, jnp.concatenate([first, first]), jnp.concatenate([partner, partner])


def _antithetic(name: str, rule: PairRule, needs_uniforms: bool) -> GradientEstimator:
    def terms(key: Array, state, site: Site):
        del key
        if site.leave_one_out is not None:
            raise ValueError(
                f"{name}() at site '{site.name}' pairs the particles of an objective that averages them "
                "(mg.elbo, mg.adversarial, mg.expectation); a multi-sample bound (mg.iwae, mg.renyi) couples "
                "them instead. Use its default there (score function with the VIMCO baseline)."
            )
        num_rows, value_shape = site.num_rows, site.value.shape[1:]
        half = paired_rows(num_rows, site.name, f"{name}()")
        logits = site.map(lambda d: _binary_logits(d, value_shape), site.parameters)  # [N, *decisions]
        frozen = jax.lax.stop_gradient(logits)
        u, below, above = _pair_decisions(site, frozen, half, needs_uniforms)
        below, above = below.astype(frozen.dtype), above.astype(frozen.dtype)  # the pair's b, b̃
        cost = per_coordinate(site.cost, logits.shape[1:])
        first = jnp.reshape(jnp.arange(num_rows) < half, (num_rows,) + (1,) * (cost.ndim - 1))
        partner_cost = jnp.roll(cost, half, axis=0)
        difference = jnp.where(first, partner_cost - cost, cost - partner_cost)  # f(above) − f(below)
        gradient = rule(jax.lax.stop_gradient(difference), u, below, above, frozen)
        terms = row_sum(jax.lax.stop_gradient(gradient) * gradient_only(logits), num_rows)
        return terms, state, SiteInfo()

    def check(distribution, site):
        check_bernoulli_or_categorical(distribution, site, name)

    return GradientEstimator(init_empty_state, _draw, terms, check, name, partner=_draw)


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

    Requires: a Bernoulli site (logits or probs; ``expand`` and ``to_event`` are fine), or
    a Categorical one (by stick breaking, see :mod:`mcgrad.estimators.antithetic`).
    ``f`` need not be differentiable. Unbiased. Prefer :func:`disarm`, which has the same
    cost and never more variance.
    Cost: 1 evaluation of ``f`` per row; an even number of rows (2 per pair).

    Example:
        >>> import jax, jax.numpy as jnp, mcgrad as mg, numpyro.distributions as dist
        >>> g = mg.grad(lambda b: jnp.sum((b - 0.45) ** 2), lambda p: dist.Bernoulli(logits=p),
        ...             estimator=mg.arm(), num_samples=4000)(jnp.zeros(2), jax.random.key(0))
        >>> bool(jnp.all(jnp.abs(g - 0.025) < 0.003))   # exact (1 − 2t)·θ(1 − θ) = 0.025
        True

    Reference: Yin & Zhou (2019), "ARM: Augment-REINFORCE-Merge Gradient for Stochastic
    Binary Networks".
    """
    return _antithetic("arm", _arm_rule, needs_uniforms=True)


def disarm() -> GradientEstimator:
    r"""The DisARM estimator for Bernoulli sites: ARM with its uniform integrated out.

    .. math::  ∂_{φ_d} E[f(b)] ≈ ½\,(f(b̃) − f(b))\;1[b_d ≠ b̃_d]\;(−1)^{b_d}\;σ(|φ_d|)

    for the antithetic pair ``b = 1[u < σ(φ)]``, ``b̃ = 1[1 − u < σ(φ)]``. Coordinates
    where the pair agrees contribute nothing, and where it disagrees the weight is a
    constant instead of ARM's ``u − ½``: variance never above ARM's, and zero at ``D = 1``.
    At a model site inside a ``plate`` each slice's difference is its own cost's.

    Requires: a Bernoulli site (logits or probs; ``expand`` and ``to_event`` are fine), or
    a Categorical one: its ``K − 1`` stick-breaking decisions are the coordinates (the
    coupled categorical estimator of Dong, Mnih & Tucker 2021).
    ``f`` need not be differentiable. Unbiased.
    Cost: 1 evaluation of ``f`` per row; an even number of rows (2 per pair).

    Example:
        >>> import jax, jax.numpy as jnp, mcgrad as mg, numpyro.distributions as dist
        >>> g = mg.per_sample_grads(lambda b: jnp.sum((b - 0.499) ** 2), lambda p: dist.Bernoulli(logits=p),
        ...                         estimator=mg.disarm(), num_samples=100)(jnp.zeros(1), jax.random.key(0))
        >>> bool(jnp.allclose(g, 5e-4, atol=1e-9))   # one coordinate: every pair gives the exact gradient
        True

    Reference: Dong, Mnih & Tucker (2020), "DisARM: An Antithetic Gradient Estimator for
    Binary Latent Variables"; (2021), "Coupled Gradient Estimators for Discrete Latent
    Variables".
    """
    return _antithetic("disarm", _disarm_rule, needs_uniforms=False)

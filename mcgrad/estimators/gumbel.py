r"""Relaxed and straight-through Gumbel estimators: low variance, biased."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpyro.distributions as dist

from mcgrad.estimators.base import GradientEstimator, SiteInfo, init_empty_state
from mcgrad.estimators.distributions import bernoulli_logits, describe, is_bernoulli

Array = jax.Array


def gumbel_softmax(temperature: float = 0.5, straight_through: bool = False) -> GradientEstimator:
    r"""The Gumbel-softmax (Concrete) relaxation, and its straight-through variant. Biased.

    A Bernoulli coordinate is drawn as ``z = σ((φ + log u − log(1 − u)) / τ)`` (the
    binary Concrete, logistic noise) and the gradient goes pathwise through ``z``. The
    relaxed estimator hands the cost the continuous ``z`` (the cost must accept values
    between 0 and 1, and the model's ``log p(z)`` is its formula at those values: a
    program with a relaxed site runs with NumPyro's support checks off);
    ``straight_through`` hands it the discrete value ``1[z > ½]`` and differentiates as if
    it were ``z``.

    Neither is unbiased for ``∇ E[f(b)]``: the bias shrinks with ``τ`` while the variance
    grows. ``estimator.bias`` says so, and :func:`mcgrad.compare` reports the measured
    bias against an unbiased estimator.

    Requires: a Bernoulli site (an integer ``Categorical`` value cannot carry a gradient,
    and NumPyro has no one-hot categorical), and a cost differentiable in the draw.
    Cost: one evaluation of ``f`` and one backward pass per row.

    Args:
        temperature: ``τ > 0``.
        straight_through: pass the discrete value forward.

    Example:
        >>> import jax, jax.numpy as jnp, mcgrad as mg, numpyro.distributions as dist
        >>> g = mg.grad(lambda b: jnp.sum(b), lambda p: dist.Bernoulli(logits=p),
        ...             estimator=mg.gumbel_softmax(0.5), num_samples=20000)(jnp.zeros(1), jax.random.key(0))
        >>> bool(abs(g[0] - 0.25) < 0.05)   # E[b] = σ(φ): near 0.25, not exactly
        True

    Reference: Jang, Gu & Poole (2017); Maddison, Mnih & Teh (2017).
    """
    if not temperature > 0:
        raise ValueError(f"gumbel_softmax(temperature=...) must be positive, got {temperature!r}.")
    name = "straight_through_gumbel" if straight_through else "gumbel_softmax"

    def check(distribution, site):
        if not is_bernoulli(distribution):
            raise ValueError(
                f"{name}() relaxes Bernoulli sites, but site '{site}' is {describe(distribution)}. A "
                "Categorical value is an integer index and cannot carry a gradient (NumPyro has no one-hot "
                "categorical): use mg.enumerate() or mg.score_function(baseline=mg.baselines.leave_one_out()); "
                "for a continuous family with rsample, mg.pathwise()."
            )

    def sample(key: Array, distribution: dist.Distribution, sample_shape=()):
        shape = tuple(sample_shape) + distribution.shape()
        logits = bernoulli_logits(distribution, shape)
        u = jax.random.uniform(key, shape, minval=1e-7, maxval=1.0 - 1e-7)
        soft = jax.nn.sigmoid((logits + jnp.log(u) - jnp.log1p(-u)) / temperature)
        if not straight_through:
            return soft
        hard = (soft > 0.5).astype(soft.dtype)
        return hard + (soft - jax.lax.stop_gradient(soft))  # exactly 0 or 1 in value

    def terms(key, state, site):
        return jnp.zeros((site.num_rows,)), state, SiteInfo()

    bias = (
        f"biased: the cost's gradient at the discrete value stands in for the relaxation's (τ = {temperature})"
        if straight_through
        else f"biased: the cost is evaluated at relaxed, continuous values (τ = {temperature})"
    )
    return GradientEstimator(init_empty_state, sample, terms, check, name, reparameterized=True, bias=bias)

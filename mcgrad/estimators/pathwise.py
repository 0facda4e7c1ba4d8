"""The pathwise (reparameterization) estimator."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mcgrad.estimators.base import GradientEstimator, SiteInfo, init_empty_state
from mcgrad.estimators.distributions import describe


def require_rsample(distribution, site: str) -> None:
    """Raise a clear error when ``distribution`` cannot be reparameterized."""
    if not distribution.has_rsample:
        raise ValueError(
            f"pathwise() needs a reparameterizable distribution, but site '{site}' is "
            f"{describe(distribution)}, which has no rsample (has_rsample=False). Use "
            "mg.score_function() or mg.measure_valued() for this site."
        )


def pathwise() -> GradientEstimator:
    r"""Pathwise (reparameterization) gradient estimator.

    .. math::  ∇_θ E_{p_θ(x)}[f(x)] ≈ \frac1N \sum_i ∇_θ f(g(ε_i; θ)),\quad x_i = g(ε_i; θ)

    NumPyro's ``rsample`` provides ``g``, including implicit reparameterization for
    Gamma, Beta and Dirichlet. The whole estimate travels through the draw, so its
    surrogate terms are zero.

    Requires: ``has_rsample`` on the distribution and a cost differentiable in ``x``.
    Cost: ``N`` evaluations of ``f`` and one backward pass.

    Example:
        >>> import jax, mcgrad as mg, numpyro.distributions as dist
        >>> g = mg.grad(lambda x: (x - 1.0) ** 2, lambda p: dist.Normal(p, 1.0),
        ...             estimator=mg.pathwise(), num_samples=2000)(0.0, jax.random.key(1))
        >>> bool(abs(g + 2.0) < 0.2)   # ∂μ E(x−1)² = 2(μ−1)
        True

    Reference: Mohamed et al. (2020), "Monte Carlo Gradient Estimation in Machine
    Learning", §5.
    """

    def sample(key: jax.Array, distribution, sample_shape=()):
        return distribution.rsample(key, sample_shape)

    def terms(key, state, site):
        return jnp.zeros((site.num_rows,)), state, SiteInfo()

    return GradientEstimator(init_empty_state, sample, terms, require_rsample, "pathwise", reparameterized=True)

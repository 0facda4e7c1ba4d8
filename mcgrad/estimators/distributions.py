"""Helpers on NumPyro distributions shared by the estimators: names, wrappers, log-densities."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

from mcgrad.estimators.log_prob import log_prob


def describe(distribution: dist.Distribution) -> str:
    """A short name for a distribution in error messages, wrappers included."""
    inner = distribution
    wrappers = []
    while hasattr(inner, "base_dist"):
        wrappers.append(type(inner).__name__)
        inner = inner.base_dist
    name = type(inner).__name__
    return f"{name} (inside {' of '.join(wrappers)})" if wrappers else name


def unwrap(distribution: dist.Distribution) -> dist.Distribution:
    """The univariate family inside ``to_event`` (Independent) and ``expand`` wrappers."""
    inner = distribution
    while isinstance(inner, (dist.Independent, dist.ExpandedDistribution)):
        inner = inner.base_dist
    return inner


def own_log_prob(distribution: dist.Distribution, value: jax.Array) -> jax.Array:
    """``log p(value)`` of a value the distribution drew itself, with a gradient that is
    right at NumPyro's kinks (see :func:`mcgrad.estimators.log_prob.log_prob`).

    NumPyro's support check (on by default: values outside the support get ``-inf``) is
    skipped: these values are in the support by construction, and at small sizes the check
    is about a third of a score-function estimate.
    """
    with numpyro.validation_enabled(False):
        return log_prob(distribution, value)


def elementwise(distribution: dist.Distribution) -> dist.Distribution:
    """The distribution inside ``to_event`` wrappers, so that ``log_prob`` is per coordinate."""
    while isinstance(distribution, dist.Independent):
        distribution = distribution.base_dist
    return distribution


def support_size(family: dist.Distribution) -> int | None:
    """How many values one coordinate of a Bernoulli (2) or Categorical (``K``) family takes,
    ``0 … K − 1`` (static); ``None`` for other families."""
    if isinstance(family, (dist.BernoulliLogits, dist.BernoulliProbs)):
        return 2
    if isinstance(family, (dist.CategoricalLogits, dist.CategoricalProbs)):
        return int(jnp.shape(family.logits if isinstance(family, dist.CategoricalLogits) else family.probs)[-1])
    return None


def sum_to_shape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sum the trailing axes of ``x`` (``[N, *batch]``) down to ``shape`` (``[N, *s]``, a
    prefix of it after broadcasting ones)."""
    summed = jnp.reshape(x, x.shape[: len(shape)] + (-1,)).sum(axis=-1) if x.ndim > len(shape) else x
    return jnp.broadcast_to(summed, shape) if summed.shape != shape else summed


def is_bernoulli(distribution: dist.Distribution) -> bool:
    """Whether ``distribution`` is a Bernoulli, possibly inside ``expand`` / ``to_event``."""
    return isinstance(unwrap(distribution), (dist.BernoulliLogits, dist.BernoulliProbs))


def bernoulli_logits(distribution: dist.Distribution, shape: tuple[int, ...]) -> jax.Array:
    """The logits of the Bernoulli inside ``distribution``, broadcast to one draw's ``shape``
    (differentiable in its parameters, logits or probs)."""
    return jnp.broadcast_to(unwrap(distribution).logits, shape)


def check_bernoulli(distribution: dist.Distribution, site: str, name: str) -> None:
    """Raise a clear error unless ``distribution`` is a Bernoulli (``expand`` and
    ``to_event`` wrappers allowed); ``name`` is the estimator's."""
    if not is_bernoulli(distribution):
        raise ValueError(
            f"{name}() applies to Bernoulli sites, but site '{site}' is {describe(distribution)}. "
            "For other discrete families use mg.score_function(baseline=mg.baselines.leave_one_out()), "
            "mg.measure_valued() or mg.enumerate()."
        )

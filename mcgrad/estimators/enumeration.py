r"""Exact enumeration of a discrete site's values: zero variance, ``K`` evaluations."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from mcgrad.estimators.base import (
    GradientEstimator,
    Site,
    SiteInfo,
    check_whole_number,
    coordinate_groups,
    coordinate_log_probs,
    draw_without_gradient,
    gradient_only,
    init_empty_state,
    per_coordinate,
)
from mcgrad.estimators.distributions import describe, support_size, unwrap

Array = jax.Array


def enumerate(max_configurations: int = 256) -> GradientEstimator:
    r"""Exact enumeration: the gradient of the exact sum over a discrete site's values.

    .. math::  ∇_θ E_{p_θ}[f] = \sum_{k} ∇_θ p_θ(k)\, f(k)

    over every configuration ``k`` of one draw's coordinates (``K^D`` of them for ``D``
    coordinates with ``K`` values each). At a model site inside a ``plate`` each slice is
    summed over on its own and all slices at once, so ``D`` counts one slice's coordinates
    (all of the draw's, where a cost term outside the plate reads it and so couples the
    slices).
    Every other draw of the row is kept, so the estimate has no variance from this site.

    Requires: a Bernoulli or Categorical site (``expand`` and ``to_event`` are fine) with at
    most ``max_configurations`` configurations per slice. ``f`` need not be differentiable.
    Unbiased, with zero variance given the row's other draws.
    Cost: ``K^D`` evaluations of ``f`` per row, batched with ``vmap``.

    Args:
        max_configurations: refuse sites with more configurations than this per slice.

    Example:
        >>> import jax, jax.numpy as jnp, mcgrad as mg, numpyro.distributions as dist
        >>> g = mg.grad(lambda b: jnp.sum((b - 0.45) ** 2), lambda p: dist.Bernoulli(logits=p),
        ...             estimator=mg.enumerate(), num_samples=1)(jnp.zeros(3), jax.random.key(0))
        >>> [round(float(v), 6) for v in g]   # exactly (1 − 2t)·θ(1 − θ)
        [0.025, 0.025, 0.025]
    """
    check_whole_number("max_configurations", max_configurations, 1)

    def check(distribution, site):
        base = unwrap(distribution)
        if support_size(base) is None or base.event_shape != ():
            raise ValueError(
                f"enumerate() sums over the values of Bernoulli and Categorical sites, but site '{site}' "
                f"is {describe(distribution)}. Use mg.score_function(baseline=mg.baselines.leave_one_out()) "
                "or mg.measure_valued() for it."
            )

    def terms(key: Array, state, site: Site):
        del key
        rows = site.coupled_as_rows()  # where a term couples the slices, a configuration spans them all
        coupled, site = rows is not site, rows
        num_rows, value_shape = site.num_rows, site.value.shape[1:]
        num_values = support_size(site.family())  # per coordinate
        axes = site.slice_axes()
        group_of, num_groups = coordinate_groups(value_shape, axes)
        num_configurations = num_values ** num_groups
        if num_configurations > max_configurations:
            why = " (a cost term outside its plate reads the draw: the slices are summed over together)"
            raise ValueError(
                f"enumerate() at site '{site.name}': one slice has {num_groups} coordinates with "
                f"{num_values} values each, {num_configurations} configurations{why if coupled else ''} (max_configurations="
                f"{max_configurations}). Use mg.disarm() (Bernoulli) or mg.score_function(...) instead, or "
                "raise max_configurations."
            )
        # [C, coordinates]: configuration c gives every coordinate of group g the value c[g].
        table = np.array(list(itertools.product(range(num_values), repeat=num_groups)), dtype=np.int32)
        configurations = jnp.asarray(table[:, group_of].reshape((num_configurations,) + value_shape))
        other_axes = tuple(a + 1 for a in range(len(value_shape)) if a not in axes)

        def one(configuration):
            values = jnp.broadcast_to(configuration, site.value.shape).astype(site.value.dtype)
            cost = per_coordinate(jax.lax.stop_gradient(site.recost_like_cost(values)), value_shape)
            log_probs = coordinate_log_probs(site, values)
            # per slice: probability of the configuration, and its cost (equal across the slice)
            probability = jnp.exp(jnp.sum(log_probs, axis=other_axes))
            slice_cost = jnp.mean(cost, axis=other_axes)
            return jnp.reshape(jax.lax.stop_gradient(slice_cost) * gradient_only(probability), (num_rows, -1)).sum(1)

        terms = jnp.sum(jax.vmap(one)(configurations), axis=0)
        return terms, state, SiteInfo(num_evaluations=num_configurations * num_rows)

    return GradientEstimator(init_empty_state, draw_without_gradient, terms, check, "enumerate")


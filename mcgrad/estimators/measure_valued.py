"""The measure-valued (weak-derivative) estimator."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from mcgrad import baselines as baselines_lib
from mcgrad.estimators.base import (
    GradientEstimator,
    Site,
    SiteInfo,
    coordinate_groups,
    coordinate_log_probs,
    draw_without_gradient,
    gradient_only,
    init_empty_state,
    per_coordinate,
)
from mcgrad.estimators.distributions import describe, unwrap
from mcgrad.estimators.score_function import score_function
from mcgrad.estimators.weak_derivatives import registered_families, weak_derivative_for

Array = jax.Array


def check_registered(distribution: dist.Distribution, site: str) -> None:
    """Raise a clear error unless ``distribution`` has registered weak derivatives."""
    base = unwrap(distribution)
    if weak_derivative_for(base) is None:
        raise ValueError(
            f"measure_valued() has no weak derivative for {describe(distribution)} at site "
            f"'{site}'. Registered families: {', '.join(registered_families())}. "
            "Register one with mg.register_weak_derivative(...), or use mg.pathwise() "
            "(if it has rsample) or mg.score_function()."
        )
    if base.event_shape != ():
        raise ValueError(
            f"measure_valued() needs a family with scalar events at site '{site}', "
            f"got {describe(distribution)} with event shape {base.event_shape}."
        )


# Above this many perturbed-row elements (per side and parameter), the default evaluates
# the perturbed coordinates a chunk at a time (lax.map) instead of all at once (vmap).
_MAX_ROWS_ELEMENTS = 1 << 22


def _base_parameters(distribution: dist.Distribution, value_shape: tuple[int, ...]) -> dict[str, Array]:
    """The covered parameters of the family inside ``distribution``, broadcast to the shape
    of one draw (plus any trailing parameter axes of a registered family)."""
    base = unwrap(distribution)
    parameters = {}
    for name, value in weak_derivative_for(base).parameters(base).items():
        extra = jnp.shape(value)[len(base.batch_shape) :] if jnp.ndim(value) > len(base.batch_shape) else ()
        parameters[name] = jnp.broadcast_to(value, value_shape + tuple(extra))
    return parameters


def _stop_covered(distribution: dist.Distribution) -> dist.Distribution:
    base = unwrap(distribution)
    return weak_derivative_for(base).stop_covered(base)


def _replaced_costs(site: Site, group_of: np.ndarray) -> Callable[[Array, Array], Array]:
    """``(group, replacement [N, coordinates]) -> [N, coordinates]``: every row's draw with
    the coordinates of ``group`` set to that row's replacement values, re-costed; each
    coordinate sees its own slice's cost."""
    value_shape = site.value.shape[1:]
    flat_values = jnp.reshape(site.value, (site.num_rows, -1))

    def replaced(group, replacement):
        # A select rather than a scatter (`.at[].set`): XLA fuses it into the cost.
        rows = jnp.where(jnp.asarray(group_of) == group, replacement.astype(flat_values.dtype), flat_values)
        costs = site.recost_like_cost(jnp.reshape(rows, site.value.shape))
        return jnp.reshape(per_coordinate(jax.lax.stop_gradient(costs), value_shape), flat_values.shape)

    return replaced


def _over_columns(fn: Callable[[Any], Any], columns: Any, num_columns: int, site: Site, batch_size: int | None):
    """``fn`` over the leading axis of ``columns`` (each column re-runs every row once):
    all at once (``vmap``), or ``batch_size`` columns at a time (``lax.map``), by default
    once all the columns' rows would exceed :data:`_MAX_ROWS_ELEMENTS` elements."""
    per_column = site.value.size
    if batch_size is None and num_columns * per_column > _MAX_ROWS_ELEMENTS:
        batch_size = max(1, _MAX_ROWS_ELEMENTS // per_column)
    if batch_size is None or batch_size >= num_columns:
        return jax.vmap(fn)(columns)
    return jax.lax.map(fn, columns, batch_size=batch_size)


def _summed_over_support(site: Site, num_values: int, batch_size: int | None) -> tuple[Array, int]:
    r"""A finite family's terms: each coordinate's exact sum over its values,

    .. math::  ∂_θ E[f] = \sum_{k ≠ x_d} ∂_θ p_θ(k)\, \big(f(x_{d←k}) − f(x)\big)

    per coordinate ``d`` of each row ``x`` (the draw's own value needs no re-run:
    ``Σ_k ∂_θ p_θ(k) = 0`` makes ``f(x)`` a baseline). The other values are taken as
    shifts ``x_d + j mod K``, ``j = 1 … K − 1``, so the re-runs are static: ``(K − 1)·G``
    per row for ``G`` coordinate groups. Returns ``([N] terms, evaluations)``.
    """
    num_rows, value_shape = site.num_rows, site.value.shape[1:]
    flat_values = jnp.reshape(site.value, (num_rows, -1))
    group_of, num_groups = coordinate_groups(value_shape, site.slice_axes())
    replaced = _replaced_costs(site, group_of)
    shifts = jnp.arange(1, num_values)

    def shifted(shift):
        return jnp.mod(flat_values + shift, num_values).astype(flat_values.dtype)

    columns = (jnp.repeat(shifts, num_groups), jnp.tile(jnp.arange(num_groups), num_values - 1))
    costs = _over_columns(lambda c: replaced(c[1], shifted(c[0])), columns, (num_values - 1) * num_groups, site,
                          batch_size)
    # [shifts·groups, N, coordinates] -> each coordinate's own group: [shifts, N, coordinates]
    costs = jnp.reshape(costs, (num_values - 1, num_groups) + flat_values.shape)
    costs = jnp.take_along_axis(costs, jnp.asarray(group_of)[None, None, None, :], axis=1)[:, 0]
    own_cost = jnp.reshape(per_coordinate(site.cost, value_shape), flat_values.shape)

    def probability(shift):  # p_θ(x_d + shift mod K) per coordinate, differentiable in θ
        log_probs = coordinate_log_probs(site, jnp.reshape(shifted(shift), site.value.shape))
        return jnp.reshape(jnp.exp(log_probs), flat_values.shape)

    probabilities = jax.vmap(probability)(shifts)
    terms = jnp.sum(jax.lax.stop_gradient(costs - own_cost[None]) * gradient_only(probabilities), axis=(0, 2))
    return terms, (num_values - 1) * num_groups * num_rows


def measure_valued(coupling: bool = True, batch_size: int | None = None) -> GradientEstimator:
    r"""Measure-valued (weak-derivative) gradient estimator.

    For every distribution parameter element ``θ_d`` with weak derivative
    ``(c_d, p_d⁺, p_d⁻)`` (see :mod:`mcgrad.estimators.weak_derivatives`):

    .. math::  ∂_{θ_d} E_{p_θ}[f] ≈ \frac{c_d}{N} \sum_i f(x_i^{(d+)}) − f(x_i^{(d−)})

    where ``x_i^{(d±)}`` is sample ``x_i`` with the coordinate governed by ``θ_d`` redrawn
    from ``p_d^±`` (the other coordinates shared: common random numbers). For a family
    with finitely many values ``K`` (Bernoulli, Categorical) the sum over them is exact
    per coordinate, ``Σ_{k ≠ x_d} ∂p_θ(k) (f(x_{d←k}) − f(x))``: the draw's own value
    is the row's cost, so ``K − 1`` re-runs per coordinate (a local expectation
    gradient). The gradient with respect to the distribution's parameters is pulled back to ``params`` by
    autodiff. At a sample site of a model, ``f`` is the whole particle re-run with the
    site's value replaced (every other draw shared). Parameters a family's entry does not
    cover (Gamma's concentration, say) fall back to the score function with a
    leave-one-out baseline.

    Requires: a registered family with scalar events (``expand`` and ``to_event`` are
    fine); ``f`` need not be differentiable. With ``coupling`` the positive and negative
    draws share their randomness, which lowers the variance.
    At a site inside a ``plate`` each slice's cost sees only its own draw, so the
    coordinates of all slices are replaced at once: ``D`` counts the parameter elements
    of one slice (a VAE's latent dimension, not batch × latent dimension). Not where a
    cost term outside the plate reads the draw (the slices observed through their sum):
    there each coordinate is replaced on its own (:meth:`~mcgrad.Site.slice_axes`).
    Cost: ``N + 2·D·N`` evaluations of ``f`` for ``D`` parameter elements (finite
    families: ``N + (K − 1)·D·N`` for ``D`` coordinates), batched with ``vmap``;
    ``batch_size`` evaluates ``batch_size`` perturbed coordinates (each for all
    ``N`` samples) at a time (``lax.map``) when all ``2·D·N`` at once would not fit in
    memory. By default that chunking starts when the perturbed rows would exceed ``2²²``
    elements.

    Example:
        >>> import jax, jax.numpy as jnp, mcgrad as mg, numpyro.distributions as dist
        >>> dist_fn = lambda p: dist.Normal(p["loc"], p["scale"])
        >>> g = mg.grad(lambda x: x ** 2, dist_fn, estimator=mg.measure_valued(),
        ...             num_samples=2000)({"loc": 1.0, "scale": 1.0}, jax.random.key(0))
        >>> bool(abs(g["loc"] - 2.0) < 0.15 and abs(g["scale"] - 2.0) < 0.4)
        True

    Reference: Pflug (1989); Mohamed et al. (2020), §6; for finite families, Titsias &
    Lázaro-Gredilla (2015), "Local expectation gradients".
    """
    uncovered = score_function(baselines_lib.leave_one_out())

    def terms(key: jax.Array, state, site: Site):
        entry = weak_derivative_for(site.family())
        if entry.support_size is not None:
            terms, num_evaluations = _summed_over_support(site, entry.support_size(site.family()), batch_size)
            return terms, state, SiteInfo(num_evaluations)
        num_rows = site.num_rows
        value_shape = site.value.shape[1:]
        num_coordinates = math.prod(value_shape)
        # Coordinates that differ only along a plate are replaced together (each slice's
        # cost sees only its own): 2·(per-slice coordinates) re-runs, not 2·(all of them).
        group_of, num_groups = coordinate_groups(value_shape, site.slice_axes())
        parameters = site.map(lambda d: _base_parameters(d, value_shape), site.parameters)  # [N, *value_shape(, K)]
        frozen = jax.lax.stop_gradient(parameters)
        replaced = _replaced_costs(site, group_of)

        terms = jnp.zeros((num_rows,))
        num_evaluations = 0
        for index, (name, sampler) in enumerate(entry.samplers.items()):
            constant, positive, negative = sampler(jax.random.fold_in(key, index), frozen, 1, coupling)
            parameter_shape = jnp.shape(parameters[name])[1:]
            extra = math.prod(parameter_shape[len(value_shape) :])  # a trailing parameter axis, else 1
            # [N, coordinates, extra]: the replacement of each coordinate for each parameter element
            positive, negative = (jnp.reshape(v, (num_rows, num_coordinates, extra)) for v in (positive, negative))
            # One column of re-runs per (group, element of the extra axis): every coordinate
            # of the group takes its own replacement for that element.
            columns = (jnp.repeat(jnp.arange(num_groups), extra), jnp.tile(jnp.arange(extra), num_groups))

            def both_sides(column):
                group, element = column
                return replaced(group, positive[:, :, element]), replaced(group, negative[:, :, element])

            cost_plus, cost_minus = _over_columns(both_sides, columns, num_groups * extra, site, batch_size)
            # [columns, N, coordinates] -> each parameter element's own column: [N, coordinates, extra]
            column_of = jnp.asarray(group_of)[:, None] * extra + jnp.arange(extra)[None, :]
            difference = jnp.moveaxis(cost_plus - cost_minus, 0, -1)
            own = jnp.take_along_axis(difference, column_of[None], axis=2)
            weak_gradient = jnp.reshape(constant, (num_rows, num_coordinates, extra)) * own
            direction = jnp.reshape(gradient_only(parameters[name]), (num_rows, num_coordinates, extra))
            terms = terms + jnp.sum(direction * jax.lax.stop_gradient(weak_gradient), axis=(1, 2))
            num_evaluations += 2 * num_groups * extra * num_rows

        if entry.stop_covered is not None:  # uncovered parameters: score function, leave-one-out
            stopped = site._replace(
                map=lambda fn, parameters, *row_args: site.map(
                    lambda d, *args: fn(_stop_covered(d), *args), parameters, *row_args
                ),
                cost=jnp.reshape(site.cost, (num_rows, -1)).sum(axis=1),
            )
            fallback, _, _ = uncovered.terms(key, uncovered.init(None), stopped)
            terms = terms + fallback
        return terms, state, SiteInfo(num_evaluations)

    return GradientEstimator(init_empty_state, draw_without_gradient, terms, check_registered, "measure_valued")

"""The measure-valued (weak-derivative) estimator."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from mcgrad.estimators.base import (
    EstimatorInfo,
    GradientEstimator,
    Problem,
    describe,
    evaluate_costs,
    gradient_only,
    init_empty_state,
)
from mcgrad.estimators.score_function import sample_log_probs
from mcgrad.estimators.weak_derivatives import registered_families, weak_derivative_for


def unwrap(distribution: dist.Distribution) -> dist.Distribution:
    """The univariate family inside ``to_event`` (Independent) and ``expand`` wrappers."""
    inner = distribution
    while isinstance(inner, (dist.Independent, dist.ExpandedDistribution)):
        inner = inner.base_dist
    return inner


def _broadcast_parameter(value: jax.Array, base: dist.Distribution, value_shape: tuple[int, ...]) -> jax.Array:
    # Parameters may carry trailing axes beyond the batch (the K of Categorical probs).
    extra = jnp.shape(value)[len(base.batch_shape) :] if jnp.ndim(value) > len(base.batch_shape) else ()
    return jnp.broadcast_to(value, value_shape + tuple(extra))


# Above this many perturbed-row elements (per side and parameter), the default evaluates
# the rows a chunk of samples at a time (lax.map) instead of all at once (vmap).
_MAX_ROWS_ELEMENTS = 1 << 22


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


def weak_derivative_terms(
    key: jax.Array,
    distribution: dist.Distribution,
    samples: jax.Array,
    costs: jax.Array,
    cost_fn,
    *,
    coupling: bool = True,
    batch_size: int | None = None,
) -> tuple[jax.Array, int]:
    """The measure-valued surrogate terms for given samples: zero in value, the estimate in gradient.

    ``samples`` (``[N, *value_shape]``, no gradient) were drawn from ``distribution`` and
    cost ``costs``. Returns ``[N]`` terms ``Σ_d (η_d − sg η_d)·sg(c_d (f(x^{d+}) − f(x^{d−})))``
    (plus the score-function fallback for uncovered parameters) and the number of extra
    evaluations of ``cost_fn``.
    """
    base = unwrap(distribution)
    entry = weak_derivative_for(base)
    num_samples = samples.shape[0]
    value_shape = tuple(distribution.batch_shape) + tuple(distribution.event_shape)
    num_coordinates = math.prod(value_shape)
    flat_samples = jnp.reshape(samples, (num_samples, num_coordinates))
    parameters = {
        name: _broadcast_parameter(value, base, value_shape) for name, value in entry.parameters(base).items()
    }
    frozen = jax.lax.stop_gradient(parameters)

    def replaced_cost(row, coordinate, value):
        # A select rather than a scatter (`.at[].set`): XLA fuses it into the cost.
        row = jnp.where(jnp.arange(num_coordinates) == coordinate, value.astype(row.dtype), row)
        return cost_fn(jnp.reshape(row, value_shape))

    terms = jnp.zeros((num_samples,), costs.dtype)
    num_evaluations = 0
    for index, (name, sampler) in enumerate(entry.samplers.items()):
        constant, positive, negative = sampler(jax.random.fold_in(key, index), frozen, num_samples, coupling)
        parameter_shape = jnp.shape(parameters[name])
        size = math.prod(parameter_shape)
        # The sample coordinate each parameter element governs (static).
        coordinate_of = np.broadcast_to(
            np.arange(num_coordinates).reshape(value_shape + (1,) * (len(parameter_shape) - len(value_shape))),
            parameter_shape,
        ).ravel()

        def evaluate_row(row_and_values, coordinate_of=coordinate_of):
            row, plus, minus = row_and_values
            both = jax.vmap(replaced_cost, in_axes=(None, 0, 0))
            return both(row, coordinate_of, plus), both(row, coordinate_of, minus)

        inputs = (
            flat_samples,
            jnp.reshape(positive, (num_samples, size)),
            jnp.reshape(negative, (num_samples, size)),
        )
        chunk = batch_size
        if chunk is None and num_samples * size * num_coordinates > _MAX_ROWS_ELEMENTS:
            # All 2·D·N perturbed rows at once would be large: a sample chunk at a time.
            chunk = max(1, _MAX_ROWS_ELEMENTS // (size * num_coordinates))
        if chunk is None or chunk >= num_samples:
            cost_plus, cost_minus = jax.vmap(evaluate_row)(inputs)
        else:
            cost_plus, cost_minus = jax.lax.map(evaluate_row, inputs, batch_size=chunk)
        weak_gradient = jax.lax.stop_gradient(jnp.reshape(constant, (1, size)) * (cost_plus - cost_minus))
        direction = jnp.reshape(gradient_only(parameters[name]), (1, size))
        terms = terms + jnp.sum(direction * weak_gradient, axis=1)
        num_evaluations += 2 * size * num_samples

    if entry.stop_covered is not None:  # uncovered parameters: score function, leave-one-out
        signal = jax.lax.stop_gradient(costs)
        if num_samples > 1:
            signal = signal - (jnp.sum(signal) - signal) / (num_samples - 1)
        log_probs = sample_log_probs(entry.stop_covered(base), samples)
        terms = terms + signal * gradient_only(log_probs)
    return terms, num_evaluations


def measure_valued(coupling: bool = True, batch_size: int | None = None) -> GradientEstimator:
    r"""Measure-valued (weak-derivative) gradient estimator.

    For every distribution parameter element ``θ_d`` with weak derivative
    ``(c_d, p_d⁺, p_d⁻)`` (see :mod:`mcgrad.estimators.weak_derivatives`):

    .. math::  ∂_{θ_d} E_{p_θ}[f] ≈ \frac{c_d}{N} \sum_i f(x_i^{(d+)}) − f(x_i^{(d−)})

    where ``x_i^{(d±)}`` is sample ``x_i`` with the coordinate governed by ``θ_d`` redrawn
    from ``p_d^±`` (the other coordinates shared: common random numbers). The gradient
    with respect to the distribution's parameters is pulled back to ``params`` by
    autodiff through ``dist_fn``. Parameters a family's entry does not cover (Gamma's
    concentration, say) fall back to the score function with a leave-one-out baseline.

    Requires: a registered family with scalar events (``expand`` and ``to_event`` are
    fine); ``f`` need not be differentiable. With ``coupling`` the positive and negative
    draws share their randomness, which lowers the variance.
    Cost: ``N + 2·D·N`` evaluations of ``f`` for ``D`` parameter elements, batched with
    ``vmap``; ``batch_size`` evaluates ``batch_size`` samples at a time (``lax.map``) when
    all ``2·D·N`` at once would not fit in memory. By default that chunking starts when
    the perturbed rows would exceed ``2²²`` elements.

    Example:
        >>> import jax, jax.numpy as jnp, mcgrad as mg, numpyro.distributions as dist
        >>> dist_fn = lambda p: dist.Normal(p["loc"], p["scale"])
        >>> g = mg.grad(lambda x: x ** 2, dist_fn, estimator=mg.measure_valued(),
        ...             num_samples=2000)({"loc": 1.0, "scale": 1.0}, jax.random.key(0))
        >>> bool(abs(g["loc"] - 2.0) < 0.15 and abs(g["scale"] - 2.0) < 0.4)
        True

    Reference: Pflug (1989); Mohamed et al. (2020), §6.
    """

    def surrogate(key: jax.Array, params, state, problem: Problem):
        distribution = problem.dist_fn(params)
        check_registered(distribution, problem.site)
        key_sample, key_derivative = jax.random.split(key)
        samples = jax.lax.stop_gradient(distribution.sample(key_sample, (problem.num_samples,)))
        costs = evaluate_costs(problem.cost_fn, samples, problem.site)
        terms, num_evaluations = weak_derivative_terms(
            key_derivative, distribution, samples, costs, problem.cost_fn, coupling=coupling, batch_size=batch_size
        )
        info = EstimatorInfo(jax.lax.stop_gradient(costs), problem.num_samples + num_evaluations)
        return costs + terms, (state, info)

    return GradientEstimator(
        init_empty_state, surrogate, {"name": "measure_valued", "coupling": coupling, "batch_size": batch_size}
    )

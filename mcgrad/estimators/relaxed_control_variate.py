r"""REBAR and RELAX for Bernoulli sites: a relaxed control variate, trained to cut variance.

A Bernoulli coordinate is the sign of a logistic variable, ``b = 1[z > 0]`` with
``z = φ + log u − log(1 − u)``; ``z̃`` is drawn from ``z`` given ``b`` (with a second
uniform ``v``). With a control variate ``c`` that accepts continuous values,

.. math::

    ĝ = \big(f(b) − c(z̃)\big)\,∇_φ \log p_φ(b) + ∇_φ c(z) − ∇_φ c(z̃)

is unbiased for ``∇_φ E[f(b)]`` whatever ``c`` is (the last two terms are pathwise
through ``z(φ, u)`` and ``z̃(φ, v, b)``). REBAR takes ``c(z) = η f(σ(z/λ))``, the cost at
the relaxed draw; RELAX adds a learned surrogate, ``c(z) = η f(σ(z/λ)) + r_ψ(z)``. The
control's parameters ``(η, λ, ψ)`` live in the estimator state and take one optimizer
step per estimate down the gradient of ``Σ ĝ²`` (the variance, up to a constant): the
gradient *with respect to the site's logits*, which is what the site sees (the same
direction as the variance of the user's parameters' gradient when the logits' Jacobian is
well conditioned).

At a model site inside a ``plate`` each slice's coefficient ``f(b) − c(z̃)`` is its own
slice's, and ``r_ψ`` scores one slice's coordinates. The program is re-run at relaxed
values with NumPyro's support checks off (a Bernoulli ``log p(z)`` is then its formula
``z log p + (1 − z) log(1 − p)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpyro
import optax

from mcgrad.estimators.base import (
    GradientEstimator,
    Site,
    SiteInfo,
    gradient_only,
    per_coordinate,
    row_sum,
)
from mcgrad.estimators.distributions import bernoulli_logits, check_bernoulli

Array = jax.Array
Network = Callable[[Any, Array], Array]  # (network params, one slice's z [D]) -> scalar

_EDGE = 1e-6  # uniforms kept off 0 and 1: log u and log(1 − u) stay finite, and so do their derivatives


class ControlState(NamedTuple):
    """The learned control variate's parameters and their optimizer's state."""

    parameters: dict
    optimizer: Any


def quadratic_surrogate(params: dict, z: Array) -> Array:
    """The default ``r_ψ``: ``Σ_d a·tanh(z_d) + b·tanh(z_d)²`` with two learned scalars (it
    needs no knowledge of the site's size)."""
    squashed = jnp.tanh(z)
    return params["linear"] * jnp.sum(squashed) + params["quadratic"] * jnp.sum(squashed**2)


def _uniforms(key: Array, distribution, sample_shape=()) -> Array:
    shape = tuple(sample_shape) + distribution.shape()
    return jax.random.uniform(key, shape, minval=_EDGE, maxval=1.0 - _EDGE)


def _draw(key: Array, distribution, sample_shape=()) -> Array:
    """``b = 1[φ + log u − log(1 − u) > 0]``: Bernoulli(σ(φ)), from the logistic variable."""
    u = _uniforms(key, distribution, sample_shape)
    z = bernoulli_logits(distribution, u.shape) + jnp.log(u) - jnp.log1p(-u)
    return jax.lax.stop_gradient((z > 0).astype(jax.dtypes.canonicalize_dtype(jnp.int_)))


def _by_slice(x: Array, plate_axes: tuple[int, ...]) -> Array:
    """``[N, *value_shape] -> [N, *plate sizes, coordinates of one slice]``."""
    axes = [1 + a for a in plate_axes]
    moved = jnp.moveaxis(x, axes, list(range(1, 1 + len(axes))))
    return jnp.reshape(moved, moved.shape[: 1 + len(axes)] + (-1,))


def _relax(
    name: str,
    network: Network | None,
    network_params: Any,
    temperature: float,
    scale: float,
    learning_rate: float,
) -> GradientEstimator:
    if not temperature > 0:
        raise ValueError(f"{name}(temperature=...) must be positive, got {temperature!r}.")
    optimizer = optax.adam(learning_rate)

    def init(params):
        del params
        parameters = {
            "log_temperature": jnp.log(jnp.asarray(temperature, jnp.float32)),
            "scale": jnp.asarray(scale, jnp.float32),
        }
        if network is not None:
            parameters["network"] = network_params
        return ControlState(parameters, optimizer.init(parameters))

    def terms(key: Array, state: ControlState, site: Site):
        site = site.coupled_as_rows()  # the relaxation replaces every slice at once
        value_shape = site.value.shape[1:]
        axes = site.slice_axes()
        logits = site.map(lambda d: bernoulli_logits(d, value_shape), site.parameters)
        u = jax.lax.stop_gradient(site.resample(_uniforms, site.parameters))
        v = jax.random.uniform(key, site.value.shape, minval=_EDGE, maxval=1.0 - _EDGE)
        b = site.value.astype(u.dtype)
        cost = _by_slice(per_coordinate(site.cost, value_shape), axes).mean(-1)  # [N, *plates]

        def conditional(phi):  # z̃ ~ p(z | b), through φ
            theta = jax.nn.sigmoid(phi)
            u_given_b = b * ((1.0 - theta) + v * theta) + (1.0 - b) * v * (1.0 - theta)
            return phi + jnp.log(u_given_b) - jnp.log1p(-u_given_b)

        def surrogate(control, z):  # r_ψ per slice: [N, *plates]
            if network is None:
                return jnp.zeros(cost.shape)
            slices = _by_slice(z, axes)
            flat = jnp.reshape(slices, (-1, slices.shape[-1]))
            return jnp.reshape(jax.vmap(lambda s: network(control["network"], s))(flat), cost.shape)

        def objective(phi, control):
            with numpyro.validation_enabled(False):  # relaxed values are off the support by design
                return relaxed_objective(phi, control)

        def relaxed_objective(phi, control):
            temperature_, scale_ = jnp.exp(control["log_temperature"]), control["scale"]
            z = phi + jnp.log(u) - jnp.log1p(-u)
            z_tilde = conditional(phi)
            # The coefficient f(b) − c(z̃): constant in φ, not in the control's parameters.
            fixed_tilde = conditional(jax.lax.stop_gradient(phi))
            relaxed_cost = site.recost_like_cost(jax.nn.sigmoid(fixed_tilde / temperature_))
            relaxed_cost = _by_slice(per_coordinate(relaxed_cost, value_shape), axes).mean(-1)
            coefficient = cost - scale_ * relaxed_cost - surrogate(control, fixed_tilde)
            log_p = _by_slice(b * jax.nn.log_sigmoid(phi) + (1.0 - b) * jax.nn.log_sigmoid(-phi), axes).sum(-1)
            pathwise = scale_ * (
                site.recost(jax.nn.sigmoid(z / temperature_)) - site.recost(jax.nn.sigmoid(z_tilde / temperature_))
            )
            learned = surrogate(control, z) - surrogate(control, z_tilde)
            return jnp.sum(coefficient * log_p) + jnp.sum(pathwise) + jnp.sum(learned)

        def estimate(control):  # ĝ with respect to the logits, [N, *value_shape]
            return jax.grad(objective)(jax.lax.stop_gradient(logits), control)

        def variance(control):
            return jnp.sum(estimate(control) ** 2) / site.num_rows

        gradient = estimate(state.parameters)
        control_gradient = jax.grad(variance)(jax.lax.stop_gradient(state.parameters))
        updates, optimizer_state = optimizer.update(control_gradient, state.optimizer, state.parameters)
        new_state = ControlState(optax.apply_updates(state.parameters, updates), optimizer_state)
        new_state = jax.lax.stop_gradient(new_state)
        terms = row_sum(jax.lax.stop_gradient(gradient) * gradient_only(logits), site.num_rows)
        return terms, new_state, SiteInfo(num_evaluations=3 * site.num_rows)

    def check(distribution, site):
        check_bernoulli(distribution, site, name)

    return GradientEstimator(init, _draw, terms, check, name)


def rebar(temperature: float = 0.5, scale: float = 1.0, learning_rate: float = 1e-3) -> GradientEstimator:
    r"""REBAR for Bernoulli sites: the cost at the relaxed draw as a control variate.

    .. math::  ĝ = \big(f(b) − η f(σ(z̃/λ))\big) ∇_φ \log p_φ(b) + η ∇_φ f(σ(z/λ)) − η ∇_φ f(σ(z̃/λ))

    with ``η`` (``scale``) and ``λ`` (``temperature``) trained inside the fit to minimise
    the estimate's variance (one Adam step of ``learning_rate`` per estimate; they live
    in the estimator state). Unbiased for any ``η, λ``.

    Requires: a Bernoulli site, and a cost that accepts values between 0 and 1 and is
    differentiable there (a model whose downstream code uses the latent arithmetically;
    its ``log p(z)`` is the Bernoulli formula at relaxed values). Cost: 3 evaluations of
    ``f`` per row beyond the row's own, their backward passes, and a second-order pass for
    the variance gradient: several times a DisARM step.

    Example:
        >>> import jax, jax.numpy as jnp, mcgrad as mg, numpyro.distributions as dist
        >>> g = mg.grad(lambda b: jnp.sum((b - 0.45) ** 2), lambda p: dist.Bernoulli(logits=p),
        ...             estimator=mg.rebar(), num_samples=4000)(jnp.zeros(2), jax.random.key(0))
        >>> bool(jnp.all(jnp.abs(g - 0.025) < 0.005))   # exact (1 − 2t)·θ(1 − θ)
        True

    Reference: Tucker, Mnih, Maddison, Lawson & Sohl-Dickstein (2017), "REBAR".
    """
    return _relax("rebar", None, None, temperature, scale, learning_rate)


def relax(
    network: Network | None = None,
    network_params: Any = None,
    *,
    temperature: float = 0.5,
    scale: float = 1.0,
    learning_rate: float = 1e-3,
) -> GradientEstimator:
    r"""RELAX for Bernoulli sites: REBAR's control variate plus a learned surrogate ``r_ψ``.

    .. math::  c(z) = η f(σ(z/λ)) + r_ψ(z),\qquad ĝ = (f(b) − c(z̃)) ∇_φ \log p_φ(b) + ∇_φ c(z) − ∇_φ c(z̃)

    ``network(params, z) -> scalar`` scores one slice's logistic variables ``z`` (one
    datum's latents inside a ``plate``); ``network_params`` is its initial value. Without
    a network, ``r_ψ`` is :func:`quadratic_surrogate` (two scalars). ``η``, ``λ`` and ``ψ``
    are trained to minimise the variance, one Adam step per estimate. Unbiased for any of
    them.

    Requires and costs: as :func:`rebar`, plus the network's evaluations.

    Example:
        >>> import jax, jax.numpy as jnp, mcgrad as mg, numpyro.distributions as dist
        >>> network = lambda w, z: jnp.dot(w, jnp.tanh(z))
        >>> estimator = mg.relax(network, jnp.zeros(2))
        >>> g = mg.grad(lambda b: jnp.sum((b - 0.45) ** 2), lambda p: dist.Bernoulli(logits=p),
        ...             estimator=estimator, num_samples=4000)(jnp.zeros(2), jax.random.key(0))
        >>> bool(jnp.all(jnp.abs(g - 0.025) < 0.005))
        True

    Reference: Grathwohl, Choi, Wu, Roeder & Duvenaud (2018), "Backpropagation through the
    Void".
    """
    if network is None:
        network, network_params = quadratic_surrogate, {"linear": jnp.float32(0.0), "quadratic": jnp.float32(0.0)}
    elif network_params is None:
        raise ValueError("relax(network, network_params): give the network's initial parameters.")
    return _relax("relax", network, network_params, temperature, scale, learning_rate)

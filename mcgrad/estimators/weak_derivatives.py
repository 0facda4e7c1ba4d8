r"""The registry of weak derivatives used by the measure-valued estimator.

A weak derivative of a density with respect to one of its parameters θ is a triple
``(c, p⁺, p⁻)`` with

.. math::  ∂_θ E_{p_θ}[f] = c_θ \big(E_{p⁺}[f] − E_{p⁻}[f]\big).

Entries are keyed by NumPyro distribution class (looked up along the class's MRO, so
subclasses inherit). Each entry names the parameters it covers and, per parameter, a
sampler ``(key, parameters, num_samples, coupling) -> (c, positive, negative)``:

* ``parameters`` maps each covered name to its array, broadcast to the distribution's
  full batch shape (plus any trailing parameter axes: a vector parameter per coordinate);
* ``c`` has the parameter's shape; ``positive`` and ``negative`` have ``[N, *shape]`` and
  hold, for every parameter element, a value of the sample coordinate that element
  governs.

A family with finitely many values per coordinate (Bernoulli, Categorical) needs no
samplers: its entry (:func:`finite_support`) gives the number of values ``K``, and the
weak derivative is the exact sum over them, ``∂_θ E_{p_θ}[f] = Σ_k ∂_θ p_θ(k) f(k)``
(``p⁺`` and ``p⁻`` point masses on the support).

Register your own with :func:`register_weak_derivative`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from numpyro.distributions import Distribution

from mcgrad.estimators.distributions import support_size

Array = jax.Array
DerivativeSampler = Callable[[Array, dict[str, Array], int, bool], tuple[Array, Array, Array]]


class WeakDerivative(NamedTuple):
    """A family's weak derivatives.

    Attributes:
        parameters: ``distribution -> {name: array}`` for the covered parameters (views of
            the distribution's own parameters, differentiable in them).
        samplers: ``{name: DerivativeSampler}``, one per covered parameter.
        stop_covered: ``distribution -> distribution`` with the covered parameters under
            ``stop_gradient``, for families with parameters not covered (their gradient
            falls back to the score function); ``None`` when all are covered.
        support_size: ``distribution -> K`` (static) for a family whose coordinates take
            the values ``0 … K − 1``: every parameter is covered by the exact sum over
            them, and ``parameters`` and ``samplers`` are unused; ``None`` otherwise.
    """

    parameters: Callable[[Distribution], dict[str, Array]]
    samplers: dict[str, DerivativeSampler]
    stop_covered: Callable[[Distribution], Distribution] | None = None
    support_size: Callable[[Distribution], int] | None = None


def finite_support(support_size: Callable[[Distribution], int]) -> WeakDerivative:
    """The entry of a family whose coordinates take the values ``0 … K − 1``,
    ``K = support_size(distribution)``: the measure-valued estimator re-runs each
    coordinate at its other ``K − 1`` values (the draw's own is the row's cost).

    Example:
        >>> import mcgrad as mg, numpyro.distributions as dist
        >>> mg.weak_derivative_for(dist.Bernoulli(logits=0.0)).support_size(dist.Bernoulli(logits=0.0))
        2
    """
    return WeakDerivative(lambda distribution: {}, {}, support_size=support_size)


_REGISTRY: dict[type, WeakDerivative] = {}


def register_weak_derivative(family: type, derivative: WeakDerivative) -> None:
    """Register (or replace) the weak derivatives of a NumPyro distribution class.

    Example:
        >>> import jax, jax.numpy as jnp, mcgrad as mg, numpyro.distributions as dist
        >>> class Shifted(dist.Poisson):   # inherits Poisson's entry already
        ...     pass
        >>> mg.weak_derivative_for(Shifted(1.0)) is mg.weak_derivative_for(dist.Poisson(1.0))
        True
    """
    _REGISTRY[family] = derivative


def registered_families() -> list[str]:
    """Names of the registered distribution classes."""
    return sorted(cls.__name__ for cls in _REGISTRY)


def weak_derivative_for(distribution: Distribution) -> WeakDerivative | None:
    """The entry for ``type(distribution)`` or its nearest registered base class."""
    for cls in type(distribution).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


# --------------------------------------------------------------------------- samplers
# Each sampler draws [N, *shape] positive and negative values for every parameter element.


def _shape(parameters: dict[str, Array], name: str, num_samples: int) -> tuple[int, ...]:
    return (num_samples,) + jnp.shape(parameters[name])


def _lead(value: Array) -> Array:
    """``value`` with a leading axis of 1, to combine with ``[N, *shape]`` draws without
    implicit rank promotion."""
    return jnp.expand_dims(value, 0)


def _normal_loc(key, parameters, num_samples, coupling):
    loc, scale = parameters["loc"], parameters["scale"]
    shape = _shape(parameters, "loc", num_samples)
    key_plus, key_minus = jax.random.split(key)
    # Rayleigh (Weibull(2, ½)) draws: W = sqrt(2·Exp(1)).
    w_plus = jnp.sqrt(2.0 * jax.random.exponential(key_plus, shape))
    w_minus = w_plus if coupling else jnp.sqrt(2.0 * jax.random.exponential(key_minus, shape))
    constant = 1.0 / (scale * math.sqrt(2.0 * math.pi))
    return constant, _lead(loc) + _lead(scale) * w_plus, _lead(loc) - _lead(scale) * w_minus


def _normal_scale(key, parameters, num_samples, coupling):
    loc, scale = parameters["loc"], parameters["scale"]
    shape = _shape(parameters, "scale", num_samples)
    key_normal, key_exponential, key_minus = jax.random.split(key, 3)
    # Double-sided Maxwell, ±√χ²₃, from two draws instead of three normals and a sign:
    # χ²₃ = z² + 2·Exp(1) for z ~ N(0, 1), and the sign of z is independent of both.
    z = jax.random.normal(key_normal, shape)
    magnitude = jnp.sqrt(z**2 + 2.0 * jax.random.exponential(key_exponential, shape))
    maxwell = jnp.where(z < 0.0, -magnitude, magnitude)
    if coupling:  # U·M is exactly N(0, 1).
        gaussian = jax.random.uniform(key_minus, shape) * maxwell
    else:
        gaussian = jax.random.normal(key_minus, shape)
    return 1.0 / scale, _lead(loc) + _lead(scale) * maxwell, _lead(loc) + _lead(scale) * gaussian


def _poisson_rate(key, parameters, num_samples, coupling):
    rate = parameters["rate"]
    shape = _shape(parameters, "rate", num_samples)
    key_plus, key_minus = jax.random.split(key)
    base = jax.random.poisson(key_plus, rate, shape).astype(jnp.result_type(float))
    other = base if coupling else jax.random.poisson(key_minus, rate, shape).astype(base.dtype)
    return jnp.ones_like(rate), base + 1.0, other


def _exponential_rate(key, parameters, num_samples, coupling):
    rate = parameters["rate"]
    shape = _shape(parameters, "rate", num_samples)
    key_a, key_b, key_c = jax.random.split(key, 3)
    first = jax.random.exponential(key_a, shape)
    second = jax.random.exponential(key_b, shape)
    # p⁺ = Exp(θ), p⁻ = Erlang(2)/θ; coupled by sharing the first exponential draw.
    start = first if coupling else jax.random.exponential(key_c, shape)
    return 1.0 / rate, first / _lead(rate), (start + second) / _lead(rate)


def _gamma_rate(key, parameters, num_samples, coupling):
    concentration, rate = parameters["concentration"], parameters["rate"]
    shape = _shape(parameters, "rate", num_samples)
    key_a, key_b, key_c = jax.random.split(key, 3)
    gamma = jax.random.gamma(key_a, jax.lax.stop_gradient(concentration), shape)
    extra = jax.random.exponential(key_b, shape)  # Gamma(a) + Exp(1) = Gamma(a + 1)
    start = gamma if coupling else jax.random.gamma(key_c, jax.lax.stop_gradient(concentration), shape)
    return concentration / rate, gamma / _lead(rate), (start + extra) / _lead(rate)


def _weibull_scale(key, parameters, num_samples, coupling):
    # NumPyro's Weibull(scale λ, concentration k): ∂λ E f = (k/λ)(E_{λ·G^{1/k}} f − E f),
    # G ~ Gamma(2, 1). (The paper's table writes it for a rate on x^k.)
    scale, concentration = parameters["scale"], parameters["concentration"]
    shape = _shape(parameters, "scale", num_samples)
    key_a, key_b, key_c = jax.random.split(key, 3)
    first = jax.random.exponential(key_a, shape)
    second = jax.random.exponential(key_b, shape)
    base = first if coupling else jax.random.exponential(key_c, shape)
    power = _lead(1.0 / jax.lax.stop_gradient(concentration))
    return concentration / scale, _lead(scale) * (first + second) ** power, _lead(scale) * base**power


def _uniform_high(key, parameters, num_samples, coupling):
    low, high = parameters["low"], parameters["high"]
    shape = _shape(parameters, "high", num_samples)
    uniform = _lead(low) + _lead(high - low) * jax.random.uniform(key, shape)
    return 1.0 / (high - low), jnp.broadcast_to(high, shape), uniform


def _uniform_low(key, parameters, num_samples, coupling):
    low, high = parameters["low"], parameters["high"]
    shape = _shape(parameters, "low", num_samples)
    uniform = _lead(low) + _lead(high - low) * jax.random.uniform(key, shape)
    return 1.0 / (high - low), uniform, jnp.broadcast_to(low, shape)


def _attributes(*names: str) -> Callable[[Distribution], dict[str, Array]]:
    return lambda d: {name: getattr(d, name) for name in names}


register_weak_derivative(
    dist.Normal, WeakDerivative(_attributes("loc", "scale"), {"loc": _normal_loc, "scale": _normal_scale})
)
for _cls in (dist.BernoulliProbs, dist.BernoulliLogits, dist.CategoricalProbs, dist.CategoricalLogits):
    register_weak_derivative(_cls, finite_support(support_size))
register_weak_derivative(dist.Poisson, WeakDerivative(_attributes("rate"), {"rate": _poisson_rate}))
register_weak_derivative(dist.Exponential, WeakDerivative(_attributes("rate"), {"rate": _exponential_rate}))
register_weak_derivative(
    dist.Gamma,
    WeakDerivative(
        _attributes("concentration", "rate"),
        {"rate": _gamma_rate},
        stop_covered=lambda d: dist.Gamma(d.concentration, jax.lax.stop_gradient(d.rate)),
    ),
)
register_weak_derivative(
    dist.Weibull,
    WeakDerivative(
        _attributes("scale", "concentration"),
        {"scale": _weibull_scale},
        stop_covered=lambda d: dist.Weibull(jax.lax.stop_gradient(d.scale), d.concentration),
    ),
)
register_weak_derivative(
    dist.Uniform, WeakDerivative(_attributes("low", "high"), {"low": _uniform_low, "high": _uniform_high})
)

r"""``log p(x)`` whose gradient is right everywhere, at the kinks of NumPyro's formulas too.

A score-function estimate multiplies the cost by ``∇_θ log p_θ(x)``, so a wrong gradient of
``log_prob`` at one parameter value biases every estimate taken there. NumPyro 0.22 (under
JAX 0.10) has such points: its numerically stable formulas take derivatives through
``max``, ``|·|`` and ``clip``, where JAX picks one-sided conventions (``max`` and ``clip``
give ``½`` at a tie, ``|·|`` gives ``1`` at ``0``) that need not add up to the derivative
of the function they compute together.

Wrong in NumPyro 0.22, corrected here (``σ`` is the logistic sigmoid, ``ε`` and ``τ`` the
float's ``eps`` and ``tiny``; checked against the closed-form derivative):

* ``BernoulliLogits`` at logits ``l = 0``. NumPyro computes
  ``−[max(l, 0) + log1p(e^{−|l|}) − x·l]``; at ``l = 0`` the two kinks give ``½ − ½`` instead
  of ``σ(0) = ½``, so ``∂_l log p = x`` instead of ``x − ½``. Corrected formula
  ``x·l − softplus(l)``, with ``∂_l = x − σ(l)`` everywhere (``jax.nn.softplus`` has a
  custom derivative, ``σ``).
* ``BinomialLogits`` at ``l = 0``, the same kink times ``n``: ``∂_l = k`` instead of
  ``k − n/2``. Corrected: ``log C(n, k) + k·l − n·softplus(l)``, ``∂_l = k − n·σ(l)``.
* ``BernoulliProbs`` and ``BinomialProbs`` at the clamp ``clip(p, τ, 1 − ε)``: the
  derivative is ``0`` for ``p < τ`` and ``p > 1 − ε`` and halved at ``p = τ`` and
  ``p = 1 − ε`` (e.g. Bernoulli ``x = 0`` at ``p = 0``: ``0`` instead of ``−1``; ``x = 1`` at
  ``p = 1``: ``0`` instead of ``1``; ``x = 1`` at ``p = 1 − ε``: ``½`` instead of ``1``), and
  ``BinomialProbs`` at ``p = 0`` with ``k ≥ 4`` gives ``nan`` in float32 (``k/τ`` overflows
  and meets the clamp's zero). Corrected: ``k·log p + (n − k)·log(1 − p)``, a term with
  count ``0`` being ``0``, and NumPyro's stand-in (``p → τ`` in ``log p``, ``p → 1 − ε`` in
  ``log(1 − p)``) used by a ``where`` only where the logarithm's argument is exactly ``0``;
  so ``∂_p = k/p − (n − k)/(1 − p)`` for every outcome of positive probability. The value
  differs from NumPyro's only where its clamp moves a term that needs none (e.g.
  ``p = 1, k = n``: ``0`` here, ``n·log(1 − ε)`` there; ``p = 1 − ε/2, k = 0``:
  ``n·log(ε/2)`` here, ``n·log ε`` there).
* ``GeometricProbs`` at ``p = 1, x = 0``: NumPyro's guard against ``0·log 0`` replaces
  ``p`` by ``0`` in both terms, so the value is ``−∞`` instead of ``0`` and the derivative
  ``0`` instead of ``1``. Corrected: ``x·log1p(−p) + log p`` with the first term ``0``
  (and constant) when ``x = 0``; ``∂_p = 1/p − x/(1 − p)``.
* ``MultinomialProbs`` at ``p_j = 0`` for a category with count ``x_j = 0``: ``xlogy``'s
  derivative computes ``0/0``, so the gradient is ``nan`` instead of ``0``. Corrected:
  ``Σ_j x_j log p_j`` summing only the categories with ``x_j > 0``; ``∂_{p_j} = x_j/p_j``.

For an outcome of probability zero (``x > 0`` at ``p = 0``, ``x < n`` at ``p = 1``) the true
``log p`` is ``−∞`` and its derivative infinite. There the value stays NumPyro's: for
Bernoulli and Binomial the singular term is NumPyro's constant ``k·log τ`` (or
``(n − k)·log ε``) with derivative ``0`` while the other term keeps its exact derivative
(finite: no ``nan``); for Geometric and Multinomial ``−∞`` with the infinite derivative. Such outcomes are never sampled and get weight ``0`` in an enumeration.

Right in NumPyro 0.22, so delegated (checked numerically at logits ``0``, ``±2``, ``±50``):
``CategoricalLogits`` and ``MultinomialLogits`` (``logsumexp``), ``GeometricLogits``,
``NegativeBinomialLogits`` and ``ZeroInflatedLogits``' gate (``softplus``),
``CategoricalProbs``, ``OrderedLogistic``, ``RelaxedBernoulliLogits``, and the continuous
families. (``Poisson`` gives ``nan`` at rate ``0``, outside its constraint, so it is left
alone.) Every family not listed above is delegated to its own ``log_prob``.

Wrappers are replayed exactly as NumPyro computes them, with this function for the base:
``Independent`` (sum over the reinterpreted dimensions), ``ExpandedDistribution``
(broadcast), ``MaskedDistribution`` (masked entries get ``0``, their values replaced by a
feasible one first), ``ZeroInflatedProbs`` / ``ZeroInflatedLogits``. Other composites
(mixtures, ``TransformedDistribution``, ...) are delegated whole, so a defective family
inside them is not corrected. Families are matched on their exact class: a subclass (which
may override ``log_prob``) is delegated.

Validation is NumPyro's: when the distribution validates its arguments (NumPyro's default),
values outside the support get ``−∞`` (and a zero gradient) exactly as NumPyro's
``validate_sample`` does; with validation off they get the formula's value, as in NumPyro.
Broadcasting here is explicit, and NumPyro's own code (delegated ``log_prob``, support
checks), which relies on implicit rank promotion, runs with it allowed, so ``log_prob``
also works under ``jax.numpy_rank_promotion("raise")``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.special import gammaln
from jax.typing import ArrayLike
from numpyro.distributions import (
    Distribution,
    ExpandedDistribution,
    Independent,
    MaskedDistribution,
)
from numpyro.distributions.discrete import (
    BernoulliLogits,
    BernoulliProbs,
    BinomialLogits,
    BinomialProbs,
    GeometricProbs,
    MultinomialProbs,
    ZeroInflatedLogits,
    ZeroInflatedProbs,
)
from numpyro.distributions.util import sum_rightmost

Array = jax.Array
LogProbFn = Callable[[Distribution, ArrayLike], Array]


def log_prob(distribution: Distribution, value: ArrayLike) -> Array:
    r"""``distribution.log_prob(value)`` with a gradient that is right everywhere.

    .. math::  \log p_θ(x), \qquad ∇_θ \log p_θ(x) \text{ exact at every } θ

    Same value as NumPyro (up to rounding, where NumPyro's is right) and the same shape; the
    gradient with respect to the distribution's parameters (and, for continuous families,
    the value) is the exact derivative, including where NumPyro 0.22's is wrong: Bernoulli
    and Binomial logits at ``0`` (``x`` instead of ``x − σ(0)``), the probability clamp of
    Bernoulli and Binomial probs, Geometric probs at ``p = 1`` and Multinomial probs at
    ``p_j = 0`` (see the module docstring for each defect and its formula). Every other family is NumPyro's own
    ``log_prob``; ``Independent``, ``expand``, ``mask`` and zero-inflated wrappers are
    replayed around the corrected base.

    Requires: a NumPyro distribution. Costs one ``log_prob`` evaluation.

    Args:
        distribution: a NumPyro distribution, possibly wrapped.
        value: a value of shape ``sample_shape + batch_shape + event_shape`` (broadcastable).

    Returns:
        ``log p(value)`` of shape ``sample_shape + batch_shape``.

    Example:
        >>> import jax
        >>> import numpyro.distributions as dist
        >>> from mcgrad.estimators.log_prob import log_prob
        >>> score = jax.grad(lambda logits: log_prob(dist.Bernoulli(logits=logits), 1.0))
        >>> float(score(0.0))  # x − σ(0) = 1 − ½
        0.5
        >>> float(jax.grad(lambda logits: dist.Bernoulli(logits=logits).log_prob(1.0))(0.0))  # NumPyro 0.22
        1.0
    """
    wrapper = _WRAPPERS.get(type(distribution))
    if wrapper is not None:
        return wrapper(distribution, value)
    formula = _CORRECTED.get(type(distribution))
    if formula is None:
        with jax.numpy_rank_promotion("allow"):
            return distribution.log_prob(value)
    return _validated(distribution, value, formula(distribution, value))


def _where(condition, x, y) -> Array:
    """``jnp.where`` with explicit broadcasting (no implicit rank promotion)."""
    return jnp.where(*jnp.broadcast_arrays(condition, x, y))


def _validated(distribution: Distribution, value, log_probs: Array) -> Array:
    """NumPyro's ``validate_sample``: ``−∞`` outside the support when validation is on."""
    if not distribution._validate_args:
        return log_probs
    with jax.numpy_rank_promotion("allow"):
        in_support = distribution._validate_sample(value)
    return _where(in_support, log_probs, -jnp.inf)


def _float(value) -> Array:
    return jnp.asarray(value, dtype=jnp.result_type(float))


# ---- corrected families


@jax.custom_jvp
def _bernoulli_logits_log_prob(logits: Array, value: Array) -> Array:
    # NumPyro's stable formula, `−(max(l, 0) + log1p(e^{−|l|}) − l·x)`, and its limits at
    # infinite logits, written without its `inf · xor(x, l > 0)` trick: that needs a
    # boolean value, and a relaxed (continuous) value differentiated under a transform
    # (REBAR's control variate) sent jax 0.10.2 into unbounded recursion there.
    finite = jnp.isfinite(logits)
    safe = jnp.where(finite, logits, 0.0)
    usual = -(jnp.clip(safe, 0) + jnp.log1p(jnp.exp(-jnp.abs(safe))) - safe * value)
    missing = jnp.where(logits > 0, 1.0 - value, value)  # the mass the infinite logit gives 0
    return jnp.where(finite, usual, jnp.where(missing == 0, 0.0, -jnp.inf))


@_bernoulli_logits_log_prob.defjvp
def _bernoulli_logits_jvp(primals, tangents):
    logits, value = primals
    logits_dot, value_dot = tangents
    with jax.numpy_rank_promotion("allow"):
        out = _bernoulli_logits_log_prob(logits, value)
        return out, (value - jax.nn.sigmoid(logits)) * logits_dot + logits * value_dot


def _bernoulli_logits(distribution: BernoulliLogits, value) -> Array:
    """NumPyro's own value (its stable formula, infinite logits included) with the exact
    derivative ``x − σ(l)`` everywhere, ``l = 0`` included (a custom JVP: the formula's
    ``max`` and ``|·|`` give ``½ − ½`` there). Costs what NumPyro's does."""
    logits, value = jnp.broadcast_arrays(distribution.logits, _float(value))
    return _bernoulli_logits_log_prob(logits, value)


def _binomial_logits(distribution: BinomialLogits, value) -> Array:
    """``log C(n, k) + k·l − n·softplus(l)``."""
    total_count, logits, value = jnp.broadcast_arrays(_float(distribution.total_count), distribution.logits, value)
    log_factorial_n = gammaln(total_count + 1)
    log_factorial_k = gammaln(value + 1)
    log_factorial_nmk = gammaln(total_count - value + 1)
    normalize_term = total_count * jax.nn.softplus(logits) - log_factorial_n
    return value * logits - log_factorial_k - log_factorial_nmk - normalize_term


def _clamped_log_terms(probs, successes, failures) -> Array:
    """``k·log p + m·log(1 − p)``, a term with count ``0`` being ``0`` (constant in ``p``).

    Only where a logarithm's argument is ``0`` (or past it) does it see NumPyro's stand-in,
    ``τ`` for ``p`` and ``ε`` for ``1 − p``, with derivative ``0``; everywhere else the
    derivative is exact (a ``where``, so no tie at the bound).
    """
    finfo = jnp.finfo(jnp.result_type(probs, float))
    low = jnp.where(probs > 0, probs, finfo.tiny)
    high = jnp.where(probs < 1, probs, 1 - finfo.eps)
    success_term = jnp.where(successes == 0, 0.0, successes * jnp.log(low))
    failure_term = jnp.where(failures == 0, 0.0, failures * jnp.log1p(-high))
    return success_term + failure_term


def _bernoulli_probs(distribution: BernoulliProbs, value) -> Array:
    """``x·log p + (1 − x)·log(1 − p)``, NumPyro's clamp only at ``log 0``."""
    probs, value = jnp.broadcast_arrays(distribution.probs, _float(value))
    return _clamped_log_terms(probs, value, 1 - value)


def _binomial_probs(distribution: BinomialProbs, value) -> Array:
    """``log C(n, k) + k·log p + (n − k)·log(1 − p)``, NumPyro's clamp only at ``log 0``."""
    total_count, probs, value = jnp.broadcast_arrays(
        _float(distribution.total_count), distribution.probs, _float(value)
    )
    log_binomial = gammaln(total_count + 1) - gammaln(value + 1) - gammaln(total_count - value + 1)
    return log_binomial + _clamped_log_terms(probs, value, total_count - value)


def _geometric_probs(distribution: GeometricProbs, value) -> Array:
    """``x·log(1 − p) + log p``, the first term ``0`` (and constant) at ``x = 0``."""
    probs, value = jnp.broadcast_arrays(distribution.probs, jnp.asarray(value))
    failed = value != 0
    safe_probs = jnp.where(failed, probs, 0.0)
    return jnp.where(failed, value * jnp.log1p(-safe_probs), 0.0) + jnp.log(probs)


def _multinomial_probs(distribution: MultinomialProbs, value) -> Array:
    """``log n! + Σ_j (x_j log p_j − log x_j!)``, categories with ``x_j = 0`` contributing ``0``."""
    probs, value = jnp.broadcast_arrays(distribution.probs, _float(value))
    counted = value > 0
    safe_probs = jnp.where(counted, probs, 1.0)
    terms = jnp.where(counted, value * jnp.log(safe_probs), 0.0) - gammaln(value + 1)
    sums = jnp.sum(terms, axis=-1)
    return jnp.add(*jnp.broadcast_arrays(gammaln(_float(distribution.total_count) + 1), sums))


_CORRECTED: dict[type, LogProbFn] = {
    BernoulliLogits: _bernoulli_logits,
    BernoulliProbs: _bernoulli_probs,
    BinomialLogits: _binomial_logits,
    BinomialProbs: _binomial_probs,
    GeometricProbs: _geometric_probs,
    MultinomialProbs: _multinomial_probs,
}


# ---- wrappers, replayed as NumPyro 0.22 computes them


def _independent(distribution: Independent, value) -> Array:
    return sum_rightmost(log_prob(distribution.base_dist, value), distribution.reinterpreted_batch_ndims)


def _expanded(distribution: ExpandedDistribution, value) -> Array:
    shape = lax.broadcast_shapes(
        distribution.batch_shape, jnp.shape(value)[: max(jnp.ndim(value) - distribution.event_dim, 0)]
    )
    return jnp.broadcast_to(log_prob(distribution.base_dist, value), shape)


def _masked(distribution: MaskedDistribution, value) -> Array:
    base, mask = distribution.base_dist, distribution._mask
    if mask is False:
        shape = lax.broadcast_shapes(
            tuple(base.batch_shape), jnp.shape(value)[: max(jnp.ndim(value) - len(distribution.event_shape), 0)]
        )
        return jnp.zeros(shape)
    if mask is True:
        return log_prob(base, value)
    try:
        with jax.numpy_rank_promotion("allow"):
            default_value = base.support.feasible_like(value)
    except NotImplementedError:
        pass
    else:
        value_mask = jnp.reshape(mask, jnp.shape(mask) + (1,) * distribution.event_dim)
        value = _where(value_mask, value, default_value)
    return _where(mask, log_prob(base, value), 0.0)


def _zero_inflated_probs(distribution: ZeroInflatedProbs, value) -> Array:
    gate, base_log_probs = jnp.broadcast_arrays(distribution.gate, log_prob(distribution.base_dist, value))
    log_probs = jnp.log1p(-gate) + base_log_probs
    zero_log_probs = jnp.log(gate + jnp.exp(log_probs))
    return _validated(distribution, value, _where(value == 0, zero_log_probs, log_probs))


def _zero_inflated_logits(distribution: ZeroInflatedLogits, value) -> Array:
    gate_logits, base_log_probs = jnp.broadcast_arrays(
        distribution.gate_logits, log_prob(distribution.base_dist, value)
    )
    log_prob_minus_log_gate = -gate_logits + base_log_probs
    log_gate = -jax.nn.softplus(-gate_logits)
    log_probs = log_prob_minus_log_gate + log_gate
    zero_log_probs = jax.nn.softplus(log_prob_minus_log_gate) + log_gate
    return _validated(distribution, value, _where(value == 0, zero_log_probs, log_probs))


_WRAPPERS: dict[type, LogProbFn] = {
    Independent: _independent,
    ExpandedDistribution: _expanded,
    MaskedDistribution: _masked,
    ZeroInflatedProbs: _zero_inflated_probs,
    ZeroInflatedLogits: _zero_inflated_logits,
}

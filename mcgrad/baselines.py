"""Baselines: transforms of the score-function learning signal.

A baseline maps the learning signal ``L = [f(x_1), …, f(x_N)]`` to ``L − b`` before it
multiplies the score ``∇θ log p(x_i)``. A baseline that does not depend on ``x_i`` keeps
the estimator unbiased, since ``E[∇θ log p(x)] = 0``; a good one lowers the variance.

Like optax transforms, each is a factory returning a :class:`Baseline` (a NamedTuple of
``init`` and ``update``), and :func:`chain` composes them::

    mg.score_function(baseline=mg.baselines.chain(
        mg.baselines.moving_average(0.9), mg.baselines.learned()))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mcgrad.estimators.base import EmptyState

Params = Any
Signal = Any  # an [N] array, or a params-shaped pytree of [N, ...] arrays (per parameter)


class BaselineContext(NamedTuple):
    """What a baseline may look at besides the signal.

    Attributes:
        scores: ``() -> ∇ log p(x_i)`` with respect to the distribution's parameters, a
            leading ``N`` on every leaf (computed only by the baselines that ask for it).
        num_samples: ``N``.
        leave_one_out: ``[N]``, each row's signal with that row left out, where the
            objective couples the rows (VIMCO for multi-sample bounds); ``None``: the mean
            of the other rows' signals.
    """

    scores: Callable[[], Params]
    num_samples: int
    leave_one_out: jax.Array | None = None


class Baseline(NamedTuple):
    """``init(params) -> state``; ``update(signal, state, context) -> (signal − b, state)``."""

    init: Callable[[Params], Any]
    update: Callable[[Signal, Any, BaselineContext], tuple[Signal, Any]]


def _stateless(center: Callable[[Signal, BaselineContext], Signal]) -> Baseline:
    return Baseline(lambda params: EmptyState(), lambda signal, state, context: (center(signal, context), state))


def none() -> Baseline:
    """No baseline: the learning signal passes unchanged.

    Example:
        >>> import jax.numpy as jnp, mcgrad as mg
        >>> mg.baselines.none().update(jnp.ones(3), (), None)[0].tolist()
        [1.0, 1.0, 1.0]
    """
    return _stateless(lambda signal, context: signal)


def constant(value: float) -> Baseline:
    """Subtract a fixed ``value`` (e.g. the exact ``E f`` in a variance study).

    Example:
        >>> import jax.numpy as jnp, mcgrad as mg
        >>> mg.baselines.constant(1.0).update(jnp.array([1.0, 3.0]), (), None)[0].tolist()
        [0.0, 2.0]
    """
    return _stateless(lambda signal, context: signal - value)


def leave_one_out() -> Baseline:
    r"""Leave-one-out (RLOO): ``b_i = \frac{1}{N-1} \sum_{j≠i} f(x_j)``.

    Unbiased because ``b_i`` is independent of ``x_i``. Needs ``N ≥ 2``. Under a
    multi-sample bound (:func:`mcgrad.iwae`, :func:`mcgrad.renyi`) every particle's signal
    is the bound itself, and ``b_i`` is the bound with particle ``i`` replaced by the
    others' mean (VIMCO; Mnih & Rezende, 2016), which the objective supplies.

    Reference: Kool, van Hoof, Welling (2019), "Buy 4 REINFORCE samples, get a baseline
    for free!".

    Example:
        >>> import jax.numpy as jnp, mcgrad as mg
        >>> mg.baselines.leave_one_out().update(jnp.array([1.0, 3.0]), (), None)[0].tolist()
        [-2.0, 2.0]
    """

    def center(signal, context):
        n = signal.shape[0]
        if n < 2:
            raise ValueError("leave_one_out() needs at least 2 samples (num_samples >= 2).")
        if context is not None and context.leave_one_out is not None:
            return signal - jnp.reshape(context.leave_one_out, (n,) + (1,) * (signal.ndim - 1))
        return signal - (jnp.sum(signal, axis=0, keepdims=True) - signal) / (n - 1)

    return _stateless(center)


class MovingAverageState(NamedTuple):
    average: jax.Array
    count: jax.Array


def moving_average(decay: float = 0.9) -> Baseline:
    r"""Exponential moving average of past mean signals, bias-corrected as in Adam.

    ``b_t = \bar L_{t-1}`` with ``\bar L_t = decay·\bar L_{t-1} + (1 − decay)·mean_i L_i``.
    Uses only previous steps, so it is unbiased; zero on the first step.

    Example:
        >>> import jax.numpy as jnp, mcgrad as mg
        >>> baseline = mg.baselines.moving_average(0.5)
        >>> state = baseline.init(None)
        >>> _, state = baseline.update(jnp.array([2.0, 4.0]), state, None)
        >>> baseline.update(jnp.array([2.0, 4.0]), state, None)[0].tolist()
        [-1.0, 1.0]
    """

    def init(params):
        return MovingAverageState(jnp.zeros(()), jnp.zeros((), jnp.int32))

    def update(signal, state, context):
        correction = 1.0 - decay ** state.count.astype(jnp.float32)
        b = jnp.where(state.count > 0, state.average / jnp.maximum(correction, 1e-12), 0.0)
        average = decay * state.average + (1.0 - decay) * jnp.mean(signal)
        return signal - b, MovingAverageState(average, state.count + 1)

    return Baseline(init, update)


def optimal_constant() -> Baseline:
    r"""The variance-optimal constant per parameter, estimated leave-one-out.

    For each parameter coordinate ``d``, ``b_d = E[f s_d²] / E[s_d²]`` with
    ``s = ∇θ log p(x)`` minimises the variance of ``(f − b_d) s_d``. Each sample uses the
    estimate from the other ``N − 1`` samples, so the estimator stays unbiased. The
    signal becomes per-parameter, so this baseline comes last in a :func:`chain`.

    Cost: the per-sample scores (a Jacobian of ``N`` log-densities).

    Example:
        >>> import jax, mcgrad as mg, numpyro.distributions as dist
        >>> estimator = mg.score_function(baseline=mg.baselines.optimal_constant())
        >>> g = mg.grad(lambda x: x ** 2, lambda p: dist.Normal(p["loc"], 1.0),
        ...             estimator=estimator, num_samples=500)({"loc": 1.0}, jax.random.key(0))
        >>> bool(abs(g["loc"] - 2.0) < 0.5)
        True
    """

    def center(signal, context):
        scores = context.scores()

        def per_leaf(score):
            n = score.shape[0]
            sig = jnp.reshape(signal, (n,) + (1,) * (score.ndim - 1))
            weight = score**2
            numerator = jnp.sum(sig * weight, axis=0, keepdims=True) - sig * weight
            denominator = jnp.sum(weight, axis=0, keepdims=True) - weight
            b = jnp.where(denominator > 0, numerator / jnp.where(denominator > 0, denominator, 1.0), 0.0)
            return sig - b

        return jax.tree.map(per_leaf, scores)

    return _stateless(center)


class LearnedState(NamedTuple):
    params: Any
    optimizer_state: Any


def learned(
    optimizer: optax.GradientTransformation | None = None,
    init_params: Any = 0.0,
    baseline_fn: Callable[[Any], jax.Array] | None = None,
) -> Baseline:
    r"""A baseline trained by its own squared-error loss ``mean_i (L_i − b)²``.

    ``b = baseline_fn(params)`` (a constant by default). The baseline used at a step is
    the one learned from previous steps, so it is independent of the current samples
    and the estimator stays unbiased. Its parameters and optimizer state live in the
    estimator state.

    Args:
        optimizer: an optax optimizer for the baseline (default ``optax.adam(0.1)``).
        init_params: initial baseline parameters (a pytree; a scalar by default).
        baseline_fn: ``params -> scalar`` (e.g. a small network's output); identity by
            default.

    Example:
        >>> import jax.numpy as jnp, mcgrad as mg, optax
        >>> baseline = mg.baselines.learned(optax.sgd(0.5))
        >>> state = baseline.init(None)
        >>> for _ in range(20):
        ...     _, state = baseline.update(jnp.array([3.0, 5.0]), state, None)
        >>> round(float(state.params), 3)
        4.0
    """
    optimizer = optimizer if optimizer is not None else optax.adam(0.1)
    baseline_fn = baseline_fn if baseline_fn is not None else (lambda p: p)

    def init(params):
        # Strongly typed (a Python float would give a weak-typed leaf that the first
        # update makes strong, so a jitted step retraces on its own returned state).
        init_value = jax.tree.map(lambda v: jnp.asarray(v, dtype=jnp.asarray(v).dtype), init_params)
        return LearnedState(init_value, optimizer.init(init_value))

    def update(signal, state, context):
        b = baseline_fn(state.params)

        def loss(p):
            return jnp.mean((jax.lax.stop_gradient(signal) - baseline_fn(p)) ** 2)

        grads = jax.grad(loss)(state.params)
        updates, optimizer_state = optimizer.update(grads, state.optimizer_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        return signal - jax.lax.stop_gradient(b), LearnedState(new_params, optimizer_state)

    return Baseline(init, update)


def chain(*baselines: Baseline) -> Baseline:
    """Apply baselines in order, each to the signal the previous one left.

    Example:
        >>> import jax.numpy as jnp, mcgrad as mg
        >>> both = mg.baselines.chain(mg.baselines.constant(1.0), mg.baselines.leave_one_out())
        >>> both.update(jnp.array([1.0, 3.0]), both.init(None), None)[0].tolist()
        [-2.0, 2.0]
    """

    def init(params):
        return tuple(b.init(params) for b in baselines)

    def update(signal, state, context):
        new_states = []
        for baseline, sub_state in zip(baselines, state, strict=True):
            signal, sub_state = baseline.update(signal, sub_state, context)
            new_states.append(sub_state)
        return signal, tuple(new_states)

    return Baseline(init, update)

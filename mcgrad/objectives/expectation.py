"""Minimise an expectation directly with any core estimator, under ``mg.fit``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from numpyro.distributions import constraints

from mcgrad.estimators.base import GradientEstimator, Problem, surrogate
from mcgrad.inference.params import ParamInfo
from mcgrad.objectives.base import Objective, ObjectiveSetup


def expectation(
    cost_fn: Callable[[jax.Array, Any, Any], jax.Array],
    dist_fn: Callable[[Any], Any],
    init_params: dict,
    *,
    estimator: GradientEstimator,
    num_samples: int,
    data: Any = None,
    batch_size: int | None = None,
) -> Objective:
    r"""``E_{dist_fn(θ)}[cost_fn(x, θ, batch)]`` with one core estimator — control variates too.

    The bridge between the low-level entry points and :func:`mcgrad.fit`: any
    :class:`~mcgrad.estimators.base.GradientEstimator` (e.g.
    ``with_control_variate(score_function(), delta_method())``) trains ``θ`` with fit's
    compiled loop, progress bar, non-finite guard and variance diagnostics. ``batch`` is a
    minibatch of ``data`` (a pytree with a leading axis) drawn without replacement each
    step, or ``data`` itself when ``batch_size`` is ``None``. Pass ``model=None,
    guide=None`` to ``fit``; parameters are unconstrained (transform them in ``dist_fn``).

    Args:
        cost_fn: ``(x, params, batch) -> scalar`` for one sample ``x``.
        dist_fn: ``params -> distribution``.
        init_params: initial parameters (a dict of arrays).
        estimator: any core estimator.
        num_samples: samples per step.
        data: a pytree of arrays with a leading data axis, or ``None``.
        batch_size: minibatch size drawn from ``data`` each step (``None``: all of it).

    Example:
        >>> import jax, jax.numpy as jnp, mcgrad as mg, numpyro.distributions as dist, optax
        >>> objective = mg.expectation(
        ...     lambda x, params, batch: (x - 3.0) ** 2,
        ...     lambda params: dist.Normal(params["loc"], 1.0), {"loc": jnp.zeros(())},
        ...     estimator=mg.with_control_variate(mg.score_function(), mg.delta_method()),
        ...     num_samples=10)
        >>> result = mg.fit(None, None, key=jax.random.key(0), num_steps=200,
        ...                 optimizer=optax.sgd(0.1), objective=objective, progress_bar=False)
        >>> round(float(result.params["loc"]), 3)
        3.0
    """

    def setup(model, guide, args, kwargs, estimators, key):
        if model is not None or guide is not None or estimators:
            raise ValueError("expectation(...) carries its own cost and distribution; call fit(None, None, ...).")
        params = jax.tree.map(jnp.asarray, init_params)
        param_info = ParamInfo(params, {name: constraints.real for name in params})

        def objective_surrogate(params, state, key, args, kwargs, shard=None):
            key_batch, key_estimate = jax.random.split(key)
            batch = data
            if batch_size is not None:
                size = jax.tree.leaves(data)[0].shape[0]
                index = jax.random.choice(key_batch, size, (batch_size,), replace=False)
                batch = jax.tree.map(lambda leaf: leaf[index], data)
            problem = Problem(lambda x: cost_fn(x, params, batch), dist_fn, num_samples)
            s, (new_state, info) = surrogate(estimator, key_estimate, params, state, problem)
            return s, (new_state, info.costs)

        return ObjectiveSetup(param_info, estimator.init(params), objective_surrogate, {})

    return Objective("expectation", num_samples, setup)

"""The objective type: what expectation is minimised, independent of how its gradient is estimated."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mcgrad.inference.params import ParamInfo

Array = jax.Array


class ObjectiveSetup(NamedTuple):
    """An objective bound to one model (and guide).

    Attributes:
        params: initial unconstrained ``numpyro.param`` values and their constraints.
        init_state: the objective's initial state (baseline states, a critic and its
            optimizer, …).
        surrogate: ``(params, state, key, args, kwargs, shard) -> (s [M], (state, losses [M]))``
            with *constrained* params and the model's arguments of this step (a new
            minibatch each step, say); ``mean(s)`` has the Monte Carlo loss as value and
            the estimated gradient as gradient; ``shard`` places particle keys on devices
            (``None``: leave them).
        estimators: the estimator chosen for each latent site (empty when there are none).
    """

    params: ParamInfo
    init_state: Any
    surrogate: Callable[..., tuple[Array, tuple[Any, Array]]]
    estimators: dict


class Objective(NamedTuple):
    """A loss to minimise over a NumPyro model: ``setup(model, guide, args, kwargs, estimators, key)``.

    ELBO-type objectives also work as the ``loss`` of ``numpyro.infer.SVI``.
    """

    name: str
    num_particles: int
    setup: Callable[..., ObjectiveSetup]

    # numpyro.infer.SVI asks its loss this before accepting discrete latent sites; mcgrad
    # estimates their gradients (score function, measure-valued), so it can.
    can_infer_discrete = True

    def loss_with_mutable_state(self, rng_key, param_map, model, guide, *args, **kwargs):
        """The ``numpyro.infer.SVI`` loss protocol: value is the loss, gradient is mcgrad's estimate."""
        bound = self.setup(model, guide, args, kwargs, None, rng_key)
        surrogate, _ = bound.surrogate(param_map, bound.init_state, rng_key, args, kwargs, None)
        return {"loss": jnp.mean(surrogate), "mutable_state": None}

    def loss(self, rng_key, param_map, model, guide, *args, **kwargs):
        """The ``numpyro.infer.SVI`` loss: value is the Monte Carlo loss, gradient mcgrad's estimate.

        ``SVI.update`` differentiates this (it calls ``loss_with_mutable_state`` only when
        the model has mutable state), and ``SVI.evaluate`` reads its value.
        """
        return self.loss_with_mutable_state(rng_key, param_map, model, guide, *args, **kwargs)["loss"]

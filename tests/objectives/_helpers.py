"""What the objective tests share: repeated independent estimates from the public
:class:`mcgrad.Trainer` at chosen parameters, and the standard-error tolerance."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mcgrad as mg

NUM_SE = 5.0
# These tests are dominated by XLA compile time, not run time: compile with cheap
# backend optimisation (the numbers are the same; only the generated code is slower).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def make_trainer(model, guide, args, objective, estimators=None):
    """A trainer that never moves (SGD at rate 0): only its ``estimate`` is used."""
    return mg.trainer(
        model, guide, *args, key=jax.random.key(0), objective=objective, optimizer=optax.sgd(0.0), estimators=estimators
    )


def at_params(training, params, positive=()):
    """The trainer's initial state at constrained ``params`` (``positive``: stored as logs)."""
    unconstrained = {n: jnp.log(v) if n in positive else v for n, v in params.items()}
    return training.init(jax.random.key(1))._replace(params=unconstrained)


def repeated(training, params, args, num_repeats, key, positive=()):
    """``num_repeats`` independent (value, gradient) estimates at constrained ``params``,
    gradients in the same coordinates (``d/dscale = d/dlog scale / scale`` for ``positive``)."""
    state = at_params(training, params, positive)

    def one(k):
        loss, grads, _ = training.estimate(state, k, *args)
        return loss, {n: g / params[n] if n in positive else g for n, g in grads.items()}

    values, grads = jax.jit(jax.vmap(one), compiler_options=FAST_COMPILE)(jax.random.split(key, num_repeats))
    return np.asarray(values, np.float64), {n: np.asarray(g, np.float64) for n, g in grads.items()}


def mean_se(samples):
    """Mean and standard error over the first axis."""
    return samples.mean(axis=0), samples.std(axis=0, ddof=1) / np.sqrt(samples.shape[0])

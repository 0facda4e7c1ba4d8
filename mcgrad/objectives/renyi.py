"""The Rényi-α bound (Li & Turner, 2016): from the ELBO (α → 1) through IWAE (α = 0)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mcgrad.inference.params import constrain
from mcgrad.inference.particles import init_site_states
from mcgrad.objectives.base import Objective, ObjectiveSetup
from mcgrad.objectives.elbo import bind_variational, check_num_particles
from mcgrad.objectives.multi_sample import bound_surrogate, keep_log_density


def renyi(alpha: float = 0.0, num_particles: int = 2) -> Objective:
    r"""The negative Rényi-α bound, ``−E[\frac{1}{1−α} \log \frac1K \sum_k w_k^{1−α}]``.

    With ``w_k = p(x, z_k)/q(z_k)`` for ``K`` guide draws. ``α = 0`` is the IWAE bound,
    ``α → 1`` the ELBO; ``α ≥ 0`` keeps it a lower bound of ``log p(x)``, and ``α < 0``
    (an upper-bound-leaning objective) is allowed as in NumPyro's ``RenyiELBO``. Pathwise
    sites differentiate through the weights ``softmax((1−α) log w)``; every other site
    uses its own estimator with the bound as each particle's cost (VIMCO-style
    leave-one-out for the score function), so discrete latents are unbiased too, where
    NumPyro's ``RenyiELBO`` supports only reparameterized ones.

    Args:
        alpha: the order ``α`` (any float but 1; use :func:`mcgrad.elbo` there).
        num_particles: ``K`` (a whole number ``≥ 2``).

    Example:
        >>> import jax, mcgrad as mg, numpyro, numpyro.distributions as dist, optax
        >>> def model(x):
        ...     z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        ...     numpyro.sample("x", dist.Normal(z, 1.0), obs=x)
        >>> def guide(x):
        ...     numpyro.sample("z", dist.Normal(numpyro.param("loc", 0.0), 1.0))
        >>> result = mg.fit(model, guide, 2.0, key=jax.random.key(0), num_steps=300,
        ...                 optimizer=optax.adam(0.05), objective=mg.renyi(0.5, 8), progress_bar=False)
        >>> bool(abs(result.params["loc"] - 1.0) < 0.2)   # the posterior mean is x/2
        True

    Reference: Li & Turner (2016), "Rényi Divergence Variational Inference".
    """
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha == 1 or not jnp.isfinite(alpha):
        raise ValueError(f"renyi(alpha=...) must be a finite number other than 1 (use mg.elbo() for 1), got {alpha!r}.")
    check_num_particles("renyi", num_particles, 2)
    scale = 1.0 - alpha

    def bound(log_weights: jax.Array) -> jax.Array:
        return (jax.nn.logsumexp(scale * log_weights) - jnp.log(log_weights.shape[0])) / scale

    def setup(model, guide, args, kwargs, estimators, key):
        variational = bind_variational(model, guide, args, kwargs, estimators, key, num_particles,
                                       independent_particles=False)
        program = variational.program._replace(stop_log_density=keep_log_density)

        def surrogate(params, state, key, args, kwargs, shard=None):
            return bound_surrogate(program, params, state, key, num_particles, args, kwargs, shard, bound)

        params = constrain(variational.params.unconstrained, variational.params.constraints)
        return ObjectiveSetup(variational.params, init_site_states(program.estimators, params), surrogate, program.estimators)

    return Objective(f"renyi({alpha:g})", num_particles, setup)

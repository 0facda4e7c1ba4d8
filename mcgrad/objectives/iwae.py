"""The importance-weighted bound (IWAE), with VIMCO and doubly-reparameterized gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mcgrad.estimators.base import gradient_only
from mcgrad.inference.params import constrain
from mcgrad.inference.particles import draw_particles, init_site_states
from mcgrad.objectives.base import Objective, ObjectiveSetup
from mcgrad.objectives.elbo import bind_variational, check_num_particles
from mcgrad.objectives.multi_sample import bound_surrogate, bound_terms, keep_log_density


def log_mean_exp(log_weights: jax.Array) -> jax.Array:
    """``log (1/M) Σ_k exp(log w_k)``: the IWAE bound of one set of particles."""
    return jax.nn.logsumexp(log_weights) - jnp.log(log_weights.shape[0])


def iwae(num_particles: int = 5, doubly_reparameterized: bool = False) -> Objective:
    r"""The negative importance-weighted bound, ``−E[log (1/K) Σ_k p(x, z_k)/q(z_k)]``.

    Pathwise sites differentiate through the normalised weights ``ŵ_k``. Every other site
    uses its own estimator with the bound as each particle's cost: the score function's
    leave-one-out baseline becomes VIMCO's ``F − F_{−k}`` (Mnih & Rezende, 2016), with
    ``F_{−k}`` the bound with ``log w_k`` replaced by the mean of the others; a
    measure-valued site re-costs the bound with one particle's draw replaced.

    With ``doubly_reparameterized`` (DReG; Tucker, Lawson, Gu, Maddison, 2019) the guide's
    parameters get ``Σ_k ŵ_k² ∂log w_k/∂z_k · ∂z_k/∂φ`` (``log q`` with its parameters
    stopped), whose signal-to-noise ratio does not decay as ``K`` grows; the model's
    parameters keep ``Σ_k ŵ_k ∇θ log w_k``. Costs a second particle pass when the model
    has parameters of its own.

    Args:
        num_particles: ``K``, importance samples per step (a whole number ``≥ 2``).
        doubly_reparameterized: use DReG for the guide's parameters.

    Example:
        >>> import jax, mcgrad as mg, numpyro, numpyro.distributions as dist, optax
        >>> def model(x):
        ...     z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        ...     numpyro.sample("x", dist.Normal(z, 1.0), obs=x)
        >>> def guide(x):
        ...     numpyro.sample("z", dist.Normal(numpyro.param("loc", 0.0), 1.0))
        >>> result = mg.fit(model, guide, 2.0, key=jax.random.key(0), num_steps=200,
        ...                 optimizer=optax.adam(0.05), objective=mg.iwae(8), progress_bar=False)
        >>> result.losses.shape
        (200,)

    Reference: Burda, Grosse, Salakhutdinov (2016).
    """
    check_num_particles("iwae", num_particles, 2)

    def setup(model, guide, args, kwargs, estimators, key):
        bound = bind_variational(model, guide, args, kwargs, estimators, key, num_particles,
                                 independent_particles=False)
        program = bound.program._replace(stop_log_density=keep_log_density)
        guide_params = {name for name, site in bound.guide_trace.items() if site["type"] == "param"}

        def surrogate(params, state, key, args, kwargs, shard=None):
            if not doubly_reparameterized:
                return bound_surrogate(program, params, state, key, num_particles, args, kwargs, shard, log_mean_exp)
            # DReG: log q of reparameterized sites with its parameters stopped, model params stopped.
            dreg = program._replace(stop_log_density=lambda estimator: estimator.reparameterized)
            only_guide = {n: v if n in guide_params else jax.lax.stop_gradient(v) for n, v in params.items()}
            particles, layouts = draw_particles(dreg, only_guide, key, num_particles, args, kwargs, shard)
            terms, new_state, value = bound_terms(
                dreg, only_guide, state, particles, layouts, args, kwargs, log_mean_exp
            )
            log_weights = -particles.loss
            weights = jax.lax.stop_gradient(jax.nn.softmax(log_weights))
            per_particle = terms - num_particles * weights**2 * gradient_only(log_weights)
            model_params = set(params) - guide_params
            if model_params:
                only_model = {n: v if n in model_params else jax.lax.stop_gradient(v) for n, v in params.items()}
                model_particles, _ = draw_particles(program, only_model, key, num_particles, args, kwargs, shard)
                per_particle = per_particle + num_particles * weights * gradient_only(model_particles.loss)
            s = -jax.lax.stop_gradient(value) + per_particle
            return s, (new_state, jax.lax.stop_gradient(particles.loss))

        params = constrain(bound.params.unconstrained, bound.params.constraints)
        return ObjectiveSetup(bound.params, init_site_states(program.estimators, params), surrogate, program.estimators)

    return Objective("iwae", num_particles, setup)

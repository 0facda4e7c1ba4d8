"""Variational objectives: the ELBO and the importance-weighted bound (IWAE)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from numpyro import handlers

from mcgrad import inference
from mcgrad.estimators.base import gradient_only
from mcgrad.inference import (
    ParticleSetup,
    Term,
    describe_site,
    latent_sites,
    site_log_prob,
    site_plates,
)
from mcgrad.objectives.base import Objective, ObjectiveSetup, identity_shard


def _model_terms(model, args, kwargs):
    def cost_terms(guide_trace, params, key):
        model_fn = handlers.substitute(handlers.replay(handlers.seed(model, key), trace=guide_trace), data=params)
        model_trace = handlers.trace(model_fn).get_trace(*args, **kwargs)
        return [
            Term(-site_log_prob(site), site_plates(site), float("inf"))
            for site in model_trace.values()
            if site["type"] == "sample"
        ]

    return cost_terms


def check_model_and_guide(model_trace: dict, guide_trace: dict) -> None:
    """Clear errors for a guide that does not match its model."""
    for name, site in guide_trace.items():
        if site["type"] == "sample" and site["is_observed"]:
            raise ValueError(
                f"site {describe_site(site)} is observed in the guide. Observations belong in the "
                "model only: drop `obs=` from the guide's numpyro.sample."
            )
    for name, site in model_trace.items():
        if site["type"] == "sample" and not site["is_observed"] and name not in guide_trace:
            raise ValueError(
                f"the guide has no sample site for the model's latent site {describe_site(site)}. Add "
                f"numpyro.sample('{name}', ...) to the guide, or use an autoguide such as "
                "numpyro.infer.autoguide.AutoNormal(model)."
            )


def _bind(model, guide, args, kwargs, estimators, key, num_particles, sticking_the_landing):
    if guide is None:
        raise ValueError("an ELBO-type objective needs a guide; for a model without latents use mg.maximum_likelihood().")
    param_info = inference.find_params([(guide, args, kwargs), (model, args, kwargs)], key)
    params = inference.constrain(param_info.unconstrained, param_info.constraints)
    guide_trace, num_site_keys = inference.trace_program(guide, params, key, args, kwargs)
    model_fn = handlers.substitute(handlers.replay(handlers.seed(model, key), trace=guide_trace), data=params)
    model_trace = handlers.trace(model_fn).get_trace(*args, **kwargs)
    check_model_and_guide(model_trace, guide_trace)
    # replay copies the guide's `infer` onto the model's sites, so read the model's own
    # `infer={"estimator": ...}` annotations from a trace that substitutes the guide's draws.
    guide_values = {n: s["value"] for n, s in guide_trace.items() if s["type"] == "sample" and not s["is_observed"]}
    own_fn = handlers.substitute(handlers.seed(model, key), data={**params, **guide_values})
    annotated = {
        name: site["infer"]["estimator"]
        for name, site in handlers.trace(own_fn).get_trace(*args, **kwargs).items()
        if site["type"] == "sample" and "estimator" in site.get("infer", {})
    }
    chosen = inference.resolve_estimators(guide_trace, annotated, estimators, num_particles)
    setup = ParticleSetup(
        guide, _model_terms(model, args, kwargs), chosen, sticking_the_landing, num_site_keys=num_site_keys
    )
    return param_info, params, chosen, setup, guide_trace


def elbo(num_particles: int = 1, sticking_the_landing: bool = False) -> Objective:
    r"""The negative evidence lower bound, ``E_q[log q(z) − log p(x, z)]``, to minimise.

    Each latent site of the guide is estimated by its own estimator (pathwise where it
    has ``rsample``, else score function with a leave-one-out baseline; override with
    ``estimators={...}`` or ``infer={"estimator": ...}``); score-function terms are
    Rao-Blackwellized over the program order and plates (see :mod:`mcgrad.inference`).

    Args:
        num_particles: samples ``M`` from the guide per step.
        sticking_the_landing: drop the score term of pathwise sites (``log q`` with its
            parameters under ``stop_gradient``): zero variance at the exact posterior.
            Roeder, Wu, Duvenaud (2017).

    Also a ``loss`` for ``numpyro.infer.SVI``.

    Example:
        >>> import jax, jax.numpy as jnp, mcgrad as mg, numpyro, numpyro.distributions as dist
        >>> def model(x):
        ...     z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        ...     numpyro.sample("x", dist.Normal(z, 1.0), obs=x)
        >>> def guide(x):
        ...     loc = numpyro.param("loc", 0.0)
        ...     numpyro.sample("z", dist.Normal(loc, 1.0))
        >>> import optax
        >>> result = mg.fit(model, guide, 2.0, key=jax.random.key(0), num_steps=300,
        ...                 optimizer=optax.sgd(0.02), objective=mg.elbo(100), progress_bar=False)
        >>> bool(abs(result.params["loc"] - 1.0) < 0.1)   # posterior mean x/2 (its jitter: ±0.01)
        True
    """

    def setup(model, guide, args, kwargs, estimators, key):
        param_info, params, chosen, particle_setup, _ = _bind(
            model, guide, args, kwargs, estimators, key, num_particles, sticking_the_landing
        )

        def surrogate(params, state, key, args, kwargs, shard=identity_shard):
            return inference.elbo_surrogate(particle_setup, params, state, key, num_particles, args, kwargs, shard)

        return ObjectiveSetup(param_info, inference.init_site_states(chosen, params), surrogate, chosen)

    return Objective("elbo", num_particles, setup)


def _leave_one_out_log_mean_exp(log_weights: jax.Array) -> jax.Array:
    """``log mean exp`` with each ``log w_m`` replaced by the mean of the others (VIMCO)."""
    num = log_weights.shape[0]
    others_mean = (jnp.sum(log_weights) - log_weights) / (num - 1)
    replaced = jnp.where(jnp.eye(num, dtype=bool), others_mean[:, None], log_weights[None, :])
    return jax.nn.logsumexp(replaced, axis=1) - jnp.log(num)


def iwae(num_particles: int = 5, doubly_reparameterized: bool = False) -> Objective:
    r"""The negative importance-weighted bound, ``−E[log (1/K) Σ_k p(x, z_k)/q(z_k)]``.

    Pathwise sites differentiate through the normalised weights ``ŵ_k``; score-function
    sites use the VIMCO leave-one-out signal ``F − F_{−k}`` (Mnih & Rezende, 2016), with
    ``F`` the bound and ``F_{−k}`` the bound with ``log w_k`` replaced by the mean of the
    others. Measure-valued sites are not supported here (use :func:`elbo`).

    With ``doubly_reparameterized`` (DReG; Tucker, Lawson, Gu, Maddison, 2019) the guide's
    parameters get ``Σ_k ŵ_k² ∂log w_k/∂z_k · ∂z_k/∂φ`` (``log q`` with its parameters
    stopped), whose signal-to-noise ratio does not decay as ``K`` grows; the model's
    parameters keep ``Σ_k ŵ_k ∇θ log w_k``. Costs a second particle pass when the model
    has parameters of its own.

    Args:
        num_particles: ``K``, importance samples per step (``K ≥ 2``).
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
    if num_particles < 2:
        raise ValueError(f"iwae(num_particles=...) needs at least 2 particles, got {num_particles}.")

    def setup(model, guide, args, kwargs, estimators, key):
        param_info, params, chosen, particle_setup, guide_trace = _bind(
            model, guide, args, kwargs, estimators, key, num_particles, False
        )
        for site in latent_sites(guide_trace):
            if chosen[site["name"]].config["name"] == "measure_valued":
                raise ValueError(
                    f"iwae() does not support measure-valued site {describe_site(site)}; use "
                    "mg.score_function() (VIMCO) or mg.pathwise(), or the mg.elbo() objective."
                )
        guide_params = {name for name, site in guide_trace.items() if site["type"] == "param"}

        def run(setup, params, keys, args, kwargs):
            return jax.vmap(lambda k: inference.particle(setup, params, k, args, kwargs))(keys)

        def surrogate(params, state, key, args, kwargs, shard=identity_shard):
            keys = shard(inference.particle_keys(particle_setup, key, num_particles))
            if doubly_reparameterized:
                stopped = {n: v if n in guide_params else jax.lax.stop_gradient(v) for n, v in params.items()}
                particles = run(particle_setup._replace(sticking_the_landing=True), stopped, keys, args, kwargs)
            else:
                particles = run(particle_setup, params, keys, args, kwargs)
            log_weights = -particles.loss
            bound = jax.nn.logsumexp(log_weights) - jnp.log(num_particles)
            signal = -jax.lax.stop_gradient(bound - _leave_one_out_log_mean_exp(log_weights))
            log_q = sum(
                (jnp.reshape(lq, (num_particles, -1)).sum(axis=1) for lq in particles.log_q.values()),
                jnp.zeros(num_particles),
            )
            per_particle = signal * gradient_only(log_q)
            if doubly_reparameterized:
                weights = jax.lax.stop_gradient(jax.nn.softmax(log_weights))
                per_particle = per_particle - weights**2 * gradient_only(log_weights)
                model_params = set(params) - guide_params
                if model_params:
                    only_model = {n: v if n in model_params else jax.lax.stop_gradient(v) for n, v in params.items()}
                    model_particles = run(particle_setup, only_model, keys, args, kwargs)
                    per_particle = per_particle + weights * gradient_only(model_particles.loss)
                s = jax.lax.stop_gradient(-bound) + num_particles * per_particle
            else:
                s = -bound + num_particles * per_particle
            return s, (state, jax.lax.stop_gradient(particles.loss))

        return ObjectiveSetup(param_info, inference.init_site_states(chosen, params), surrogate, chosen)

    return Objective("iwae", num_particles, setup)

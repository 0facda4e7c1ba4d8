"""Maximum likelihood for explicit models."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mcgrad.inference import handlers
from mcgrad.inference.checks import check_observations, check_observed_shapes, warn_missing_plates
from mcgrad.inference.costs import describe_site, site_log_prob
from mcgrad.inference.params import constrain, find_params
from mcgrad.objectives.base import Objective, ObjectiveSetup


def maximum_likelihood() -> Objective:
    r"""The negative log-likelihood ``−log p_θ(x)`` of an explicit model, to minimise.

    Parameters are ``numpyro.param`` sites; every sample site must be observed (mixtures
    marginalise their assignment, e.g. ``dist.MixtureSameFamily``). The Monte Carlo is
    over data: ``numpyro.plate(..., subsample_size=B)`` gives the unbiased minibatch
    estimate ``(n/B) Σ_{i∈batch} −log p_θ(x_i)``. Pass ``None`` as the guide.

    Example:
        >>> import jax, jax.numpy as jnp, mcgrad as mg, numpyro, numpyro.distributions as dist, optax
        >>> data = 3.0 + jax.random.normal(jax.random.key(0), (500,))
        >>> def model(x):
        ...     loc = numpyro.param("loc", 0.0)
        ...     with numpyro.plate("data", x.shape[0], subsample_size=100) as index:
        ...         numpyro.sample("x", dist.Normal(loc, 1.0), obs=x[index])
        >>> result = mg.fit(model, None, data, key=jax.random.key(1), num_steps=500,
        ...                 optimizer=optax.adam(0.05), objective=mg.maximum_likelihood(),
        ...                 progress_bar=False)
        >>> bool(abs(result.params["loc"] - data.mean()) < 0.05)
        True
    """

    def setup(model, guide, args, kwargs, estimators, key):
        if guide is not None:
            raise ValueError("maximum_likelihood() fits numpyro.param sites of the model; pass guide=None.")
        if estimators:
            raise ValueError("maximum_likelihood() has no latent sites to take estimators.")
        param_info = find_params([(model, args, kwargs)], key)
        params = constrain(param_info.unconstrained, param_info.constraints)
        model_trace = handlers.run(model, args, kwargs, key=key, params=params)
        for site in model_trace.values():
            if site["type"] == "sample" and not site["is_observed"]:
                raise ValueError(
                    f"maximum_likelihood() needs every sample site observed, but {describe_site(site)} is "
                    "latent. Marginalise it in the model (e.g. dist.MixtureSameFamily for a mixture "
                    "assignment), or fit a guide with mg.elbo()."
                )
        check_observations(model_trace, args, kwargs)
        check_observed_shapes(model_trace)
        warn_missing_plates(model_trace)

        def surrogate(params, state, key, args, kwargs, shard=None):
            trace = handlers.run(model, args, kwargs, key=key, params=params)
            loss = -sum(
                (jnp.sum(site_log_prob(site)) for site in trace.values() if site["type"] == "sample"),
                jnp.zeros(()),
            )
            return loss[None], (state, jax.lax.stop_gradient(loss)[None])

        return ObjectiveSetup(param_info, (), surrogate, {})

    return Objective("maximum_likelihood", 1, setup)

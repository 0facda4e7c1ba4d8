"""Fitted results as ArviZ ``InferenceData``."""

from __future__ import annotations

import arviz as az
import jax
import numpy as np
import xarray as xr
from numpyro import handlers

from mcgrad.inference import handlers as program_handlers
from numpyro.infer import Predictive, log_likelihood


def to_inference_data(result, num_samples: int = 1000, key: jax.Array | None = None) -> az.InferenceData:
    """An ArviZ ``InferenceData`` from a :class:`mcgrad.fit.FitResult`.

    Groups: ``posterior`` (``num_samples`` draws of the guide's latent sites, one chain; for
    a model without a guide, the fitted parameters as one draw), ``log_likelihood`` (of
    every observed site, per draw), ``observed_data``, and ``fit`` (the loss trace and the
    gradient variance / SNR recorded during training). ``arviz.summary`` and ``arviz.loo``
    work on it.

    Example:
        >>> import jax, arviz as az, mcgrad as mg, numpyro, numpyro.distributions as dist, optax
        >>> def model(x):
        ...     z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        ...     with numpyro.plate("data", x.shape[0]):
        ...         numpyro.sample("x", dist.Normal(z, 1.0), obs=x)
        >>> def guide(x):
        ...     numpyro.sample("z", dist.Normal(numpyro.param("loc", 0.0), 0.5))
        >>> x = jax.numpy.array([0.5, 1.0, 1.5])
        >>> result = mg.fit(model, guide, x, key=jax.random.key(0), num_steps=50,
        ...                 optimizer=optax.adam(0.05), objective=mg.elbo(2), progress_bar=False)
        >>> idata = result.to_inference_data(num_samples=100)
        >>> idata.posterior["z"].shape, idata.log_likelihood["x"].shape
        ((1, 100), (1, 100, 3))
    """
    key = key if key is not None else jax.random.key(0)
    model = handlers.substitute(result.model, data=result.params)
    if result.guide is not None:
        predictive = Predictive(result.guide, params=result.params, num_samples=num_samples)
        draws = predictive(key, *result.args, **result.kwargs)
        guide_trace = program_handlers.run(result.guide, result.args, result.kwargs, key=key, params=result.params)
        latent = [n for n, s in guide_trace.items() if s["type"] == "sample" and not s["is_observed"]]
        samples = {name: draws[name] for name in latent}
        posterior = {name: np.asarray(value)[None] for name, value in samples.items()}
    else:
        samples = {}
        posterior = {name: np.asarray(value)[None, None] for name, value in result.params.items()}
    if samples:
        likelihood = log_likelihood(model, samples, *result.args, **result.kwargs)
    else:
        likelihood = {n: v[None] for n, v in log_likelihood(model, {}, *result.args, batch_ndims=0, **result.kwargs).items()}
    model_trace = program_handlers.run(result.model, result.args, result.kwargs, key=key, params=result.params)
    observed = {n: np.asarray(s["value"]) for n, s in model_trace.items() if s["type"] == "sample" and s["is_observed"]}
    idata = az.from_dict(
        posterior=posterior,
        log_likelihood={name: np.asarray(value)[None] for name, value in likelihood.items()},
        observed_data=observed,
    )
    diagnostics = result.diagnostics
    fit_group = {"loss": (("step",), np.asarray(result.losses))}
    for name in diagnostics.variance:
        fit_group[f"gradient_variance_{name}"] = (("recorded_step",), diagnostics.variance[name])
        fit_group[f"gradient_snr_{name}"] = (("recorded_step",), diagnostics.snr[name])
    coords = {"step": np.arange(len(result.losses)), "recorded_step": diagnostics.steps}
    idata.add_groups({"fit": xr.Dataset(fit_group, coords=coords)})
    return idata

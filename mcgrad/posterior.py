"""Fitted results as ArviZ ``InferenceData``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr
from numpyro import handlers

from mcgrad.inference import handlers as program_handlers
from numpyro.infer import Predictive, log_likelihood

try:
    import arviz as az
except FileNotFoundError:
    # arviz 0.23 stamps a once-a-day notice through one fixed temporary file name, so when
    # several processes import it at once the losers' rename fails. The winner has written
    # today's stamp by then, and a second import reads it and writes nothing.
    import arviz as az


def to_inference_data(result, num_samples: int = 1000, key: jax.Array | None = None) -> az.InferenceData:
    """An ArviZ ``InferenceData`` from a :class:`mcgrad.fit.FitResult`.

    Groups: ``posterior`` (``num_samples`` draws of the guide's latent sites, one chain per
    fit: restarts of a batched fit are chains, so ``arviz.rhat`` across them tells whether
    they found the same optimum; for
    a model without a guide, the fitted parameters as one draw), ``log_likelihood`` (of
    every observed site, per draw), ``observed_data``, ``fit`` (the loss trace and the
    gradient variance / SNR recorded during training), and with ``mg.auto()`` sites ``auto``
    (each decision's choice and every candidate's variance, seconds and efficiency). ``arviz.summary`` and ``arviz.loo``
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
    losses = np.asarray(result.losses)
    restarts = losses.shape[0] if losses.ndim == 2 else None
    chains = range(restarts) if restarts is not None else [None]
    posterior, likelihood = {}, {}
    for chain in chains:
        params = result.params if chain is None else jax.tree.map(lambda v, c=chain: v[c], result.params)
        chain_posterior, chain_likelihood, observed = _one_chain(result, params, num_samples, jax.random.fold_in(key, chain or 0))
        for name, value in chain_posterior.items():
            posterior.setdefault(name, []).append(value)
        for name, value in chain_likelihood.items():
            likelihood.setdefault(name, []).append(value)
    idata = az.from_dict(
        posterior={name: np.stack(values) for name, values in posterior.items()},
        log_likelihood={name: np.stack(values) for name, values in likelihood.items()},
        observed_data=observed,
    )
    diagnostics = result.diagnostics
    chain_dims = ("chain",) if restarts is not None else ()
    fit_group = {"loss": (chain_dims + ("step",), losses)}
    for name in diagnostics.variance:
        fit_group[f"gradient_variance_{name}"] = (chain_dims + ("recorded_step",), diagnostics.variance[name])
        fit_group[f"gradient_snr_{name}"] = (chain_dims + ("recorded_step",), diagnostics.snr[name])
    coords = {"step": np.arange(losses.shape[-1]), "recorded_step": diagnostics.steps}
    if restarts is not None:
        coords["chain"] = np.arange(restarts)
    idata.add_groups({"fit": xr.Dataset(fit_group, coords=coords)})
    if diagnostics.choices is not None and len(diagnostics.choices):
        idata.add_groups({"auto": _choices_dataset(diagnostics.choices)})
    return idata


def _choices_dataset(choices) -> xr.Dataset:
    """``mg.auto()``'s decisions: per site, the chosen candidate at each decision step, and
    every candidate's measured variance, seconds, efficiency and its relative standard error
    (``decision`` × ``candidate``); per decision its seconds and the run's seconds before it."""
    ledger = choices.groupby("step")[["decision_seconds", "run_seconds"]].first()
    variables = {column: (("decision_step",), ledger[column].to_numpy(dtype=float)) for column in ledger}
    coords = {"decision_step": ledger.index.to_numpy()}
    for site, panel in choices.groupby("site", sort=False):
        steps = np.array(sorted(panel["step"].unique()))
        candidates = list(dict.fromkeys(panel["candidate"]))
        step_dim, candidate_dim = f"{site}_decision_step", f"{site}_candidate"
        coords[step_dim], coords[candidate_dim] = steps, candidates
        for column in ("variance", "seconds", "efficiency", "efficiency_error"):
            table = panel.pivot(index="step", columns="candidate", values=column).reindex(index=steps, columns=candidates)
            variables[f"{site}_{column}"] = ((step_dim, candidate_dim), table.to_numpy(dtype=float))
        chosen = panel[panel["chosen"]].set_index("step")["candidate"].reindex(steps)
        variables[f"{site}_choice"] = ((step_dim,), chosen.to_numpy(dtype=str))
    return xr.Dataset(variables, coords=coords)


def _summed_out_site(result, params, guide_trace: dict, key: jax.Array):
    """The site summed out of ``result``'s model (``None`` for none), as its fit saw it."""
    from mcgrad.objectives.elbo import summed_out_site

    args, kwargs = result.args, result.kwargs
    model_trace = program_handlers.run(result.model, args, kwargs, key=key, params=params, replay_trace=guide_trace)
    return summed_out_site(result.model, model_trace, guide_trace, params, key, args, kwargs), model_trace


def _summed_out_likelihood(result, params, model_trace: dict, samples: dict, key: jax.Array, summed) -> dict:
    """For a model with a site summed out of it (:func:`mcgrad.objectives.elbo.summed_out_site`),
    the pointwise log-likelihood of the observed site that reads it, marginal over it:
    ``log Σ_k p(c = k) p(x_n | c = k, z)`` per slice and draw. NumPyro's ``log_likelihood``
    would draw the site from its prior instead. Where other sites read it too (a second
    observed site, a latent one) the pointwise split is not defined: those observed sites
    are left out, with a warning. Empty for a model without one."""
    import warnings

    from mcgrad.objectives.elbo import sum_out

    args, kwargs = result.args, result.kwargs
    readers = [site for name, site in model_trace.items() if name in summed.readers and name != summed.name]
    observed = [s["name"] for s in readers if s["is_observed"]]
    if len(readers) != 1 or len(observed) != 1:
        warnings.warn(f"to_inference_data: {[s['name'] for s in readers]} read the summed-out site "
                      f"'{summed.name}', so their pointwise log-likelihood is not defined; log_likelihood leaves "
                      f"{observed} out.", stacklevel=3)
        return {name: None for name in observed}

    def marginal(draw):
        def run(value):
            return program_handlers.run(result.model, args, kwargs, key=key, params=params,
                                        values={**draw, summed.name: value})

        return sum_out(run, summed)[1]

    return {observed[0]: jax.vmap(marginal)(samples)}


def _one_chain(result, params, num_samples: int, key: jax.Array):
    """One fit's posterior draws (from the guide; the parameters themselves without one),
    the log-likelihood of each draw, and the observed data."""
    model = handlers.substitute(result.model, data=params)
    if result.guide is not None:
        predictive = Predictive(result.guide, params=params, num_samples=num_samples)
        draws = predictive(key, *result.args, **result.kwargs)
        guide_trace = program_handlers.run(result.guide, result.args, result.kwargs, key=key, params=params)
        latent = [n for n, s in guide_trace.items() if s["type"] == "sample" and not s["is_observed"]]
        samples = {name: draws[name] for name in latent}
        posterior = {name: np.asarray(value) for name, value in samples.items()}
    else:
        samples = {}
        posterior = {name: np.asarray(value)[None] for name, value in params.items()}
    if samples:
        summed, model_trace = _summed_out_site(result, params, guide_trace, key)
        if summed is not None:  # NumPyro's log_likelihood would need the site: any value, then the marginal
            model = handlers.substitute(model, data={summed.name: jnp.zeros(summed.shape, summed.dtype)})
        likelihood = log_likelihood(model, samples, *result.args, **result.kwargs)
        if summed is not None:
            likelihood.update(_summed_out_likelihood(result, params, model_trace, samples, key, summed))
    else:
        likelihood = {n: v[None] for n, v in log_likelihood(model, {}, *result.args, batch_ndims=0, **result.kwargs).items()}
    model_trace = program_handlers.run(result.model, result.args, result.kwargs, key=key, params=params)
    observed = {n: np.asarray(s["value"]) for n, s in model_trace.items() if s["type"] == "sample" and s["is_observed"]}
    return posterior, {name: np.asarray(value) for name, value in likelihood.items() if value is not None}, observed

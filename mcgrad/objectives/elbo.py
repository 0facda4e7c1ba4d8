"""The evidence lower bound, and the binding of a model and guide shared by every
variational objective (ELBO, IWAE, Rényi)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from numpyro.distributions import constraints

from mcgrad.estimators.distributions import describe, unwrap
from mcgrad.estimators.base import check_whole_number
from mcgrad.estimators.score_function import score_function
from mcgrad.inference import handlers
from mcgrad.inference.checks import (
    check_observations,
    check_observed_shapes,
    warn_guide_only_sites,
    warn_missing_plates,
)
from mcgrad.inference.costs import Term, describe_site, latent_sites, site_log_prob, site_plates
from mcgrad.inference.params import ParamInfo, constrain, find_params
from mcgrad.inference.particles import (
    Program,
    average_surrogate,
    count_site_keys,
    init_site_states,
    coupled_sites,
    partner_flags,
)
from mcgrad.inference.site_estimators import resolve_estimators
from mcgrad.objectives.base import Objective, ObjectiveSetup


def model_terms(model):
    """The cost terms ``−log p(x, z)`` of ``model`` replaying a guide's trace, one per sample
    site, with the model's arguments of the step."""

    def cost_terms(guide_trace, params, key, args, kwargs):
        model_trace = handlers.run(model, args, kwargs, key=key, params=params, replay_trace=guide_trace)
        return [
            Term(-site_log_prob(site), site_plates(site), float("inf"))
            for site in model_trace.values()
            if site["type"] == "sample"
        ]

    return cost_terms


def check_model_and_guide(model_trace: dict, guide_trace: dict) -> None:
    """Clear errors for a guide that does not match its model, and NumPyro's warnings.

    Errors: an observed site in the guide; a latent site of the model the guide does not
    sample; a latent site whose guide distribution draws values the model cannot score
    (a discrete model site with a continuous guide, an unconstrained guide for a
    constrained model site, a guide draw outside the model's support). Warnings, as
    NumPyro's ``Trace_ELBO`` gives them: a guide site that is not in the model; a batch
    dimension of a model site that no plate declares (``Missing a plate statement for
    batch dimension -2``: data of shape ``[n, 1]`` under a plate of ``n``, which
    broadcasts to ``n²`` observations).
    """
    for name, site in guide_trace.items():
        if site["type"] == "sample" and site["is_observed"]:
            raise ValueError(
                f"site {describe_site(site)} is observed in the guide. Observations belong in the "
                "model only: drop `obs=` from the guide's numpyro.sample."
            )
    for name, site in model_trace.items():
        if site["type"] == "sample" and not site["is_observed"] and name not in guide_trace:
            raise ValueError(missing_guide_site(site))
    for name, site in model_trace.items():
        guide_site = guide_trace.get(name)
        if site["type"] == "sample" and not site["is_observed"] and guide_site is not None:
            check_support(site, guide_site)
    warn_guide_only_sites(model_trace, guide_trace)
    check_observed_shapes(model_trace)
    warn_missing_plates(model_trace)


def _unconstrained(constraint) -> bool:
    while isinstance(constraint, constraints.independent):
        constraint = constraint.base_constraint
    return isinstance(constraint, type(constraints.real))


def missing_guide_site(site: dict) -> str:
    """The error for a latent model site the guide does not sample, with the fix that fits
    it: a discrete site (NumPyro's ``infer={"enumerate": "parallel"}`` marks one that
    ``TraceEnum_ELBO`` sums out in the model) gets a discrete guide site, which mcgrad's
    default sums exactly over its values; a continuous one, a guide site or an autoguide."""
    name = site["name"]
    if not site["fn"].support.is_discrete:
        return (f"the guide has no sample site for the model's latent site {describe_site(site)}. Add "
                f"numpyro.sample('{name}', ...) to the guide, or use an autoguide such as "
                "numpyro.infer.autoguide.AutoNormal(model).")
    enumerated = (f" It is marked infer={{'enumerate': {site['infer']['enumerate']!r}}}: mcgrad does not sum out "
                  "model-only sites as NumPyro's TraceEnum_ELBO does." if site["infer"].get("enumerate") else "")
    return (f"the guide has no sample site for the model's discrete latent site {describe_site(site)}.{enumerated} "
            f"Give the guide a discrete '{name}' (e.g. numpyro.sample('{name}', dist.Categorical(logits="
            "numpyro.param(...))) in the same plate; one label per datum is then summed exactly over its values "
            "by default), or marginalise it in the model (e.g. dist.MixtureSameFamily). Autoguides such as "
            "AutoNormal cover continuous sites only: block it from them with "
            f"numpyro.handlers.block(model, hide=['{name}']).")


def check_support(model_site: dict, guide_site: dict) -> None:
    """A site-named error when the guide's distribution draws values outside the model's support.

    Otherwise ``log p(x, z)`` is ``−∞`` (or NaN) for the guide's draws and every step is
    skipped as non-finite.
    """
    name, model_fn, guide_fn = model_site["name"], model_site["fn"], guide_site["fn"]
    model_support, guide_support = model_fn.support, guide_fn.support
    if any(isinstance(c, type(constraints.dependent)) for c in (model_support, guide_support)):
        return  # a support known only per value
    problem = None
    if isinstance(unwrap(guide_fn), dist.Delta):
        pass  # a point mass (AutoDelta): its support says nothing of its value, checked below
    elif model_support.is_discrete and not guide_support.is_discrete:
        problem = "is discrete, but the guide's distribution is continuous"
    elif guide_support.is_discrete and not model_support.is_discrete:
        problem = "is continuous, but the guide's distribution is discrete"
    elif _unconstrained(guide_support) and not _unconstrained(model_support):
        problem = f"is constrained ({model_support}), but the guide's distribution is unconstrained"
    # The guide's draw, for elementwise supports only: a check with a tolerance (simplex,
    # positive definite) could refuse a float32 draw that is fine. (A tracer: in NumPyro's SVI.)
    value = guide_site["value"]
    if problem is None and model_support.event_dim == 0 and not isinstance(value, jax.core.Tracer):
        with jax.numpy_rank_promotion("allow"), jax.ensure_compile_time_eval():
            in_support = model_support(value)
            if not isinstance(in_support, jax.core.Tracer) and not bool(jnp.all(in_support)):
                problem = f"is {model_support}, but the guide drew values outside it"
    if problem is not None:
        fix = (
            "a discrete guide distribution on the same values (e.g. dist.Bernoulli(logits=numpyro.param(...)) "
            "or dist.Categorical(logits=...))"
            if model_support.is_discrete
            else "a guide distribution with the model's support (e.g. dist.LogNormal for a positive site, "
            "dist.Beta for the unit interval), or numpyro.infer.autoguide.AutoNormal(model), which maps "
            "to each site's support"
        )
        raise ValueError(
            f"site '{name}': the model's {describe(model_fn)} support {problem} ({describe(guide_fn)}), so "
            f"log p(x, z) is not finite for the guide's draws. Give '{name}' {fix}."
        )


class Variational(NamedTuple):
    """A model and guide bound for a variational objective."""

    params: ParamInfo
    program: Program
    guide_trace: dict


def bind_variational(model, guide, args, kwargs, estimators, key, num_particles, *,
                     independent_particles: bool) -> Variational:
    """Trace the guide and model once: their params, the guide's site estimators, checks.
    ``independent_particles``: each particle has its own cost (the ELBO's; a multi-sample
    bound's are coupled), which the default estimators may use."""
    if guide is None:
        raise ValueError("an ELBO-type objective needs a guide; for a model without latents use mg.maximum_likelihood().")
    param_info = find_params([(guide, args, kwargs), (model, args, kwargs)], key)
    params = constrain(param_info.unconstrained, param_info.constraints)
    guide_trace, key_table = count_site_keys(guide, params, key, args, kwargs)
    model_trace = handlers.run(model, args, kwargs, key=key, params=params, replay_trace=guide_trace)
    check_model_and_guide(model_trace, guide_trace)
    check_observations(model_trace, args, kwargs)
    # replay copies the guide's `infer` onto the model's sites, so read the model's own
    # `infer={"estimator": ...}` annotations from a run that substitutes the guide's draws.
    guide_values = {n: s["value"] for n, s in guide_trace.items() if s["type"] == "sample" and not s["is_observed"]}
    own_trace = handlers.run(model, args, kwargs, key=key, params=params, values=guide_values)
    annotated = {
        name: site["infer"]["estimator"]
        for name, site in own_trace.items()
        if site["type"] == "sample" and "estimator" in site.get("infer", {})
    }
    def coupled(sites):  # any estimator that draws plainly will do: only the data flow counts
        plain = {site["name"]: score_function() for site in latent_sites(guide_trace)}
        return coupled_sites(Program(guide, model_terms(model), plain, keys=key_table), params, key, args, kwargs,
                             sites)

    chosen = resolve_estimators(guide_trace, annotated, estimators, num_particles,
                                independent_rows=independent_particles, coupled_sites=coupled)
    program = Program(guide, model_terms(model), chosen, keys=key_table)
    partner_flags(program, num_particles)  # an odd count for antithetic pairs fails here, not at the first step
    return Variational(param_info, program, guide_trace)


def elbo(num_particles: int = 1, sticking_the_landing: bool = False) -> Objective:
    r"""The negative evidence lower bound, ``E_q[log q(z) − log p(x, z)]``, to minimise.

    Each latent site of the guide is estimated by its own estimator (pathwise where it
    has ``rsample``, the exact sum over a Bernoulli or Categorical drawn once per slice of a
    plate, DisARM for a Bernoulli with two particles, else score function with
    a leave-one-out baseline: :func:`mcgrad.estimators.choice.preferred`; override with
    ``estimators={...}`` or ``infer={"estimator": ...}``; any
    :class:`~mcgrad.GradientEstimator` works per site); learning signals are
    Rao-Blackwellized over the program order and plates (see
    :mod:`mcgrad.inference.particles`). For a site whose draw carries no gradient the
    zero-mean term ``∇ log q(z)|_z`` is dropped.

    Args:
        num_particles: samples ``M`` from the guide per step (a whole number ``≥ 1``).
        sticking_the_landing: drop that term for pathwise sites too (``log q`` with its
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

    check_num_particles("elbo", num_particles, 1)

    def setup(model, guide, args, kwargs, estimators, key):
        bound = bind_variational(model, guide, args, kwargs, estimators, key, num_particles, independent_particles=True)
        program = bound.program
        if sticking_the_landing:
            program = program._replace(stop_log_density=lambda estimator: True)

        def surrogate(params, state, key, args, kwargs, shard=None):
            return average_surrogate(program, params, state, key, num_particles, args, kwargs, shard)

        params = constrain(bound.params.unconstrained, bound.params.constraints)
        return ObjectiveSetup(bound.params, init_site_states(program.estimators, params), surrogate, program.estimators)

    return Objective("elbo", num_particles, setup)


def check_num_particles(objective: str, num_particles, minimum: int) -> None:
    """A clear error for a particle count that is not a whole number ``≥ minimum``."""
    check_whole_number(f"{objective}(num_particles=...)", num_particles, minimum)

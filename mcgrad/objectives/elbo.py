"""The evidence lower bound, and the binding of a model and guide shared by every
variational objective (ELBO, IWAE, Rényi), a discrete model site summed out of the model
included."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro.distributions import constraints

from mcgrad.estimators.distributions import describe, unwrap
from mcgrad.estimators.base import check_whole_number
from mcgrad.estimators.choice import MAX_SUMMED_VALUES, summable
from mcgrad.estimators.score_function import score_function
from mcgrad.inference import handlers
from mcgrad.inference.checks import (
    check_observations,
    check_observed_shapes,
    warn_guide_only_sites,
    warn_missing_plates,
)
from mcgrad.inference.costs import (
    Plates,
    Term,
    describe_site,
    latent_sites,
    reduce_to_plates,
    site_log_prob,
    site_plates,
)
from mcgrad.inference.params import ParamInfo, constrain, find_params
from mcgrad.inference.particles import (
    Program,
    average_surrogate,
    count_site_keys,
    init_site_states,
    coupled_sites,
    dependent_outputs,
    partner_flags,
)
from mcgrad.inference.site_estimators import resolve_estimators
from mcgrad.objectives.base import Objective, ObjectiveSetup

Array = jax.Array


class SummedSite(NamedTuple):
    """A discrete site of the model that the guide does not sample, summed out of the model
    (:func:`summed_out_site`): its values, its value's shape and dtype, its plates and the
    shape of its log-density, and the names of the model's sample sites that read it (its
    own included), all read once from the traces at setup."""

    name: str
    num_values: int
    shape: tuple[int, ...]
    dtype: Any
    plates: Plates
    log_prob_shape: tuple[int, ...]
    readers: frozenset[str]


def summed_out_site(model, model_trace: dict, guide_trace: dict, params, key, args, kwargs) -> SummedSite | None:
    """The model's site marked ``infer={"enumerate": "parallel"}`` that the guide does not
    sample (NumPyro's ``TraceEnum_ELBO`` sums such a site out), or ``None``.

    Requires: one such site, a Bernoulli or Categorical (at most 256 values) with one
    value per slice of its plates; every log-density term that reads it is split along
    each of its plates (one mixture label per datum, not a label that a term outside its
    plate sums over), and scaled like it. Anything else is a clear error naming the site.
    (Like the engine's own coupling check, the data flow is traced array by array: a term
    that reads another slice's label inside the plate, a shifted copy say, is not seen.)"""
    marked = [
        site for name, site in model_trace.items()
        if site["type"] == "sample" and not site["is_observed"] and name not in guide_trace
        and site["infer"].get("enumerate")
    ]
    if not marked:
        return None
    if len(marked) > 1:
        raise ValueError(
            f"the model marks {[s['name'] for s in marked]} for enumeration, and the guide samples none of them: "
            "mcgrad sums out one model-only site. Give the guide the others (a discrete site in the same plate "
            "is summed exactly over its values by default)."
        )
    site = marked[0]
    name = site["name"]
    if not summable(site["fn"]) or site["fn"].event_shape != ():
        raise ValueError(
            f"site {describe_site(site)} is marked for enumeration, but mcgrad sums out only a Bernoulli or "
            f"Categorical of at most {MAX_SUMMED_VALUES} values, one value per slice of its plates (no to_event). "
            "Sample it in the guide instead."
        )
    value = jnp.asarray(site["value"])
    plates = site_plates(site)
    own_shape = jnp.shape(site_log_prob(site, scaled=False))

    def log_probs(draw):  # every sample site's log-density with the site's every slice at `draw`
        trace = handlers.run(model, args, kwargs, key=key, params=params, values={name: draw},
                             replay_trace=guide_trace)
        return [site_log_prob(s, scaled=False) for s in trace.values() if s["type"] == "sample"]

    reads = tuple(dependent_outputs(log_probs, value))
    sample_sites = [s for s in model_trace.values() if s["type"] == "sample"]
    readers = frozenset(s["name"] for s, read in zip(sample_sites, reads, strict=True) if read)
    for other in sample_sites:
        if other["name"] not in readers:
            continue
        shape, other_plates = jnp.shape(site_log_prob(other, scaled=False)), site_plates(other)
        split = all(plate in other_plates and (-plate[1] <= len(shape) and shape[plate[1]] > 1
                                               or -plate[1] <= len(own_shape) and own_shape[plate[1]] == 1)
                    for plate in plates)
        if not split:
            raise ValueError(
                f"site {describe_site(other)} reads the summed-out site '{name}' across its plates "
                f"{[p[0] for p in plates]}, so the sum over '{name}' does not split slice by slice. mcgrad sums "
                "out a label whose terms are each datum's own: sample it in the guide instead."
            )
        if other.get("scale") is not None or site.get("scale") is not None:
            if not np.allclose(np.asarray(other.get("scale", 1.0) or 1.0), np.asarray(site.get("scale") or 1.0)):
                raise ValueError(f"site {describe_site(other)} is scaled unlike the summed-out site '{name}' "
                                 "(subsampled in another plate); sample it in the guide instead.")
    num_values = int(site["fn"].enumerate_support(expand=False).shape[0])
    return SummedSite(name, num_values, value.shape, value.dtype, plates, own_shape, readers)


def sum_out(run: Callable[[Array], dict], summed: SummedSite) -> tuple[list[tuple[Array, Plates]], Array, Any]:
    """``summed``'s site summed out of the model run by ``run(value)`` (a trace with the site's
    every slice at ``value``), batched over its values in one run.

    Returns the scaled log-densities (and plates) of the sample sites that do not read the
    site, as they are; per slice of its plates, ``log Σ_k exp(Σ log p(·, c = k))`` over the
    sites that read it (its own included), unscaled; and their plate scale."""
    sites = [s for s in run(jnp.zeros(summed.shape, summed.dtype)).values() if s["type"] == "sample"]
    values = jnp.broadcast_to(
        jnp.arange(summed.num_values, dtype=summed.dtype).reshape((summed.num_values,) + (1,) * len(summed.shape)),
        (summed.num_values, *summed.shape),
    )

    def log_densities(value):
        trace = run(value)
        return [(site_log_prob(s), site_log_prob(s, scaled=False)) for s in trace.values() if s["type"] == "sample"]

    per_value = jax.vmap(log_densities)(values)  # each [K, ...]
    kept, joint, scale = [], jnp.zeros((summed.num_values, *summed.log_prob_shape)), 1.0
    for site, (scaled, unscaled) in zip(sites, per_value, strict=True):
        plates = site_plates(site)
        if site["name"] not in summed.readers:
            kept.append((scaled[0], plates))
            continue
        scale = site["scale"] if site.get("scale") is not None else scale
        joint = joint + jax.vmap(
            lambda value, plates=plates: reduce_to_plates(Term(value, plates, 0.0), summed.plates,
                                                          summed.log_prob_shape)
        )(unscaled)
    return kept, jax.nn.logsumexp(joint, axis=0), scale


def model_terms(model, summed: SummedSite | None = None):
    """The cost terms ``−log p(x, z)`` of ``model`` replaying a guide's trace, one per sample
    site, with the model's arguments of the step.

    With ``summed`` that site is summed out of the model: the terms that read it (its own
    and, say, the observations that depend on it) become one term per slice,
    ``−s · log Σ_k exp(Σ_terms log p(·, c = k))`` over its ``K`` values (``s`` their plate
    scale), from one run of the model batched over the values; the terms that do not read
    it stay as they are. The bound is then the ELBO of the model with the site marginalised
    (NumPyro's ``TraceEnum_ELBO``), exact in it."""

    def cost_terms(guide_trace, params, key, args, kwargs):
        model_trace = handlers.run(model, args, kwargs, key=key, params=params, replay_trace=guide_trace)
        return [
            Term(-site_log_prob(site), site_plates(site), float("inf"))
            for site in model_trace.values()
            if site["type"] == "sample"
        ]

    if summed is None:
        return cost_terms

    def summed_cost_terms(guide_trace, params, key, args, kwargs):
        def run(value):
            return handlers.run(model, args, kwargs, key=key, params=params, values={summed.name: value},
                                replay_trace=guide_trace)

        kept, marginal, scale = sum_out(run, summed)
        return [Term(-value, plates, float("inf")) for value, plates in kept] + [
            Term(-scale * marginal, summed.plates, float("inf"))
        ]

    return summed_cost_terms


def check_model_and_guide(model_trace: dict, guide_trace: dict, summed: tuple[str, ...] = ()) -> None:
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
        if site["type"] == "sample" and not site["is_observed"] and name not in guide_trace and name not in summed:
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
    it: a discrete site can be summed out of the model (marked as for NumPyro's
    ``TraceEnum_ELBO``) or sampled by a discrete guide site, which mcgrad's default sums
    exactly over its values; a continuous one needs a guide site or an autoguide."""
    name = site["name"]
    if not site["fn"].support.is_discrete:
        return (f"the guide has no sample site for the model's latent site {describe_site(site)}. Add "
                f"numpyro.sample('{name}', ...) to the guide, or use an autoguide such as "
                "numpyro.infer.autoguide.AutoNormal(model).")
    return (f"the guide has no sample site for the model's discrete latent site {describe_site(site)}. Sum it out "
            f"of the model: mark it numpyro.sample('{name}', ..., infer={{'enumerate': 'parallel'}}) (one label per "
            f"datum; NumPyro's TraceEnum_ELBO marks it so); or give the guide a discrete '{name}' (e.g. "
            f"numpyro.sample('{name}', dist.Categorical(logits=numpyro.param(...))) in the same plate, summed "
            "exactly over its values by default); or marginalise it in the model (e.g. dist.MixtureSameFamily). "
            "Autoguides such as AutoNormal cover continuous sites only: block it from them with "
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
    summed = summed_out_site(model, model_trace, guide_trace, params, key, args, kwargs)
    check_model_and_guide(model_trace, guide_trace, () if summed is None else (summed.name,))
    terms = model_terms(model, summed)
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
        return coupled_sites(Program(guide, terms, plain, keys=key_table), params, key, args, kwargs,
                             sites)

    chosen = resolve_estimators(guide_trace, annotated, estimators, num_particles,
                                independent_rows=independent_particles, coupled_sites=coupled)
    program = Program(guide, terms, chosen, keys=key_table)
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

    A discrete site of the model that the guide does not sample, marked
    ``infer={"enumerate": "parallel"}`` (as for NumPyro's ``TraceEnum_ELBO``), is summed
    out of the model, one slice at a time (:func:`summed_out_site`): the bound is then the
    model's with that site marginalised.

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

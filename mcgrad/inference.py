"""Per-site gradient estimation over NumPyro programs.

A *program* is a NumPyro function whose latent sample sites are drawn (a guide for the
ELBO, a generator for adversarial fitting). Each latent site gets one estimator from the
core — pathwise where the site has ``rsample``, else score function with a baseline, or
whatever the user names in ``estimators={...}`` or ``infer={"estimator": ...}`` — and the
per-particle surrogate adds each site's term to the particle's cost:

* pathwise: the site's value carries its gradient (reparameterization);
* score function: ``sg(L − b) · (log q − sg log q)`` with the site's learning signal ``L``
  Rao-Blackwellized: only cost terms at or after the site count, and inside a ``plate``
  only the terms of the site's own slice (plus the terms outside that plate);
* measure-valued: the particle is re-run with the site's value replaced by its positive
  and negative weak-derivative samples, every other draw shared (common random numbers).

Handlers (``substitute``, ``replay``, ``trace``, and a key table in place of ``seed`` for
the program, see :func:`particle_keys`) are applied inside the traced functions, never
around ``jit``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to
from numpyro.primitives import Messenger

from mcgrad import baselines as baselines_lib
from mcgrad.estimators.base import GradientEstimator, describe, gradient_only
from mcgrad.estimators.measure_valued import check_registered, weak_derivative_terms
from mcgrad.estimators.pathwise import pathwise, require_rsample
from mcgrad.estimators.score_function import score_function

Array = jax.Array
Params = dict[str, Any]


# --------------------------------------------------------------------------- parameters


class ParamInfo(NamedTuple):
    """Initial unconstrained parameters and the constraint of each ``numpyro.param`` site."""

    unconstrained: Params
    constraints: dict[str, constraints.Constraint]


def _is_real(constraint) -> bool:
    return constraint is constraints.real or isinstance(constraint, type(constraints.real))


def find_params(fns: list[tuple[Callable, tuple, dict]], key: Array) -> ParamInfo:
    """Trace each function once (seeded, in order, each replaying the one before) for its params."""
    unconstrained, found = {}, {}
    previous = None
    for index, (fn, args, kwargs) in enumerate(fns):
        fn = handlers.seed(fn, jax.random.fold_in(key, index))
        if previous is not None:
            fn = handlers.replay(fn, trace=previous)
        previous = handlers.trace(fn).get_trace(*args, **kwargs)
        for name, site in previous.items():
            if site["type"] != "param" or name in found:
                continue
            constraint = site["kwargs"].get("constraint", constraints.real)
            found[name] = constraint
            value = site["value"]
            unconstrained[name] = value if _is_real(constraint) else biject_to(constraint).inv(value)
    return ParamInfo(unconstrained, found)


def constrain(unconstrained: Params, param_constraints: dict[str, constraints.Constraint]) -> Params:
    """Map unconstrained parameters to their constrained values (as ``numpyro.param`` sees them)."""
    return {
        name: value if _is_real(param_constraints[name]) else biject_to(param_constraints[name])(value)
        for name, value in unconstrained.items()
    }


# --------------------------------------------------------------------------- per-site estimators


def default_estimator(distribution: dist.Distribution, num_particles: int) -> GradientEstimator:
    """Pathwise with rsample; else score function with leave-one-out (moving average for 1 particle)."""
    if distribution.has_rsample:
        return pathwise()
    baseline = baselines_lib.leave_one_out() if num_particles > 1 else baselines_lib.moving_average()
    return score_function(baseline=baseline)


def estimator_name(estimator: GradientEstimator, site: str) -> str:
    name = (estimator.config or {}).get("name")
    if name not in ("pathwise", "score_function", "measure_valued"):
        raise ValueError(
            f"site '{site}': only mg.pathwise(), mg.score_function(...) and mg.measure_valued(...) "
            "apply to one sample site of a model; wrap the whole objective instead."
        )
    return name


def resolve_estimators(
    program_trace: dict,
    annotated: dict[str, GradientEstimator],
    overrides: dict[str, GradientEstimator] | None,
    num_particles: int,
) -> dict[str, GradientEstimator]:
    """One estimator per latent site of ``program_trace``, validated against the site."""
    overrides = dict(overrides or {})
    latent = latent_sites(program_trace)
    unknown = set(overrides) - {site["name"] for site in latent}
    if unknown:
        raise ValueError(
            f"estimators names {sorted(unknown)}, which are not latent sample sites of the guide "
            f"(its latent sites: {[site['name'] for site in latent]})."
        )
    chosen = {}
    for site in latent:
        name, fn = site["name"], site["fn"]
        estimator = overrides.get(name) or site["infer"].get("estimator") or annotated.get(name)
        estimator = estimator or default_estimator(fn, num_particles)
        kind = estimator_name(estimator, name)
        if kind == "pathwise":
            require_rsample(fn, name)
        elif kind == "measure_valued":
            check_registered(fn, name)
        chosen[name] = estimator
    return chosen


def latent_sites(program_trace: dict) -> list[dict]:
    return [s for s in program_trace.values() if s["type"] == "sample" and not s["is_observed"]]


class _SiteSampling(Messenger):
    """Stops the gradient of the values of sites not estimated pathwise."""

    def __init__(self, fn, pathwise_sites: frozenset[str]):
        self.pathwise_sites = pathwise_sites
        super().__init__(fn)

    def postprocess_message(self, msg):
        if msg["type"] == "sample" and not msg["is_observed"] and msg["name"] not in self.pathwise_sites:
            msg["value"] = jax.lax.stop_gradient(msg["value"])


# --------------------------------------------------------------------------- cost terms


class Term(NamedTuple):
    """One cost term: a log-density array (scaled, masked), its plates and program position.

    ``order`` is the index of the program site it belongs to (cost terms outside the
    program, such as the model's, come after every program site).
    """

    value: Array
    plates: tuple[tuple[str, int], ...]
    order: float


def site_plates(site: dict) -> tuple[tuple[str, int], ...]:
    return tuple((frame.name, frame.dim) for frame in site["cond_indep_stack"] if frame.dim is not None)


def site_log_prob(
    site: dict, scaled: bool = True, fn: dist.Distribution | None = None, own_sample: bool = False
) -> Array:
    """``log p(value)`` of a sample site with its mask (and its plate scale if ``scaled``).

    ``own_sample``: the value was drawn from the site's own distribution (or a weak
    derivative of it), so it is in the support and NumPyro's support check is skipped.
    """
    fn = fn if fn is not None else site["fn"]
    with numpyro.validation_enabled(False) if own_sample else contextlib.nullcontext():
        log_prob = fn.log_prob(site["value"])
    if site.get("mask") is not None:
        log_prob = jnp.where(site["mask"], log_prob, 0.0)
    if scaled and site.get("scale") is not None:
        log_prob = site["scale"] * log_prob
    return log_prob


def reduce_to_plates(term: Term, plates: tuple[tuple[str, int], ...], shape: tuple[int, ...]) -> Array:
    """Sum ``term`` over every axis but the plates it shares with a site of log-prob ``shape``."""
    value = jnp.asarray(term.value)
    shared = [dim for name, dim in plates if (name, dim) in term.plates and -dim <= len(shape)]
    keep = sorted(value.ndim + dim for dim in shared if -dim <= value.ndim and value.shape[dim] > 1)
    summed = jnp.sum(value, axis=tuple(a for a in range(value.ndim) if a not in keep))
    target = [1] * len(shape)
    for axis in keep:
        target[len(shape) + axis - value.ndim] = value.shape[axis]
    return jnp.broadcast_to(jnp.reshape(summed, target), shape)


# --------------------------------------------------------------------------- particles


class ParticleSetup(NamedTuple):
    """What the engine needs: the program, how its trace is costed, and the site estimators."""

    program: Callable
    cost_terms: Callable[[dict, Params], list[Term]]  # (program trace, params) -> model/critic terms
    estimators: dict[str, GradientEstimator]
    sticking_the_landing: bool = False
    program_log_prob: bool = True  # the program's own log-density is part of the cost (ELBO: log q)
    num_site_keys: int = 0  # the program's random sites (see trace_program)


# --------------------------------------------------------------------------- particle keys
#
# Every particle gets a row of keys drawn in one call, ``[cost terms, measure-valued,
# spare, one per random site of the program]``, and the program's random sites take theirs
# in program order. NumPyro's ``seed`` would split a key at every site instead: one more
# threefry loop per site in the compiled step, which at 50 particles costs about 0.2 s of
# XLA compile time and changes nothing else.

_RANDOM_MESSAGES = ("sample", "prng_key", "plate", "control_flow")
_FIRST_SITE_KEY = 3


def _needs_key(msg: dict) -> bool:
    """Whether ``seed`` would hand ``msg`` a key (and so, whether the table does)."""
    return msg["type"] in _RANDOM_MESSAGES and msg["kwargs"].get("rng_key") is None and msg["value"] is None


class _CountSiteKeys(Messenger):
    def __init__(self, fn):
        self.count = 0
        super().__init__(fn)

    def process_message(self, msg):
        if _needs_key(msg):
            self.count += 1


class _SiteKeys(Messenger):
    """Gives the program's random sites keys from a row drawn in advance, in program order;
    sites past the row (a program whose structure changed since setup) get keys split from
    ``spare``, as ``seed`` would."""

    def __init__(self, fn, keys: Array, spare: Array):
        self.keys, self.spare, self.index = keys, spare, 0
        super().__init__(fn)

    def process_message(self, msg):
        if not _needs_key(msg):
            return
        if self.index < self.keys.shape[0]:
            msg["kwargs"]["rng_key"] = self.keys[self.index]
            self.index += 1
        else:
            self.spare, msg["kwargs"]["rng_key"] = jax.random.split(self.spare)


def trace_program(program: Callable, params: Params, key: Array, args: tuple, kwargs: dict) -> tuple[dict, int]:
    """One seeded run of ``program`` with ``params`` substituted: its trace, and how many
    keys it draws (sample sites, ``prng_key``, plates), the ``num_site_keys`` of its
    :class:`ParticleSetup`."""
    counter = _CountSiteKeys(program)
    program_trace = handlers.trace(handlers.substitute(handlers.seed(counter, key), data=params)).get_trace(
        *args, **kwargs
    )
    return program_trace, counter.count


def particle_keys(setup: ParticleSetup, key: Array, num_particles: int) -> Array:
    """``[num_particles, 3 + num_site_keys]`` keys, one row per particle, in one call."""
    return jax.random.split(key, (num_particles, _FIRST_SITE_KEY + setup.num_site_keys))


class Particle(NamedTuple):
    """One particle: its loss (pathwise gradient attached) and its score-function pieces."""

    loss: Array
    log_q: dict[str, Array]  # unscaled log q of each score-function site (differentiable)
    signals: dict[str, Array]  # Rao-Blackwellized learning signal of each site (no gradient)
    weak_terms: Array  # measure-valued surrogate terms (zero in value)


def _program_terms(program_trace: dict, sticking_the_landing: bool, pathwise_sites: frozenset) -> list[Term]:
    terms = []
    for order, site in enumerate(latent_sites(program_trace)):
        fn = site["fn"]
        if sticking_the_landing and site["name"] in pathwise_sites:
            fn = jax.tree.map(jax.lax.stop_gradient, fn)
        terms.append(Term(site_log_prob(site, fn=fn, own_sample=True), site_plates(site), order))
    return terms


def run_particle(
    setup: ParticleSetup,
    params: Params,
    keys: Array,
    args: tuple,
    kwargs: dict,
    substitutions: dict | None = None,
) -> tuple[dict, list[Term]]:
    """Trace the program for one particle (its row of :func:`particle_keys` fixes all of its
    draws) and cost it."""
    pathwise_sites = frozenset(n for n, e in setup.estimators.items() if e.config["name"] == "pathwise")
    program = _SiteSampling(setup.program, pathwise_sites)
    data = {**params, **(substitutions or {})}
    # Substituted values replace draws after their keys are taken: the key sequence stays.
    program = handlers.substitute(_SiteKeys(program, keys[_FIRST_SITE_KEY:], keys[2]), data=data)
    program_trace = handlers.trace(program).get_trace(*args, **kwargs)
    # numpyro post-processes the outermost handler first, so `trace` records each site
    # before _SiteSampling stops its gradient: stop it in the record too, or the model's
    # terms (and log q) would differentiate through non-pathwise draws.
    for site in latent_sites(program_trace):
        if site["name"] not in pathwise_sites:
            site["value"] = jax.lax.stop_gradient(site["value"])
    terms = _program_terms(program_trace, setup.sticking_the_landing, pathwise_sites) if setup.program_log_prob else []
    terms += setup.cost_terms(program_trace, params, keys[0])
    return program_trace, terms


def total(terms: list[Term]) -> Array:
    return sum((jnp.sum(t.value) for t in terms), jnp.zeros(()))


def particle(setup: ParticleSetup, params: Params, keys: Array, args: tuple, kwargs: dict) -> Particle:
    """Everything one particle (one row of :func:`particle_keys`) contributes to the surrogate."""
    program_trace, terms = run_particle(setup, params, keys, args, kwargs)
    loss = total(terms)
    log_q, signals = {}, {}
    weak_terms = jnp.zeros(())
    for order, site in enumerate(latent_sites(program_trace)):
        name = site["name"]
        estimator = setup.estimators[name]
        kind = estimator.config["name"]
        if kind == "score_function":
            lq = site_log_prob(site, scaled=False, own_sample=True)
            plates = site_plates(site)
            downstream = [t for t in terms if t.order >= order]
            signals[name] = jax.lax.stop_gradient(sum(reduce_to_plates(t, plates, lq.shape) for t in downstream))
            log_q[name] = lq
        elif kind == "measure_valued":
            value = site["value"]

            def replaced_loss(new_value, name=name):
                _, new_terms = run_particle(setup, params, keys, args, kwargs, {name: new_value})
                return jax.lax.stop_gradient(total(new_terms))

            config = estimator.config
            terms_mv, _ = weak_derivative_terms(
                jax.random.fold_in(keys[1], order),
                site["fn"],
                value[None],
                jax.lax.stop_gradient(loss)[None],
                replaced_loss,
                coupling=config["coupling"],
                batch_size=config["batch_size"],
            )
            weak_terms = weak_terms + terms_mv[0]
    return Particle(loss, log_q, signals, weak_terms)


def _no_scores():
    raise ValueError(
        "baselines.optimal_constant() needs per-sample scores of one distribution and is not "
        "available for sites of a model; use leave_one_out(), moving_average() or learned()."
    )


def init_site_states(estimators: dict[str, GradientEstimator], params: Params) -> dict[str, Any]:
    return {name: estimator.init(params) for name, estimator in estimators.items()}


def elbo_surrogate(
    setup: ParticleSetup,
    params: Params,
    site_states: dict[str, Any],
    key: Array,
    num_particles: int,
    args: tuple,
    kwargs: dict,
    shard: Callable[[Array], Array] = lambda keys: keys,
) -> tuple[Array, tuple[dict[str, Any], Array]]:
    """Per-particle surrogate ``[M]`` of the mean particle loss, the new site states and the losses."""
    keys = shard(particle_keys(setup, key, num_particles))
    particles = jax.vmap(lambda k: particle(setup, params, k, args, kwargs))(keys)
    surrogate = particles.loss + particles.weak_terms
    new_states = dict(site_states)
    context = baselines_lib.BaselineContext(scores=_no_scores, num_samples=num_particles)
    for name, signal in particles.signals.items():
        baseline = setup.estimators[name].config["baseline"]
        centered, new_states[name] = baseline.update(signal, site_states[name], context)
        centered = jax.lax.stop_gradient(centered)
        term = centered * gradient_only(particles.log_q[name])
        surrogate = surrogate + jnp.reshape(term, (num_particles, -1)).sum(axis=1)
    return surrogate, (new_states, jax.lax.stop_gradient(particles.loss))


def describe_site(site: dict) -> str:
    return f"'{site['name']}' ({describe(site['fn'])})"

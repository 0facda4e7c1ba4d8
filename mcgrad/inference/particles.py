"""The particle engine: a NumPyro program's latent sites, each handed to its estimator.

A *program* is a NumPyro function whose latent sample sites are drawn (a guide for the
ELBO, a generator for adversarial fitting). Each step runs ``M`` particles of it
(``vmap``), each costed by the objective (its terms: the program's own log-density,
the model's, a critic's). Then every latent site becomes a :class:`~mcgrad.Site` with one
row per particle and goes to its estimator's ``terms``; the engine never asks which
estimator it holds. What the engine does for every estimator alike:

* draws each site with its estimator's ``sample`` (:mod:`mcgrad.inference.handlers`);
* Rao-Blackwellizes each site's learning signal: only cost terms at or after the site
  count, and inside a ``plate`` only the terms of the site's own slice (plus the terms
  outside that plate);
* re-costs a particle with one site's value replaced and every other draw kept (the
  same key table; a site whose distribution does not depend on the replaced one takes its
  stored draw), for estimators that ask (measure-valued, enumeration, control variates):
  its total, or per plate slice like the site's signal.

Particles take their keys from one table drawn per step: ``[M + 1, 3 + S]`` keys, a row
per particle (a key for the cost terms, two spares, and one per random site of the
program in program order) and a last row for the estimators' own randomness (site ``i``
of the program takes its ``i``-th key). One call of the key's bit generator per step:
``seed`` would split a key at every site instead, and on CPU every call of threefry is a
loop of its own in the compiled step. A subsampled plate's minibatch is drawn once per
step, its random words the data of more keys of the same table, and substituted into
every particle (and every re-run): all particles of a step see one minibatch, so their
learning signals compare like with like.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpyro
from jax.extend import core as jax_core

from mcgrad.estimators.base import GradientEstimator, Site, split_parameters
from mcgrad.inference import handlers
from mcgrad.inference.costs import Plates, Term, latent_sites, reduce_to_plates, site_log_prob, site_plates, total

Array = jax.Array
Params = dict[str, Any]
CostTerms = Callable[[dict, Params, Array, tuple, dict], list[Term]]

_FIRST_SITE_KEY = 3


def drop_for_unreparameterized(estimator: GradientEstimator) -> bool:
    """The ELBO's rule: a site whose draw carries no gradient keeps ``log q`` in its cost
    without the zero-mean term ``∇ log q(z)|_z``."""
    return not estimator.reparameterized


class Program(NamedTuple):
    """A program, how each of its particles is costed, and the estimator of each site.

    Attributes:
        fn: the NumPyro program (guide or generator).
        cost_terms: ``(program trace, params, key, args, kwargs) -> terms`` beyond the
            program's own log-density (the model's ``−log p``, a critic's loss).
        estimators: one per latent site.
        log_density: whether the program's own ``log q`` is part of the cost (ELBO, IWAE).
        stop_log_density: ``estimator -> bool``: evaluate the site's ``log q`` with its
            distribution's parameters under ``stop_gradient`` (sticking the landing for
            reparameterized sites; the zero-mean direct term of the others).
        keys: the keys one run of the program takes (:class:`~mcgrad.inference.handlers.KeyTable`).
    """

    fn: Callable
    cost_terms: CostTerms
    estimators: dict[str, GradientEstimator]
    log_density: bool = True
    stop_log_density: Callable[[GradientEstimator], bool] = drop_for_unreparameterized
    keys: handlers.KeyTable = handlers.KeyTable()


def count_site_keys(
    fn: Callable, params: Params, key: Array, args: tuple, kwargs: dict
) -> tuple[dict, handlers.KeyTable]:
    """One seeded run of ``fn`` with ``params``: its trace and the keys it takes."""
    return handlers.run(fn, args, kwargs, key=key, params=params, count_keys=True)


def minibatch_draws(program: Program) -> tuple[int, ...]:
    """Per subsampled plate, the draws its minibatch takes from the step's key table (``2B``
    where :func:`~mcgrad.inference.handlers.draws_from_words`, else 0: from its key)."""
    return tuple(2 * subsample_size if handlers.draws_from_words(size, subsample_size) else 0
                 for _, _, size, subsample_size in program.keys.subsampled)


def particle_keys(program: Program, key: Array, num_particles: int) -> tuple[Array, Array, Array]:
    """The step's key table in one call: ``[num_particles, 3 + width]`` keys, one row per
    particle (a subsampled plate's minibatch comes from the first row's key:
    :func:`draw_minibatches`), a row of ``3 + width`` keys for the sites' estimators, and
    ``[2, D]`` random words for the ``D`` minibatch draws (:func:`minibatch_draws`): the
    data of ``D`` more keys of the same call (a key's two words are threefry's output for a
    counter of its own, as ``jax.random.bits`` draws them), so the draws cost no call."""
    width = _FIRST_SITE_KEY + program.keys.width
    num_draws = sum(minibatch_draws(program))
    extra = -(-num_draws // (num_particles + 1))  # columns holding the draws' keys
    table = jax.random.split(key, (num_particles + 1, width + extra))
    keys, term_keys = table[:num_particles, :width], table[num_particles, :width]
    words = jax.random.key_data(table[:, width:].reshape(-1)[:num_draws]).T
    paired = program.keys.columns(paired_sites(program))
    if paired:  # a partner particle draws its paired sites from its first-half twin's keys
        columns, half = jnp.asarray(paired) + _FIRST_SITE_KEY, num_particles // 2
        keys = keys.at[half:, columns].set(keys[:half, columns])
    return keys, term_keys, words


def paired_sites(program: Program) -> tuple[str, ...]:
    """The sites whose estimator draws antithetic pairs (``GradientEstimator.partner``)."""
    return tuple(name for name, estimator in program.estimators.items() if estimator.partner is not None)


def partner_flags(program: Program, num_particles: int) -> Array:
    """``[M]``: which particles are partners (the second half; none if no site pairs).

    Raises:
        ValueError: for an odd number of particles when a site pairs its draws.
    """
    sites = paired_sites(program)
    if not sites:
        return jnp.zeros((num_particles,), bool)
    if num_particles % 2:
        raise ValueError(
            f"the estimator of site(s) {list(sites)} draws antithetic pairs of particles, so num_particles "
            f"must be even (got {num_particles}): num_particles=2 is one pair."
        )
    return jnp.arange(num_particles) >= num_particles // 2


def run_particle(
    program: Program,
    params: Params,
    keys: Array,
    args: tuple,
    kwargs: dict,
    values: dict | None = None,
    partner: Array | None = None,
) -> tuple[dict, list[Term]]:
    """Trace the program for one particle (its row of keys and its ``partner`` flag fix
    all of its draws) and cost it. A program with a relaxed site (an estimator with a
    ``bias``, drawing values between the support's points) runs with NumPyro's support
    checks off, so the model's ``log p`` at those values is its formula, not ``−∞``."""
    relaxed = any(estimator.bias is not None for estimator in program.estimators.values())
    with numpyro.validation_enabled(False) if relaxed else contextlib.nullcontext():
        return _run_particle(program, params, keys, args, kwargs, values, partner)


def _run_particle(program, params, keys, args, kwargs, values, partner):
    trace = handlers.run(
        program.fn,
        args,
        kwargs,
        site_keys=(keys[_FIRST_SITE_KEY:], keys[2]),
        params=params,
        values=values,
        estimators=program.estimators,
        partner=partner,
    )
    terms = []
    if program.log_density:
        for order, site in enumerate(latent_sites(trace)):
            fn = site["fn"]
            if program.stop_log_density(program.estimators[site["name"]]):
                fn = jax.tree.map(jax.lax.stop_gradient, fn)
            terms.append(Term(site_log_prob(site, fn=fn, own_sample=True), site_plates(site), order))
    terms += program.cost_terms(trace, params, keys[0], args, kwargs)
    return trace, terms


def draw_minibatches(program: Program, keys: Array, term_keys: Array, words: Array) -> dict[str, Array]:
    """Each subsampled plate's minibatch for a step, drawn once and substituted into every
    particle and re-run: from its share of ``words`` (:func:`particle_keys`) or else from
    its key in ``keys`` (the first particle's row). The rare fallback of
    :func:`~mcgrad.inference.handlers.first_distinct` takes its key from the end of
    ``term_keys``, the estimators' row: its ``3 + width`` keys outnumber the latent sites
    by at least three plus the subsampled plates."""
    plates, start = {}, 0
    for index, ((name, position, size, subsample_size), draws) in enumerate(
        zip(program.keys.subsampled, minibatch_draws(program), strict=True)
    ):
        plates[name] = handlers.random_subset(keys[_FIRST_SITE_KEY + position], size, subsample_size,
                                              term_keys[-1 - index], words[:, start:start + draws] if draws else None)
        start += draws
    return plates


class SiteRows(NamedTuple):
    """One latent site over the particles (leading axis ``M`` everywhere)."""

    value: Array
    key: Array
    parameters: tuple  # floating-point leaves of the site's distribution
    others: tuple  # its other leaves
    signal: Array  # Rao-Blackwellized cost, shaped like the site's log-density


class Particles(NamedTuple):
    """``M`` particles of a program: their costs (pathwise gradients attached), their keys,
    and each latent site's rows; what a re-run needs to reproduce a particle's other draws
    (the step's minibatches, shared by all particles, and each one's partner flag); the
    keys of the sites' estimators (``term_keys[i]`` for the program's ``i``-th latent site)."""

    loss: Array
    keys: Array
    sites: dict[str, SiteRows]
    plates: dict[str, Array]
    partner: Array
    term_keys: Array

    def rerun(self, program: Program, params: Params, args: tuple, kwargs: dict, values: dict, reduce: Callable):
        """``vmap`` over the particles of ``reduce(trace, terms)`` for each particle re-run with
        ``values`` (``{name: [M, ...]}``) substituted and every other draw kept: the same
        keys, minibatches and partner flags. A site whose distribution does not depend on
        the replaced sites (:func:`independent_sites`) takes its stored draw instead of
        drawing it again from its key: the same value, without the draw (a plate of
        Bernoulli labels beside a replaced location: most of a measure-valued step)."""
        independent = independent_sites(program, params, self, args, kwargs, tuple(values))
        kept = {other: rows.value for other, rows in self.sites.items() if other in independent}

        def one(keys, partner, row_values):
            return reduce(*run_particle(program, params, keys, args, kwargs, {**self.plates, **row_values}, partner))

        return jax.vmap(one)(self.keys, self.partner, {**kept, **values})


def independent_sites(program: Program, params: Params, particles: Particles, args, kwargs, replaced: tuple) -> set:
    """The latent sites whose distribution does not depend on the values of the ``replaced``
    sites, in the program as traced for the first particle (:func:`dependent_outputs`).

    Such a site draws the same value from its key whatever the replaced values are, so a
    re-run may substitute its stored draw.
    """
    others = [name for name in particles.sites if name not in replaced]
    if not others:
        return set()
    first = {name: particles.sites[name].value[0] for name in replaced}
    counts = []  # leaves per site, seen while tracing

    def distributions(values):
        trace, _ = run_particle(
            program, params, particles.keys[0], args, kwargs, {**particles.plates, **values}, particles.partner[0]
        )
        leaves = [jax.tree.leaves(split_parameters(trace[name]["fn"])[:2]) if name in trace else [] for name in others]
        counts.extend(len(site_leaves) for site_leaves in leaves)
        return leaves

    dependent = iter(dependent_outputs(distributions, first))
    return {name for name, count in zip(others, counts, strict=True) if not any(next(dependent) for _ in range(count))}


def dependent_outputs(fn: Callable, *inputs) -> list[bool]:
    """Which leaves of ``fn(*inputs)`` depend on ``inputs``: the data flow of its jaxpr,
    conservative (a primitive with any dependent input has only dependent outputs)."""
    jaxpr = jax.make_jaxpr(fn)(*inputs).jaxpr
    dependent = set(jaxpr.invars)
    for equation in jaxpr.eqns:
        if any(isinstance(var, jax_core.Var) and var in dependent for var in equation.invars):
            dependent.update(equation.outvars)
    return [isinstance(var, jax_core.Var) and var in dependent for var in jaxpr.outvars]


def crossed_plates(terms_of: Callable[[Array], list[Term]], value: Array, plates: Plates) -> frozenset[str]:
    """The plates among a site's ``plates`` whose slices its cost couples: some cost term
    reads the site's draw ``value`` (:func:`dependent_outputs`) but is not split along
    the plate (it lies outside it, or has one entry along its dim), so replacing the draw
    in every slice at once would change that term by all the replacements together.

    ``terms_of(value)``: the cost terms of a particle whose site draw is ``value``. Along
    the other plates each slice's cost sees only its own draw, which lets an estimator
    replace every slice at once (:meth:`~mcgrad.Site.slice_axes`).
    """
    if not plates:
        return frozenset()
    seen = []  # each term's plates and shape, seen while tracing

    def values(draw):
        terms = terms_of(draw)
        seen.extend((term.plates, jnp.shape(term.value)) for term in terms)
        return [term.value for term in terms]

    reads = dependent_outputs(values, value)
    reading = [term for term, read in zip(seen, reads, strict=True) if read]

    def split(term_plates, shape, plate):
        return plate in term_plates and -plate[1] <= len(shape) and shape[plate[1]] > 1

    return frozenset(plate[0] for plate in plates if not all(split(*term, plate) for term in reading))


def _coupled(program: Program, params: Params, keys: Array, partner, minibatches: dict, args, kwargs, name: str,
             value: Array, plates: tuple[SitePlate, ...]) -> bool:
    """Whether a cost term couples the slices of site ``name`` along any of its ``plates``
    (:func:`crossed_plates`), for the particle of ``keys`` whose draw there is ``value``."""
    def terms_of(draw):
        return run_particle(program, params, keys, args, kwargs, {**minibatches, name: draw}, partner)[1]

    return bool(crossed_plates(terms_of, value, tuple((plate.name, plate.dim) for plate in plates)))


def drawn_once_per_slice(site: dict) -> bool:
    """Whether a trace's ``site`` draws one coordinate per slice of its plates, in at least
    one plate of several slices: no event axis, and no batch axis outside the plates, of
    size > 1."""
    shape = jnp.shape(site["value"])
    axes = {plate.axis for plate in sliced_plates(site)}
    return bool(axes) and math.prod(size for axis, size in enumerate(shape) if axis not in axes) == 1


def coupled_sites(program: Program, params: Params, key: Array, args: tuple, kwargs: dict,
                  sites: list[dict]) -> set[str]:
    """Of the latent ``sites`` (of a trace of ``program``: their draws' shapes and plates are
    all that is read), the names of those whose slices a cost term outside one of their
    plates couples (:func:`crossed_plates`), traced for one particle of ``program``."""
    keys, term_keys, words = particle_keys(program, key, 1)
    minibatches = draw_minibatches(program, keys[0], term_keys, words)
    return {site["name"] for site in sites
            if _coupled(program, params, keys[0], None, minibatches, args, kwargs, site["name"], site["value"],
                        sliced_plates(site))}


class _Layout(NamedTuple):
    """What the vmapped particles cannot return as arrays: how to rebuild each site's
    distribution from its leaves, its sample shape, and its plates with the axis of its
    draw each one runs along (seen while tracing)."""

    rebuild: Callable
    sample_shape: tuple[int, ...]
    plates: tuple[SitePlate, ...]


def site_signal(site: dict, order: int, terms: list[Term]) -> Array:
    """The learning signal of the program's ``order``-th latent site: the cost terms at or
    after it, each reduced to the site's plates, shaped like its log-density."""
    shape = jax.eval_shape(lambda: site_log_prob(site, scaled=False, own_sample=True)).shape
    downstream = [t for t in terms if t.order >= order]
    return sum((reduce_to_plates(t, site_plates(site), shape) for t in downstream), jnp.zeros(shape))


class SitePlate(NamedTuple):
    """A plate a site sits in: its name, its dim (from the right of the batch shape, as
    NumPyro declares it) and the axis of the site's draw it runs along."""

    name: str
    dim: int
    axis: int


def sliced_plates(site: dict) -> tuple[SitePlate, ...]:
    """The plates of a trace's ``site`` with more than one slice, by axis of its draw."""
    shape = jnp.shape(site["value"])
    batch_ndim = len(shape) - len(site["fn"].event_shape)
    plates = [SitePlate(name, dim, batch_ndim + dim) for name, dim in site_plates(site) if -dim <= batch_ndim]
    return tuple(sorted((plate for plate in plates if shape[plate.axis] > 1), key=lambda plate: plate.axis))


def draw_particles(
    program: Program, params: Params, key: Array, num_particles: int, args: tuple, kwargs: dict, shard=None
) -> tuple[Particles, dict[str, _Layout]]:
    """Run ``num_particles`` particles of ``program`` and collect each latent site's rows."""
    keys, term_keys, words = particle_keys(program, key, num_particles)
    partner = partner_flags(program, num_particles)
    plates = draw_minibatches(program, keys[0], term_keys, words)
    if shard is not None:
        keys, partner = shard(keys), shard(partner)
    layouts: dict[str, _Layout] = {}

    def one(row_keys, row_partner):
        trace, terms = run_particle(program, params, row_keys, args, kwargs, plates, row_partner)
        sites = {}
        for order, site in enumerate(latent_sites(trace)):
            name = site["name"]
            parameters, others, rebuild = split_parameters(site["fn"])
            signal = site_signal(site, order, terms)
            sample_shape = tuple(site["kwargs"].get("sample_shape", ()))
            layouts[name] = _Layout(rebuild, sample_shape, sliced_plates(site))
            sites[name] = SiteRows(
                jax.lax.stop_gradient(site["value"]),
                site["kwargs"]["rng_key"],
                parameters,
                others,
                jax.lax.stop_gradient(signal),
            )
        return total(terms), sites

    loss, sites = jax.vmap(one)(keys, partner)
    return Particles(loss, keys, sites, plates, partner, term_keys), layouts


def site_terms(
    program: Program,
    params: Params,
    particles: Particles,
    layouts: dict[str, _Layout],
    states: dict[str, Any],
    args: tuple,
    kwargs: dict,
    *,
    cost: Array | None = None,
    leave_one_out: Array | None = None,
    row_cost: Callable[[Array], Array] | None = None,
) -> tuple[Array, dict[str, Any], int]:
    """Each latent site's estimator terms, summed: ``([M] terms, new states, extra evaluations)``.

    By default a site's row cost is its Rao-Blackwellized signal and a re-costed row is
    the particle's total cost (the ELBO). A multi-sample bound passes its own: ``cost``
    (``[M]``, every site), ``leave_one_out`` (VIMCO) and ``row_cost``, which maps the
    re-costed particles' totals to each row's cost under the bound.
    """
    frozen = jax.lax.stop_gradient(params)
    total_terms = jnp.zeros(particles.loss.shape)
    new_states = dict(states)
    num_evaluations = 0
    for index, (name, rows) in enumerate(particles.sites.items()):
        layout = layouts[name]

        def map_rows(fn, parameters, *row_args, layout=layout, rows=rows):
            return jax.vmap(lambda p, o, *a: fn(layout.rebuild(p, o), *a))(parameters, rows.others, *row_args)

        def recost(values, name=name):
            replaced = particles.rerun(program, frozen, args, kwargs, {name: values}, lambda _, terms: total(terms))
            return row_cost(replaced) if row_cost is not None else replaced

        def recost_slices(values, name=name):
            def signal(trace, terms):
                order = [site["name"] for site in latent_sites(trace)].index(name)
                return site_signal(trace[name], order, terms)

            return particles.rerun(program, frozen, args, kwargs, {name: values}, signal)

        def resample(sample_fn, parameters, rows=rows, layout=layout):
            return jax.vmap(lambda k, p, o: sample_fn(k, layout.rebuild(p, o), layout.sample_shape))(
                rows.key, parameters, rows.others
            )

        @functools.cache
        def coupled(name=name, rows=rows, layout=layout):
            return _coupled(program, frozen, particles.keys[0], particles.partner[0], particles.plates, args, kwargs,
                            name, rows.value[0], layout.plates)

        site = Site(
            name=name,
            value=rows.value,
            cost=rows.signal if cost is None else cost,
            parameters=rows.parameters,
            map=map_rows,
            jacobian=lambda fn, parameters: jax.grad(lambda p: jnp.sum(fn(p)))(parameters),
            recost=recost,
            resample=resample,
            leave_one_out=leave_one_out,
            recost_slices=recost_slices if cost is None else None,
            plate_axes=tuple(plate.axis for plate in layout.plates),
            coupled=coupled,
        )
        terms, new_states[name], info = program.estimators[name].terms(particles.term_keys[index], states[name], site)
        total_terms = total_terms + terms
        num_evaluations += info.num_evaluations
    return total_terms, new_states, num_evaluations


def init_site_states(estimators: dict[str, GradientEstimator], params: Params) -> dict[str, Any]:
    return {name: estimator.init(params) for name, estimator in estimators.items()}


def average_surrogate(
    program: Program,
    params: Params,
    states: dict[str, Any],
    key: Array,
    num_particles: int,
    args: tuple,
    kwargs: dict,
    shard=None,
) -> tuple[Array, tuple[dict[str, Any], Array]]:
    """The per-particle surrogate ``[M]`` of the mean particle cost (the ELBO, a generator's
    loss): ``(surrogate, (new site states, particle costs))``."""
    particles, layouts = draw_particles(program, params, key, num_particles, args, kwargs, shard)
    terms, new_states, _ = site_terms(program, params, particles, layouts, states, args, kwargs)
    return particles.loss + terms, (new_states, jax.lax.stop_gradient(particles.loss))

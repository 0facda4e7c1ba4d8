"""Choosing one estimator per latent site of a program."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpyro.distributions as dist

from mcgrad.estimators.base import GradientEstimator, check_estimator, describe_argument
from mcgrad.estimators.choice import BUILTIN_CANDIDATES, auto, preferred, resolve, summable
from mcgrad.inference.costs import latent_sites
from mcgrad.inference.particles import drawn_once_per_slice


def default_estimator(distribution: dist.Distribution, num_particles: int, *, independent_rows: bool,
                      one_per_slice: bool = False) -> GradientEstimator:
    """Pathwise with rsample; the exact sum over a Bernoulli or Categorical drawn once per
    independent slice of a plate; DisARM for a Bernoulli with two particles of their own costs; else
    the score function with leave-one-out (a moving average for one particle). The rule,
    and why: :func:`mcgrad.estimators.choice.preferred`."""
    name = preferred(distribution, num_particles, independent_rows, one_per_slice)
    return BUILTIN_CANDIDATES[name](num_particles)


def resolve_estimators(
    program_trace: dict,
    annotated: dict[str, GradientEstimator],
    overrides: dict[str, GradientEstimator] | str | None,
    num_particles: int,
    *,
    independent_rows: bool,
    coupled_sites: Callable[[list[dict]], set[str]] | None = None,
) -> dict[str, GradientEstimator]:
    """One estimator per latent site of ``program_trace``, checked against the site.

    Precedence: ``overrides`` (``estimators={...}`` of ``fit``), then the program site's own
    ``infer={"estimator": ...}``, then ``annotated`` (the model's annotations of the same
    site), then :func:`default_estimator`. ``overrides="auto"`` gives every latent site
    ``mg.auto()``; an ``auto`` site resolves to the default's candidate where it applies
    (:func:`mcgrad.estimators.choice.resolve`), which ``mg.fit`` then measures and switches.
    ``independent_rows``: each particle has its own cost (the ELBO's particles), as the
    objective declares. ``coupled_sites(sites)``: the names of those of the trace's
    ``sites`` whose plate slices a cost term couples (:func:`mcgrad.inference.particles.coupled_sites`), asked
    only where the answer decides a default; a site left unanswered counts as coupled.
    Labels are summed by default at no more than :data:`MAX_SUMMED_SITES` sites of a
    program: each summed site re-runs the model ``K − 1`` times a particle and traces one
    more re-run, so a chain of ``T`` label sites (an HMM's states in a plate of sequences)
    would cost ``T·(K − 1)`` re-runs a step and ``T`` traced re-runs to compile.
    """
    latent = latent_sites(program_trace)
    if isinstance(overrides, str):
        if overrides != "auto":
            raise ValueError(f"estimators is a dict of per-site estimators or 'auto', got {overrides!r}.")
        overrides = {site["name"]: auto() for site in latent}
    if overrides is not None and not isinstance(overrides, Mapping):
        raise TypeError(f"estimators is a dict of per-site estimators (e.g. {{'z': mg.disarm()}}) or 'auto', "
                        f"got {describe_argument(overrides)}.")
    overrides = dict(overrides or {})
    unknown = set(overrides) - {site["name"] for site in latent}
    if unknown:
        raise ValueError(
            f"estimators names {sorted(unknown)}, which are not latent sample sites of the guide "
            f"(its latent sites: {[site['name'] for site in latent]})."
        )
    given = {site["name"]: overrides.get(site["name"]) or site["infer"].get("estimator") or annotated.get(site["name"])
             for site in latent}
    # Sites the default would sum over exactly if no cost term couples their slices.
    labels = [
        site for site in latent
        if (given[site["name"]] is None or getattr(given[site["name"]], "auto", None) is not None)
        and summable(site["fn"]) and drawn_once_per_slice(site)
    ]
    if len(labels) > MAX_SUMMED_SITES:  # a chain of labels: every state site would re-run the model
        labels = []
    summed = {site["name"] for site in labels} - coupled_sites(labels) if (
        independent_rows and coupled_sites and labels) else set()
    chosen = {}
    for site in latent:
        name, fn = site["name"], site["fn"]
        one_per_slice = name in summed
        estimator = given[name] or default_estimator(fn, num_particles, independent_rows=independent_rows,
                                                     one_per_slice=one_per_slice)
        check_estimator(estimator, f"site '{name}': the estimator")
        estimator = resolve(estimator, fn, num_particles, name, independent_rows=independent_rows,
                            one_per_slice=one_per_slice)
        estimator.check(fn, name)
        chosen[name] = estimator
    return chosen


# At most this many label sites of one program are summed over by default (see above).
MAX_SUMMED_SITES = 8

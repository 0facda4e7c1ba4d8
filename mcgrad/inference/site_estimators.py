"""Choosing one estimator per latent site of a program."""

from __future__ import annotations

import numpyro.distributions as dist

from mcgrad.estimators.base import GradientEstimator
from mcgrad.estimators.choice import BUILTIN_CANDIDATES, auto, preferred, resolve
from mcgrad.inference.costs import latent_sites


def default_estimator(distribution: dist.Distribution, num_particles: int, *,
                      independent_rows: bool) -> GradientEstimator:
    """Pathwise with rsample; DisARM for a Bernoulli with two particles of their own costs;
    else the score function with leave-one-out (a moving average for one particle). The
    rule, and why: :func:`mcgrad.estimators.choice.preferred`."""
    return BUILTIN_CANDIDATES[preferred(distribution, num_particles, independent_rows)](num_particles)


def resolve_estimators(
    program_trace: dict,
    annotated: dict[str, GradientEstimator],
    overrides: dict[str, GradientEstimator] | str | None,
    num_particles: int,
    *,
    independent_rows: bool,
) -> dict[str, GradientEstimator]:
    """One estimator per latent site of ``program_trace``, checked against the site.

    Precedence: ``overrides`` (``estimators={...}`` of ``fit``), then the program site's own
    ``infer={"estimator": ...}``, then ``annotated`` (the model's annotations of the same
    site), then :func:`default_estimator`. ``overrides="auto"`` gives every latent site
    ``mg.auto()``; an ``auto`` site resolves to the default's candidate where it applies
    (:func:`mcgrad.estimators.choice.resolve`), which ``mg.fit`` then measures and switches.
    ``independent_rows``: each particle has its own cost (the ELBO's particles), as the
    objective declares.
    """
    latent = latent_sites(program_trace)
    if isinstance(overrides, str):
        if overrides != "auto":
            raise ValueError(f"estimators is a dict of per-site estimators or 'auto', got {overrides!r}.")
        overrides = {site["name"]: auto() for site in latent}
    overrides = dict(overrides or {})
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
        estimator = estimator or default_estimator(fn, num_particles, independent_rows=independent_rows)
        if not isinstance(estimator, GradientEstimator):
            raise ValueError(
                f"site '{name}': the estimator must be a GradientEstimator (e.g. mg.score_function()), "
                f"got {type(estimator).__name__}."
            )
        estimator = resolve(estimator, fn, num_particles, name, independent_rows=independent_rows)
        estimator.check(fn, name)
        chosen[name] = estimator
    return chosen

r"""``mg.auto()``: an estimator value that stands for "the most efficient applicable one".

Which estimator is best depends on the family, the cost, the parameters and the stage of
training. ``auto`` names a set of candidates (by default every registered estimator that
applies to the site: :data:`CANDIDATES`) and a schedule; what uses it measures each
candidate at the current parameters and runs the one with the highest efficiency

.. math::  \mathrm{efficiency}_c = \frac{1}{V_c \cdot t_c},

``V_c`` the total variance of the gradient it gives and ``t_c`` the seconds one estimate
takes (compiled). Lowest variance per second: the estimator that reaches a given accuracy
soonest.

This module holds the value and what is known per site without measuring (which
candidates apply); the measuring lives beside the drivers that use it:
:func:`mcgrad.select` (one distribution and cost, by :func:`mcgrad.compare`) and
:func:`mcgrad.fit` (every ``every`` steps, per site, :mod:`mcgrad.selection`).

At a site of a program, ``auto`` resolves to :func:`pinned`: one candidate at a time, with
a state (:class:`AutoState`) that keeps every candidate's own state (baselines, RELAX's
learned parameters) and the current choice, so switching candidates never changes the
state's structure and a checkpoint resumes with the choice it had.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp
from numpyro.distributions import Distribution

from mcgrad.estimators.base import GradientEstimator, Params, check_whole_number

Factory = Callable[[int], GradientEstimator]


def score_function_loo(num_rows: int) -> GradientEstimator:
    """The score function with a leave-one-out baseline, or a moving average for one row."""
    from mcgrad import baselines
    from mcgrad.estimators.score_function import score_function

    baseline = baselines.leave_one_out() if num_rows > 1 else baselines.moving_average()
    return score_function(baseline=baseline)


def _builtin_candidates() -> dict[str, Factory]:
    from mcgrad.estimators.antithetic import disarm
    from mcgrad.estimators.enumeration import enumerate as enumerate_estimator
    from mcgrad.estimators.measure_valued import measure_valued
    from mcgrad.estimators.pathwise import pathwise
    from mcgrad.estimators.relaxed_control_variate import rebar
    from mcgrad.estimators.taylor_control_variate import double_control_variate

    return {
        "pathwise": lambda num_rows: pathwise(),
        "score_function_loo": score_function_loo,
        "measure_valued": lambda num_rows: measure_valued(),
        "disarm": lambda num_rows: disarm(),
        "double_control_variate": lambda num_rows: double_control_variate(),
        "rebar": lambda num_rows: rebar(),
        "enumerate": lambda num_rows: enumerate_estimator(),
    }


CANDIDATES: dict[str, Factory] = {}
"""The registry: candidate name -> ``num_rows -> GradientEstimator``, in preference order (the
first applicable one is a site's choice before anything is measured). Add to it with
:func:`register_candidate`."""


def register_candidate(name: str, factory: Factory) -> None:
    """Make ``factory(num_rows)`` a default candidate of :func:`auto` under ``name``.

    It is offered at every site whose distribution its estimator's ``check`` accepts
    (and, for antithetic pairs, with an even number of rows). Biased estimators are
    refused here: auto ranks by variance, which cannot see bias; pass one explicitly in
    ``auto(candidates=...)`` to rank it anyway.

    Example:
        >>> import mcgrad as mg
        >>> mg.register_candidate("score_function_plain", lambda num_rows: mg.score_function())
        >>> "score_function_plain" in mg.estimators.choice.CANDIDATES
        True
        >>> del mg.estimators.choice.CANDIDATES["score_function_plain"]
    """
    if factory(2).bias is not None:
        raise ValueError(
            f"candidate '{name}' is biased ({factory(2).bias}); auto ranks by variance and cost, which "
            "cannot see bias. Pass it explicitly in mg.auto(candidates={...}) to rank it anyway."
        )
    CANDIDATES[name] = factory


BUILTIN_CANDIDATES: dict[str, Factory] = _builtin_candidates()
"""The built-in candidates, whatever the registry holds now (``mg.fit``'s defaults are among them)."""
CANDIDATES.update(BUILTIN_CANDIDATES)


class AutoSettings(NamedTuple):
    """What :func:`auto` was given (see there)."""

    candidates: tuple[tuple[str, GradientEstimator | Factory], ...] | None
    every: int | None
    num_estimates: int
    margin: float
    prune: float
    criterion: str = "progress"
    budget: float = 0.05
    confidence: float = 2.0


class AutoSite(NamedTuple):
    """``auto`` resolved at one site: its applicable candidates and the one it runs now.

    Attributes:
        settings: the :class:`AutoSettings`.
        names: the candidates' names, in order.
        estimators: the candidates, in order.
        index: the candidate this estimator runs.
    """

    settings: AutoSettings
    names: tuple[str, ...]
    estimators: tuple[GradientEstimator, ...]
    index: int


class AutoState(NamedTuple):
    """The state of an ``auto`` site: the current choice and every candidate's own state."""

    choice: Any  # int32 scalar: index into the site's candidates
    states: tuple


def _unresolved(params: Params):
    raise ValueError(
        "mg.auto() is resolved per site, where the site's distribution is known: use it in mg.fit "
        "(estimators={'z': mg.auto()} or estimators='auto'), in a model's infer={'estimator': mg.auto()}, "
        "in mg.grad, or rank candidates yourself with mg.select(...)."
    )


def auto(
    candidates: Mapping[str, GradientEstimator] | None = None,
    every: int | None = None,
    num_estimates: int = 10,
    margin: float = 0.1,
    prune: float = 10.0,
    criterion: str = "progress",
    budget: float = 0.05,
    confidence: float = 2.0,
) -> GradientEstimator:
    r"""Choose the estimator by measured variance × seconds, and keep choosing as training moves.

    Accepted wherever an estimator is: ``mg.fit(..., estimators={"z": mg.auto()})`` (or
    ``estimators="auto"`` for every latent site), ``infer={"estimator": mg.auto()}`` in a
    model or guide, and ``mg.grad``. In :func:`mcgrad.fit`, at step 0 and every ``every``
    steps it measures, for each auto site and each candidate (the other sites kept at
    their current choice), independent gradient estimates at the current parameters: the
    total variance ``V`` of the step's gradient (every parameter) and the seconds ``t``
    one estimate takes (compiled, run one after another as steps run). It then runs the
    candidate with the most progress per second (``criterion="progress"``: per parameter
    coordinate the fraction of the update that is signal, ``|ḡ|/√(ḡ² + V)``, summed over
    the site's coordinates, :func:`mcgrad.selection.progress`, and over the others, the
    same for every candidate of the site, :func:`mcgrad.selection.shared_progress`: the
    estimator sets the whole step's seconds) or the highest ``1/(V·t)`` (``criterion="variance"``;
    ``V`` relative to each coordinate's second moment). Variance alone keeps rewarding an
    estimator after its noise has stopped limiting the steps: on the benchmarks it picked
    measure-valued where it costs 3–4× a step and saves no steps.

    Args:
        candidates: ``{name: estimator}``; default every estimator of the registry
            (:data:`CANDIDATES`: pathwise, score function with leave-one-out, measure-valued,
            DisARM, double control variate, REBAR, enumeration) that applies to the site.
        every: steps between decisions in ``mg.fit``, each made. Default: a quarter of the
            run and once at a sixteenth, each made only where the decisions so far and
            this one (at the last one's cost) take at most ``budget`` of the run's seconds so far
            (:func:`mcgrad.selection.affordable`): a decision's fixed cost (milliseconds)
            does not shrink with the run.
        num_estimates: gradient estimates per decision for the fastest candidate (``≥ 2``);
            the others get as many as the same seconds buy, at least 2.
        margin: switch away from the current choice only for a candidate more than this
            fraction more efficient (no flip-flopping on noise; a switch can cost a compile).
            At the first decision too: the first candidate is the preferred one, and an
            early switch on noise can last (Adam's second moments remember a noisy
            estimator's gradients for about ``1/(1 − β₂)`` steps).
        prune: after the first decision, candidates less efficient than the best by more
            than this factor are not measured again (their last numbers are kept).
        criterion: ``"progress"`` (default) or ``"variance"``, as above.
        budget: the share of the run measuring may take. A decision's estimates spend at
            most what the run leaves unspent (this fraction of the run so far and of its
            remaining steps at the current pace, less what decisions took;
            :func:`mcgrad.selection.estimates_budget`), shared by the auto sites: fewer
            estimates per candidate where the time would exceed it, never fewer than 2 (a
            variance). On the default schedule a decision is made only where all decisions
            so far took at most this fraction of the run so far.
        confidence: switch only where the gain beyond ``margin`` exceeds this many standard
            errors of the difference (each efficiency's error from its own variance
            estimate: about its whole size with 2 estimates, a third with 10 on one
            coordinate; :func:`mcgrad.selection.standard_errors`). A few estimates on a
            site of few coordinates rarely decide anything: the current choice stays.

    Returns:
        A :class:`~mcgrad.GradientEstimator` named ``"auto"``; its ``auto`` field holds the
        settings. Resolved at a site it becomes :func:`pinned`.

    Example:
        >>> import jax, mcgrad as mg, numpyro.distributions as dist
        >>> g = mg.grad(lambda x: (x - 2.0) ** 2, lambda p: dist.Normal(p, 1.0),
        ...             estimator=mg.auto(), num_samples=100)
        >>> bool(abs(g(0.0, jax.random.key(0)) + 4.0) < 0.5)   # ∂μ E(x−2)² = 2(μ−2)
        True
    """
    check_whole_number("num_estimates", num_estimates, 2, " (a variance needs two estimates)")
    if every is not None:
        check_whole_number("every", every, 1)
    if criterion not in ("progress", "variance"):
        raise ValueError(f"auto(criterion=...) is 'progress' or 'variance', got {criterion!r}.")
    if not margin >= 0 or not prune >= 1 or not budget > 0 or not confidence >= 0:
        raise ValueError(f"auto needs margin >= 0, prune >= 1, budget > 0 and confidence >= 0, got margin={margin!r}, "
                         f"prune={prune!r}, budget={budget!r}, confidence={confidence!r}.")
    if candidates is not None:
        candidates = dict(candidates)
        if not candidates:
            raise ValueError("auto(candidates=...) needs at least one candidate.")
        for name, estimator in candidates.items():
            if not isinstance(estimator, GradientEstimator) or estimator.auto is not None:
                raise ValueError(f"auto candidate '{name}' must be a GradientEstimator (not mg.auto()), got {estimator!r}.")
        candidates = tuple(candidates.items())
    settings = AutoSettings(candidates, every, num_estimates, float(margin), float(prune), criterion, float(budget),
                            float(confidence))

    def unresolved_draw(key, distribution, sample_shape=()):
        _unresolved(None)

    def unresolved_terms(key, state, site):
        _unresolved(None)

    return GradientEstimator(_unresolved, unresolved_draw, unresolved_terms, name="auto", auto=settings)


def candidates_for(
    distribution: Distribution, num_rows: int, site: str = "x", candidates: Mapping | None = None
) -> dict[str, GradientEstimator]:
    """The candidates that apply to ``site``'s ``distribution`` with ``num_rows`` rows (draws
    or particles): each estimator's ``check`` accepts the distribution, and antithetic
    pairs need an even number of rows.

    Example:
        >>> import mcgrad as mg, numpyro.distributions as dist
        >>> list(mg.estimators.choice.candidates_for(dist.Normal(0.0, 1.0), 4))
        ['pathwise', 'score_function_loo', 'measure_valued']
        >>> list(mg.estimators.choice.candidates_for(dist.Bernoulli(logits=0.0), 2))[:3]
        ['score_function_loo', 'measure_valued', 'disarm']
    """
    if candidates is None:
        offered = {name: factory(num_rows) for name, factory in CANDIDATES.items()}
    else:
        offered = {name: c if isinstance(c, GradientEstimator) else c(num_rows) for name, c in dict(candidates).items()}
    applicable = {}
    for name, estimator in offered.items():
        if estimator.partner is not None and num_rows % 2:
            continue
        try:
            estimator.check(distribution, site)
        except (ValueError, NotImplementedError):
            continue
        applicable[name] = estimator
    return applicable


def pinned(site: AutoSite) -> GradientEstimator:
    """The estimator an ``auto`` site runs while candidate ``site.index`` is chosen.

    It draws and estimates as that candidate does; its state is an :class:`AutoState`
    holding every candidate's state, of which it updates only its own.
    """
    index = site.index
    chosen = site.estimators[index]

    def init(params: Params) -> AutoState:
        return AutoState(jnp.asarray(index, jnp.int32), tuple(c.init(params) for c in site.estimators))

    def terms(key, state: AutoState, row_site):
        row_terms, new_state, info = chosen.terms(key, state.states[index], row_site)
        states = state.states[:index] + (new_state,) + state.states[index + 1 :]
        return row_terms, AutoState(state.choice, states), info

    return chosen._replace(init=init, terms=terms, auto=site)


# A finite site summed exactly by default has at most this many values a coordinate:
# enumeration's own limit on the configurations of one slice.
MAX_SUMMED_VALUES = 256


def summable(distribution: Distribution) -> bool:
    """A Bernoulli or Categorical family with at most :data:`MAX_SUMMED_VALUES` values a
    coordinate: one the default sums over, where its draw is one label per slice."""
    from mcgrad.estimators.distributions import support_size, unwrap

    num_values = support_size(unwrap(distribution))
    return num_values is not None and num_values <= MAX_SUMMED_VALUES


def preferred(distribution: Distribution, num_rows: int, independent_rows: bool = True,
              one_per_slice: bool = False) -> str:
    """The candidate ``mg.fit`` runs at a site nobody chose an estimator for, by name.

    * Pathwise where the family has ``rsample``.
    * The exact sum over the values (measure-valued on a finite family: ``K − 1`` re-runs
      a row) for a Bernoulli or Categorical (at most :data:`MAX_SUMMED_VALUES` values)
      whose draw is ``one_per_slice``: one label per slice of a plate, read by no cost term
      outside the plate (a mixture's assignments), with rows of their own costs. The site
      then adds no variance, and its re-runs replace every slice at once, however many
      (a scalar site, outside any plate, is not summed: a chain of ``T`` of them would
      re-run the model ``T·(K − 1)`` times). On the 500-point mixtures of
      ``benchmarks/labels.py`` it reaches the target in 677, 1352 and 1784 steps (K = 2,
      10, 100) at 1.1–1.6× the step of the score function, which takes 856 steps at
      K = 2 and never reaches it at 10 and 100.
    * DisARM for a Bernoulli with two rows (particles) that each have their own cost
      (``independent_rows``: the ELBO's particles, not a multi-sample bound's, where the
      leave-one-out score function is VIMCO). The pair's coupled difference has less
      variance than the score function with the other row as baseline: on the toy problem
      of the reference 0 against 2.5e-7; on the discrete VAE (hand-written) 1.2–1.8× less
      in the encoder's gradient over training, and mcgrad's reaches the target in 12%
      fewer steps at the same cost a step.
    * Else the score function with a leave-one-out baseline: its baseline improves with
      every row, where DisARM only pairs them (at four particles the benchmark mixture's
      labels by the score function reached the old default's target in 1625 steps,
      against DisARM's 1696).

    Example:
        >>> import numpyro.distributions as dist
        >>> [preferred(dist.Normal(0.0, 1.0), 2), preferred(dist.Bernoulli(logits=0.0), 2),
        ...  preferred(dist.Bernoulli(logits=0.0), 4), preferred(dist.Bernoulli(logits=0.0), 4, one_per_slice=True)]
        ['pathwise', 'disarm', 'score_function_loo', 'measure_valued']
    """
    from mcgrad.estimators.distributions import is_bernoulli

    if distribution.has_rsample:
        return "pathwise"
    if independent_rows and one_per_slice and summable(distribution):
        return "measure_valued"
    if independent_rows and num_rows == 2 and is_bernoulli(distribution):
        return "disarm"
    return "score_function_loo"


def resolve(estimator: GradientEstimator, distribution: Distribution, num_rows: int, site: str, *,
            independent_rows: bool, one_per_slice: bool = False) -> GradientEstimator:
    """``auto`` at one site: :func:`pinned` to its :func:`preferred` candidate where that
    applies, else its first applicable one (an estimator already resolved, or any other
    estimator, is returned as it is).

    Raises:
        ValueError: when no candidate applies to the site.
    """
    settings = estimator.auto
    if settings is None or isinstance(settings, AutoSite):
        return estimator
    applicable = candidates_for(distribution, num_rows, site, dict(settings.candidates) if settings.candidates else None)
    if not applicable:
        from mcgrad.estimators.distributions import describe

        raise ValueError(
            f"mg.auto(): no candidate applies to site '{site}' ({describe(distribution)}, {num_rows} rows). "
            "Pass candidates that do, e.g. mg.auto(candidates={'sf': mg.score_function()})."
        )
    names, first_choice = tuple(applicable), preferred(distribution, num_rows, independent_rows, one_per_slice)
    first = names.index(first_choice) if first_choice in names else 0
    return pinned(AutoSite(settings, names, tuple(applicable.values()), first))

r"""``mg.auto()`` in :func:`mcgrad.fit`: measure each auto site's candidates, run the most efficient.

A fit with auto sites runs in segments between decisions (:func:`decision_steps`: every
``every`` steps; on the default schedule those the run's ledger affords,
:func:`affordable`). At each decision, for each
auto site ``s`` and each of its candidates ``c`` (the other sites at their current
choice), :func:`measurer` takes independent gradient estimates at the current state, one
after another in one compiled loop (as steps run), and records

* ``V_{s,c}``: the variance of the step's gradient in the parameters that feed ``s``'s
  distribution (found once per fit by differentiating its parameters), coordinate by
  coordinate relative to the gradient's second moment there (a scale every candidate
  shares: :func:`relative_variances`, what Adam divides by). Relative, because a raw sum
  is ruled by the few coordinates with the largest gradients (on the discrete VAE the
  decoder's, which every candidate leaves about alike, so its noise decided); only the
  site's parameters, because the other sites' coordinates carry noise that is the same
  in expectation for every candidate of this site and would drown its differences (500
  label logits beside a 2-parameter location);
* ``t_{s,c}``: seconds per estimate (after compilation, less the call's fixed cost, which
  training steps do not pay: :func:`run_measurement`).

Candidates share a time budget: ``num_estimates`` estimates of the fastest, and as many
of the others as the same time buys (at least 2), so an expensive candidate costs little
to rule out; fewer where that would pass ``budget`` of the run's steps per decision. The
site runs the candidate with the most progress per second over the whole step's
coordinates (the site's own, :func:`progress`, and the others', the same for every
candidate, :func:`shared_progress`; or ``argmax_c 1/(V_{s,c} · t_{s,c})``) among those
measured for the segment, switching only for a gain above
``margin`` by more than ``confidence`` standard errors (:func:`standard_errors`: a
variance from few estimates is itself noisy, and a switch on noise costs steps and a
compile); a pruned candidate's row keeps its last numbers but is not chosen on them.
Each choice's segment is an ordinary compiled run of ``mg.fit`` (cached, so returning to
a choice reuses its program); the choice itself lives in the state
(:class:`~mcgrad.estimators.choice.AutoState`), so a checkpoint resumes with it.

Every decision is recorded (:func:`decision_table`): ``FitResult.diagnostics.choices``.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import functools
import itertools
import math
import os
import statistics
import time
from collections.abc import Callable, Generator
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from mcgrad.diagnostics import efficiency, running_moments
from mcgrad.estimators.base import split_parameters
from mcgrad.estimators.choice import AutoSite, AutoState, pinned
from mcgrad.inference import handlers
from mcgrad.programs import ProgramCache, compiler_options, one_time, one_time_clock
from mcgrad.programs import fingerprint as _fingerprint

Array = jax.Array

# Measurement programs of recent fits, so a second fit (or a resumed one) of the same model
# does not compile them again; ``mg.fit.cache`` holds the training programs.
MEASURERS = ProgramCache(max_entries=32)
# Per program, argument shapes and site: the parameter coordinates upstream of the site
# (:func:`upstream_mask`; an eager trace and reverse pass, tens of milliseconds a call).
UPSTREAM_MASKS = ProgramCache(max_entries=64)

# Set while the auto driver runs its segments through mg.fit, which must then run the
# pinned choices as given instead of handing them back to the driver.
SEGMENT = contextvars.ContextVar("mcgrad_auto_segment", default=False)


def auto_sites(estimators: dict) -> dict[str, AutoSite]:
    """The sites of a trainer's ``estimators`` chosen by ``mg.auto()``, with their candidates."""
    return {name: e.auto for name, e in estimators.items() if isinstance(e.auto, AutoSite)}


def choices_in(objective_state: Any) -> dict[str, int]:
    """``{site: current candidate index}`` read from the objective state's :class:`AutoState` s."""
    found = {}
    leaves = jax.tree_util.tree_flatten_with_path(objective_state, is_leaf=lambda x: isinstance(x, AutoState))[0]
    for path, leaf in leaves:
        if isinstance(leaf, AutoState):
            found[_site_of(path)] = int(np.asarray(leaf.choice).reshape(-1)[0])
    return found


def with_choices(objective_state: Any, choices: dict[str, int]) -> Any:
    """The objective state with each named auto site's ``choice`` set."""

    def set_choice(path, leaf):
        if isinstance(leaf, AutoState) and _site_of(path) in choices:
            return leaf._replace(choice=np.asarray(choices[_site_of(path)], np.int32))  # a host value: no dispatch
        return leaf

    return jax.tree_util.tree_map_with_path(set_choice, objective_state, is_leaf=lambda x: isinstance(x, AutoState))


def _site_of(path) -> str:
    return str(path[-1].key)


def pinned_estimators(sites: dict[str, AutoSite], choices: dict[str, int]) -> dict:
    """Per auto site, the estimator that runs its chosen candidate."""
    return {name: pinned(site._replace(index=choices[name])) for name, site in sites.items()}


def upstream_mask(program: Callable, args, kwargs, key, state, constrained: Callable, site: str) -> np.ndarray:
    """``[P]`` booleans over the flattened parameter coordinates (the order of
    :func:`measurer`): the ``numpyro.param`` values that the distribution at ``site``
    depends on; every coordinate where none do or the site is not found.

    One reverse pass of a generic function of the site's distribution parameters: a
    parameter whose gradient is exactly zero does not feed the site.
    """

    def functional(p):
        trace = handlers.run(program, args, kwargs, key=key, params=constrained(p))
        if site not in trace:
            return jnp.zeros(())
        leaves, _, _ = split_parameters(trace[site]["fn"])
        return sum((jnp.sum(leaf * (1.0 + 0.37 * leaf)) for leaf in leaves), jnp.zeros(()))

    grads = jax.grad(functional)(state.params)
    feeds = [np.full(np.size(leaf), bool(np.any(np.asarray(leaf) != 0))) for leaf in jax.tree.leaves(grads)]
    mask = np.concatenate(feeds) if feeds else np.zeros(0, bool)
    return mask if mask.any() else np.ones_like(mask)


class Measurement(NamedTuple):
    """One candidate at one decision: per parameter coordinate the mean and variance of the
    step's gradient (flat ``[P]``), the seconds one estimate took, and how many estimates
    gave them."""

    mean: np.ndarray
    variance: np.ndarray
    seconds: float
    num_estimates: int


def measurer(training, static_inputs: Any) -> Callable:
    """A jitted ``(state, keys, first, count, array_inputs) -> [2, P]``: per parameter
    coordinate the mean and variance (``ddof=1``; Welford's running mean and sum of
    squares) of the gradient estimates at ``state`` under ``keys[first:first + count]``
    (past the last key, the keys again from the first: for timing, :func:`_timing`),
    one after another in a loop (as steps run). ``first`` and ``count`` are arguments, so
    every share of the keys runs one program, and the loop runs only the estimates asked
    for; the two rows come back as one array (one transfer)."""

    def varying(state, index):
        # The state plus 0·index: the same values, but XLA can no longer hoist what depends on
        # the state alone out of the loop, which a training step (new parameters each step)
        # never can. Hoisted, the measurement undercharged candidates with much such work
        # (the discrete VAE: score function 0.19 ms an estimate, DisARM 0.21; as steps both
        # 0.23, and 0.21 each measured so).
        zero = index.astype(jnp.float32) * 0.0
        inexact = lambda leaf: leaf + zero.astype(leaf.dtype) if jnp.issubdtype(leaf.dtype, jnp.inexact) else leaf
        return state._replace(params=jax.tree.map(inexact, state.params),
                              objective_state=jax.tree.map(inexact, state.objective_state))

    def unused(*trees):
        # 0 × the step's other outputs (its loss, the estimators' new state), so XLA keeps
        # the work a step does for them: discarded, it was dead code, and REBAR (whose new
        # state is its learned temperature's update, a second gradient) measured 0.18 ms an
        # estimate on the discrete VAE against 0.39 ms a step. (x·0 is not folded for floats.)
        total = sum((jnp.sum(leaf).astype(jnp.float32) for leaf in jax.tree.leaves(trees)
                     if jnp.issubdtype(leaf.dtype, jnp.inexact)), jnp.zeros((), jnp.float32))
        return jnp.nan_to_num(total) * 0.0

    @functools.partial(jax.jit, compiler_options=compiler_options())
    def measure(state, keys, first, count, array_inputs):
        args, kwargs = eqx.combine(array_inputs, static_inputs)
        zeros = jnp.zeros(sum(jnp.size(leaf) for leaf in jax.tree.leaves(state.params)))

        def add(index, carry):
            n, mean, squares = carry
            # the keys in turn, over and over: a timing call (_timing) runs more estimates than keys
            key = keys[index % keys.shape[0]]
            loss, grads, new_state = training.estimate(varying(state, index), key, *args, **kwargs)
            flat = jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree.leaves(grads)]).astype(zeros.dtype)
            return (n + 1, *running_moments(n + 1, mean, squares, flat + unused(loss, new_state)))

        n, mean, squares = jax.lax.fori_loop(first, first + count, add, (jnp.zeros(()), zeros, zeros))
        return jnp.stack([mean, squares / (n - 1)])

    return measure


def compile_measurements(entries: list[dict]) -> float:
    """Compile the entries' lowered measurement programs; returns the wall seconds.

    Tracing and lowering ran one program after another (NumPyro's handler stack is
    global); XLA compiles them here in parallel threads, one per core, which is most of
    the time.
    """
    pending = [entry for entry in entries if entry["compiled"] is None]
    if not pending:
        return 0.0
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(pending), os.cpu_count() or 1)) as pool:
        programs = pool.map(lambda entry: entry.pop("lowered").compile(), pending)
        for entry, program in zip(pending, programs, strict=True):
            entry["compiled"] = program
    return time.perf_counter() - start


def _timed_call(entry: dict, state, keys, first: int, count: int, array_inputs):
    """The entry's program on ``keys[first:first + count]``: the two moment rows and the call's
    wall seconds (numpy scalars in: a ``jnp`` one is a dispatch of its own)."""
    start = time.perf_counter()
    mean, variance = np.asarray(entry["compiled"](state, keys, np.int32(first), np.int32(count), array_inputs))
    return mean, variance, time.perf_counter() - start


def run_measurement(entry: dict, state, keys, first: int, count: int, array_inputs) -> Measurement:
    """The estimates under ``keys[first:first + count]`` of the entry's compiled program,
    timed alone.

    Its seconds per estimate leave out the call's fixed cost: a training step pays none of
    it (the steps run in one compiled loop), and left in it charges a candidate given 2
    estimates half of it an estimate and one given 10 a tenth. The fixed cost is the
    entry's ``fixed`` where :func:`_timing` found it, else its ``dispatch``
    (:func:`time_dispatch`: a call asking for no estimate, which leaves out the loop's own
    set-up). A call the fixed cost alone explains (timing noise) counts a tenth of its time
    as the estimates'.
    """
    mean, variance, elapsed = _timed_call(entry, state, keys, first, count, array_inputs)
    fixed = entry["fixed"] if "fixed" in entry else time_dispatch(entry, state, keys, array_inputs)
    return Measurement(mean, variance, max(elapsed - fixed, 0.1 * elapsed) / count, count)


def _interleaved(jobs: dict[Any, Generator]) -> tuple[dict[Any, Any], dict[Any, float]]:
    """Run :func:`_timing` generators round-robin, one timed call of each in turn, so a
    passing slowdown (the first calls after compiling a decision's programs) falls on all
    of them alike rather than on whichever was timed first: on the benchmark mixture a
    first fit, timing candidate after candidate, had DisARM at 276 µs an estimate and
    measure-valued at 128, against 98 and 47 in later fits. Returns each job's result and
    the wall seconds its calls took."""
    results, seconds, active = {}, dict.fromkeys(jobs, 0.0), dict(jobs)
    while active:
        for name, job in list(active.items()):
            start = time.perf_counter()
            try:
                next(job)
            except StopIteration as stop:
                results[name] = stop.value
                del active[name]
            seconds[name] += time.perf_counter() - start
    return results, seconds


# The most estimates one timing call runs (its keys taken in turn, over and over).
MAX_TIMED_ESTIMATES = 1000


def _timing(entry: dict, state, keys, first: int, array_inputs, long: float = 3e-3,
            repeats: int = 3) -> Generator[None, None, list[Measurement]]:
    r"""Time a program not timed before (a generator: it yields after each timed call, for
    :func:`_interleaved`): calls of one estimate and of ``k``, enough for about ``long``
    seconds, the fastest of ``repeats`` of each. Their difference gives the seconds an
    estimate and the call's fixed cost apart,

    .. math::  t = \frac{T_k - T_1}{k - 1}, \qquad F = T_1 - t,

    kept in the entry (``seconds``, ``fixed``). A call's fixed cost is more than its
    dispatch: the loop's set-up and the moments' wrap-up run once a call whatever the count
    (on the benchmark mixture a call of one estimate took 155 µs past its dispatch, and
    each further estimate 42–66 µs). The ``k`` estimates take the keys in turn, over and
    over (:func:`measurer`), so ``k`` is not bounded by the decision's keys; they only time,
    and only the one estimate under ``keys[first]`` joins the measurement.

    Long, because the difference of short calls is mostly their jitter: on the mixture,
    calls of 1 and 4 estimates (about 0.25 and 0.4 ms) gave slopes that moved by ±15%
    between three timings and ran 15% high on average, the first fit's decision ranking on
    them (the location's pathwise at 151 µs an estimate and measure-valued at 80, where
    each runs 51 and 66); calls of 1 and 60 gave the same slopes within ±3%. ``k`` is sized
    in two steps (from the one estimate's call, which the fixed cost fills, then from the
    first slope), at most :data:`MAX_TIMED_ESTIMATES`.

    An estimate that takes ``long`` or more keeps its one call, the fastest of ``repeats``
    under ``10·long`` (one slow call can be noise), less the dispatch. So does one whose
    ``k − 1`` estimates take less than a call (their slope within the calls' noise): it is
    charged its share of the ``k``-call past the dispatch. Returns the one estimate's
    measurement, at the seconds found.
    """

    def call(count):
        return _timed_call(entry, state, keys, first, count, array_inputs)

    mean, variance, single = call(1)
    yield
    if long <= single < 10 * long:  # slow once can be noise: the fastest of `repeats`
        for _ in range(repeats - 1):
            single = min(single, call(1)[2])
            yield
    fixed = time_dispatch(entry, state, keys, array_inputs)
    seconds = max(single - fixed, 0.1 * single)
    if single < long:
        count = math.ceil(long / max(single, 1e-6)) + 1
        bulk = call(count)[2]
        yield
        slope = (bulk - single) / (count - 1)
        if 0 < bulk - single < long / 2:  # the first k was sized by a call the fixed cost fills
            count = min(MAX_TIMED_ESTIMATES, max(count, math.ceil(long / slope) + 1))
            bulk = call(count)[2]
            yield
        for _ in range(repeats - 1):
            single = min(single, call(1)[2])
            bulk = min(bulk, call(count)[2])
            yield
        if bulk - single > single:  # the k − 1 more estimates outlast a call: their cost is resolved
            seconds = (bulk - single) / (count - 1)
            entry["fixed"] = max(single - seconds, 0.0)
        else:  # estimates too cheap to tell from a call's fixed cost and its noise: a share of the
            # call past the dispatch each, alike for all
            seconds = max(bulk - fixed, 0.1 * bulk) / count
    entry["seconds"] = min(entry.get("seconds", math.inf), seconds)
    return [Measurement(mean, variance, seconds, 1)]


def time_dispatch(entry: dict, state, keys, array_inputs, repeats: int = 3) -> float:
    """The entry's fixed seconds a call that asks for no estimate (arguments in, the moments
    out): the fastest of ``repeats`` such calls, kept in the entry. Called after a call of
    the program, so its first call's one-time work is done."""
    if "dispatch" not in entry:
        calls = []
        for _ in range(repeats):
            start = time.perf_counter()
            np.asarray(entry["compiled"](state, keys, np.int32(0), np.int32(0), array_inputs))
            calls.append(time.perf_counter() - start)
        entry["dispatch"] = min(calls)
    return entry["dispatch"]


def merged(a: Measurement, b: Measurement) -> Measurement:
    r"""The moments of two groups of estimates joined (Chan et al.'s pairwise update), at
    ``a``'s seconds: with ``δ = \bar g_b - \bar g_a`` and ``n = n_a + n_b``,

    .. math::  \bar g = \bar g_a + δ\, n_b / n, \qquad
               (n - 1) V = (n_a - 1) V_a + (n_b - 1) V_b + δ^2 n_a n_b / n.

    A group of one estimate has no spread (its variance ``0/0``) to carry.

    Example:
        >>> import numpy as np
        >>> one = Measurement(np.array([1.0]), np.array([np.nan]), 1e-3, 1)
        >>> two = Measurement(np.array([4.0]), np.array([2.0]), 1e-3, 2)  # estimates 3 and 5
        >>> both = merged(one, two)
        >>> both.mean.tolist(), both.variance.tolist(), both.num_estimates   # of 1, 3, 5
        ([3.0], [4.0], 3)
    """
    n = a.num_estimates + b.num_estimates
    delta = b.mean - a.mean
    squares = sum(m.variance * (m.num_estimates - 1) if m.num_estimates > 1 else np.zeros_like(m.mean) for m in (a, b))
    squares = squares + delta**2 * a.num_estimates * b.num_estimates / n
    return Measurement(a.mean + delta * b.num_estimates / n, squares / (n - 1), a.seconds, n)


def relative_variances(measurements: dict[str, Measurement], mask: np.ndarray) -> dict[str, float]:
    r"""Each candidate's variance over the coordinates in ``mask``, each relative to a scale
    all candidates share:

    .. math::  V^{rel}_c = \sum_{d \in mask} \frac{V_{c,d}}{S_d}, \qquad
               S_d = \operatorname{mean}_c (\bar g_{c,d}^2 + V_{c,d}),

    ``S_d`` the gradient's second moment in coordinate ``d`` (the scale an adaptive optimizer
    divides by). A raw sum is ruled by the few coordinates with the largest gradients;
    relative to their scale every coordinate counts as the optimizer sees it.
    """
    scale = _second_moment(measurements)
    return {c: float(np.sum((m.variance / scale)[mask])) for c, m in measurements.items()}


def _second_moment(measurements: dict[str, Measurement]) -> np.ndarray:
    """Per coordinate ``S_d = mean_c(ḡ_{c,d}² + V_{c,d})`` (at least float32's tiny), the
    scale :func:`relative_variances` divides by."""
    scale = np.mean([m.mean**2 + m.variance for m in measurements.values()], axis=0)
    return np.maximum(scale, np.finfo(np.float32).tiny)


def estimates_budget(budget: float, segment_steps: float, step_seconds: float, ledger: tuple[float, float, int],
                     calls: float, num_sites: int, spent: float = 0.0) -> float:
    """The seconds one site's estimates may take at a decision. The decision may take
    ``budget`` of a segment's steps at ``step_seconds`` a step, or, where more, what the run
    leaves unspent (``budget`` of the run so far and of its remaining steps at that pace,
    less what its earlier decisions took and the calls' fixed seconds, ``calls`` a site);
    the sites share what this decision's estimates have not ``spent`` yet (the sites
    before, in order), this one and the ``num_sites − 1`` after it alike. So a site that
    needs few estimates leaves the rest to the next (on the benchmark mixture an even
    split left the labels' six candidates 2 estimates each in repeated fits, where the
    location's three took 25 that its ranking did not need).

    Example:
        >>> round(estimates_budget(0.05, 400, 1e-4, (0.0, 0.0, 2000), 0.0, 1), 6)   # a run's first decision
        0.01
        >>> round(estimates_budget(0.05, 400, 1e-4, (0.1, 0.009, 1000), 0.0, 2), 6)  # mostly spent: a segment's
        0.001
        >>> round(estimates_budget(0.05, 400, 1e-4, (0.0, 0.0, 2000), 0.0, 1, spent=0.002), 6)  # the last site's
        0.008
    """
    ran, measured, remaining = ledger
    unspent = budget * (ran + remaining * step_seconds) - measured - calls * num_sites
    return (max(budget * segment_steps * step_seconds, unspent) - spent) / num_sites


def estimate_counts(seconds: dict[str, float], num_estimates: int, limit: float = math.inf) -> dict[str, int]:
    """Estimates per candidate for one time budget: ``n`` of the fastest, and as many of each
    other as the same seconds buy (at least 2, for a variance); ``n`` is ``num_estimates``,
    or less where their seconds would pass ``limit`` (never below 2).

    Example:
        >>> estimate_counts({"fast": 1e-3, "slow": 4e-3}, 10)
        {'fast': 10, 'slow': 2}
        >>> estimate_counts({"fast": 1e-3, "slow": 4e-3}, 10, limit=0.012)
        {'fast': 4, 'slow': 2}
    """
    fastest = min(seconds.values())
    for n in range(num_estimates, 1, -1):
        counts = {c: int(min(n, max(2, round(n * fastest / t)))) for c, t in seconds.items()}
        if sum(counts[c] * seconds[c] for c in counts) <= limit:
            return counts
    return counts


def _stacked(measurements: dict[str, Measurement]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The candidates' estimate counts ``[C]``, means and variances ``[C, P]``, in their order:
    the rules below take every candidate in one array operation (a decision's bookkeeping
    was ~40% of the benchmark mixture's decision in per-candidate small operations)."""
    counts = np.array([m.num_estimates for m in measurements.values()], float)
    return counts, np.stack([m.mean for m in measurements.values()]), np.stack([m.variance for m in measurements.values()])


def _inside(mask, size: int) -> np.ndarray:
    """``[size]`` booleans: the coordinates ``mask`` selects (a boolean mask or a slice)."""
    inside = np.zeros(size, bool)
    inside[mask] = True
    return inside


def _signal(counts: np.ndarray, means: np.ndarray, variances: np.ndarray) -> np.ndarray:
    """Per coordinate ``ḡ²``, the squared gradient every unbiased candidate estimates: their
    estimates (:func:`_stacked`) pooled, the square corrected for the pooled mean's own noise."""
    pooled = counts @ means / counts.sum()
    noise_of_pooled = counts @ variances / counts.sum() ** 2
    return np.maximum(pooled**2 - noise_of_pooled, 0.0)


# The gradient progress is ranked at, as a fraction of the one measured (ρ): a run spends
# most of its steps to a target after its gradients have shrunk, where noise limits them.
LATE_GRADIENT = 0.1


def _late_signal(counts: np.ndarray, means: np.ndarray, variances: np.ndarray) -> np.ndarray:
    """Per coordinate ``(ρ ḡ)²``: :func:`_signal` at :data:`LATE_GRADIENT`."""
    return LATE_GRADIENT**2 * _signal(counts, means, variances)


def progress(measurements: dict[str, Measurement], mask: np.ndarray) -> dict[str, float]:
    r"""Each candidate's expected progress per step, as an adaptive optimizer makes it, late
    in the run:

    .. math::  P_c = \sum_{d \in mask} \frac{ρ |\bar g_d|}{\sqrt{ρ^2 \bar g_d^2 + V_{c,d}}},

    ``\bar g`` the gradient every unbiased candidate estimates (their estimates pooled; its
    square corrected for the pooled mean's own noise). Each coordinate moves by about the
    fraction of its update that is signal (Adam divides by the root mean square): near 1
    where the noise is small against the gradient, whatever the variance, and ``∝ 1/√V``
    where noise rules. Variance alone keeps rewarding an estimator after its noise has
    stopped limiting the steps.

    At ``ρ = 1`` this is a step's progress now. At step 0 gradients are large against their
    noise, so every candidate moves about alike: on the benchmark mixture the labels'
    measure-valued made 1.2× the score function's progress there, though it takes 1.6×
    fewer steps to the target at about the same cost a step, and a decision on it kept the
    score function. Most steps to a target are taken after the gradients have shrunk toward
    their noise: at a tenth of the measured gradient (:data:`LATE_GRADIENT`) measure-valued
    makes 2.8× the score function's progress. There the ranking is the noise limit's,
    ``Σ |ḡ|/√V`` a second (0.1 and 0.03 rank alike), bounded by 1 a coordinate where a
    candidate's noise is near nothing.

    Each fraction is taken less its bias from ``V``'s own noise (:func:`_signal_fraction`),
    so a candidate measured on few estimates is not ranked up for it.
    """
    counts, means, variances = _stacked(measurements)
    fractions = _signal_fraction(_late_signal(counts, means, variances)[mask], variances[:, mask], counts[:, None] - 1)
    return dict(zip(measurements, fractions.sum(axis=1).tolist(), strict=True))


def _signal_fraction(signal: np.ndarray, variance: np.ndarray, dof: float) -> np.ndarray:
    r"""Per coordinate the fraction of an Adam update that is signal,
    ``f(V) = √s / √(s + V)`` (``s = ḡ²``), from a variance ``V̂`` with ``dof`` degrees of
    freedom, less the plug-in's bias:

    .. math::  \hat f = f(\hat V) - \tfrac12 f''(\hat V)\, \widehat{Var}(\hat V)
               = f(\hat V) - \frac{3}{4 k} \frac{\sqrt{s}\, \hat V^2}{(s + \hat V)^{5/2}}, \qquad k = dof,

    ``Var(V̂) = 2V²/k`` for Gaussian estimates. ``f`` is convex in ``V``, so ``f(V̂)`` is high
    where noise rules: from 2 estimates by 1.63× where ``V = 10 s`` and 2.46× where
    ``V = 100 s``, from 10 by 1.07× and 1.09×. With the correction: 1.16× and 1.41× from 2,
    within 10% from 3 and 1% from 10. Candidates get fewer estimates the dearer they are,
    so uncorrected the bias ranked dear candidates up. The correction is at most
    ``3/(4k)`` of ``f`` itself: never negative.
    """
    total = np.maximum(signal + variance, np.finfo(np.float32).tiny)
    fraction = np.sqrt(signal) / np.sqrt(total)
    return fraction * (1.0 - 0.75 * (variance / total) ** 2 / np.maximum(dof, 1.0))


def shared_progress(measurements: dict[str, Measurement], mask: np.ndarray) -> float:
    r"""The progress a step makes on the coordinates outside ``mask`` (the parameters that
    do not feed the site), the same for every candidate of the site: :func:`progress` there
    at the candidates' variances pooled (their draws have the same distribution, so these
    coordinates' noise differs between them by chance alone).

    A site's candidate sets the seconds of the whole step, and every coordinate waits for
    it: ranked by the site's own progress per second, a costlier estimator that sharpens a
    site of two coordinates beats a cheaper one and slows the 500 others (the benchmark
    mixture's location: measure-valued at 1.78 of 2 against pathwise's 1.31, at 88 µs an
    estimate against 66; in fixed runs the two reach the target in 1007 and 1015 steps,
    and pathwise's steps cost 25% less). So :func:`run` ranks a site's candidates by
    ``(P_c + P_shared) / t_c``.

    Example:
        >>> m = {"a": Measurement(np.ones(3), np.array([0.0, 3.0, 3.0]), 1e-3, 10),
        ...      "b": Measurement(np.ones(3), np.array([3.0, 1.0, 1.0]), 1e-3, 10)}
        >>> # ḡ² = 0.9, at ρ = 0.1: 2 · √0.009/√(0.009 + 2), less the bias at 18 degrees of freedom
        >>> round(shared_progress(m, np.array([True, False, False])), 3)
        0.128
    """
    counts, means, variances = _stacked(measurements)
    pooled = counts @ variances / counts.sum()
    dof = float(np.sum(np.maximum(counts - 1.0, 0.0)))
    outside = ~_inside(mask, means.shape[1])
    return float(np.sum(_signal_fraction(_late_signal(counts, means, variances), pooled, dof)[outside]))


def program_cost(entry: dict) -> tuple[float, float, float] | None:
    """XLA's static count for the entry's compiled measurement program: ``(flops,
    transcendentals, bytes accessed)``, its loop's body (one estimate) counted once; kept in
    the entry. ``None`` where the backend gives no count."""
    if "cost" not in entry:
        try:
            analysis = entry["compiled"].cost_analysis()
            analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
            entry["cost"] = tuple(float(analysis[k]) for k in ("flops", "transcendentals", "bytes accessed"))
        except (AttributeError, KeyError, IndexError, TypeError, NotImplementedError):
            entry["cost"] = None
    return entry["cost"]


# A transcendental counts as this many flops in a program's work (tens on a CPU's vector
# units: a polynomial and a range reduction).
TRANSCENDENTAL_FLOPS = 10.0
# Seconds grow as work^b across one decision's programs: b fitted on the pairs whose work
# differs by at least MIN_WORK_RATIO, within WORK_EXPONENT; DEFAULT_WORK_EXPONENT without such
# a pair. Measured: 0.63 (the benchmark mixture's labels), 0.86 (the discrete VAE), 0.93 (the BLR).
MIN_WORK_RATIO = 1.2
WORK_EXPONENT = (0.5, 1.0)
DEFAULT_WORK_EXPONENT = 0.8


def counted_seconds(seconds: dict[str, float], costs: dict[str, tuple | None]) -> dict[str, float]:
    r"""Each candidate's seconds an estimate as ranked: a power of its program's work
    (:func:`program_cost`: ``w = flops +`` :data:`TRANSCENDENTAL_FLOPS` ``· transcendentals``),
    its level and exponent taken from all the candidates' timings,

    .. math::  \hat t_c = e^{a}\, w_c^{\,b}, \qquad b = \operatorname{median}_{i,j}
               \frac{\log t_i - \log t_j}{\log w_i - \log w_j}, \qquad
               a = \operatorname{median}_c (\log t_c - b \log w_c)

    (Theil–Sen: medians, so one wild timing moves neither), the slopes over the pairs whose
    work differs by :data:`MIN_WORK_RATIO` or more, ``b`` within :data:`WORK_EXPONENT`. A
    candidate without a count, or alone with one, keeps its own timing.

    Timings of a fresh program right after a decision's compiles are off by up to 3×: the
    benchmark mixture's first fit timed enumeration at 20 µs an estimate and DisARM at 27
    (each runs 62 and 68, timed later on calls of sixty estimates, ±3% between timings) and
    chose enumeration on it; one timed the discrete VAE's score function and DisARM at
    140 and 180 µs (3.33 and 3.34 million of work, equal costs a step) and left DisARM on
    it. The counts are exact and the same every run; across one decision's programs
    seconds followed ``w^b`` within ±15% (mixture labels: b = 0.63, VAE 0.86, BLR 0.93).
    So the counts set the ratios, and the clock the level.

    Example:
        >>> seconds = {"score": 140e-6, "disarm": 180e-6, "measure_valued": 830e-6, "rebar": 335e-6}
        >>> costs = {"score": (3.11e6, 2.20e4, 0.0), "disarm": (3.13e6, 2.05e4, 0.0),
        ...          "measure_valued": (2.74e7, 4.13e5, 0.0), "rebar": (1.01e7, 6.1e4, 0.0)}
        >>> {c: round(t * 1e6) for c, t in counted_seconds(seconds, costs).items()}   # µs
        {'score': 147, 'disarm': 147, 'measure_valued': 789, 'rebar': 352}
    """
    works = {c: cost[0] + TRANSCENDENTAL_FLOPS * cost[1] for c, cost in costs.items()
             if cost is not None and c in seconds and 0 < seconds[c] < math.inf and cost[0] + cost[1] > 0}
    if len(works) < 2:
        return dict(seconds)
    x = {c: math.log(w) for c, w in works.items()}
    y = {c: math.log(seconds[c]) for c in works}
    slopes = [(y[a] - y[b]) / (x[a] - x[b]) for a, b in itertools.combinations(works, 2)
              if abs(x[a] - x[b]) >= math.log(MIN_WORK_RATIO)]
    low, high = WORK_EXPONENT
    exponent = min(max(statistics.median(slopes), low), high) if slopes else DEFAULT_WORK_EXPONENT
    level = statistics.median([y[c] - exponent * x[c] for c in works])
    return {c: math.exp(level + exponent * x[c]) if c in works else t for c, t in seconds.items()}


# A program's seconds an estimate (its fastest timing, interleaved with the other
# candidates'), relative standard error on a shared machine: the discrete VAE's score
# function and DisARM, one cost a step, timed at 139-164 µs fit after fit, about ±8% for
# one fit's timing. At 0.1 with confidence 2, no gain under ~45% was sure, and the
# 10000-label mixture kept the labels' score function against measure-valued's 33% (its
# 34% fewer steps to target); at 0.05 a sure gain is ~26%, above the VAE's 10.6% on noise.
TIMING_ERROR = 0.05


def standard_errors(measurements: dict[str, Measurement], mask: np.ndarray, criterion: str,
                    shared: float = 0.0, timing_error: float = TIMING_ERROR,
                    moves: dict[str, float] | None = None) -> dict[str, float]:
    r"""Each candidate's efficiency's standard error relative to the efficiency, from the
    noise of its own variance estimate: ``n`` estimates give ``V̂_d`` with
    ``Var(V̂_d) ≈ 2 V_d² / (n − 1)`` (Gaussian estimates, coordinates independent). For
    :func:`progress` (``s = ḡ²``, held fixed: every candidate shares it) and for the
    relative variance (:func:`relative_variances`, scale ``S``):

    .. math::  \frac{SE(P_c)^2}{P_c^2} = \frac{2}{n - 1} \frac{\sum_d \big(\tfrac12 \sqrt{s_d}\, V_d\,
               (s_d + V_d)^{-3/2}\big)^2}{P_c^2}, \qquad
               \frac{SE(1/V^{rel}_c)^2}{(1/V^{rel}_c)^2} = \frac{2}{n - 1}
               \frac{\sum_d \big(r_d (1 - r_d / C)\big)^2}{(V^{rel}_c)^2},

    ``r_d = V_d / S_d``, ``C`` the number of candidates (the scale averages their second
    moments, so ``V_d`` is in it too). Under ``"progress"`` the efficiency ranked is
    ``(P_c + shared) / t_c`` (:func:`shared_progress`): the error is relative to that sum
    (the shared part is common to every candidate, and its noise moves them alike).

    Seconds carry ``timing_error`` of themselves (:data:`TIMING_ERROR`), added in
    quadrature: once the site's progress is a small part of the step's (or the candidates
    make about the same), the seconds decide, and sub-millisecond timings of one program
    move by 5–10% between fits; without it a 10% timing gap passed as sure and switched
    the discrete VAE from DisARM to the score function at step 6000 (two estimators of
    the same cost a step). With 2 estimates the variance's error is about the
    efficiency's own size: such a candidate wins only by far.

    Example:
        >>> m = {"a": Measurement(np.ones(4), np.full(4, 1.0), 1e-3, 9),
        ...      "b": Measurement(np.ones(4), np.full(4, 1.0), 1e-3, 3)}
        >>> standard_errors(m, np.ones(4, bool), "variance", timing_error=0.0)
        {'a': 0.1875, 'b': 0.375}
        >>> # r = ½ on 4 coordinates, C = 2: √(2/(n−1)) · √4 · ½(1 − ¼) / (4 · ½); with the timing's:
        >>> {c: round(e, 4) for c, e in standard_errors(m, np.ones(4, bool), "variance").items()}
        {'a': 0.1941, 'b': 0.3783}
    """
    errors = {}
    if criterion == "progress":
        moves = progress(measurements, mask) if moves is None else moves
        counts, means, variances = _stacked(measurements)
        signal, variances = _late_signal(counts, means, variances)[mask], variances[:, mask]
        # |∂P/∂V_d|·V_d per candidate and coordinate
        slopes = 0.5 * np.sqrt(signal) * variances / np.maximum(signal + variances, np.finfo(np.float32).tiny) ** 1.5
        spreads = np.sqrt(np.sum(slopes**2, axis=1) * 2.0 / np.maximum(counts - 1, 1)).tolist()
        for c, spread in zip(measurements, spreads, strict=True):
            errors[c] = math.hypot(spread / (moves[c] + shared), timing_error) if moves[c] + shared > 0 else math.inf
    else:
        scale, relative = _second_moment(measurements), relative_variances(measurements, mask)
        for c, m in measurements.items():
            share = (m.variance / scale)[mask]
            # V_d also enters the scale (a 1/C share): ∂(V_d/S_d)/∂V_d · V_d = (V_d/S_d)(1 − V_d/(C S_d))
            slope = share * (1.0 - share / len(measurements))
            spread = math.sqrt(float(np.sum(slope**2)) * 2.0 / max(m.num_estimates - 1, 1))
            errors[c] = math.hypot(spread / relative[c] if relative[c] > 0 else 0.0, timing_error)
    return errors


def could_seconds_decide(mask, timing_error: float = TIMING_ERROR) -> bool:
    """Whether :func:`seconds_decide` can hold at all for a site with these coordinates
    (``mask``: :func:`upstream_mask`): only where they are at most ``timing_error`` of the
    others' number (each other coordinate makes at most 1 of progress), so a site that is
    most of the parameters is not probed for it.

    Example:
        >>> could_seconds_decide(np.arange(502) < 2), could_seconds_decide(np.arange(502) >= 2)
        (True, False)
    """
    if not isinstance(mask, np.ndarray) or mask.dtype != bool:  # every coordinate (the trace could not tell)
        return False
    inside = int(np.count_nonzero(mask))
    return inside <= timing_error * (mask.size - inside)


def seconds_decide(measurements: dict[str, Measurement], mask, timing_error: float = TIMING_ERROR) -> bool:
    r"""Whether the site's own progress is within the seconds' error: its ``n`` coordinates
    make at most 1 each (:func:`progress`), so against the others' :func:`shared_progress`
    ``P_s`` a candidate's efficiency ``(P_c + P_s)/t_c`` is its seconds' to within a factor

    .. math::  1 + n / P_s \le 1 + ε_t,

    ``ε_t`` the seconds' own relative error (:data:`TIMING_ERROR`). More estimates cannot
    then make a decision surer than its timing: the site takes the 2-estimate floor. On
    the benchmark mixture's location (2 coordinates against the labels' ~58) its three
    candidates took 25 estimates a decision that moved its efficiencies by ≤ 3.4%.

    Example:
        >>> one = {"a": Measurement(np.ones(50), np.full(50, 1e-4), 1e-3, 2)}
        >>> seconds_decide(one, np.arange(50) < 2), seconds_decide(one, np.arange(50) < 20)
        (True, False)
    """
    num_coordinates = int(_inside(mask, np.size(next(iter(measurements.values())).mean)).sum())
    return num_coordinates <= timing_error * shared_progress(measurements, mask)


def outpaced(seconds: dict[str, float], most_progress: float, best: float, prune: float) -> dict[str, float]:
    r"""The candidates, timed once, that cannot come within ``prune`` of the ``best``
    progress per second, with their ceilings: progress is at most 1 a site coordinate
    (:func:`progress`), so over ``n`` of them, and the others' :func:`shared_progress`
    ``P_s``, a candidate taking ``t`` seconds an estimate makes at most

    .. math::  E^{max}_c = (n + P_s) / t_c

    per second (``most_progress = n + P_s``). Used only on a program that has run before (a fresh
    one's first estimate carries one-time work, which would make the ceiling too low).

    Example:
        >>> outpaced({"slow": 0.026, "close": 0.003}, 62, best=60_000.0, prune=10.0)
        {'slow': 2384.6153846153848}
    """
    ceilings = {c: most_progress / t for c, t in seconds.items()}
    return {c: ceiling for c, ceiling in ceilings.items() if ceiling * prune < best}


def decide(
    current: int, names: tuple[str, ...], efficiencies: dict[str, float], margin: float,
    errors: dict[str, float] | None = None, confidence: float = 2.0,
) -> int:
    r"""The candidate to run: the most efficient of those that beat the current one by more
    than ``margin``, surely: with ``E`` the efficiencies and ``ε`` their relative standard
    errors (:func:`standard_errors`; none given: no error),

    .. math::  E_c - (1 + m) E_{cur} > z \sqrt{(ε_c E_c)^2 + \big((1 + m) ε_{cur} E_{cur}\big)^2},

    ``z`` the ``confidence``. Otherwise the current one stays: a switch on noise costs the
    steps it runs on the worse estimator, and a compile.

    Example:
        >>> names = ("a", "b")
        >>> decide(0, names, {"a": 1.0, "b": 1.3}, margin=0.1)
        1
        >>> decide(0, names, {"a": 1.0, "b": 1.3}, margin=0.1, errors={"a": 0.3, "b": 0.3})
        0
    """
    errors = errors or {}
    finite = {n: e for n, e in efficiencies.items() if not math.isnan(e)}
    if not finite:
        return current
    current_efficiency = finite.get(names[current], -math.inf)  # not measured: any measured one beats it
    if current_efficiency == math.inf:
        return current
    bar = (1.0 + margin) * current_efficiency
    bar_error = bar * errors.get(names[current], 0.0) if math.isfinite(bar) else 0.0

    def surely_better(name, e):
        return e == math.inf or bar == -math.inf or (
            e - bar > confidence * math.hypot(e * errors.get(name, 0.0), bar_error))

    sure = {n: e for n, e in finite.items() if n != names[current] and surely_better(n, e)}
    return names.index(max(sure, key=sure.get)) if sure else current


def decision_table(records: list[dict]) -> pd.DataFrame:
    """The decisions as one long table: a row per (step, site, candidate) with ``variance``
    (relative, :func:`relative_variances`; what is ranked), ``raw_variance`` (the plain sum
    over coordinates), ``progress`` (:func:`progress`, the site's coordinates),
    ``shared_progress`` (:func:`shared_progress`, the others', the same for every
    candidate at a decision; 0 under ``criterion="variance"``), ``seconds`` (per estimate,
    as ranked: :func:`counted_seconds`), ``timed_seconds`` (its program's own fastest
    timing so far), ``flops``, ``transcendentals`` and ``bytes_accessed`` (XLA's counts for its program,
    :func:`program_cost`; NaN where the backend gives none), ``efficiency`` (what is ranked: ``(progress +
    shared_progress)`` per second, or
    ``1/(variance·seconds)`` under ``criterion="variance"``; for a candidate timed once and
    :func:`outpaced`, its ceiling, with ``variance`` and ``progress`` NaN),
    ``efficiency_error`` (its standard error relative to it, :func:`standard_errors`; 0 for
    a ceiling), ``measured`` (``False``: pruned, last numbers kept), ``chosen``,
    ``num_estimates`` behind the variance, the ``compile_seconds`` / ``measure_seconds``
    spent on it (``timing_seconds`` of the latter a program's one-time work: its untimed
    first run and timing calls), and the run's ledger (the same on a decision's rows; a
    program's one-time work excluded): ``decision_seconds``, what the whole decision took,
    and ``run_seconds``, what the run's segments had taken before it (:func:`affordable`)."""
    columns = ["step", "site", "candidate", "variance", "raw_variance", "progress", "shared_progress", "seconds",
               "timed_seconds", "flops", "transcendentals", "bytes_accessed", "efficiency",
               "efficiency_error", "measured", "chosen", "num_estimates", "compile_seconds", "measure_seconds",
               "timing_seconds", "decision_seconds", "run_seconds"]
    return pd.DataFrame(records, columns=columns)


class AutoRun(NamedTuple):
    """What the auto driver needs of the fit it runs (see :func:`run`)."""

    fit: Callable
    trainer: Callable
    model: Callable | None
    guide: Callable | None
    args: tuple
    kwargs: dict
    key: Array
    setup_key: Array
    settings: dict
    estimators: Any


def _measure_site(run: AutoRun, sites, choices, name, state, keys, array_inputs, programs, mask, last,
                  segment_steps: float, step_seconds: float | None, ledger: tuple[float, float, int],
                  spent_before: float = 0.0):
    """Measure every candidate of auto site ``name`` (pruned ones keep ``last``'s numbers).

    Candidates share one time budget (:func:`estimate_counts`). A candidate not timed before
    is timed by :func:`_timing` (calls of one estimate and of enough for a few
    milliseconds; candidates in turn, :func:`_interleaved`); a program's first run is not timed
    but taken as an extra estimate first: it carries one-time work, which a call that skips the estimate does not absorb (on the
    BLR pathwise's first estimate took 27 ms against 0.6 ms, and timing it gave pathwise 2
    of the fastest's 10 estimates). All join its share (:func:`merged`). A candidate
    timed on one estimate (or by an earlier fit) at the floor of 2 estimates that cannot
    catch up (:func:`outpaced`) takes no second: on the BLR, measure-valued's 26 ms
    against pathwise's 0.6 ms. A program's fastest timing is kept with it (``entry["seconds"]``):
    a program's cost does not change and other load only adds time, so a later fit of
    the same program starts from it, takes no timing estimate, and its choices stop
    following the noise of one timing (on the mixture of ``benchmarks/auto.py``, repeated
    fits chose among four combinations on timings of 70–140 µs, each new one a compile).
    ``programs`` (:func:`measurement_programs`) gives the program for every site's choice.
    The estimates after timing fit the site's share of the budget: ``budget`` of
    ``segment_steps`` steps (the run's steps over its decisions: the budget is a share of
    the run, the same at each decision however long the segment after it), at
    ``step_seconds`` a step (the current choice's, from its segments; before any, its
    seconds an estimate), or, where more, what the run leaves unspent: ``budget`` of the
    run so far and of its ``remaining`` steps at that pace, less what its decisions took
    and its candidates' calls' fixed costs
    (``ledger = (run seconds, decision seconds, remaining steps)``; :func:`affordable`
    then holds the next decision back until the run has paid for it), less what the sites
    before this one took in this decision (``spent_before``), shared with those after.
    A site whose own coordinates can move its candidates' efficiencies by less than the
    seconds' own error (:func:`seconds_decide`: the benchmark mixture's location, 2
    coordinates against the labels' ~58 of progress a step) takes the 2-estimate floor. A short run makes
    one or two decisions, and each is then made on ``num_estimates``, not on the 2–4 a
    fifth of its budget bought (the benchmark mixture's repeated fits chose the
    location's score function on 4 estimates, at 1.53 in progress, where 10 gave 0.68).
    """
    site = sites[name]
    rows, entries, lowering_seconds = {}, {}, 0.0
    for index, candidate in enumerate(site.names):
        previous = last.get(candidate)
        # Pruned on its standing when last measured (against that decision's best): the
        # efficiencies all fall as a run's gradients shrink, so a pruned candidate's old
        # number against a later best came back within `prune` (the BLR's repeated fits
        # measured measure-valued again at step 1000, 23 ms of a 0.28-s time to target).
        if previous is not None and (
            math.isnan(previous["efficiency"]) or previous["efficiency"] * site.settings.prune < previous["best_then"]
        ):
            rows[candidate] = dict(previous, measured=False, compile_seconds=0.0, measure_seconds=0.0, timing_seconds=0.0)
            continue
        measured_choices = {**choices, name: index}

        start = time.perf_counter()
        try:
            entry = programs(measured_choices)  # a build is one-time work the cache records
            if entry.get("refused"):
                raise ValueError(entry["refused"])
            if entry["compiled"] is None:  # traced here, so a candidate that refuses the site fails here
                try:
                    with one_time(candidate):
                        entry["lowered"] = entry["measure"].lower(state, keys, np.int32(0), np.int32(1), array_inputs)
                except ValueError as error:
                    # Kept with the program, so later fits do not trace it again to find out
                    # (enumeration on the discrete VAE's 2^16 configurations: 0.1 s a fit).
                    entry["refused"] = str(error)
                    raise
                finally:
                    lowering_seconds += time.perf_counter() - start  # its build included
            entries[candidate] = entry
        except ValueError:  # the candidate refuses the site once traced (enumeration's configuration count)
            rows[candidate] = dict(variance=math.nan, seconds=math.nan, timed_seconds=math.nan, efficiency=math.nan,
                                   progress=math.nan, efficiency_error=math.nan, measured=False,
                                   raw_variance=math.nan, num_estimates=0, compile_seconds=0.0, measure_seconds=0.0,
                                   timing_seconds=0.0)
    fresh = [c for c, entry in entries.items() if entry["compiled"] is None]
    with one_time("compile measurements"):
        compile_seconds = lowering_seconds + compile_measurements(list(entries.values()))
    seconds, taken, spent = {}, {}, {}  # per candidate: seconds per estimate, estimates taken, seconds spent
    known_before = []  # timed by an earlier fit of the same program, not yet in this one
    untimed = []
    for candidate, entry in entries.items():
        previous = last.get(candidate)
        if previous is not None and math.isfinite(previous["timed_seconds"]):
            seconds[candidate] = min(previous["timed_seconds"], entry.get("seconds", math.inf))
        elif "seconds" in entry:
            seconds[candidate] = entry["seconds"]
            known_before.append(candidate)
        else:
            untimed.append(candidate)
    with one_time("timing"):
        for candidate in untimed:  # a fresh program's first run carries one-time work: untimed
            entry, start = entries[candidate], time.perf_counter()
            taken[candidate] = []
            if not entry.get("ran"):
                mean, variance, _ = _timed_call(entry, state, keys, 0, 1, array_inputs)
                taken[candidate].append(Measurement(mean, variance, math.nan, 1))
                entry["ran"] = True
            spent[candidate] = time.perf_counter() - start
        timed, timing_seconds = _interleaved({c: _timing(entries[c], state, keys, len(taken[c]), array_inputs)
                                              for c in untimed})
    for candidate in untimed:
        taken[candidate] += timed[candidate]
        seconds[candidate] = entries[candidate]["seconds"]
        spent[candidate] += timing_seconds[candidate]
    timing = dict(spent)  # a program's one-time work, as its compile is: once a process
    floor_only = False
    current = site.names[choices[name]]
    probe = current if current in entries else next(iter(entries), None)
    if probe is not None and site.settings.criterion == "progress" and could_seconds_decide(mask):
        # The current choice's floor first: from it, whether the site's own progress matters.
        first = taken.setdefault(probe, [])
        if _count(first) < 2:
            extra = run_measurement(entries[probe], state, keys, _count(first), 2 - _count(first), array_inputs)
            spent[probe] = spent.get(probe, 0.0) + extra.seconds * extra.num_estimates
            first.append(extra)
        floor_only = seconds_decide({probe: functools.reduce(merged, first)}, mask)
    counts = {}
    if seconds:
        per_step = step_seconds or seconds.get(current, min(seconds.values()))
        calls = sum(entry.get("fixed", entry.get("dispatch", 0.0)) for entry in entries.values())  # a call each
        limit = estimates_budget(site.settings.budget, segment_steps, per_step, ledger, calls,
                                 len(sites) - list(sites).index(name), spent_before)
        counts = estimate_counts(seconds, keys.shape[0], limit + sum(_count(first) * seconds[c] for c, first in taken.items()))
        if floor_only:
            counts = {c: 2 for c in counts}
    # A candidate at the 2-estimate floor (4x the fastest's seconds or more) with at most one
    # estimate taken here (timed once now, or timed by an earlier fit or decision) waits: if
    # even full progress (1 a coordinate) per its seconds is `prune` times short of the
    # best, its second estimate would not change the decision. (Every entry here has run
    # once already, so no ceiling carries a program's one-time work.)
    waiting = [c for c in entries if _count(taken.get(c, [])) <= 1 and counts[c] <= 2
               and site.settings.criterion == "progress"]
    measurements = {}

    def complete(candidate):
        entry, groups = entries[candidate], list(taken.get(candidate, []))
        if counts[candidate] > _count(groups):
            rest = run_measurement(entry, state, keys, _count(groups), counts[candidate] - _count(groups), array_inputs)
            spent[candidate] = spent.get(candidate, 0.0) + rest.seconds * rest.num_estimates
            entry["seconds"] = min(entry.get("seconds", math.inf), rest.seconds)
            groups.append(rest)
        joined = functools.reduce(merged, groups)
        measurements[candidate] = joined._replace(seconds=min(entry["seconds"], seconds[candidate]))

    def compile_share(candidate):
        return compile_seconds / len(fresh) if candidate in fresh else 0.0

    for candidate in entries:
        if candidate not in waiting:
            complete(candidate)
    costs = {candidate: program_cost(entry) for candidate, entry in entries.items()}

    def priced():  # seconds as ranked: the programs' work, at the timings' level (counted_seconds)
        return counted_seconds({c: measurements[c].seconds if c in measurements else seconds[c] for c in entries},
                               costs)

    # The waiting candidates, the most promising (cheapest: the highest ceiling) first, each
    # measured unless the best so far outpaces it. All waiting (a tight budget, a repeated
    # fit), the fastest alone had set the best: the BLR's repeats measured the score function
    # (15 000 a second), which left measure-valued's ceiling (2 900, ×10) standing, and spent
    # 21 ms on its two estimates, where pathwise (110 000) rules it out.
    ceilings = {}
    while waiting:
        charged = priced()
        if measurements:
            num_coordinates = int(_inside(mask, np.size(next(iter(measurements.values())).mean)).sum())
            moves, shared = progress(measurements, mask), shared_progress(measurements, mask)
            best = max((moves[c] + shared) / charged[c] for c in measurements)
            ceilings.update(outpaced({c: charged[c] for c in waiting}, num_coordinates + shared, best,
                                     site.settings.prune))
            waiting = [c for c in waiting if c not in ceilings]
        if waiting:
            cheapest = min(waiting, key=charged.get)
            complete(cheapest)
            waiting.remove(cheapest)
    charged = priced()
    for candidate in ceilings:
        rows[candidate] = dict(variance=math.nan, raw_variance=math.nan, seconds=charged[candidate],
                               timed_seconds=seconds[candidate], progress=math.nan,
                               efficiency=ceilings[candidate], efficiency_error=0.0, measured=True,
                               num_estimates=_count(taken.get(candidate, [])),
                               compile_seconds=compile_share(candidate), measure_seconds=spent.get(candidate, 0.0),
                               timing_seconds=timing.get(candidate, 0.0))
    relative = relative_variances(measurements, mask) if measurements else {}
    moves = progress(measurements, mask) if measurements else {}
    # The candidate sets the whole step's seconds: ranked by all its coordinates' progress
    shared = shared_progress(measurements, mask) if measurements and site.settings.criterion == "progress" else 0.0
    errors = standard_errors(measurements, mask, site.settings.criterion, shared, moves=moves) if measurements else {}
    for candidate, measurement in measurements.items():
        # A program's cost does not change with the parameters, and other load only adds
        # time: the fastest timing so far is the best estimate of its seconds.
        rows[candidate] = dict(
            variance=relative[candidate], raw_variance=float(np.sum(measurement.variance)),
            seconds=charged[candidate],
            timed_seconds=measurement.seconds,
            progress=moves[candidate],
            shared_progress=shared,
            efficiency=((moves[candidate] + shared) / charged[candidate] if site.settings.criterion == "progress"
                        else efficiency(relative[candidate], charged[candidate])),
            efficiency_error=errors[candidate],
            measured=True,
            num_estimates=measurement.num_estimates,
            compile_seconds=compile_share(candidate),
            measure_seconds=spent[candidate],  # every measured candidate ran at least one estimate here
            timing_seconds=timing.get(candidate, 0.0),
        )
    best_now = max((r["efficiency"] for r in rows.values() if r["measured"] and not math.isnan(r["efficiency"])),
                   default=math.nan)
    for row in rows.values():  # the best it was measured against (a pruned row keeps its own)
        if row["measured"]:
            row["best_then"] = best_now
    for candidate, cost in costs.items():  # XLA's counts beside the rows they priced
        if candidate in rows and rows[candidate]["measured"]:
            rows[candidate].update(zip(("flops", "transcendentals", "bytes_accessed"), cost or (math.nan,) * 3,
                                       strict=True))
    return {candidate: rows[candidate] for candidate in site.names if candidate in rows}


def _count(groups: list[Measurement]) -> int:
    return sum(group.num_estimates for group in groups)


def measurement_programs(run: AutoRun, sites: dict[str, AutoSite], static_inputs, shapes) -> Callable[[dict], dict]:
    """``programs(choices) -> entry``: the measurement program (``measure``, jitted; its
    ``compiled`` form once compiled; whether it has ``ran``) that runs each auto site's
    chosen candidate. Kept in :data:`MEASURERS` across fits, under what identifies it as
    ``mg.fit``'s cache does: model, guide, settings, static and array-shape inputs. The
    model and the sites are fingerprinted once per fit, so a candidate's program costs a
    lookup (a full fingerprint per candidate was milliseconds)."""
    fixed = _fixed_overrides(run.estimators)
    base = _interned(_fingerprint((run.model, run.guide, dict(run.settings, estimators=fixed, diagnostics_every=0),
                                   static_inputs, shapes)))
    site_prints = {name: _interned(_fingerprint(site)) for name, site in sites.items()}
    found: dict = {}

    def programs(choices: dict) -> dict:
        key = tuple(sorted(choices.items()))
        if key not in found:
            def build():
                settings = dict(run.settings, estimators={**fixed, **pinned_estimators(sites, choices)},
                                diagnostics_every=0)
                training = run.trainer(run.model, run.guide, *run.args, key=run.setup_key, **settings, **run.kwargs)
                return {"measure": measurer(training, static_inputs), "compiled": None}

            prints = tuple((name, site_prints[name], index) for name, index in key)
            found[key] = MEASURERS.get((base, prints), build)
        return found[key]

    return programs


_INTERNED: dict = {}
_TOKENS = itertools.count()


def _interned(fingerprint: Any) -> int:
    """A small token for a fingerprint, the same for equal ones (compared once, here): a
    deep fingerprint as part of a cache key is hashed and compared at every lookup (a
    decision's nine program lookups on the benchmark mixture took 0.8 ms). Tokens are never
    reused, so forgetting old ones (past :data:`MEASURERS`' reach) can only cost a rebuild;
    an unhashable fingerprint gets a token of its own."""
    try:
        token = _INTERNED.get(fingerprint)
    except TypeError:
        return next(_TOKENS)
    if token is None:
        if len(_INTERNED) >= 4 * MEASURERS.max_entries:
            _INTERNED.clear()
        token = _INTERNED[fingerprint] = next(_TOKENS)
    return token


def _fixed_overrides(estimators: Any) -> dict:
    """The user's per-site estimators that are not ``mg.auto()``."""
    if not isinstance(estimators, dict):
        return {}
    return {n: e for n, e in estimators.items() if e.auto is None}


def decision_steps(every: list[int | None], num_steps: int) -> list[int]:
    """The steps at which the auto sites may decide: 0 and every ``every`` steps (the
    smallest the sites set). Where none sets it, a quarter of the run, and one more at a
    sixteenth, each made where the run affords it (:func:`affordable`): the first is made
    at the initial parameters, which the run leaves at once and never sees again (on the discrete VAE the score function, DisARM and the double
    control variate tie there within 4%; by step 250 of 8000 DisARM makes 18% more
    progress a step at the same seconds, which the decision at step 2000 was the first
    to see).

    Example:
        >>> decision_steps([None], 8000)
        [0, 500, 2000, 4000, 6000]
        >>> decision_steps([None, 300], 1000)
        [0, 300, 600, 900]
    """
    given = [e for e in every if e is not None]
    period = min(given) if given else max(1, num_steps // 4)
    steps = set(range(0, num_steps, period))
    if not given and num_steps // 16 > 0:
        steps.add(num_steps // 16)
    return sorted(steps)


def affordable(measured: float, ran: float, budget: float, next_cost: float = 0.0) -> bool:
    """Whether a decision of the default schedule is made: the measurements so far and this
    one (``next_cost``: what the last decision took) take at most ``budget`` of the seconds
    the run's segments have taken, so at every decision they have taken at most ``budget``
    of the run (counted without this one, a decision at 2000 steps on the discrete VAE took
    the measurements before its target to 11% of the run). A program's one-time work is left
    out of both: compiling it, and for a measurement program its first run and timing
    (once a process, as compiling is; the ledger is what recurs).

    A decision's cost does not shrink with the run: timing and calling each candidate
    (milliseconds for a few, ~20 ms for the discrete VAE's first) is fixed, and a run of
    under a second cannot pay for five of them (the benchmark mixture's four decisions
    before its target took 0.039 s, against its best combination's 0.06 s to the target).
    Such a run keeps its first choice; a longer one decides where the schedule says. A
    user's ``every`` is kept as given.

    Example:
        >>> affordable(0.0, 0.0, 0.05), affordable(0.02, 0.1, 0.05), affordable(0.02, 0.5, 0.05)
        (True, False, True)
        >>> affordable(0.02, 0.5, 0.05, next_cost=0.01)
        False
    """
    return budget == math.inf or measured + next_cost <= budget * ran


def run(run: AutoRun, training, state, losses: np.ndarray, history, *, num_steps: int, progress_bar: bool,
        checkpoint_path, chunk_size: int | None):
    """The auto driver: decisions at :func:`decision_steps` (on the default schedule, those
    :func:`affordable`), ordinary ``mg.fit`` segments between them."""
    from mcgrad.fit import (
        FitResult,
        NonFiniteError,
        default_chunk_size,
        save_checkpoint,
    )

    sites = auto_sites(training.estimators)
    decisions = decision_steps([site.settings.every for site in sites.values()], num_steps)
    scheduled_by_user = any(site.settings.every is not None for site in sites.values())
    budget = min(site.settings.budget for site in sites.values())
    measured_seconds = ran_seconds = last_decision = 0.0  # the run's ledger, compile excluded from both
    num_estimates = max(site.settings.num_estimates for site in sites.values())
    array_inputs, static_inputs = eqx.partition((run.args, run.kwargs), eqx.is_array)
    program = run.guide if run.guide is not None else run.model
    shapes = _fingerprint(jax.tree.map(lambda a: (a.shape, str(a.dtype)), array_inputs))  # the arguments' shapes

    def mask_of(name):
        try:
            return upstream_mask(program, run.args, run.kwargs, run.setup_key, state,
                                 lambda p: training.params(state._replace(params=p)), name)
        except Exception:  # noqa: BLE001  (a program the trace cannot follow: every coordinate)
            return slice(None)

    program_fingerprint = _fingerprint((program, static_inputs))
    masks = {name: UPSTREAM_MASKS.get((program_fingerprint, shapes, name), functools.partial(mask_of, name))
             for name in sites}
    choices = {name: choices_in(state.objective_state).get(name, site.index) for name, site in sites.items()}
    records: list[dict] = []
    last: dict[str, dict] = {name: {} for name in sites}
    programs = measurement_programs(run, sites, static_inputs, shapes)
    step_seconds: dict = {}  # per combination of choices: the fastest seconds a step of its segments
    loss_chunks, parts = [losses], []
    done = int(np.asarray(state.step))
    # One chunk length for every segment, so each choice compiles one program however long
    # its segments (a fit's explicit chunk_size is its compiled length): the longest segment
    # there can be, so one runs as one call. On the default schedule a decision the run
    # cannot afford is skipped and its segments join, up to the rest of the run (the
    # benchmark mixture's one segment of 2000 steps ran as four calls of 500, ~2 ms more).
    gaps = zip(decisions, [*decisions[1:], num_steps], strict=True)
    longest = max(1, max(b - max(a, done) for a, b in gaps) if scheduled_by_user else num_steps - done)
    periodic = progress_bar or checkpoint_path is not None
    chunk = chunk_size or (default_chunk_size(longest) if periodic else longest)
    bar = None
    if progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, initial=done, desc=f"{run.settings['objective'].name} (auto)")
    try:
        while done < num_steps:
            if done in decisions and (scheduled_by_user or affordable(measured_seconds, ran_seconds, budget,
                                                                        last_decision)):
                with one_time_clock() as setting_up:
                    started, first_record = time.perf_counter(), len(records)
                    keys = _decision_keys(state.key, num_estimates)
                    estimated = 0.0  # seconds of estimates the sites took so far in this decision
                    for name, site in sites.items():
                        rows = _measure_site(run, sites, choices, name, state, keys, array_inputs, programs, masks[name],
                                             last[name], num_steps / len(decisions),
                                             step_seconds.get(tuple(sorted(choices.items()))),
                                             (ran_seconds, measured_seconds, num_steps - done), estimated)
                        # What the site's estimates took (its one-time timing calls left out)
                        estimated += sum(r["measure_seconds"] - r["timing_seconds"] for r in rows.values())
                        # Pruned rows keep numbers relative to an earlier point and scale (the
                        # relative variance and progress pool the candidates measured with them):
                        # recorded, never chosen on.
                        # The margin holds at the first decision too: the first candidate is
                        # mg.fit's default (choice.preferred), and leaving it on noise
                        # costs: the BLR's score function, chosen at step 0 without it, left a
                        # run on pathwise from step 125 short of the target at step 2000
                        # (Adam's second moments remember its gradients ~1000 steps).
                        measured = {c: r for c, r in rows.items() if r["measured"]}
                        new = decide(choices[name], site.names, {c: r["efficiency"] for c, r in measured.items()},
                                     site.settings.margin, {c: r["efficiency_error"] for c, r in measured.items()},
                                     site.settings.confidence)
                        choices[name] = new
                        last[name] = rows
                        for candidate, row in rows.items():
                            records.append(dict(row, step=done, site=name, candidate=candidate,
                                                chosen=candidate == site.names[new]))
                    state = state._replace(objective_state=with_choices(state.objective_state, choices))
                    # A program's one-time work (building and compiling it, its first run and
                    # timing; eager ops compiled on first use) is left out, as the segments'
                    # compile is: the ledger is what recurs.
                    decision_seconds = time.perf_counter() - started - setting_up()
                for record in records[first_record:]:
                    record.update(run_seconds=ran_seconds, decision_seconds=decision_seconds)
                measured_seconds += decision_seconds
                last_decision = decision_seconds
            # The segment runs to the next decision the ledger will afford at the current pace
            # (a skipped one would only split the segment: a call's setup, ~2 ms).
            pace = step_seconds.get(tuple(sorted(choices.items()))) or _chosen_seconds(sites, choices, last)
            following = next((d for d in decisions if d > done and (
                scheduled_by_user or pace is None
                or affordable(measured_seconds, ran_seconds + (d - done) * pace, budget, last_decision))), num_steps)
            length = min(chunk, following - done) if periodic else following - done
            overrides = {**_fixed_overrides(run.estimators), **pinned_estimators(sites, choices)}
            token = SEGMENT.set(True)
            try:
                with one_time_clock() as setting_up:
                    start = time.perf_counter()
                    result = run.fit(
                        run.model, run.guide, *run.args, key=run.key, num_steps=done + length,
                        **dict(run.settings, estimators=overrides), progress_bar=False, chunk_size=chunk,
                        checkpoint_path=None, resume_from=state, **run.kwargs,
                    )
                    elapsed = time.perf_counter() - start - setting_up()  # a new choice's first segment compiles
            except NonFiniteError as error:
                raise NonFiniteError(str(error), error.state, np.concatenate(loss_chunks + [error.losses])) from None
            finally:
                SEGMENT.reset(token)
            ran = tuple(sorted(choices.items()))
            step_seconds[ran] = min(step_seconds.get(ran, math.inf), elapsed / length)
            ran_seconds += elapsed
            state = result.state
            loss_chunks.append(result.losses)
            parts.append(result.diagnostics)
            done += length
            if checkpoint_path is not None:  # the table is built only where it is written (~1 ms)
                diagnostics = _joined(history, parts, records, int(np.asarray(state.num_nonfinite)))
                save_checkpoint(checkpoint_path, state, np.concatenate(loss_chunks), diagnostics,
                                run.settings["objective"], run.key)
            if bar is not None:
                last_loss = result.losses[-1]
                postfix = {"loss": f"{last_loss:.4g}"}
                postfix.update({name: sites[name].names[choices[name]] for name in sites})
                bar.set_postfix(postfix)
                bar.update(length)
    finally:
        if bar is not None:
            bar.close()
    diagnostics = _joined(history, parts, records, int(np.asarray(state.num_nonfinite)))
    return FitResult(
        training.params(state), np.concatenate(loss_chunks), state, diagnostics, run.model, run.guide, run.args, run.kwargs
    )


@functools.partial(jax.jit, static_argnums=1)
def _decision_keys(key_data: Array, num: int) -> Array:
    """A decision's ``num`` keys, from the state's key (one call: three eager ops each dispatched
    cost a decision ~0.2 ms)."""
    return jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(key_data), 0x5E1EC7), num)


def _chosen_seconds(sites: dict[str, AutoSite], choices: dict[str, int], last: dict[str, dict]) -> float | None:
    """A step's seconds before a segment of these choices has run: the slowest of the chosen
    candidates' measured seconds an estimate (each estimate is a whole step's), if any."""
    seconds = [last[name].get(sites[name].names[index], {}).get("seconds", math.nan) for name, index in choices.items()]
    finite = [s for s in seconds if math.isfinite(s)]
    return max(finite) if finite else None


def _joined(history, parts, records, num_nonfinite):
    from mcgrad.fit import TrainingDiagnostics

    names = list(history.variance)
    steps = np.concatenate([history.steps] + [p.steps for p in parts]).astype(np.int64)
    variance = {n: np.concatenate([history.variance[n]] + [p.variance[n] for p in parts]) for n in names}
    snr = {n: np.concatenate([history.snr[n]] + [p.snr[n] for p in parts]) for n in names}
    return TrainingDiagnostics(steps, variance, snr, num_nonfinite, decision_table(records))

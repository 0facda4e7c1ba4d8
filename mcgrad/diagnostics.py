r"""Gradient-variance diagnostics: which estimator to use for a problem.

From ``R`` independent estimates ``ĝ_1 … ĝ_R`` of ``∇θ E_{p_θ}[f]`` (one estimator, ``N``
samples each, ``R`` keys, computed in one ``jit``-compiled ``vmap``):

.. math::

    \bar g = \frac1R \sum_r ĝ_r, \qquad
    V_d = \frac{1}{R-1} \sum_r (ĝ_{r,d} − \bar g_d)^2, \qquad
    \mathrm{SNR}_d = \frac{|\bar g_d|}{\sqrt{V_d}},

the total variance ``Σ_d V_d`` (the trace of the covariance), the bias ``\bar g − ∇``
against an exact gradient with its standard error ``\sqrt{V_d / R}``, the cost of one
estimate in evaluations of ``f`` and in seconds (measured after compilation), and the
efficiency ``1 / (Σ_d V_d · seconds)``: higher is better, and it is the number to rank
estimators by when their costs differ.

:func:`gradient_statistics` is the pure core (any stack of gradients with a leading axis:
repeated estimates, or per-sample gradients); :func:`diagnose` runs one estimator;
:func:`compare` runs several and returns a table and a figure; :func:`variance_sweep`
measures per-sample variance over a grid of cost parameters (the paper's Figure 2).
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from mcgrad import baselines as baselines_lib
from mcgrad.estimators.base import (
    CostFn,
    DistFn,
    GradientEstimator,
    Params,
    Problem,
    check_estimator,
    check_instance,
    check_whole_number,
    estimate,
    grad,
    per_sample_grads,
    surrogate,
)
from mcgrad.estimators.enumeration import enumerate as enumerate_estimator
from mcgrad.estimators.score_function import score_function

Array = jax.Array


class GradientStatistics(NamedTuple):
    """Summary of a stack of gradients (every leaf has a leading axis ``R``).

    Attributes:
        mean: params-shaped mean over the leading axis.
        variance: params-shaped unbiased variance (``ddof=1``) per coordinate.
        total_variance: scalar, the sum of ``variance`` over every coordinate.
        snr: params-shaped ``|mean| / sqrt(variance)`` per coordinate.
        bias: ``mean − exact``, or ``None`` without an exact gradient.
        bias_standard_error: ``sqrt(variance / R)``, or ``None`` without one.
    """

    mean: Params
    variance: Params
    total_variance: Array
    snr: Params
    bias: Params | None
    bias_standard_error: Params | None


class Diagnostics(NamedTuple):
    """What :func:`diagnose` measured for one estimator on one problem.

    The first six fields are those of :class:`GradientStatistics` over ``num_repeats``
    independent estimates (each from ``num_samples`` samples).

    Attributes:
        num_evaluations: evaluations of ``cost_fn`` per estimate (from
            :class:`~mcgrad.EstimatorInfo`).
        seconds: wall time per estimate after compilation (the median over timing runs of
            the compiled batch of ``num_repeats`` estimates, divided by ``num_repeats``).
        efficiency: ``1 / (total_variance · seconds)``; NaN when flagged.
        num_samples, num_repeats: ``N`` and ``R``.
        flag: why these numbers do not rank the estimator (``""`` when they do): e.g.
            ``"biased: non-differentiable cost"`` when every estimate is exactly ``0``
            while the cost varies across samples (see :func:`diagnose`), or a biased
            estimator's own :attr:`~mcgrad.GradientEstimator.bias` (the relaxations), whose
            ``bias`` is then measured against an unbiased reference when no ``exact``
            gradient is given (:func:`unbiased_reference`).
    """

    mean: Params
    variance: Params
    total_variance: Array
    snr: Params
    bias: Params | None
    bias_standard_error: Params | None
    num_evaluations: int
    seconds: float
    efficiency: float
    num_samples: int
    num_repeats: int
    flag: str = ""


class Comparison(NamedTuple):
    """What :func:`compare` returns.

    Attributes:
        table: a pandas DataFrame with one row per estimator (index ``estimator``).
        figure: a matplotlib Figure of the table (variance, time, efficiency).
        diagnostics: ``{name: Diagnostics}``, the full numbers behind the table.
        best: the name of the most efficient estimator that is not flagged (``rank`` 1),
            or ``None`` when every one is flagged.
    """

    table: pd.DataFrame
    figure: Any
    diagnostics: dict[str, Diagnostics]
    best: str | None = None


# --------------------------------------------------------------------------- core


def gradient_statistics(gradients: Params, exact: Params | None = None) -> GradientStatistics:
    r"""Mean, variance, SNR and bias of a stack of gradients (pure; works under ``jit``).

    Every leaf of ``gradients`` has a leading axis ``R ≥ 2``: ``R`` repeated estimates
    (the variance of one estimate), or ``N`` per-sample gradients from
    :func:`mcgrad.per_sample_grads` (the single-sample variance; divide by ``N`` for an
    ``N``-sample estimate).

    Args:
        gradients: a pytree of ``[R, ...]`` arrays.
        exact: the exact gradient (params-shaped), or ``None``.

    Returns:
        A :class:`GradientStatistics`.

    Example:
        >>> import jax.numpy as jnp, mcgrad as mg
        >>> stats = mg.gradient_statistics({"loc": jnp.array([1.0, 3.0])}, exact={"loc": 2.5})
        >>> float(stats.mean["loc"]), float(stats.variance["loc"]), float(stats.bias["loc"])
        (2.0, 2.0, -0.5)
    """
    leaves = jax.tree.leaves(gradients)
    num_repeats = leaves[0].shape[0]
    if num_repeats < 2:
        raise ValueError(f"gradient_statistics needs at least 2 gradients along the leading axis, got {num_repeats}.")
    mean = jax.tree.map(lambda g: jnp.mean(g, axis=0), gradients)
    variance = jax.tree.map(lambda g: jnp.var(g, axis=0, ddof=1), gradients)
    total_variance = sum((jnp.sum(v) for v in jax.tree.leaves(variance)), jnp.zeros(()))
    snr = jax.tree.map(lambda m, v: jnp.abs(m) / jnp.sqrt(v), mean, variance)
    if exact is None:
        return GradientStatistics(mean, variance, total_variance, snr, None, None)
    bias = jax.tree.map(lambda m, e: m - jnp.asarray(e, m.dtype), mean, exact)
    standard_error = jax.tree.map(lambda v: jnp.sqrt(v / num_repeats), variance)
    return GradientStatistics(mean, variance, total_variance, snr, bias, standard_error)


def running_moments(count: Array, mean: Params, squares: Params, value: Params) -> tuple[Params, Params]:
    """Welford's update: the running mean and sum of squared deviations after one more
    ``value`` (pytrees alike), ``count`` the number of values including it. The unbiased
    variance is ``squares / (count − 1)``."""
    delta = jax.tree.map(jnp.subtract, value, mean)
    mean = jax.tree.map(lambda m, d: m + d / jnp.asarray(count, d.dtype), mean, delta)
    squares = jax.tree.map(lambda q, d, v, m: q + d * (v - m), squares, delta, value, mean)
    return mean, squares


def efficiency(variance: float, seconds: float) -> float:
    """``1 / (variance · seconds)``: infinite for an estimate without variance, NaN for a
    non-finite variance."""
    if not math.isfinite(variance):
        return math.nan
    product = variance * seconds
    return 1.0 / product if product > 0 else math.inf


def count_evaluations(
    cost_fn: CostFn, dist_fn: DistFn, estimator: GradientEstimator, params: Params, *, num_samples: int
) -> int:
    """Evaluations of ``cost_fn`` one estimate spends (traced abstractly: nothing runs).

    Example:
        >>> import mcgrad as mg, numpyro.distributions as dist
        >>> normal = lambda p: dist.Normal(p["loc"], p["scale"])
        >>> mg.count_evaluations(lambda x: x ** 2, normal, mg.measure_valued(),
        ...                      {"loc": 0.0, "scale": 1.0}, num_samples=10)   # N + 2·D·N, D = 2
        50
    """
    check_whole_number("num_samples", num_samples, 1)
    problem = Problem(cost_fn, dist_fn, num_samples)
    counted: list[int] = []

    def run(p, key):
        s, (_, info) = surrogate(estimator, key, p, estimator.init(p), problem)
        counted.append(info.num_evaluations)  # static metadata, read at trace time
        return s

    jax.eval_shape(run, params, jax.random.key(0))
    return int(counted[0])


def median_seconds(fn: Callable[[], Any], num_runs: int) -> float:
    """Median wall time of ``fn()`` over ``num_runs`` runs, each blocked until ready."""
    times = []
    for _ in range(num_runs):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _check_counts(num_samples, num_repeats, num_timing_runs) -> None:
    """Clear errors for sample, repeat and timing counts that are not whole numbers in range."""
    check_whole_number("num_samples", num_samples, 1)
    check_whole_number("num_repeats", num_repeats, 2)
    check_whole_number("num_timing_runs", num_timing_runs, 1)


_NON_DIFFERENTIABLE = "biased: non-differentiable cost"


def _non_differentiable_flag(gradients: Params, cost_range: tuple[float, float], label: str) -> str:
    """``_NON_DIFFERENTIABLE`` (with a ``UserWarning`` naming ``label``) when every gradient
    estimate is exactly ``0`` while the cost's values vary across samples, else ``""``.

    A cost whose derivative is ``0`` almost everywhere (a step ``where(x > 0, 1, 0)``,
    ``floor``, ``round``) has a pathwise gradient of exactly ``0`` at every sample, with
    variance ``0``: the expectation still moves with the parameters (through the jumps),
    so such an estimate is biased, however small its variance.
    """
    low, high = cost_range
    varies = np.isfinite(low) and np.isfinite(high) and high > low
    if not varies or any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(gradients)):
        return ""
    warnings.warn(
        f"estimator '{label}': every gradient estimate is exactly 0 while cost_fn's values vary "
        "across samples, so the cost's derivative is 0 almost everywhere (a step, floor, round or "
        "comparison). Pathwise (and any estimator that differentiates the cost) is biased for "
        "non-differentiable costs: it misses the jumps. Its variance (0) does not measure its error, "
        "so it is flagged and left out of the ranking; use mg.score_function() or "
        "mg.measure_valued() for this cost.",
        UserWarning,
        stacklevel=4,  # the caller of diagnose or compare
    )
    return _NON_DIFFERENTIABLE


def diagnose(
    cost_fn: CostFn,
    dist_fn: DistFn,
    estimator: GradientEstimator,
    params: Params,
    *,
    key: Array,
    num_samples: int,
    num_repeats: int,
    exact: Params | None = None,
    num_timing_runs: int = 5,
) -> Diagnostics:
    r"""Run ``num_repeats`` independent estimates of one estimator and summarise them.

    The estimates are one compiled program: ``jit(vmap(estimate))`` over
    ``num_repeats`` keys split from ``key``; the estimator state starts fresh for each
    (as in :func:`mcgrad.grad`, so a moving-average baseline contributes nothing here).
    Seconds are measured on the compiled program, after compilation.

    Args:
        cost_fn: one sample -> scalar cost.
        dist_fn: params -> NumPyro distribution.
        estimator: any :class:`~mcgrad.GradientEstimator`.
        params: where the gradient is estimated.
        key: a JAX PRNG key.
        num_samples: ``N``, samples per estimate.
        num_repeats: ``R ≥ 2``, independent estimates.
        exact: the exact gradient, for the bias and its standard error.
        num_timing_runs: timing runs of the compiled batch (the median is kept).

    Returns:
        A :class:`Diagnostics`. When every estimate is exactly ``0`` while the cost varies
        across samples (a cost whose derivative is ``0`` almost everywhere, such as a step,
        under an estimator that differentiates it, such as pathwise) the estimate is
        biased: ``flag`` says so, ``efficiency`` is NaN and a ``UserWarning`` names the
        estimator.

    Raises:
        ValueError: for ``num_samples < 1``, ``num_repeats < 2``, ``num_timing_runs < 1``
            or counts that are not whole numbers.

    Example:
        >>> import jax, mcgrad as mg, numpyro.distributions as dist
        >>> normal = lambda p: dist.Normal(p["loc"], p["scale"])
        >>> params = {"loc": 1.0, "scale": 1.0}
        >>> d = mg.diagnose(lambda x: x ** 2, normal, mg.pathwise(), params, key=jax.random.key(0),
        ...                 num_samples=10, num_repeats=500, exact={"loc": 2.0, "scale": 2.0})
        >>> round(float(d.variance["loc"]), 1)      # exact: 4σ²/N = 0.4
        0.4
        >>> bool(abs(d.bias["loc"]) < 5 * d.bias_standard_error["loc"]), d.num_evaluations
        (True, 10)
    """
    _check_counts(num_samples, num_repeats, num_timing_runs)
    settings = {"num_samples": num_samples, "num_repeats": num_repeats, "exact": exact, "num_timing_runs": num_timing_runs}
    return _diagnose(cost_fn, dist_fn, estimator, params, key, label=None, **settings)


def _diagnose(cost_fn, dist_fn, estimator, params, key, *, num_samples, num_repeats, exact, num_timing_runs, label):
    """:func:`diagnose`, with ``label`` the estimator's name in the warning for a flag
    (``None``: its own name)."""
    check_estimator(estimator, f"the estimator '{label}'" if label else "estimator")
    label = label or estimator.name
    estimate_fn = estimate(cost_fn, dist_fn, estimator=estimator, num_samples=num_samples)

    def one(p, k):
        out = estimate_fn(p, estimator.init(p), k)
        return out.grad, (jnp.min(out.info.costs), jnp.max(out.info.costs))

    keys = jax.random.split(key, num_repeats)
    # Call the jitted function, not a `Compiled` object: for a program with a host callback
    # (the finiteness check) the latter takes a slow Python path (~0.25 ms per call on CPU).
    batched = jax.jit(jax.vmap(one, in_axes=(None, 0)))
    gradients, (low, high) = jax.block_until_ready(batched(params, keys))  # compiles
    seconds = median_seconds(lambda: batched(params, keys), num_timing_runs) / num_repeats
    reference_error = None
    if estimator.bias is not None and exact is None:  # its bias against an unbiased reference
        exact, reference_error = unbiased_reference(cost_fn, dist_fn, params, key, num_samples, num_repeats)
    stats = jax.jit(gradient_statistics)(gradients, exact)
    if reference_error is not None:  # the reference's own noise widens the bias's standard error
        stats = stats._replace(
            bias_standard_error=jax.tree.map(jnp.hypot, stats.bias_standard_error, reference_error)
        )
    num_evaluations = count_evaluations(cost_fn, dist_fn, estimator, params, num_samples=num_samples)
    flag = _non_differentiable_flag(gradients, (float(jnp.min(low)), float(jnp.max(high))), label)
    flag = flag or (estimator.bias or "")
    ranked = math.nan if flag else efficiency(float(stats.total_variance), seconds)
    return Diagnostics(*stats, num_evaluations, seconds, ranked, num_samples, num_repeats, flag)


def unbiased_reference(cost_fn, dist_fn, params, key, num_samples: int, num_repeats: int) -> tuple[Params, Params]:
    """The gradient a biased estimator is measured against, and its standard error.

    Exact enumeration where the distribution allows it (standard error ``0``); otherwise
    the mean of ``num_repeats`` score-function estimates with a leave-one-out baseline
    (unbiased for every family whose support does not move), with its standard error.
    """
    enumeration = enumerate_estimator()
    try:
        enumeration.check(dist_fn(params), "x")
        exact = grad(cost_fn, dist_fn, estimator=enumeration, num_samples=1)(params, key)
        return exact, jax.tree.map(jnp.zeros_like, exact)
    except ValueError:  # not enumerable (a continuous family, or too many configurations)
        pass
    reference = score_function(baseline=baselines_lib.leave_one_out())
    estimate_fn = grad(cost_fn, dist_fn, estimator=reference, num_samples=max(num_samples, 2))
    gradients = jax.jit(jax.vmap(estimate_fn, in_axes=(None, 0)))(params, jax.random.split(jax.random.fold_in(key, 1), num_repeats))
    stats = gradient_statistics(gradients)
    return stats.mean, jax.tree.map(lambda v: jnp.sqrt(v / num_repeats), stats.variance)


# --------------------------------------------------------------------------- tables


def coordinate_names(params: Params) -> list[str]:
    """One name per parameter coordinate, in ``jax.tree.leaves`` order then row-major.

    Example:
        >>> import jax.numpy as jnp, mcgrad as mg
        >>> mg.diagnostics.coordinate_names({"loc": jnp.zeros(2), "scale": 1.0})
        ['loc[0]', 'loc[1]', 'scale']
    """
    names = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = jax.tree_util.keystr(path, simple=True, separator=".") or "params"
        shape = np.shape(leaf)
        if shape == ():
            names.append(name)
        else:
            names.extend(f"{name}[{','.join(map(str, index))}]" for index in np.ndindex(*shape))
    return names


def _flat(tree: Params) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(leaf)) for leaf in jax.tree.leaves(tree)])


def _leaf_names(params: Params) -> list[str]:
    return [
        jax.tree_util.keystr(path, simple=True, separator=".") or "params"
        for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
    ]


def diagnostics_row(result: Diagnostics) -> dict[str, float]:
    """One table row: costs, total variance, efficiency, and per parameter leaf the summed
    variance and mean SNR; with an exact gradient, the largest ``|bias| / SE``."""
    row: dict[str, float] = {
        "num_samples": result.num_samples,
        "num_evaluations": result.num_evaluations,
        "seconds": result.seconds,
        "total_variance": float(result.total_variance),
        "efficiency": result.efficiency,
        "mean_snr": float(np.mean(_flat(result.snr))),
        "flag": result.flag,
    }
    for name, variance, snr in zip(
        _leaf_names(result.mean), jax.tree.leaves(result.variance), jax.tree.leaves(result.snr), strict=True
    ):
        row[f"variance[{name}]"] = float(np.sum(variance))
        row[f"snr[{name}]"] = float(np.mean(snr))
    if result.bias is not None:
        bias, standard_error = _flat(result.bias), _flat(result.bias_standard_error)
        row["bias_norm"] = float(np.linalg.norm(bias))
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(standard_error > 0, np.abs(bias) / standard_error, np.where(bias == 0, 0.0, np.inf))
        row["max_bias_z"] = float(np.max(z))
    return row


def compare(
    cost_fn: CostFn,
    dist_fn: DistFn,
    estimators: Mapping[str, GradientEstimator],
    params: Params,
    *,
    key: Array,
    num_samples: int,
    num_repeats: int,
    exact: Params | None = None,
    num_timing_runs: int = 5,
) -> Comparison:
    r"""Run several estimators on one problem: a table (one row each) and a figure.

    Every estimator gets the same ``key`` (common random numbers across rows) and the
    same ``num_samples`` and ``num_repeats``; see :func:`diagnose` for what is measured.
    Table columns: ``num_samples``, ``num_evaluations``, ``seconds`` (per estimate),
    ``total_variance``, ``efficiency`` (``1/(variance·seconds)``), ``mean_snr``, ``flag``
    (why a row is not ranked: ``"biased: non-differentiable cost"`` for an estimator that
    differentiates a cost whose derivative is ``0`` almost everywhere, e.g. pathwise on a
    step; ``""`` otherwise), ``rank`` (by efficiency among the rows without a flag, 1 the
    best; NaN for flagged rows), then ``variance[leaf]`` (summed over the leaf) and
    ``snr[leaf]`` (mean over the leaf) per parameter leaf, and with ``exact`` the bias
    norm and the largest ``|bias|/SE`` (``max_bias_z``, about ``< 4`` for an unbiased
    estimator). A flagged row also gets a ``UserWarning`` naming it.

    Args:
        cost_fn: one sample -> scalar cost.
        dist_fn: params -> NumPyro distribution.
        estimators: ``{name: GradientEstimator}``.
        params: where the gradient is estimated.
        key: a JAX PRNG key.
        num_samples: samples per estimate.
        num_repeats: independent estimates per estimator.
        exact: the exact gradient, if known.
        num_timing_runs: timing runs per estimator.

    Returns:
        A :class:`Comparison` (``table``, ``figure``, ``diagnostics``, ``best``).

    Raises:
        ValueError: for invalid counts (see :func:`diagnose`).

    Example:
        >>> import jax, mcgrad as mg, numpyro.distributions as dist
        >>> normal = lambda p: dist.Normal(p["loc"], p["scale"])
        >>> result = mg.compare(lambda x: x ** 2, normal,
        ...                     {"score function": mg.score_function(), "pathwise": mg.pathwise()},
        ...                     {"loc": 1.0, "scale": 1.0}, key=jax.random.key(0),
        ...                     num_samples=10, num_repeats=200)
        >>> result.table["total_variance"].idxmin()
        'pathwise'
    """
    from mcgrad import plotting

    _check_counts(num_samples, num_repeats, num_timing_runs)
    settings = {"num_samples": num_samples, "num_repeats": num_repeats, "exact": exact, "num_timing_runs": num_timing_runs}
    check_instance(estimators, Mapping, "compare(estimators=...)", "{'pathwise': mg.pathwise()}", kind="dict")
    results = {}
    for name, estimator in estimators.items():  # (a loop, not a comprehension: the warning's stacklevel)
        results[name] = _diagnose(cost_fn, dist_fn, estimator, params, key, label=name, **settings)
    table = pd.DataFrame.from_dict({name: diagnostics_row(r) for name, r in results.items()}, orient="index")
    table.index.name = "estimator"
    ranked = table.loc[table["flag"] == "", "efficiency"]
    table.insert(table.columns.get_loc("flag") + 1, "rank", ranked.rank(ascending=False, method="min"))
    best = str(ranked.idxmax()) if len(ranked) and ranked.notna().any() else None
    return Comparison(table, plotting.comparison_figure(table), results, best)


class Selection(NamedTuple):
    """What :func:`select` returns.

    Attributes:
        table: one row per applicable candidate, the most efficient first: the columns of
            :func:`compare`'s table, ``efficiency`` under the chosen ``cost``.
        best: the winner's name.
        estimator: the winner.
        comparison: the :class:`Comparison` behind the table.
    """

    table: pd.DataFrame
    best: str
    estimator: GradientEstimator
    comparison: Comparison


def select(
    cost_fn: CostFn,
    dist_fn: DistFn,
    params: Params,
    *,
    key: Array,
    candidates: Mapping[str, GradientEstimator] | None = None,
    num_samples: int = 10,
    num_repeats: int = 100,
    cost: str = "seconds",
    num_timing_runs: int = 5,
) -> Selection:
    r"""Rank the estimators that apply to ``dist_fn(params)`` by efficiency; the low-level form of :func:`mcgrad.auto`.

    Every candidate runs ``num_repeats`` independent ``num_samples``-sample estimates at
    ``params`` (:func:`compare`, common random numbers); its efficiency is
    ``1 / (V · cost)``, ``V`` the total variance of one estimate and ``cost`` the seconds
    one estimate takes after compilation (``cost="seconds"``) or its evaluations of
    ``cost_fn`` (``cost="evaluations"``: deterministic under ``key``). Biased and flagged
    candidates are not ranked.

    Args:
        cost_fn: one sample -> scalar cost.
        dist_fn: params -> NumPyro distribution.
        params: where the gradient is estimated.
        key: a JAX PRNG key.
        candidates: ``{name: estimator}``; default the registered candidates that apply
            (:func:`mcgrad.estimators.choice.candidates_for`).
        num_samples: samples per estimate.
        num_repeats: independent estimates per candidate.
        cost: ``"seconds"`` or ``"evaluations"``.
        num_timing_runs: timing runs per candidate.

    Returns:
        A :class:`Selection` (``table``, ``best``, ``estimator``, ``comparison``).

    Raises:
        ValueError: for an unknown ``cost``, when no candidate applies, or when every
            candidate is flagged.

    Example:
        >>> import jax, mcgrad as mg, numpyro.distributions as dist
        >>> normal = lambda p: dist.Normal(p["loc"], p["scale"])
        >>> choice = mg.select(lambda x: (x - 2.0) ** 2, normal, {"loc": 1.0, "scale": 1.0},
        ...                    key=jax.random.key(0), cost="evaluations")
        >>> choice.best, list(choice.table.index)
        ('pathwise', ['pathwise', 'measure_valued', 'score_function_loo'])
    """
    from mcgrad.estimators.choice import candidates_for

    if cost not in ("seconds", "evaluations"):
        raise ValueError(f"select(cost=...) is 'seconds' or 'evaluations', got {cost!r}.")
    applicable = {}
    for name, estimator in candidates_for(dist_fn(params), num_samples, "x", candidates).items():
        try:  # a trace refuses what the distribution alone cannot (enumeration's configuration count)
            count_evaluations(cost_fn, dist_fn, estimator, params, num_samples=num_samples)
        except ValueError:
            continue
        applicable[name] = estimator
    if not applicable:
        raise ValueError(
            f"select: no candidate applies to {dist_fn(params)} with num_samples={num_samples} "
            "(antithetic candidates need an even number)."
        )
    comparison = compare(
        cost_fn, dist_fn, applicable, params, key=key, num_samples=num_samples, num_repeats=num_repeats,
        num_timing_runs=num_timing_runs,
    )
    table = comparison.table.copy()
    if cost == "evaluations":
        with np.errstate(divide="ignore"):
            efficiency = 1.0 / (table["total_variance"] * table["num_evaluations"])
        table["efficiency"] = efficiency.where(table["flag"] == "", np.nan)
        ranked = table.loc[table["flag"] == "", "efficiency"]
        table["rank"] = ranked.rank(ascending=False, method="min")
    ranked = table["efficiency"].where(table["flag"] == "")
    if not ranked.notna().any():
        raise ValueError(f"select: every candidate is flagged ({dict(table['flag'])}); none can be ranked.")
    table = table.assign(_order=ranked.fillna(-np.inf)).sort_values("_order", ascending=False, kind="stable")
    table = table.drop(columns="_order")
    best = str(table.index[0])
    return Selection(table, best, applicable[best], comparison)


# --------------------------------------------------------------------------- sweeps


def variance_sweep(
    cost_fns: Mapping[str, Callable[[Array, Array], Array]],
    dist_fn: DistFn,
    estimators: Mapping[str, GradientEstimator],
    params: Params,
    grids: Mapping[str, Array],
    *,
    key: Array,
    num_samples: int,
) -> pd.DataFrame:
    r"""Per-sample gradient variance over a grid of cost parameters ``k``.

    For each estimator, cost ``f(x; k)`` and ``k`` in ``grids[cost]``: the mean and the
    single-sample variance of the ``N`` per-sample gradients (:func:`mcgrad.per_sample_grads`;
    the variance of an ``N``-sample estimate is this divided by ``N``). One ``jit`` per
    estimator covers every cost, with ``vmap`` over ``k``; every ``k`` shares ``key``
    (common random numbers, so the curves are smooth in ``k``).

    Args:
        cost_fns: ``{name: (x, k) -> scalar}``.
        dist_fn: params -> NumPyro distribution.
        estimators: ``{name: GradientEstimator}``.
        params: where the gradient is estimated.
        grids: ``{cost name: 1-D array of k}``.
        key: a JAX PRNG key.
        num_samples: ``N`` per-sample gradients per ``(estimator, cost, k)``.

    Returns:
        A long DataFrame with columns ``cost, k, estimator, parameter, mean, variance,
        evaluations_per_sample, variance_x_evaluations`` (one row per parameter
        coordinate).

    Example:
        >>> import jax, jax.numpy as jnp, mcgrad as mg, numpyro.distributions as dist
        >>> table = mg.variance_sweep({"quadratic": lambda x, k: (x - k) ** 2},
        ...                           lambda p: dist.Normal(p, 1.0), {"pathwise": mg.pathwise()},
        ...                           1.0, {"quadratic": jnp.array([0.0, 2.0])},
        ...                           key=jax.random.key(0), num_samples=20_000)
        >>> table["variance"].round().tolist()   # 4σ², whatever k
        [4.0, 4.0]
    """
    check_whole_number("num_samples", num_samples, 2, " (a variance needs two samples)")
    names = coordinate_names(params)
    rows = []
    for estimator_name, estimator in estimators.items():

        def run(p, key, estimator=estimator):
            out = {}
            for cost_name, cost_fn in cost_fns.items():

                def one(k, cost_fn=cost_fn):
                    per_sample = per_sample_grads(
                        lambda x: cost_fn(x, k), dist_fn, estimator=estimator, num_samples=num_samples
                    )(p, key)
                    stats = gradient_statistics(per_sample)
                    return stats.mean, stats.variance

                out[cost_name] = jax.vmap(one)(jnp.asarray(grids[cost_name]))
            return out

        results = jax.jit(run)(params, key)
        for cost_name in cost_fns:  # (jit returns the dict sorted by key)
            mean, variance = results[cost_name]
            grid = np.asarray(grids[cost_name])
            k0 = jnp.asarray(grid[0])
            evaluations = count_evaluations(
                lambda x, cost_fn=cost_fns[cost_name]: cost_fn(x, k0), dist_fn, estimator, params, num_samples=num_samples
            )
            per_sample = evaluations / num_samples
            means = np.concatenate([np.reshape(np.asarray(m), (len(grid), -1)) for m in jax.tree.leaves(mean)], axis=1)
            variances = np.concatenate(
                [np.reshape(np.asarray(v), (len(grid), -1)) for v in jax.tree.leaves(variance)], axis=1
            )
            for index, k in enumerate(grid):
                for column, name in enumerate(names):
                    rows.append(
                        {
                            "cost": cost_name,
                            "k": float(k),
                            "estimator": estimator_name,
                            "parameter": name,
                            "mean": float(means[index, column]),
                            "variance": float(variances[index, column]),
                            "evaluations_per_sample": per_sample,
                            "variance_x_evaluations": float(variances[index, column]) * per_sample,
                        }
                    )
    return pd.DataFrame(rows)

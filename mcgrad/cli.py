r"""The ``mcgrad`` command.

Subcommands live in :data:`COMMANDS`, a registry of :class:`Command` values; ``main``
builds one argparse subparser per entry. Adding a subcommand is one
:func:`register_command` call::

    register_command(Command("compare", "compare estimators on a model", add_arguments, run))

``mcgrad study`` reproduces the paper's variance study (Mohamed et al. 2020, §3, Figure
2): ``x ~ N(μ=1, σ=1)``, costs ``(x−k)²``, ``exp(−k x²)`` and ``cos(k x)`` over a grid
of ``k``, per-sample variance of the gradient w.r.t. ``μ`` and ``σ`` for the score
function, the score function with a leave-one-out baseline, pathwise and coupled
measure-valued estimators.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pandas as pd

import mcgrad as mg


class Command(NamedTuple):
    """A subcommand of ``mcgrad``.

    Attributes:
        name: what follows ``mcgrad`` on the command line.
        help: one line for ``mcgrad --help``.
        add_arguments: ``parser -> None``, adds the subcommand's options (may add its own
            subparsers, e.g. ``mcgrad compare blr``).
        run: ``args -> exit code``.
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def register_command(command: Command) -> Command:
    """Add (or replace) a subcommand of ``mcgrad``."""
    COMMANDS[command.name] = command
    return command


# --------------------------------------------------------------------------- study

STUDY_COSTS = {
    "quadratic": ("(x−k)²", lambda x, k: (x - k) ** 2),
    "exponential": ("exp(−k x²)", lambda x, k: jnp.exp(-k * x**2)),
    "cosine": ("cos(k x)", lambda x, k: jnp.cos(k * x)),
}
STUDY_PARAMETERS = {"loc": "μ", "scale": "σ"}
STUDY_POINT = {"loc": 1.0, "scale": 1.0}  # x ~ N(μ = 1, σ = 1)


def study_distribution(params) -> dist.Normal:
    """The study's family, ``N(loc, scale²)``."""
    return dist.Normal(params["loc"], params["scale"])


def study_grids(num_points: int = 21) -> dict:
    """The ``k`` grids: linear on [−3, 3] for the quadratic, log on [0.1, 10] otherwise."""
    return {
        "quadratic": np.linspace(-3.0, 3.0, num_points),
        "exponential": np.geomspace(0.1, 10.0, num_points),
        "cosine": np.geomspace(0.1, 10.0, num_points),
    }


def study_estimators() -> dict:
    """The four estimators of the study (all stateless, so per-sample variance is theirs)."""
    return {
        "score function": mg.score_function(),
        "score function + leave-one-out": mg.score_function(baseline=mg.baselines.leave_one_out()),
        "pathwise": mg.pathwise(),
        "measure-valued (coupled)": mg.measure_valued(coupling=True),
    }


def quadratic_exact_variance(
    estimator: str, parameter: str, k, loc: float = 1.0, scale: float = 1.0, num_samples: int | None = None
):
    r"""Exact variance of the gradient for the quadratic cost ``(x − k)²`` (REFERENCE.md,
    Mohamed et al. §3).

    With ``num_samples=None``, of one sample's gradient (leave-one-out then uses the
    ``b = E f`` row, its large-``N`` limit). With ``num_samples=N``, of an ``N``-sample
    estimate: the single-sample variance over ``N``, and for leave-one-out exactly at that
    ``N``, plus ``(E[s²] Var f + (∂E f)²) / (N(N − 1))`` (:func:`leave_one_out_excess`),
    here ``(8a² + 2σ²)`` for ``μ`` and ``(8a² + 8σ²)`` for ``σ`` over ``N(N − 1)``,
    ``a = μ − k``.

    Example:
        >>> from mcgrad.cli import quadratic_exact_variance
        >>> quadratic_exact_variance("pathwise", "scale", 0.0), quadratic_exact_variance("pathwise", "scale", 0.0, num_samples=4)
        (12.0, 3.0)
        >>> round(quadratic_exact_variance("score function + leave-one-out", "loc", 1.0, num_samples=2), 3)  # 10/2 + 2/2
        6.0
    """
    a, s2 = loc - k, scale**2
    table = {
        "score function": (a**4 / s2 + 14 * a**2 + 15 * s2, 2 * a**4 / s2 + 60 * a**2 + 74 * s2),
        "score function + leave-one-out": (8 * a**2 + 10 * s2, 40 * a**2 + 56 * s2),
        "pathwise": (4 * s2 + 0 * a, 4 * a**2 + 8 * s2),
        "measure-valued (coupled)": ((16 / np.pi - 4) * a**2, 4 * a**2 + 4 * s2),
    }
    index = 0 if parameter == "loc" else 1
    if num_samples is None:
        return table[estimator][index]
    variance = table[estimator][index] / num_samples
    if estimator == "score function + leave-one-out":
        excess = (8 * a**2 + 2 * s2, 8 * a**2 + 8 * s2)[index]
        variance = variance + excess / (num_samples * (num_samples - 1))
    return variance


def leave_one_out_excess(
    cost_fn: Callable, k: float, num_samples: int, loc: float = 1.0, scale: float = 1.0, num_nodes: int = 2401
) -> dict[str, float]:
    r"""What a finite ``N`` adds to the variance of the leave-one-out estimate, per parameter.

    With ``b_i`` the mean cost of the other ``N − 1`` samples and ``s`` the score,
    ``ĝ = (1/N) Σ_i (f_i − b_i) s_i`` has variance

    .. math::  \frac{\mathrm{Var}((f − E f)\,s)}{N} + \frac{E[s^2]\,\mathrm{Var} f + g^2}{N(N − 1)},
               \qquad g = E[f s] = ∂E f,

    (expand ``b_i``; every cross term with a lone score has mean zero). The first term
    is the ``b = E f`` variance over ``N``; this returns the second, for ``x ~ N(loc,
    scale²)`` and the cost ``cost_fn(x, k)``, by quadrature (the trapezoidal rule on
    ``num_nodes`` points of ``ε ∈ [−12, 12]``, ``x = loc + scale·ε``: exact to float
    precision for the study's smooth costs).

    Example:
        >>> from mcgrad.cli import leave_one_out_excess
        >>> excess = leave_one_out_excess(lambda x, k: (x - k) ** 2, 0.0, 10)   # (8a² + 2σ², 8a² + 8σ²)/90
        >>> round(excess["loc"] * 90, 6), round(excess["scale"] * 90, 6)
        (10.0, 16.0)
    """
    epsilon = np.linspace(-12.0, 12.0, num_nodes)  # the trapezoidal rule: spectrally accurate here
    weights = np.exp(-(epsilon**2) / 2) / np.sqrt(2 * np.pi) * (epsilon[1] - epsilon[0])
    with jax.enable_x64(True):  # the cost in float64 (jnp would round it to float32)
        f = np.asarray(cost_fn(jnp.asarray(loc + scale * epsilon), k), dtype=np.float64)
    mean_f = weights @ f
    variance_f = weights @ (f - mean_f) ** 2
    scores = {"loc": epsilon / scale, "scale": (epsilon**2 - 1) / scale}
    excess = {}
    for name, s in scores.items():
        g = weights @ (f * s)
        excess[name] = float((weights @ s**2 * variance_f + g**2) / (num_samples * (num_samples - 1)))
    return excess


def run_study(*, num_samples: int, seed: int, num_points: int = 21):
    """The study's long table (see :func:`mcgrad.variance_sweep`) plus ``exact_variance``
    (quadratic cost only; NaN elsewhere).

    Example:
        >>> from mcgrad.cli import run_study
        >>> table = run_study(num_samples=200, seed=0, num_points=3)
        >>> sorted(table["estimator"].unique())[:2], len(table)   # 4 estimators × 3 costs × 3 k × 2
        (['measure-valued (coupled)', 'pathwise'], 72)
    """
    table = mg.variance_sweep(
        {name: cost for name, (_, cost) in STUDY_COSTS.items()},
        study_distribution,
        study_estimators(),
        STUDY_POINT,
        study_grids(num_points),
        key=jax.random.key(seed),
        num_samples=num_samples,
    )
    exact = [
        quadratic_exact_variance(row.estimator, row.parameter, row.k) if row.cost == "quadratic" else np.nan
        for row in table.itertuples()
    ]
    return table.assign(exact_variance=exact)


def contiguous_runs(ks: Sequence[float], labels: Sequence[str]) -> list[tuple[str, float, float]]:
    """Compress per-``k`` labels into ``(label, k_first, k_last)`` runs.

    Example:
        >>> contiguous_runs([0, 1, 2, 3], ["a", "a", "b", "a"])
        [('a', 0, 1), ('b', 2, 2), ('a', 3, 3)]
    """
    runs: list[tuple[str, float, float]] = []
    for k, label in zip(ks, labels, strict=True):
        if runs and runs[-1][0] == label:
            runs[-1] = (label, runs[-1][1], k)
        else:
            runs.append((label, k, k))
    return runs


def study_winners(table: pd.DataFrame, column: str = "variance", tie_tolerance: float = 0.05) -> pd.DataFrame:
    """Per (cost, parameter), the estimator with the lowest ``column`` over ranges of k.

    Estimators within a factor ``1 + tie_tolerance`` of the lowest tie (joined by " ≈ "),
    so that Monte Carlo noise in the variance estimates does not flip the winner.

    Returns:
        A DataFrame with columns ``cost, parameter, estimator, k_from, k_to``.
    """
    rows = []
    for (cost, parameter), panel in table.groupby(["cost", "parameter"], sort=False):
        ks, labels = [], []
        for k, at_k in panel.groupby("k", sort=True):
            lowest = at_k[column].min()
            winners = at_k.loc[at_k[column] <= lowest * (1 + tie_tolerance), "estimator"]
            ks.append(k)
            labels.append(" ≈ ".join(winners))
        for estimator, k_from, k_to in contiguous_runs(ks, labels):
            rows.append({"cost": cost, "parameter": parameter, "estimator": estimator, "k_from": k_from, "k_to": k_to})
    return pd.DataFrame(rows)


LEAVE_ONE_OUT = "score function + leave-one-out"


def _select_branch(cost_fn, dist_fn, estimator, params, num_samples):
    """``(k, key) -> (gradient, (min cost, max cost))``: one estimate as :func:`mcgrad.select`
    makes it (``mg.estimate`` from a fresh state, the cost range for its flag), ``k`` an argument."""

    def branch(k, key):
        fn = mg.estimate(lambda x: cost_fn(x, k), dist_fn, estimator=estimator, num_samples=num_samples)
        out = fn(params, estimator.init(params), key)
        return out.grad, (jnp.min(out.info.costs), jnp.max(out.info.costs))

    return branch


def study_auto(
    table: pd.DataFrame, *, seed: int, num_samples: int = 10, num_repeats: int = 1000, num_timing_runs: int = 5
) -> pd.DataFrame:
    r"""What ``mg.auto()`` picks at every (cost, ``k``) of the study, against the most efficient estimator.

    Auto's choice is :func:`mcgrad.select`'s over :func:`study_estimators` with
    ``cost="seconds"``: per candidate, ``num_repeats`` independent ``num_samples``-sample
    estimates (keys split from one key, the same for every candidate and ``k``), their
    total variance ``V`` over ``μ`` and ``σ``, and the seconds ``t`` one estimate takes
    compiled (the median of ``num_timing_runs`` runs of the batch, over ``num_repeats``);
    it picks the largest ``1/(V·t)``. The numbers are made as ``select`` makes them, with
    one compile per estimator for the whole study (``k`` and the cost, chosen by
    ``lax.switch``, are arguments) instead of one per (estimator, cost, ``k``).

    The reference ranks the same candidates by ``1/(V*·t)``, the same seconds and ``V*``
    the variance of a ``num_samples``-sample estimate: exact for the quadratic
    (:func:`quadratic_exact_variance`, leave-one-out at that ``N``); for the other costs,
    which have no closed forms here, the single-sample variance measured in ``table``
    (its high ``N``) over ``num_samples``, leave-one-out's finite-``N`` excess added
    (:func:`leave_one_out_excess`).

    Args:
        table: :func:`run_study`'s table (its grids of ``k``, and the measured variances).
        seed: PRNG seed (auto's key is folded from it).
        num_samples: ``N``, samples per estimate.
        num_repeats: ``R``, estimates per candidate.
        num_timing_runs: timing runs per candidate and (cost, ``k``).

    Returns:
        A DataFrame, one row per (cost, ``k``): ``cost, k, auto_choice, best, reference``
        (``"exact"`` or ``"measured"``), ``agrees``, ``gap`` (the best's reference
        efficiency over the second best's, minus 1), ``auto_loss`` (1 − the reference
        efficiency of auto's choice over the best's; 0 where they agree), then per
        estimator ``seconds[·]``, ``variance[·]`` (auto's) and ``reference_variance[·]``.
    """
    estimators = study_estimators()
    costs = list(STUDY_COSTS)
    grids = {cost: np.sort(table.loc[table["cost"] == cost, "k"].unique()) for cost in costs}
    keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), 1), num_repeats)
    measured = {}  # (cost, k, estimator) -> (total variance, seconds)
    for name, estimator in estimators.items():
        branches = [
            _select_branch(cost_fn, study_distribution, estimator, STUDY_POINT, num_samples)
            for _, cost_fn in STUDY_COSTS.values()
        ]
        batched = jax.jit(
            jax.vmap(lambda index, k, key, branches=branches: jax.lax.switch(index, branches, k, key), in_axes=(None, None, 0))
        )
        for index, cost in enumerate(costs):
            for k in grids[cost]:
                args = (jnp.asarray(index, jnp.int32), jnp.asarray(k, jnp.float32), keys)
                gradients, _ = jax.block_until_ready(batched(*args))  # compiles once per estimator
                run = functools.partial(batched, *args)
                seconds = mg.diagnostics.median_seconds(run, num_timing_runs) / num_repeats
                measured[cost, k, name] = float(mg.gradient_statistics(gradients).total_variance), seconds

    rows = []
    for cost in costs:
        panel = table[table["cost"] == cost]
        for k in grids[cost]:
            row = {"cost": cost, "k": float(k)}
            auto_efficiency, reference_efficiency, details = {}, {}, {}
            for name in estimators:
                variance, seconds = measured[cost, k, name]
                if cost == "quadratic":
                    reference = sum(
                        quadratic_exact_variance(name, parameter, k, num_samples=num_samples) for parameter in STUDY_PARAMETERS
                    )
                else:
                    at = panel[(panel["k"] == k) & (panel["estimator"] == name)]
                    reference = at["variance"].sum() / num_samples
                    if name == LEAVE_ONE_OUT:
                        reference += sum(leave_one_out_excess(STUDY_COSTS[cost][1], k, num_samples).values())
                auto_efficiency[name] = 1.0 / (variance * seconds)
                reference_efficiency[name] = 1.0 / (reference * seconds)
                details |= {f"seconds[{name}]": seconds, f"variance[{name}]": variance, f"reference_variance[{name}]": reference}
            choice = max(auto_efficiency, key=auto_efficiency.get)
            best, second = sorted(reference_efficiency, key=reference_efficiency.get, reverse=True)[:2]
            row |= {
                "auto_choice": choice,
                "best": best,
                "reference": "exact" if cost == "quadratic" else "measured",
                "agrees": choice == best,
                "gap": reference_efficiency[best] / reference_efficiency[second] - 1.0,
                "auto_loss": 1.0 - reference_efficiency[choice] / reference_efficiency[best],
            }
            rows.append(row | details)
    return pd.DataFrame(rows)


def _format_auto(auto: pd.DataFrame, threshold: float = 0.2) -> str:
    lines = []
    for cost, panel in auto.groupby("cost", sort=False):
        label = STUDY_COSTS[cost][0]
        line = f"  {label:<12} agrees at {int(panel['agrees'].sum())} of {len(panel)} k ({panel['reference'].iloc[0]} ranking)"
        differ = panel[~panel["agrees"]]
        if len(differ):
            line += "; differs at " + "; ".join(
                f"k = {row.k:.3g} ({row.auto_choice}, best {row.best} by {100 * row.gap:.0f}%)" for row in differ.itertuples()
            )
        lines.append(line)
    clear = auto[auto["gap"] > threshold]
    line = (
        f"  Where the best two differ by more than {100 * threshold:.0f}% in efficiency, auto agrees at "
        f"{int(clear['agrees'].sum())} of {len(clear)} (cost, k)"
    )
    if not auto["agrees"].all():
        line += f"; where it differs, it loses at most {100 * auto['auto_loss'].max():.0f}% of the best's efficiency"
    lines.append(line + ".")
    return "\n".join(lines)


def _format_winners(winners) -> str:
    lines = []
    for (cost, parameter), group in winners.groupby(["cost", "parameter"], sort=False):
        label = f"{STUDY_COSTS[cost][0]}, ∂/∂{STUDY_PARAMETERS.get(parameter, parameter)}"
        ranges = "; ".join(
            f"{row.estimator} for k in [{row.k_from:.3g}, {row.k_to:.3g}]" for row in group.itertuples()
        )
        lines.append(f"  {label:<22} {ranges}")
    return "\n".join(lines)


def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", type=Path, default=Path("mcgrad-study"), help="where the PNG and CSV go")
    parser.add_argument(
        "--num-samples", type=int, default=100_000, help="per-sample gradients per (estimator, cost, k)"
    )
    parser.add_argument("--num-points", type=int, default=21, help="values of k per cost")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed")
    parser.add_argument(
        "--auto-num-samples", type=int, default=10, help="samples per estimate in auto's choice (mg.select's N)"
    )
    parser.add_argument(
        "--auto-num-repeats", type=int, default=1000, help="estimates per candidate in auto's choice (mg.select's R)"
    )
    parser.add_argument(
        "--auto-timing-runs", type=int, default=5, help="timing runs per candidate and (cost, k) (mg.select's default 5)"
    )


def run_study_command(args: argparse.Namespace) -> int:
    from mcgrad import plotting  # matplotlib, only when a figure is drawn

    start = time.perf_counter()
    table = run_study(num_samples=args.num_samples, seed=args.seed, num_points=args.num_points)
    seconds = time.perf_counter() - start
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = output_dir / "variance_study.csv", output_dir / "variance_study.png"
    winners_path = output_dir / "winners.csv"
    table.to_csv(csv_path, index=False)
    labels = {name: label for name, (label, _) in STUDY_COSTS.items()}
    plotting.sweep_figure(table, cost_labels=labels, parameter_labels=STUDY_PARAMETERS).savefig(png_path, dpi=120)
    start = time.perf_counter()
    auto = study_auto(
        table, seed=args.seed, num_samples=args.auto_num_samples, num_repeats=args.auto_num_repeats,
        num_timing_runs=args.auto_timing_runs,
    )
    auto_seconds = time.perf_counter() - start
    auto_path = output_dir / "auto.csv"
    auto.to_csv(auto_path, index=False)
    winners = study_winners(table, "variance")
    winners_cost = study_winners(table, "variance_x_evaluations")
    winners.assign(criterion="variance").pipe(
        lambda w: pd.concat([w, winners_cost.assign(criterion="variance_x_evaluations")])
    ).to_csv(winners_path, index=False)

    step = max(1, args.num_points // 5)  # print about five k per cost; the CSV has them all
    shown_k = {cost: sorted(panel["k"].unique())[::step] for cost, panel in table.groupby("cost")}
    shown = table[[k in shown_k[cost] for cost, k in zip(table["cost"], table["k"], strict=True)]]
    pivot = shown.pivot_table(index=["cost", "parameter", "k"], columns="estimator", values="variance", sort=False)
    print(f"Per-sample gradient variance, x ~ N(1, 1), N = {args.num_samples} (every k in {csv_path}):\n")
    print(pivot.to_string(float_format=lambda v: f"{v:.3g}"))
    print("\nLowest variance:")
    print(_format_winners(winners))
    print("\nLowest variance × evaluations per sample (measure-valued spends 5, the others 1):")
    print(_format_winners(winners_cost))
    print(
        f"\nmg.auto()'s choice (mg.select over the four estimators by variance × seconds, N = {args.auto_num_samples}, "
        f"{args.auto_num_repeats} estimates each) against the most efficient by 1/(variance × the same seconds), "
        f"the variance of an N-sample estimate exact for (x−k)² and, for the other costs, measured above "
        f"(N = {args.num_samples}; no closed forms):"
    )
    print(_format_auto(auto))
    print(
        f"\nWrote {csv_path}, {png_path}, {winners_path}, {auto_path} (study {seconds:.1f} s, auto {auto_seconds:.1f} s, including compilation)."
    )
    return 0


register_command(Command("study", "the paper's variance study (Gaussian, three costs)", add_study_arguments, run_study_command))


# --------------------------------------------------------------------------- compare


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    problems = parser.add_subparsers(dest="problem", metavar="PROBLEM", required=True)
    blr = problems.add_parser("blr", help="Bayesian logistic regression on breast cancer (the paper's §8.3)")
    blr.add_argument("--output-dir", type=Path, default=Path("mcgrad-compare-blr"), help="where the PNG and CSV go")
    blr.add_argument("--num-steps", type=int, default=5000, help="SGD steps (the paper: 5000)")
    blr.add_argument("--learning-rate", type=float, default=1e-3, help="initial SGD rate, cosine decay (paper: 1e-3)")
    blr.add_argument("--num-samples", type=int, default=50, help="guide samples per step (paper: 50)")
    blr.add_argument("--batch-size", type=int, default=32, help="minibatch size (paper: 32)")
    blr.add_argument("--seed", type=int, default=0, help="PRNG seed")
    blr.add_argument("--no-progress", action="store_true", help="no progress bars")
    blr.set_defaults(compare=run_compare_blr)
    vae = problems.add_parser(
        "discrete-vae",
        help="Bernoulli VAE on binarized digits: DisARM, score function, measure-valued, … against "
        "hand-written JAX and NumPyro (benchmarks/discrete.py runs it longer)",
    )
    vae.add_argument(
        "--output-dir", type=Path, default=Path("mcgrad-compare-discrete-vae"), help="where the PNG and CSV go"
    )
    vae.add_argument("--num-steps", type=int, default=3000, help="Adam steps per method, a multiple of 4 (default 3000)")
    vae.add_argument("--seed", type=int, default=0, help="PRNG seed")
    vae.add_argument("--methods", nargs="+", default=None, metavar="METHOD", help="a subset of the methods (default all)")
    vae.set_defaults(compare=run_compare_discrete_vae)


def run_compare_command(args: argparse.Namespace) -> int:
    return args.compare(args)


def run_compare_blr(args: argparse.Namespace) -> int:
    from mcgrad.experiments import blr

    comparison = blr.run(
        num_steps=args.num_steps,
        learning_rate=args.learning_rate,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        seed=args.seed,
        progress_bar=not args.no_progress,
    )
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = output_dir / "blr_comparison.csv", output_dir / "blr_comparison.png"
    comparison.table.to_csv(csv_path, index=False)
    blr.plot(comparison, png_path)
    print("\nBayesian logistic regression, breast cancer (D = 31), mean-field Gaussian guide:\n")
    print(comparison.table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"\nWrote {csv_path} and {png_path}.")
    return 0


DISCRETE_VAE_SEGMENTS = 4  # checkpoints (gradient variance) and timed segments per method


def run_compare_discrete_vae(args: argparse.Namespace) -> int:
    from mcgrad.experiments import discrete_vae

    if args.num_steps < DISCRETE_VAE_SEGMENTS or args.num_steps % DISCRETE_VAE_SEGMENTS:
        raise SystemExit(f"mcgrad compare discrete-vae: --num-steps must be a positive multiple of "
                         f"{DISCRETE_VAE_SEGMENTS}, got {args.num_steps}.")
    start = time.perf_counter()
    comparison = discrete_vae.run(
        num_steps=args.num_steps,
        seed=args.seed,
        names=args.methods,
        num_segments=DISCRETE_VAE_SEGMENTS,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    seconds = time.perf_counter() - start
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = output_dir / "discrete_vae_comparison.csv", output_dir / "discrete_vae_comparison.png"
    comparison.table.to_csv(csv_path, index=False)
    discrete_vae.plot(comparison, png_path)
    settings = comparison.settings
    shown = comparison.table.drop(columns=["description", "bias"])
    print(
        f"\nDiscrete VAE, binarized digits, {settings['latent_dim']} Bernoulli latents, batch {settings['batch_size']}, "
        f"Adam {settings['learning_rate']:g}, {settings['num_steps']} steps; target: smoothed training −ELBO ≤ "
        f"{settings['target']} nats/image, time = steps × compiled s/step:\n"
    )
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"\nWrote {csv_path} and {png_path} ({seconds:.0f} s).")
    return 0


register_command(
    Command(
        "compare",
        "compare estimators on a model (blr: the paper's logistic regression; discrete-vae: Bernoulli latents)",
        add_compare_arguments,
        run_compare_command,
    )
)


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The ``mcgrad`` parser, one subparser per registered command."""
    parser = argparse.ArgumentParser(prog="mcgrad", description="Monte Carlo gradient estimation.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS.values():
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mcgrad`` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

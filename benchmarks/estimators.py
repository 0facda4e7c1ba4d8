r"""mcgrad's estimators against hand-written pure-JAX versions of the same estimators.

Problem: ``x ~ N(loc, diag(exp(log_scale))²)`` in ``D`` dimensions (``params = {"loc": [D],
"log_scale": [D]}``, so ``2·D`` distribution parameters), ``N`` samples per estimate, and
one of two costs (``--cost``):

* ``logistic`` (default): the negative log-likelihood of a logistic regression with
  weights ``x`` on 32 fixed synthetic points, ``f(x) = Σ_b log(1 + exp(−y_b a_bᵀx))``
  (the paper's §8.3 experiment in miniature; ``32·D`` multiply-adds per evaluation);
* ``cheap``: ``f(x) = log(1 + ‖x − ½‖²)``, a few flops per coordinate, where everything
  but the cost evaluations shows.

For every ``D`` in {1, 10, 100} and ``N`` in {10, 100, 1000} and every estimator
(pathwise, score function, score function with a leave-one-out baseline, coupled
measure-valued), the time of one ``jit``-compiled ``mg.grad`` estimate against a
``jit``-compiled reference written with ``jax.random`` and ``jnp`` only (no mcgrad, no
NumPyro). The references draw the same random numbers as mcgrad, so both give the same
gradient (``max_abs_difference`` checks it). Targets: mcgrad / reference ≤ 1.1, and
measure-valued / (``2·(2D)·N`` vmapped evaluations of the cost) ≤ 1.5.

Timing: everything is compiled before timing; each call is blocked until ready; the
functions of one comparison are interleaved (their order rotating) so machine noise hits
all of them; each timing sample repeats a call enough times to last a few milliseconds;
the reported time is the median over samples, and a ratio is the median over rounds of
the per-round ratio (paired: both sides timed back to back, so bursts of load from other
processes cancel). Dispatch is synchronous
(``jax_cpu_enable_async_dispatch=False``, for mcgrad and references alike): on a loaded
CPU the hand-off to XLA's worker thread otherwise adds tens of microseconds of noise to
every small call. Memory: XLA's compiled
``memory_analysis()`` (temporary buffers, arguments and outputs of the compiled
program), which is what the program needs at peak besides the runtime itself.

    python benchmarks/estimators.py                  # full run, writes benchmarks/results/
    python benchmarks/estimators.py --update-docs    # ... and the table in docs/benchmarks.md
    python benchmarks/estimators.py --quick          # smoke mode (seconds)
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import mcgrad as mg

sys.path.append(str(Path(__file__).parent))  # last: benchmarks/models.py must not hide the models package
from docs_tables import replace_table  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[1]
RATIO_TARGET = 1.1
EVALUATIONS_TARGET = 1.5


# --------------------------------------------------------------------------- problem


NUM_DATA = 32


def cheap_cost(x: jax.Array) -> jax.Array:
    """``log(1 + ‖x − ½‖²)`` for one sample ``x`` of shape ``[D]``."""
    return jnp.log1p(jnp.sum((x - 0.5) ** 2))


def logistic_cost_for(dimension: int) -> Callable[[jax.Array], jax.Array]:
    """The logistic-regression negative log-likelihood on 32 fixed points in ``D`` dims."""
    rng = np.random.default_rng(dimension)
    features = jnp.asarray(rng.normal(size=(NUM_DATA, dimension)) / math.sqrt(dimension), jnp.float32)
    labels = jnp.asarray(np.where(rng.random(NUM_DATA) < 0.5, -1.0, 1.0), jnp.float32)

    def logistic_cost(x: jax.Array) -> jax.Array:
        return jnp.sum(jnp.logaddexp(0.0, -labels * (features @ x)))

    return logistic_cost


COSTS: dict[str, Callable[[int], Callable[[jax.Array], jax.Array]]] = {
    "logistic": logistic_cost_for,
    "cheap": lambda dimension: cheap_cost,
}
COST_DESCRIPTIONS = {
    "logistic": "sum_b log(1 + exp(-y_b a_b^T x)), 32 fixed points",
    "cheap": "log(1 + ||x - 0.5||^2)",
}


def normal(params):
    import numpyro.distributions as dist

    return dist.Normal(params["loc"], jnp.exp(params["log_scale"])).to_event(1)


def initial_params(dimension: int) -> dict[str, jax.Array]:
    return {"loc": jnp.linspace(-1.0, 1.0, dimension), "log_scale": jnp.full((dimension,), -0.5)}


MCGRAD_ESTIMATORS: dict[str, Callable[[], mg.GradientEstimator]] = {
    "pathwise": mg.pathwise,
    "score_function": mg.score_function,
    "score_function_loo": lambda: mg.score_function(baseline=mg.baselines.leave_one_out()),
    "measure_valued": lambda: mg.measure_valued(coupling=True),
    # The same estimator evaluating one sample's 2·(2D) rows at a time (lax.map).
    "measure_valued_batch1": lambda: mg.measure_valued(coupling=True, batch_size=1),
}


# --------------------------------------------------------------------------- references (pure JAX)


def _log_normal_density(x, loc, log_scale):
    """``log N(x; loc, exp(log_scale)²)`` summed over the last axis: ``[N]``."""
    scale = jnp.exp(log_scale)
    terms = -0.5 * ((x - loc[None, :]) / scale[None, :]) ** 2 - log_scale[None, :] - 0.5 * math.log(2 * math.pi)
    return jnp.sum(terms, axis=1)


def reference_pathwise(cost: Callable, num_samples: int):
    def grad_fn(params, key):
        # Every mcgrad estimate splits its key into a sampling and a terms key (the terms
        # of the pathwise estimator are zero and do not use theirs): drawn the same here.
        key_sample, _ = jax.random.split(key)

        def loss(p):
            epsilon = jax.random.normal(key_sample, (num_samples, p["loc"].shape[0]))
            x = p["loc"][None, :] + epsilon * jnp.exp(p["log_scale"])[None, :]
            return jnp.mean(jax.vmap(cost)(x))

        return jax.grad(loss)(params)

    return grad_fn


def _reference_score_function(cost: Callable, num_samples: int, leave_one_out: bool):
    def grad_fn(params, key):
        loc, log_scale = params["loc"], params["log_scale"]
        key_sample, _ = jax.random.split(key)  # as mcgrad draws (see reference_pathwise)
        epsilon = jax.random.normal(key_sample, (num_samples, loc.shape[0]))
        x = loc[None, :] + epsilon * jnp.exp(log_scale)[None, :]
        signal = jax.vmap(cost)(x)
        if leave_one_out:
            signal = signal - (jnp.sum(signal) - signal) / (num_samples - 1)

        def surrogate(p):
            return jnp.mean(signal * _log_normal_density(x, p["loc"], p["log_scale"]))

        return jax.grad(surrogate)(params)

    return grad_fn


def reference_score_function(cost: Callable, num_samples: int):
    return _reference_score_function(cost, num_samples, leave_one_out=False)


def reference_score_function_loo(cost: Callable, num_samples: int):
    return _reference_score_function(cost, num_samples, leave_one_out=True)


def replaced_costs(cost: Callable, x: jax.Array, values: jax.Array) -> jax.Array:
    """``[N, D]`` costs ``f(x_n with coordinate d set to values[n, d])``.

    All ``N·D`` rows at once, with ``jnp.where`` on a one-hot mask: of the three natural
    ways (``where``, ``.at[d].set`` as mcgrad does, or ``x + e_d·(v − x)``) the fastest
    on XLA:CPU for the logistic cost, and within 10% of the fastest for the cheap one.
    """
    dimension = x.shape[1]
    one_hot = jnp.eye(dimension, dtype=bool)
    rows = jnp.where(one_hot[None, :, :], values[:, :, None], x[:, None, :])
    return jax.vmap(jax.vmap(cost))(rows)


def reference_measure_valued(cost: Callable, num_samples: int):
    """Coupled weak derivatives of the Normal (the paper's Table 1), pulled back to
    ``log_scale`` by the chain rule; random numbers drawn as mcgrad draws them."""

    def grad_fn(params, key):
        loc, log_scale = params["loc"], params["log_scale"]
        scale = jnp.exp(log_scale)
        shape = (num_samples, loc.shape[0])
        key_sample, key_derivative = jax.random.split(key)
        x = loc[None, :] + jax.random.normal(key_sample, shape) * scale[None, :]

        # ∂/∂loc: c = 1/(σ√(2π)), x± = loc ± σ·W, W ~ Rayleigh (one W for both sides).
        key_plus, _ = jax.random.split(jax.random.fold_in(key_derivative, 0))
        rayleigh = jnp.sqrt(2.0 * jax.random.exponential(key_plus, shape))
        loc_row, scale_row = loc[None, :], scale[None, :]
        plus, minus = loc_row + scale_row * rayleigh, loc_row - scale_row * rayleigh
        grad_loc = jnp.mean(replaced_costs(cost, x, plus) - replaced_costs(cost, x, minus), axis=0) / (scale * math.sqrt(2 * math.pi))

        # ∂/∂σ: c = 1/σ, x⁺ = loc + σ·M (double-sided Maxwell), x⁻ = loc + σ·U·M.
        # M = sign(z)·√(z² + 2E), z ~ N(0, 1), E ~ Exp(1): ±√χ²₃.
        key_normal, key_exponential, key_uniform = jax.random.split(jax.random.fold_in(key_derivative, 1), 3)
        z = jax.random.normal(key_normal, shape)
        magnitude = jnp.sqrt(z**2 + 2.0 * jax.random.exponential(key_exponential, shape))
        maxwell = jnp.where(z < 0.0, -magnitude, magnitude)
        gaussian = jax.random.uniform(key_uniform, shape) * maxwell
        plus, minus = loc_row + scale_row * maxwell, loc_row + scale_row * gaussian
        grad_scale = jnp.mean(replaced_costs(cost, x, plus) - replaced_costs(cost, x, minus), axis=0) / scale

        return {"loc": grad_loc, "log_scale": grad_scale * scale}  # ∂/∂log σ = σ·∂/∂σ

    return grad_fn


REFERENCES: dict[str, Callable[[Callable, int], Callable]] = {
    "pathwise": reference_pathwise,
    "score_function": reference_score_function,
    "score_function_loo": reference_score_function_loo,
    "measure_valued": reference_measure_valued,
    "measure_valued_batch1": reference_measure_valued,
}


# --------------------------------------------------------------------------- timing


def compile_fn(fn: Callable, *args) -> tuple[Callable, Any]:
    """``(jitted, compiled)``: time the jitted function (the C++ dispatch path users get;
    calling a ``Compiled`` object of a program with a host callback, such as mcgrad's
    finiteness check, takes a slow Python path), read memory from the compiled one (the
    jit cache shares the executable, so it compiles once)."""
    jitted = jax.jit(fn)
    compiled = jitted.lower(*args).compile()
    jax.block_until_ready(jitted(*args))
    return jitted, compiled


def memory_bytes(compiled) -> dict[str, int] | None:
    """Temporary, argument and output bytes of a compiled program (None if unavailable)."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if stats is None:
        return None
    return {
        "temp": int(stats.temp_size_in_bytes),
        "argument": int(stats.argument_size_in_bytes),
        "output": int(stats.output_size_in_bytes),
    }


def calls_per_sample(fn: Callable[[], Any], min_sample_seconds: float) -> int:
    """How many calls make one timing sample last at least ``min_sample_seconds``."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    single = max(time.perf_counter() - start, 1e-7)
    return max(1, math.ceil(min_sample_seconds / single))


class Timing(NamedTuple):
    """Per-call wall time and process CPU time (all threads) of every timing round, in
    seconds; ``wall``/``cpu`` are their medians."""

    wall: float
    cpu: float
    wall_samples: list[float]
    cpu_samples: list[float]


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of the per-round ratio: the two were timed back to back in each
    round, so load that comes and goes hits both sides of a ratio alike."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True) if b > 0)


def time_interleaved(
    fns: dict[str, Callable[[], Any]], *, num_samples: int, min_sample_seconds: float
) -> dict[str, Timing]:
    """Median seconds per call of each (already compiled) function, timed interleaved.

    CPU time is reported beside wall time because on a shared machine wall time also
    counts the time spent waiting for a core.
    """
    for fn in fns.values():  # warm up
        jax.block_until_ready(fn())
    calls = {name: calls_per_sample(fn, min_sample_seconds) for name, fn in fns.items()}
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for index in range(num_samples):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:  # rotate the order every round
            fn, count = fns[name], calls[name]
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(count):
                jax.block_until_ready(fn())
            wall[name].append((time.perf_counter() - start_wall) / count)
            cpu[name].append((time.process_time() - start_cpu) / count)
    return {
        name: Timing(statistics.median(wall[name]), statistics.median(cpu[name]), wall[name], cpu[name]) for name in fns
    }


def max_abs_difference(a, b) -> float:
    return float(max(jnp.max(jnp.abs(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)))


# --------------------------------------------------------------------------- benchmark


def benchmark_case(
    estimator_name: str,
    dimension: int,
    num_samples: int,
    *,
    cost_name: str = "logistic",
    timing_samples: int,
    min_sample_seconds: float,
    time_unchecked: bool = True,
) -> list[dict[str, Any]]:
    """Rows for one (estimator, D, N): mcgrad vs reference, and for measure-valued also vs
    ``2·(2D)·N`` vmapped evaluations of the cost. ``time_unchecked`` also times mcgrad
    with ``check_finite=False`` (the cost of the finiteness check)."""
    params, key = initial_params(dimension), jax.random.key(0)
    cost = COSTS[cost_name](dimension)
    estimator = MCGRAD_ESTIMATORS[estimator_name]()
    checked, checked_compiled = compile_fn(
        mg.grad(cost, normal, estimator=estimator, num_samples=num_samples), params, key
    )
    reference, reference_compiled = compile_fn(REFERENCES[estimator_name](cost, num_samples), params, key)
    fns = {"mcgrad": lambda: checked(params, key), "reference": lambda: reference(params, key)}
    if time_unchecked:
        unchecked, _ = compile_fn(
            mg.grad(cost, normal, estimator=estimator, num_samples=num_samples, check_finite=False), params, key
        )
        fns["mcgrad_unchecked"] = lambda: unchecked(params, key)
    num_evaluations = mg.count_evaluations(cost, normal, estimator, params, num_samples=num_samples)
    baselines = {"reference": (reference_compiled, RATIO_TARGET)}
    if estimator_name.startswith("measure_valued"):
        num_floor = 2 * (2 * dimension) * num_samples
        points = jax.random.normal(jax.random.key(1), (num_floor, dimension))
        floor, floor_compiled = compile_fn(jax.vmap(cost), points)
        fns["evaluations"] = lambda: floor(points)
        baselines["evaluations"] = (floor_compiled, EVALUATIONS_TARGET)
    timings = time_interleaved(fns, num_samples=timing_samples, min_sample_seconds=min_sample_seconds)
    mcgrad, unchecked_timing = timings["mcgrad"], timings.get("mcgrad_unchecked")
    base = {
        "estimator": estimator_name,
        "cost": cost_name,
        "D": dimension,
        "N": num_samples,
        "num_evaluations": num_evaluations,
        "mcgrad_seconds": mcgrad.wall,
        "mcgrad_cpu_seconds": mcgrad.cpu,
        "mcgrad_unchecked_seconds": unchecked_timing.wall if unchecked_timing else None,
        "mcgrad_memory_bytes": memory_bytes(checked_compiled),
    }
    rows = []
    for name, (compiled, target) in baselines.items():
        timing = timings[name]
        rows.append(
            base
            | {
                "baseline": "reference" if name == "reference" else f"{num_floor} vmapped cost evaluations",
                "baseline_seconds": timing.wall,
                "baseline_cpu_seconds": timing.cpu,
                "baseline_memory_bytes": memory_bytes(compiled),
                "ratio": paired_ratio(mcgrad.wall_samples, timing.wall_samples),
                "ratio_of_medians": mcgrad.wall / timing.wall,
                "ratio_cpu": paired_ratio(mcgrad.cpu_samples, timing.cpu_samples) if timing.cpu > 0 else None,
                "ratio_unchecked": (
                    paired_ratio(unchecked_timing.wall_samples, timing.wall_samples) if unchecked_timing else None
                ),
                "target": target,
                "max_abs_difference": (
                    max_abs_difference(checked(params, key), reference(params, key)) if name == "reference" else None
                ),
            }
        )
        rows[-1]["within_target"] = bool(rows[-1]["ratio"] <= target)
    return rows


def run(
    dimensions: Sequence[int],
    sample_sizes: Sequence[int],
    estimators: Sequence[str],
    *,
    cost_name: str = "logistic",
    timing_samples: int,
    min_sample_seconds: float,
    time_unchecked: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    rows = []
    for dimension in dimensions:
        for num_samples in sample_sizes:
            for name in estimators:
                new = benchmark_case(
                    name,
                    dimension,
                    num_samples,
                    cost_name=cost_name,
                    timing_samples=timing_samples,
                    min_sample_seconds=min_sample_seconds,
                    time_unchecked=time_unchecked,
                )
                for row in new:
                    log(
                        f"D={dimension:<4} N={num_samples:<5} {name:<19} vs {row['baseline']:<32} "
                        f"{row['mcgrad_seconds'] * 1e6:10.1f} µs / {row['baseline_seconds'] * 1e6:10.1f} µs "
                        f"= {row['ratio']:.2f} (target {row['target']})"
                    )
                rows.extend(new)
    return rows


def environment(quick: bool, timing_samples: int, cost_name: str) -> dict[str, Any]:
    device = jax.devices()[0]
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": quick,
        "jax": jax.__version__,
        "mcgrad": mg.__version__,
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "device": device.device_kind,
        "cpu_count": os.cpu_count(),
        "timing_samples": timing_samples,
        "async_dispatch": bool(jax.config.read("jax_cpu_enable_async_dispatch")),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cost": f"{cost_name}: {COST_DESCRIPTIONS[cost_name]}",
        "distribution": "Normal(loc, exp(log_scale)).to_event(1), D dimensions, 2·D parameters",
    }


def _format_ratio(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}"


def _format_bytes(memory: dict[str, int] | None) -> str:
    if memory is None:
        return "n/a"
    size = float(memory["temp"])
    for unit in ("B", "KiB", "MiB"):
        if size < 1024 or unit == "MiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def markdown_table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"Run {meta['date']} on {meta['backend']} ({meta['device']}, {meta['cpu_count']} cores), "
        f"jax {meta['jax']}{' — quick mode' if meta['quick'] else ''}, cost `{meta['cost']}`, load average "
        f"{meta['load_average']:.1f} at the end. Times are medians of "
        f"{meta['timing_samples']} interleaved rounds, ratios medians of the per-round ratios (wall time, and process "
        "CPU time); memory is XLA's temporary buffers of the compiled program.",
        "",
        "| estimator | D | N | compared with | mcgrad µs | baseline µs | ratio | ratio (CPU time) "
        "| target | mcgrad temp memory | baseline temp memory |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        mark = "" if row["within_target"] else " ✗"
        lines.append(
            f"| {row['estimator']} | {row['D']} | {row['N']} | {row['baseline']} "
            f"| {row['mcgrad_seconds'] * 1e6:.1f} | {row['baseline_seconds'] * 1e6:.1f} "
            f"| {row['ratio']:.2f}{mark} | {_format_ratio(row['ratio_cpu'])} | ≤ {row['target']} "
            f"| {_format_bytes(row['mcgrad_memory_bytes'])} | {_format_bytes(row['baseline_memory_bytes'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode: one small case, few timing samples")
    parser.add_argument("--output-dir", type=Path, default=REPOSITORY / "benchmarks" / "results")
    parser.add_argument("--update-docs", action="store_true", help="also write the table into docs/benchmarks.md")
    parser.add_argument("--estimators", nargs="+", default=list(MCGRAD_ESTIMATORS), choices=list(MCGRAD_ESTIMATORS))
    parser.add_argument("--cost", default="logistic", choices=list(COSTS), help="the cost function (see above)")
    parser.add_argument("--dimensions", type=int, nargs="+", help="values of D (default 1 10 100)")
    parser.add_argument("--sample-sizes", type=int, nargs="+", help="values of N (default 10 100 1000)")
    args = parser.parse_args(argv)
    jax.config.update("jax_cpu_enable_async_dispatch", False)

    if args.quick:
        dimensions, sample_sizes, timing_samples, min_sample_seconds = (2,), (10,), 3, 2e-4
    else:
        dimensions, sample_sizes, timing_samples, min_sample_seconds = (1, 10, 100), (10, 100, 1000), 25, 3e-3
    dimensions, sample_sizes = args.dimensions or dimensions, args.sample_sizes or sample_sizes
    rows = run(
        dimensions,
        sample_sizes,
        args.estimators,
        cost_name=args.cost,
        timing_samples=timing_samples,
        min_sample_seconds=min_sample_seconds,
        time_unchecked=not args.quick,
    )
    meta = environment(args.quick, timing_samples, args.cost)
    table = markdown_table(rows, meta)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "estimators.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    (args.output_dir / "estimators.md").write_text("# Estimators: mcgrad vs hand-written JAX\n\n" + table)
    if args.update_docs:
        replace_table("estimators benchmark", table)
    print(f"\nWrote {args.output_dir / 'estimators.json'} and {args.output_dir / 'estimators.md'}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Mixture labels: mg.fit's default for a discrete latent per datum against the score function.

A one-dimensional mixture of ``K`` unit-variance components at fixed, evenly spaced
centres (the component means a model parameter, started half a unit off), ``N = 500``
points drawn from it with a fixed key; per datum a label ``z_i ~ Categorical(1/K)``
(``K = 2``: the same model with a Bernoulli label), and a guide with a free logit vector
per datum. ``mg.elbo(4)``, Adam 0.05, 2000 steps, the same initial parameters and keys
for every method:

* ``default``: what ``mg.fit`` runs unasked. Each label is its datum's only latent
  coordinate and no cost term outside the plate reads it, so the default sums over its
  ``K`` values exactly (``mg.measure_valued()`` on the finite family: ``K − 1`` re-runs
  a particle).
* ``score_function_loo``: the score function with a leave-one-out baseline, the default
  for such sites before 2026-12-05.

*Target*: the default's final smoothed loss (trailing mean over 100 steps) + 1 nat
(0.002 nats a datum). *Time to target*: steps to target × the compiled seconds a step
(the fastest of ``--timing-calls`` calls; compile excluded, reported apart).

Run: ``python benchmarks/labels.py`` (about 3 minutes on 2 CPU cores; ``--quick`` for a
smoke run). Writes ``benchmarks/results/labels.json`` and ``.md`` (and with
``--update-docs`` the section in ``docs/benchmarks.md``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax

import mcgrad as mg

sys.path.append(str(Path(__file__).parent))  # last: benchmarks/models.py must not hide the models package
from docs_tables import replace_table  # noqa: E402

RESULTS = Path(__file__).parent / "results"
WINDOW = 100
TOLERANCE = 1.0  # nats above the default's final smoothed loss


def label_distribution(logits: jax.Array) -> dist.Distribution:
    """Bernoulli for two values, else Categorical, over the last axis of ``logits``."""
    if logits.shape[-1] == 2:
        return dist.Bernoulli(logits=logits[..., 1] - logits[..., 0])
    return dist.Categorical(logits=logits)


def mixture(num_values: int, num_data: int = 500):
    """``(model, guide, x)`` of the mixture with ``num_values`` components."""
    centres = jnp.linspace(-num_values, num_values, num_values)
    key = jax.random.key(7)
    labels = jax.random.categorical(key, jnp.zeros(num_values), shape=(num_data,))
    x = centres[labels] + jax.random.normal(jax.random.fold_in(key, 1), (num_data,))

    def model(x):
        means = numpyro.param("means", centres + 0.5)
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", label_distribution(jnp.zeros(num_values)))
            numpyro.sample("x", dist.Normal(means[z.astype(jnp.int32)], 1.0), obs=x)

    def guide(x):
        logits = numpyro.param("z_logits", jnp.zeros((x.shape[0], num_values)))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("z", label_distribution(logits))

    return model, guide, x


METHODS = {
    "default": None,
    "score_function_loo": {"z": mg.score_function(baseline=mg.baselines.leave_one_out())},
}


def smooth(losses: np.ndarray, window: int) -> np.ndarray:
    sums = np.cumsum(np.insert(np.asarray(losses, np.float64), 0, 0.0))
    return (sums[window:] - sums[:-window]) / window


def run(num_values: int, name: str, num_steps: int, timing_calls: int) -> dict:
    model, guide, x = mixture(num_values)
    settings = dict(key=jax.random.key(0), num_steps=num_steps, optimizer=optax.adam(0.05),
                    objective=mg.elbo(4), estimators=METHODS[name], progress_bar=False)
    start = time.perf_counter()
    result = mg.fit(model, guide, x, **settings)
    first_call = time.perf_counter() - start
    seconds = []
    for _ in range(timing_calls):  # the same compiled program again: its run time alone
        start = time.perf_counter()
        jax.block_until_ready(mg.fit(model, guide, x, **settings).state)
        seconds.append(time.perf_counter() - start)
    training = mg.trainer(model, guide, x, key=settings["key"], optimizer=settings["optimizer"],
                          objective=settings["objective"], estimators=settings["estimators"])
    return {"estimator": training.estimators["z"].name, "losses": np.asarray(result.losses).tolist(),
            "seconds_per_step": min(seconds) / num_steps, "compile_seconds": first_call - min(seconds)}


def summarize(rows: dict, window: int) -> dict:
    default = smooth(rows["default"]["losses"], window)
    target = float(default[-1]) + TOLERANCE
    for row in rows.values():
        smoothed = smooth(row["losses"], window)
        reached = np.nonzero(smoothed <= target)[0]
        row["final"] = float(smoothed[-1])
        row["steps_to_target"] = int(reached[0]) + window if len(reached) else None
        row["time_to_target_seconds"] = (row["steps_to_target"] * row["seconds_per_step"]
                                         if row["steps_to_target"] is not None else None)
        del row["losses"]
    return {"target": target}


def fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown(results: dict) -> str:
    lines = [f"### Mixture labels: {results['settings']['num_data']} points, mg.elbo(4), Adam 0.05, "
             f"{results['settings']['num_steps']} steps", "",
             "| K | method | estimator | final | steps to target | ms/step | time to target s | compile s |",
             "|---|---|---|---|---|---|---|---|"]
    for num_values, problem in results["problems"].items():
        for name, row in problem["methods"].items():
            lines.append(f"| {num_values} | {name} | `{row['estimator']}` | {row['final']:.2f} "
                         f"| {fmt(row['steps_to_target'], 'd')} | {1e3 * row['seconds_per_step']:.3f} "
                         f"| {fmt(row['time_to_target_seconds'], '.3f')} | {row['compile_seconds']:.1f} |")
    lines += ["", f"Target: the default's final smoothed loss (trailing mean over {results['settings']['window']} "
              f"steps) + {TOLERANCE:g} nat; — where never reached. ms/step: the fastest of "
              f"{results['settings']['timing_calls']} calls of the compiled run. compile s: the first call less "
              "that (the first row's holds the process's one-time start as well)."]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    parser.add_argument("--update-docs", action="store_true")
    parser.add_argument("--timing-calls", type=int, default=3)
    args = parser.parse_args(argv)
    num_steps, window = (60, 10) if args.quick else (2000, WINDOW)
    sizes = (2, 3) if args.quick else (2, 10, 100)
    problems = {}
    for num_values in sizes:
        rows = {name: run(num_values, name, num_steps, 1 if args.quick else args.timing_calls) for name in METHODS}
        problems[str(num_values)] = {"methods": rows, **summarize(rows, window)}
        print(f"K={num_values}: " + ", ".join(f"{n} {r['final']:.2f} ({r['steps_to_target']} steps)"
                                              for n, r in rows.items()), flush=True)
    results = {"settings": {"num_data": 500, "num_steps": num_steps, "window": window, "quick": args.quick,
                            "timing_calls": 1 if args.quick else args.timing_calls},
               "problems": problems,
               "machine": {"platform": platform.platform(), "devices": [str(d) for d in jax.devices()]}}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "labels.json").write_text(json.dumps(results, indent=2))
    (args.output_dir / "labels.md").write_text(markdown(results))
    if args.update_docs:
        replace_table("labels", markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()

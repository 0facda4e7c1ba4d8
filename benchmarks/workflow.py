"""Workflow benchmark: many fits of one model, as a Bayesian workflow runs them.

1. The BLR job (breast cancer, mean-field guide, 50 particles, Adam, 2000 steps) fitted
   repeatedly with fresh optimizer and objective objects in every call, as a user writes
   it: each call's compile time (``jax.monitoring``) and wall time. Target: calls after
   the first spend ≤ 5% of the first call's compile time compiling, on top of the run.
2. 25 restarts: one ``mg.fit(key=<25 keys>)`` (one compiled program, the restarts
   vectorised) against 25 ``SVI.run`` calls. Target: ≥ 10× faster end to end.
3. 300 sequential one-step fits of a small model in a fresh process: peak RSS after each
   (target: growth ≤ 50 MB after the tenth).

Run: ``python benchmarks/workflow.py`` (``--quick`` for a smoke run). Writes
``benchmarks/results/workflow.json`` and ``.md`` (and with ``--update-docs`` the section in
``docs/benchmarks.md``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpyro.infer import SVI, Trace_ELBO
from numpyro.optim import optax_to_numpyro

import mcgrad as mg
from mcgrad.experiments.blr import load_breast_cancer

sys.path.insert(0, str(Path(__file__).parent))
from fit_speed import blr_guide, blr_model  # noqa: E402
from docs_tables import replace_table  # noqa: E402

RESULTS = Path(__file__).parent / "results"

_compile_seconds = [0.0]


def _record(event: str, duration: float, **_) -> None:
    if event.rsplit("/", 1)[-1] in ("jaxpr_trace_duration", "jaxpr_to_mlir_module_duration", "backend_compile_duration"):
        _compile_seconds[0] += duration


jax.monitoring.register_event_duration_secs_listener(_record)


def timed(fn):
    _compile_seconds[0] = 0.0
    start = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        out = fn()
    return time.perf_counter() - start, _compile_seconds[0], out


def repeated_fits(features, labels, num_fits: int, num_steps: int, num_particles: int) -> dict:
    rows = []
    for index in range(num_fits):

        def call(index=index):
            result = mg.fit(blr_model, blr_guide, features, labels, key=jax.random.key(index), num_steps=num_steps,
                            optimizer=optax.adam(1e-2), objective=mg.elbo(num_particles))
            return float(np.mean(result.losses[-max(1, num_steps // 10):]))

        seconds, compile_seconds, loss = timed(call)
        rows.append({"seconds": seconds, "compile_seconds": compile_seconds, "final_loss": loss})
    first, later = rows[0], rows[1:]
    later_compile = float(np.median([r["compile_seconds"] for r in later]))
    return {
        "num_fits": num_fits,
        "num_steps": num_steps,
        "fits": rows,
        "first_compile_seconds": first["compile_seconds"],
        "later_compile_seconds_median": later_compile,
        "later_compile_fraction_of_first": later_compile / first["compile_seconds"],
        "first_seconds": first["seconds"],
        "later_seconds_median": float(np.median([r["seconds"] for r in later])),
    }


def restarts(features, labels, num_restarts: int, num_steps: int, num_particles: int) -> dict:
    keys = jax.random.split(jax.random.key(11), num_restarts)

    def batched():
        result = mg.fit(blr_model, blr_guide, features, labels, key=keys, num_steps=num_steps,
                        optimizer=optax.adam(1e-2), objective=mg.elbo(num_particles))
        return result.losses

    def svi_runs():
        out = []
        for restart in range(num_restarts):
            svi = SVI(blr_model, blr_guide, optax_to_numpyro(optax.adam(1e-2)), Trace_ELBO(num_particles))
            out.append(np.asarray(svi.run(keys[restart], num_steps, features, labels).losses))
        return np.stack(out)

    mg.fit.cache.clear()  # the batched program compiles inside the measurement
    mcgrad_seconds, mcgrad_compile, losses = timed(batched)
    svi_seconds, svi_compile, svi_losses = timed(svi_runs)
    final = lambda l: np.mean(np.asarray(l)[:, -max(1, num_steps // 10):], axis=1)  # noqa: E731
    return {
        "num_restarts": num_restarts,
        "num_steps": num_steps,
        "mcgrad_batched_seconds": mcgrad_seconds,
        "mcgrad_batched_compile_seconds": mcgrad_compile,
        "numpyro_svi_seconds": svi_seconds,
        "numpyro_svi_compile_seconds": svi_compile,
        "speedup": svi_seconds / mcgrad_seconds,
        "best_restart": int(np.argmin(final(losses))),
        "final_loss_range_mcgrad": [float(final(losses).min()), float(final(losses).max())],
        "final_loss_range_svi": [float(final(svi_losses).min()), float(final(svi_losses).max())],
    }


MEMORY_SCRIPT = """
import json, resource, sys
import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist, optax
import mcgrad as mg

def model(x):
    z = numpyro.sample("z", dist.Bernoulli(0.5))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", dist.Normal(2.0 * z - 1.0, 1.0), obs=x)

def guide(x):
    numpyro.sample("z", dist.Bernoulli(logits=numpyro.param("logits", jnp.zeros(()))))

x = jnp.array([0.8, 1.3, -0.2, 1.1, 0.5])
rss = []
for i in range(int(sys.argv[1])):
    mg.fit(model, guide, x, key=jax.random.key(i), num_steps=1, optimizer=optax.adam(0.05),
           objective=mg.elbo(4), progress_bar=False)
    rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
print(json.dumps(rss))
"""


def memory(num_fits: int) -> dict:
    process = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(num_fits)], capture_output=True, text=True,
                             timeout=1800, check=True)
    rss = json.loads(process.stdout.strip().splitlines()[-1])
    return {"num_fits": num_fits, "peak_rss_mb": rss, "growth_after_tenth_mb": rss[-1] - rss[min(9, len(rss) - 1)]}


def markdown(results: dict) -> str:
    fits, batch, mem = results["repeated"], results["restarts"], results["memory"]
    lines = [
        f"### Many fits of one model (BLR, {fits['num_steps']} steps, fresh optimizer and objective each call)",
        "",
        "| call | wall (s) | compile (s) |",
        "|---|---|---|",
    ]
    for index, row in enumerate(fits["fits"]):
        lines.append(f"| {index + 1} | {row['seconds']:.2f} | {row['compile_seconds']:.3f} |")
    lines += [
        "",
        f"- Later calls compile for **{100 * fits['later_compile_fraction_of_first']:.1f}%** of the first call's "
        f"compile time (median {fits['later_compile_seconds_median']:.3f} s against {fits['first_compile_seconds']:.2f} s; "
        "target ≤ 5%).",
        "",
        f"### {batch['num_restarts']} restarts, {batch['num_steps']} steps each",
        "",
        "| | end to end (s) | of which compile (s) |",
        "|---|---|---|",
        f"| one batched `mg.fit(key=keys)` | {batch['mcgrad_batched_seconds']:.2f} | {batch['mcgrad_batched_compile_seconds']:.2f} |",
        f"| {batch['num_restarts']} × `SVI.run` | {batch['numpyro_svi_seconds']:.2f} | {batch['numpyro_svi_compile_seconds']:.2f} |",
        "",
        f"- Speed-up: **{batch['speedup']:.1f}×** (target ≥ 10×). Final losses: mcgrad "
        f"{batch['final_loss_range_mcgrad'][0]:.2f}–{batch['final_loss_range_mcgrad'][1]:.2f}, "
        f"SVI {batch['final_loss_range_svi'][0]:.2f}–{batch['final_loss_range_svi'][1]:.2f}.",
        "",
        f"### Memory over {mem['num_fits']} one-step fits in one process",
        "",
        f"Peak RSS after fit 1, 10, {mem['num_fits']}: {mem['peak_rss_mb'][0]:.0f}, "
        f"{mem['peak_rss_mb'][min(9, len(mem['peak_rss_mb']) - 1)]:.0f}, {mem['peak_rss_mb'][-1]:.0f} MB: growth after the "
        f"tenth **{mem['growth_after_tenth_mb']:.1f} MB** (target ≤ 50 MB).",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    parser.add_argument("--update-docs", action="store_true")
    args = parser.parse_args(argv)
    data = load_breast_cancer()
    features, labels = jnp.asarray(data.features), jnp.asarray(data.labels)
    if args.quick:
        results = {
            "repeated": repeated_fits(features, labels, num_fits=3, num_steps=20, num_particles=5),
            "restarts": restarts(features, labels, num_restarts=3, num_steps=20, num_particles=5),
            "memory": memory(12),
        }
    else:
        results = {
            "repeated": repeated_fits(features, labels, num_fits=5, num_steps=2000, num_particles=50),
            "restarts": restarts(features, labels, num_restarts=25, num_steps=2000, num_particles=50),
            "memory": memory(300),
        }
    results["machine"] = {"platform": platform.platform(), "devices": [str(d) for d in jax.devices()]}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "workflow.json").write_text(json.dumps(results, indent=2))
    (args.output_dir / "workflow.md").write_text(markdown(results))
    if args.update_docs:
        replace_table("workflow", markdown(results), heading="Workflow: many fits, restarts, memory")
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()

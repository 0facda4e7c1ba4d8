"""How fast is ``mg.fit``? Ratios from one run, never a single absolute time.

1. Bayesian logistic regression on breast cancer (569 × 31, mean-field Gaussian guide,
   50 particles, Adam): ``mg.fit`` with the pathwise ELBO **as a user calls it** (default
   settings: gradient diagnostics on, a progress bar, a fresh call each time) and tuned
   (no bar; no diagnostics), against a hand-written pure-JAX ``lax.scan`` loop of the
   same ELBO (target: per step ≤ 1.1× with diagnostics on) and against NumPyro
   ``SVI.run`` with ``Trace_ELBO`` (target: end to end no slower). Diagnostics overhead
   per step: default against ``diagnostics_every=0`` (target ≤ 10%). Two times each: end
   to end (trace + compile + run, what a user waits for, with the compile part measured
   by ``jax.monitoring``) and the marginal run time of ``S`` steps, from calls of ``S``
   and ``10·S`` steps with their compile times taken out. Methods are interleaved and
   repeated; medians are reported, and a ratio is the median over repeats of the ratio
   within each repeat. Memory: XLA's temporary buffers of each compiled
   training loop.
3. Memory in the number of particles: ``mg.elbo(M)`` for ``M`` ∈ {10, 1000, 40000} on a
   small model with a Bernoulli latent (score function), default diagnostics: XLA's
   temporary buffers of the compiled step, to show them linear in ``M`` (the old
   per-particle diagnostics were ``O(M²)``: 64 GB at ``M = 40000``).
2. Discrete latents: a two-component model with a Bernoulli assignment per datum (a
   plate of 100), mean-field Bernoulli guide. mcgrad's score function with a
   leave-one-out baseline (Rao-Blackwellized over the plate) against NumPyro's
   ``TraceGraph_ELBO`` at equal particles: gradient variance at the initial parameters
   (over independent keys) and the exact ELBO (by enumeration) after equal Adam steps.

Run: ``python benchmarks/fit_speed.py`` (``--quick`` for a smoke run). Writes
``benchmarks/results/fit_speed.json`` and ``.md`` (and with ``--update-docs`` the tables
in ``docs/benchmarks.md``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
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
from numpyro.infer import SVI, Trace_ELBO, TraceGraph_ELBO
from numpyro.optim import optax_to_numpyro

import mcgrad as mg
from mcgrad.experiments.blr import load_breast_cancer
from mcgrad.programs import COMPILE_EVENTS, covered

sys.path.append(str(Path(__file__).parent))  # last: benchmarks/models.py must not hide the models package
from docs_tables import replace_table  # noqa: E402

RESULTS = Path(__file__).parent / "results"

# --------------------------------------------------------------------------- 1. BLR speed


def blr_model(features, labels):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([features.shape[1]]).to_event(1))
    numpyro.sample("y", dist.Bernoulli(logits=features @ w), obs=labels)


def blr_guide(features, labels):
    dim = features.shape[1]
    loc = numpyro.param("loc", jnp.zeros(dim))
    scale = numpyro.param("scale", jnp.ones(dim), constraint=dist.constraints.positive)
    numpyro.sample("w", dist.Normal(loc, scale).to_event(1))


def pure_jax_loop(features, labels, key, num_steps, num_particles, learning_rate):
    """The same ELBO and optimizer by hand: reparameterized Gaussian, exp for the scale;
    ``num_steps`` Adam steps in one ``lax.scan`` (to be jitted)."""
    optimizer = optax.adam(learning_rate)
    dim = features.shape[1]

    def loss(params, key):
        loc, scale = params["loc"], jnp.exp(params["scale"])
        eps = jax.random.normal(key, (num_particles, dim))
        w = loc + scale * eps
        logits = w @ features.T
        log_likelihood = jnp.sum(labels * logits - jnp.logaddexp(0.0, logits), axis=1)
        log_prior = -0.5 * jnp.sum(w**2, axis=1) - 0.5 * dim * jnp.log(2 * jnp.pi)
        log_q = jnp.sum(-0.5 * eps**2 - jnp.log(scale), axis=1) - 0.5 * dim * jnp.log(2 * jnp.pi)
        return jnp.mean(log_q - log_prior - log_likelihood)

    def step(carry, _):
        params, opt_state, key = carry
        key, step_key = jax.random.split(key)
        value, grads = jax.value_and_grad(loss)(params, step_key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, key), value

    params = {"loc": jnp.zeros(dim), "scale": jnp.zeros(dim)}
    (params, _, _), losses = jax.lax.scan(step, (params, optimizer.init(params), key), None, length=num_steps)
    return params, losses


def pure_jax_fit(features, labels, key, num_steps, num_particles, learning_rate):
    """The hand-written loop, compiled afresh in every call as a user's script would."""
    run = jax.jit(functools.partial(pure_jax_loop, num_steps=num_steps, num_particles=num_particles,
                                    learning_rate=learning_rate))
    _, losses = run(features, labels, key)
    return jax.block_until_ready(losses)


def mcgrad_fit(features, labels, key, num_steps, num_particles, learning_rate, progress_bar=True, diagnostics=True):
    """``mg.fit`` as a user writes it: a fresh call with default settings (progress bar and
    gradient diagnostics on) unless told otherwise."""
    options = {} if diagnostics else {"diagnostics_every": 0}
    # A first fit: mg.fit keeps compiled programs across calls (benchmarks/workflow.py
    # measures that); here every call pays its compile, as the first call of a process does.
    mg.fit.cache.clear()
    result = mg.fit(
        blr_model,
        blr_guide,
        features,
        labels,
        key=key,
        num_steps=num_steps,
        optimizer=optax.adam(learning_rate),
        objective=mg.elbo(num_particles),
        progress_bar=progress_bar,
        **options,
    )
    return result.losses


def numpyro_fit(features, labels, key, num_steps, num_particles, learning_rate, progress_bar=True):
    svi = SVI(blr_model, blr_guide, optax_to_numpyro(optax.adam(learning_rate)), Trace_ELBO(num_particles))
    result = svi.run(key, num_steps, features, labels, progress_bar=progress_bar)
    return np.asarray(jax.block_until_ready(result.losses))


_compile_intervals: list[tuple[float, float]] = []


def _record_compile(event: str, duration: float, **_) -> None:
    if event in COMPILE_EVENTS:
        end = time.perf_counter()
        _compile_intervals.append((end - duration, end))


jax.monitoring.register_event_duration_secs_listener(_record_compile)


def time_call(fn, *args) -> tuple[float, float, object]:
    """Wall seconds of ``fn(*args)``, the seconds JAX spent tracing, lowering and compiling
    inside it (from ``jax.monitoring``'s compile events), and its result."""
    _compile_intervals.clear()
    start = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # the progress bars
        result = fn(*args)
    return time.perf_counter() - start, covered(_compile_intervals), result


def blr_speed(
    num_steps: int, num_particles: int, num_repeats: int, learning_rate: float = 1e-2, run_multiple: int = 10
) -> dict:
    """End to end: one call of ``num_steps`` (trace, compile, run), as a user waits for it.
    Run: the marginal time of ``num_steps`` more steps once compiled, from a call with
    ``run_multiple`` times as many: ``((T(k·S) − C(k·S)) − (T(S) − C(S))) / (k − 1)`` with
    ``C`` each call's measured compile time; setup costs cancel, and ``k`` large keeps the
    noise small."""
    data = load_breast_cancer()
    features, labels = jnp.asarray(data.features), jnp.asarray(data.labels)
    methods = {
        # Both libraries as a user calls them (their progress bars on: mg.fit scans chunks
        # between updates of the bar, SVI.run then dispatches one jitted step at a time;
        # mg.fit records gradient diagnostics).
        "mcgrad": mcgrad_fit,
        "numpyro_svi": numpyro_fit,
        "pure_jax": pure_jax_fit,
        # Tuned: no bars; and mcgrad without diagnostics.
        "mcgrad_no_bar": functools.partial(mcgrad_fit, progress_bar=False),
        "mcgrad_no_bar_no_diagnostics": functools.partial(mcgrad_fit, progress_bar=False, diagnostics=False),
        "numpyro_svi_no_bar": functools.partial(numpyro_fit, progress_bar=False),
    }
    names = list(methods)
    samples = {name: {"end_to_end": [], "compile": [], "run": []} for name in methods}
    final_losses = {}  # from the first repeat's calls (key 0)
    for fn in methods.values():  # first-use costs of the process (imports, JAX's caches)
        time_call(fn, features, labels, jax.random.key(0), 2, num_particles, learning_rate)
    for repeat in range(num_repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:  # interleaved, order rotating
            fn, key = methods[name], jax.random.key(repeat)
            once, compile_seconds, losses = time_call(fn, features, labels, key, num_steps, num_particles, learning_rate)
            many, compile_many, _ = time_call(
                fn, features, labels, key, run_multiple * num_steps, num_particles, learning_rate
            )
            if repeat == 0:
                final_losses[name] = float(np.mean(np.asarray(losses)[-max(1, num_steps // 10) :]))
            samples[name]["end_to_end"].append(once)
            samples[name]["compile"].append(compile_seconds)
            # Each call's own compile time is taken out, so its noise does not land in the run.
            samples[name]["run"].append(((many - compile_many) - (once - compile_seconds)) / (run_multiple - 1))
    summary = {
        name: {
            "end_to_end_seconds": float(np.median(t["end_to_end"])),
            "compile_seconds": float(np.median(t["compile"])),
            "run_seconds": float(np.median(t["run"])),
            "final_loss": final_losses[name],
            "samples": t,
        }
        for name, t in samples.items()
    }

    def ratio(a, b, what):
        """The median over repeats of the repeat's ratio: the two calls of a repeat ran
        close together in time, so the machine's slow drifts cancel in each ratio."""
        key = {"run_seconds": "run", "end_to_end_seconds": "end_to_end"}[what]
        return float(np.median(np.asarray(samples[a][key]) / np.asarray(samples[b][key])))

    ratios = {
        # Per step, diagnostics on (no bars on either side): target ≤ 1.1.
        "mcgrad_over_pure_jax_run": ratio("mcgrad_no_bar", "pure_jax", "run_seconds"),
        "mcgrad_no_diagnostics_over_pure_jax_run": ratio("mcgrad_no_bar_no_diagnostics", "pure_jax", "run_seconds"),
        # Diagnostics overhead per step: target ≤ 1.1.
        "diagnostics_overhead_run": ratio("mcgrad_no_bar", "mcgrad_no_bar_no_diagnostics", "run_seconds"),
        # End to end as users call them (defaults): target ≥ 1.
        "numpyro_over_mcgrad_end_to_end": ratio("numpyro_svi", "mcgrad", "end_to_end_seconds"),
        "numpyro_over_mcgrad_run": ratio("numpyro_svi", "mcgrad", "run_seconds"),
        "numpyro_over_mcgrad_no_bar_end_to_end": ratio("numpyro_svi_no_bar", "mcgrad_no_bar", "end_to_end_seconds"),
        "numpyro_over_mcgrad_no_bar_run": ratio("numpyro_svi_no_bar", "mcgrad_no_bar", "run_seconds"),
        "mcgrad_over_pure_jax_end_to_end": ratio("mcgrad_no_bar", "pure_jax", "end_to_end_seconds"),
    }
    return {
        "methods": summary,
        "ratios": ratios,
        "temp_memory_bytes": blr_memory(features, labels, num_particles, learning_rate),
        "num_steps": num_steps,
        "num_particles": num_particles,
        "num_repeats": num_repeats,
        "run_multiple": run_multiple,
    }


def compiled_temp_bytes(fn, *args) -> int:
    """XLA's temporary buffers of ``jax.jit(fn)`` compiled for ``args``."""
    return int(jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes)


def blr_memory(features, labels, num_particles: int, learning_rate: float, num_steps: int = 100) -> dict:
    """Temporary memory of one compiled training loop of ``num_steps``: mcgrad's trainer
    (diagnostics on, as mg.fit's default records them) against the hand-written loop."""
    objective = mg.elbo(num_particles)

    def mcgrad_loop(diagnostics_every):
        training = mg.trainer(blr_model, blr_guide, features, labels, key=jax.random.key(0), objective=objective,
                              optimizer=optax.adam(learning_rate), diagnostics_every=diagnostics_every)
        state = training.init(jax.random.key(1))
        return compiled_temp_bytes(lambda s, f, y: training.run(s, num_steps, f, y), state, features, labels)

    def pure_loop(features, labels):
        return pure_jax_loop(features, labels, jax.random.key(0), num_steps, num_particles, learning_rate)

    return {
        "mcgrad_diagnostics_every_1": mcgrad_loop(1),
        "mcgrad_no_diagnostics": mcgrad_loop(0),
        "pure_jax": compiled_temp_bytes(pure_loop, features, labels),
    }


# --------------------------------------------------------------------------- 3. memory in M


def bernoulli_model(x):
    z = numpyro.sample("z", dist.Bernoulli(0.5))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", dist.Normal(2.0 * z - 1.0, 1.0), obs=x)


def bernoulli_guide(x):
    numpyro.sample("z", dist.Bernoulli(logits=numpyro.param("logits", jnp.zeros(()))))


def particle_memory(particle_counts=(10, 1000, 40_000), num_steps: int = 20) -> dict:
    """Per ``M``: XLA's temporary memory of mg.fit's compiled step (diagnostics on, as
    recorded by default), and one real ``mg.fit`` with default settings (its wall time and
    its recorded, finite, gradient variance)."""
    x = jnp.array([0.8, 1.3, -0.2, 1.1, 0.5])
    rows = {}
    for num_particles in particle_counts:
        objective = mg.elbo(num_particles)
        training = mg.trainer(bernoulli_model, bernoulli_guide, x, key=jax.random.key(0), objective=objective,
                              optimizer=optax.adam(0.05), diagnostics_every=1)
        state = training.init(jax.random.key(1))
        temp = compiled_temp_bytes(training.step, state, x)
        start = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):
            result = mg.fit(bernoulli_model, bernoulli_guide, x, key=jax.random.key(0), num_steps=num_steps,
                            optimizer=optax.adam(0.05), objective=objective)
        seconds = time.perf_counter() - start
        rows[str(num_particles)] = {
            "temp_bytes_per_step": temp,
            "temp_bytes_per_particle": temp / num_particles,
            "fit_seconds": seconds,
            "recorded_variance": float(np.mean(result.diagnostics.variance["logits"])),
            "num_records": int(len(result.diagnostics.steps)),
        }
    return {"num_steps": num_steps, "particles": rows}


# --------------------------------------------------------------------------- 2. discrete latents


def mixture_data(key, num_data: int = 100):
    assignment = jax.random.bernoulli(key, 0.5, (num_data,))
    return jnp.where(assignment, 2.0, -2.0) + jax.random.normal(jax.random.fold_in(key, 1), (num_data,))


def discrete_model(x):
    means = numpyro.param("means", jnp.array([-0.5, 0.5]))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Bernoulli(0.5))
        numpyro.sample("x", dist.Normal(means[z.astype(jnp.int32)], 1.0), obs=x)


def discrete_guide(x):
    logits = numpyro.param("logits", jnp.zeros(x.shape[0]))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("z", dist.Bernoulli(logits=logits))


def exact_elbo(params, x) -> float:
    """Σ_i Σ_z q(z_i)[log p(z_i) + log p(x_i | z_i) − log q(z_i)], by enumeration."""
    q1 = jax.nn.sigmoid(params["logits"])
    total = 0.0
    for z, qz in ((0, 1.0 - q1), (1, q1)):
        log_joint = jnp.log(0.5) + dist.Normal(params["means"][z], 1.0).log_prob(x)
        total = total + jnp.sum(qz * (log_joint - jnp.log(jnp.clip(qz, 1e-30))))
    return float(total)


def gradient_variance(loss_fn, params, num_keys: int) -> float:
    grads = jax.jit(jax.vmap(lambda k: jax.grad(loss_fn)(params, k)))(jax.random.split(jax.random.key(7), num_keys))
    return float(np.mean([np.mean(np.var(np.asarray(g), axis=0)) for g in jax.tree.leaves(grads)]))


def discrete_comparison(num_steps: int, num_particles: int, num_keys: int) -> dict:
    x = mixture_data(jax.random.key(3))
    init = {"means": jnp.array([-0.5, 0.5]), "logits": jnp.zeros(x.shape[0])}
    objective = mg.elbo(num_particles)
    reference = TraceGraph_ELBO(num_particles)

    def mcgrad_loss(params, key):
        return objective.loss_with_mutable_state(key, params, discrete_model, discrete_guide, x)["loss"]

    def numpyro_loss(params, key):
        return reference.loss(key, params, discrete_model, discrete_guide, x)

    variance = {"mcgrad": gradient_variance(mcgrad_loss, init, num_keys), "numpyro": gradient_variance(numpyro_loss, init, num_keys)}
    optimizer = optax.adam(0.05)
    result = mg.fit(
        discrete_model, discrete_guide, x, key=jax.random.key(0), num_steps=num_steps,
        optimizer=optimizer, objective=objective, progress_bar=False, diagnostics_every=0,
    )
    svi = SVI(discrete_model, discrete_guide, optax_to_numpyro(optimizer), reference)
    svi_result = svi.run(jax.random.key(0), num_steps, x, progress_bar=False)
    return {
        "num_particles": num_particles,
        "num_steps": num_steps,
        "gradient_variance_at_init": variance,
        "variance_ratio_numpyro_over_mcgrad": variance["numpyro"] / variance["mcgrad"],
        "final_exact_elbo": {"mcgrad": exact_elbo(result.params, x), "numpyro": exact_elbo(svi_result.params, x)},
    }


# --------------------------------------------------------------------------- report


def markdown(results: dict) -> str:
    speed = results["blr"]
    lines = [
        f"### Bayesian logistic regression, {speed['num_steps']} Adam steps, {speed['num_particles']} particles",
        "",
        f"Medians of {speed['num_repeats']} interleaved repeats. *End to end*: one call, as a user "
        "waits for it (trace, compile, run). *Compile*: the part JAX spent tracing, lowering and "
        f"compiling (`jax.monitoring`). *Run*: {speed['num_steps']} more steps once compiled: "
        f"((T − C)({speed['run_multiple']}·S) − (T − C)(S)) / {speed['run_multiple'] - 1}, T a call's "
        "time and C its compile time. A ratio below is the median over repeats of the ratio "
        "within each repeat (its calls ran close together).",
        "",
        "| method | end to end (s) | compile (s) | run (s) | final loss |",
        "|---|---|---|---|---|",
    ]
    memory = speed["temp_memory_bytes"]
    for name, m in speed["methods"].items():
        lines.append(
            f"| {name} | {m['end_to_end_seconds']:.2f} | {m['compile_seconds']:.2f} | {m['run_seconds']:.3f} "
            f"| {m['final_loss']:.2f} |"
        )
    r = speed["ratios"]
    lines += [
        "",
        "`mcgrad` and `numpyro_svi` are the libraries' defaults (progress bars; mcgrad records "
        "gradient diagnostics every `num_steps // 50` steps); `_no_bar` turns the bars off.",
        "",
        f"- Per step, diagnostics on, mcgrad / pure JAX: **{r['mcgrad_over_pure_jax_run']:.2f}×** (target ≤ 1.1); "
        f"without diagnostics {r['mcgrad_no_diagnostics_over_pure_jax_run']:.2f}×",
        f"- Diagnostics overhead per step: **{r['diagnostics_overhead_run']:.2f}×** (target ≤ 1.1)",
        f"- End to end, defaults, NumPyro SVI / mcgrad: **{r['numpyro_over_mcgrad_end_to_end']:.2f}×** "
        f"(target ≥ 1); without bars {r['numpyro_over_mcgrad_no_bar_end_to_end']:.2f}×; per step "
        f"{r['numpyro_over_mcgrad_run']:.2f}× with bars, {r['numpyro_over_mcgrad_no_bar_run']:.2f}× without",
        f"- End to end, mcgrad / pure JAX (no bar): {r['mcgrad_over_pure_jax_end_to_end']:.2f}×",
        f"- XLA temporary memory of 100 compiled steps: mcgrad {memory['mcgrad_diagnostics_every_1'] / 1024:.0f} KiB "
        f"with diagnostics at every step, {memory['mcgrad_no_diagnostics'] / 1024:.0f} KiB without; "
        f"pure JAX {memory['pure_jax'] / 1024:.0f} KiB",
        "",
    ]
    particles = results["particles"]
    lines += [
        f"### Memory in the number of particles (Bernoulli latent, score function, default diagnostics, "
        f"{particles['num_steps']} steps)",
        "",
        "| M | step temp memory (KiB) | per particle (bytes) | mg.fit wall (s) | recorded variance |",
        "|---|---|---|---|---|",
    ]
    for m, row in particles["particles"].items():
        lines.append(
            f"| {m} | {row['temp_bytes_per_step'] / 1024:.1f} | {row['temp_bytes_per_particle']:.0f} | "
            f"{row['fit_seconds']:.2f} | {row['recorded_variance']:.3g} |"
        )
    lines.append("")
    d = results["discrete"]
    lines += [
        f"### Discrete latents (Bernoulli assignment per datum, plate of 100), {d['num_particles']} particles",
        "",
        "| | mcgrad score function + leave-one-out | NumPyro TraceGraph_ELBO |",
        "|---|---|---|",
        f"| gradient variance at init (mean over coordinates) | {d['gradient_variance_at_init']['mcgrad']:.4g} | "
        f"{d['gradient_variance_at_init']['numpyro']:.4g} |",
        f"| exact ELBO after {d['num_steps']} Adam steps | {d['final_exact_elbo']['mcgrad']:.2f} | "
        f"{d['final_exact_elbo']['numpyro']:.2f} |",
        "",
        f"Variance ratio NumPyro / mcgrad: **{d['variance_ratio_numpyro_over_mcgrad']:.2f}×**.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    parser.add_argument("--update-docs", action="store_true", help="also write the tables into docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.quick:
        blr = blr_speed(num_steps=50, num_particles=5, num_repeats=1)
        discrete = discrete_comparison(num_steps=20, num_particles=4, num_keys=8)
        particles = particle_memory((10, 100), num_steps=5)
    else:
        blr = blr_speed(num_steps=2000, num_particles=50, num_repeats=7, run_multiple=5)
        discrete = discrete_comparison(num_steps=1000, num_particles=10, num_keys=2000)
        particles = particle_memory()
    results = {
        "blr": blr,
        "discrete": discrete,
        "particles": particles,
        "machine": {"platform": platform.platform(), "devices": [str(d) for d in jax.devices()]},
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "fit_speed.json").write_text(json.dumps(results, indent=2))
    (args.output_dir / "fit_speed.md").write_text(markdown(results))
    if args.update_docs:
        replace_table("fit_speed", markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()

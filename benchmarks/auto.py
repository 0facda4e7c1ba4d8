r"""``mg.auto()`` in ``mg.fit`` against every fixed candidate: time to target, overhead, compile.

Three models, each fitted once per method from the same initial parameters and keys:

1. **BLR**: the Bayesian logistic regression of ``benchmarks/fit_speed.py`` (breast
   cancer, 569 × 31, standard normal prior, mean-field Gaussian guide, ``mg.elbo(50)``,
   Adam 0.01, 2000 steps). Fixed: pathwise (mg.fit's default), score function with
   leave-one-out, measure-valued. Target: auto's time to the final ELBO within 1.1× of
   pathwise's.
2. **Discrete VAE**: the VAE of :mod:`mcgrad.experiments.discrete_vae` (16 Bernoulli
   latents, binarized digits, batch 32, Adam 1e-3, 8000 steps, its initial weights and
   keys), ``mg.elbo(2)``. Fixed: DisARM (mg.fit's default for a Bernoulli with two
   particles), score function with leave-one-out, measure-valued (with ``mg.elbo(2)``,
   and with ``mg.elbo(1)`` as ``benchmarks/discrete.py`` runs it), double control
   variate, REBAR. Auto: ``mg.auto()`` (its default schedule: decisions at 0, a sixteenth
   of the run and every quarter, those the run affords at its 5% budget). Target: within
   1.1× of the best fixed estimator's time to the −ELBO 21.09 nats per image.
3. **Mixture**: a two-component mixture with a continuous and a discrete latent, on
   data drawn from a fixed key: ``loc ~ N(0, 5²)``, per datum ``z_i ~ Bernoulli(½)``,
   ``x_i ~ N(loc + (2 z_i − 1)·shift, 1)`` (``shift`` a model parameter); guide
   ``N(m, s²)`` for ``loc`` and a free logit per datum for ``z``; ``mg.elbo(4)``, Adam
   0.05. Fixed: every combination of {pathwise, score function + leave-one-out,
   measure-valued} for ``loc`` × {score function + leave-one-out, measure-valued,
   DisARM, double control variate, REBAR, enumeration} for ``z``; auto:
   ``estimators="auto"``. Target: within 1.1× of the best combination's time to target.

Each method is one ``mg.fit`` call as a user makes it (default diagnostics, no progress
bar), then the same call again in ``--timing-calls − 1`` interleaved rounds over the
methods (those whose first call ran over ``--repeat-limit`` seconds are timed once): the
trajectory is the first call's; a component's run seconds are the smallest over the calls
(other load on the shared machine only adds time; an auto segment's, the lowest seconds a
step of the calls' segments of the same choices: :func:`summarize_auto`). Seven calls by
default (:data:`TIMING_CALLS`): the machine runs XLA's multi-threaded programs in slow and
fast phases of a few seconds, and four compiled copies of one mixture program, called in
turn, ran 0.075–0.081 ms a step in one round and 0.053–0.055 in a later one; with three
calls a method whose calls all fell in slow phases kept the slow rate (auto's segments
once at 0.078 against the same combination's fixed 0.058). Compile seconds
are the first call's one-time work (``jax.monitoring``: trace, lower, compile; and building each trainer, where
NumPyro traces the model and guide eagerly; the union of the intervals); *end to
end* is the first call's wall time.

The time-to-target target is then taken head to head: auto and its reference (pathwise on
the BLR, else the fastest fixed method to target in the rounds above) are called again,
``--head-to-head`` times each (:data:`HEAD_TO_HEAD_CALLS`), alone and in turn, and their
times come from these calls only (:func:`paired_times`). The reference was picked as the
fastest of many noisy timings, so its time in the rounds reads low (the winner's curse);
the rounds' ratio is reported beside it.

*Time to target*: the smoothed loss (a trailing mean over ``window`` steps) first at or
below the target, at step ``T``. A fixed estimator's time is its setup and wrap-up (the
call's seconds outside its compiled steps, less compile time: paid once, however soon the
target comes) plus ``T`` × its seconds per compiled step. Auto's is its own
run time up to step ``T``: its measurement runs at the decisions before ``T``, the
segments before ``T`` and the fraction of the one ``T`` falls in (each segment's wall time
less its compile time), and its setup. The target of BLR is the pathwise (default) run's
final smoothed loss plus ``tolerance``; of the mixture, the default combination's; of the
VAE the fixed 21.09.

How auto's time is split: the benchmark wraps the ``fit`` that the auto driver
(:func:`mcgrad.selection.run`) calls for each segment, so each segment's wall and compile
seconds are timed as it runs; what happens between segments (building each candidate's
trainer, the measurement scans, their compilation) is the measurement. ``mg.fit`` records
the decisions (``result.diagnostics.choices``), not the segments' times.

Run: ``python benchmarks/auto.py`` (about 10 minutes on 2 CPU cores; ``--quick`` for a
smoke run of seconds per model, ``--problems`` for a subset, ``--num-steps-*`` to
shorten). Writes ``benchmarks/results/auto.json`` and ``.md`` and
``docs/img/auto_choices.png`` (auto's decisions on the VAE); with ``--update-docs`` the
tables in ``docs/benchmarks.md``. With ``--quick``, another ``--output-dir`` or problems
without the VAE, everything goes to ``--output-dir``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax

import mcgrad as mg
from mcgrad import selection
from mcgrad.estimators.choice import CANDIDATES
from mcgrad.experiments import discrete_vae
from mcgrad.experiments.blr import load_breast_cancer
from mcgrad.programs import COMPILE_EVENTS, covered

sys.path.append(str(Path(__file__).parent))  # last: benchmarks/models.py must not hide the models package
from docs_tables import replace_table  # noqa: E402

RESULTS = Path(__file__).parent / "results"
FIGURE = Path(__file__).parent.parent / "docs" / "img" / "auto_choices.png"
PROBLEMS = ("blr", "vae", "mixture")

# The issue's targets.
TIME_RATIO = 1.1  # auto's time to target / the reference's (pathwise on BLR, the best fixed otherwise), at most
TIMING_CALLS = 7  # mg.fit calls per method (see the module docstring)
HEAD_TO_HEAD_CALLS = 8  # then auto and its reference alone, in turn, for the time-to-target target
OVERHEAD = 0.1  # auto's measurement run seconds / its segments' run seconds, at most


# --------------------------------------------------------------------------- models


def blr_model(features, labels):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([features.shape[1]]).to_event(1))
    numpyro.sample("y", dist.Bernoulli(logits=features @ w), obs=labels)


def blr_guide(features, labels):
    dim = features.shape[1]
    loc = numpyro.param("loc", jnp.zeros(dim))
    scale = numpyro.param("scale", jnp.ones(dim), constraint=dist.constraints.positive)
    numpyro.sample("w", dist.Normal(loc, scale).to_event(1))


def mixture_model(x):
    loc = numpyro.sample("loc", dist.Normal(0.0, 5.0))
    shift = numpyro.param("shift", 1.0, constraint=dist.constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Bernoulli(0.5))
        numpyro.sample("x", dist.Normal(loc + (2.0 * z - 1.0) * shift, 1.0), obs=x)


def mixture_guide(x):
    mean = numpyro.param("loc_mean", 0.0)
    scale = numpyro.param("loc_scale", 1.0, constraint=dist.constraints.positive)
    numpyro.sample("loc", dist.Normal(mean, scale))
    logits = numpyro.param("z_logits", jnp.zeros(x.shape[0]))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("z", dist.Bernoulli(logits=logits))


def mixture_data(key: jax.Array, num_data: int, loc: float = 1.0, shift: float = 2.0) -> jax.Array:
    """``num_data`` draws of the mixture: ``loc ± shift`` with equal odds, unit noise."""
    z = jax.random.bernoulli(key, 0.5, (num_data,))
    return loc + jnp.where(z, shift, -shift) + jax.random.normal(jax.random.fold_in(key, 1), (num_data,))


# --------------------------------------------------------------------------- problems


class Method(NamedTuple):
    """One way to fit a problem: ``mg.fit``'s ``estimators`` and ``objective``."""

    name: str
    estimators: Any  # None (mg.fit's default), "auto", or {site: estimator}
    objective: Any
    is_auto: bool = False
    is_default: bool = False


class Problem(NamedTuple):
    """A model, its data, the fit's settings, the methods and how its target is set.

    ``target`` is a fixed loss, or ``None`` for the ``reference`` method's final smoothed
    loss plus ``tolerance``. Losses are divided by ``loss_scale`` (the VAE: per image).
    """

    name: str
    title: str
    model: Callable
    guide: Callable
    args: tuple
    key: jax.Array
    num_steps: int
    optimizer: optax.GradientTransformation
    methods: list[Method]
    reference: str | None
    target: float | None
    tolerance: float
    loss_scale: float
    window: int
    settings: dict


def candidate(name: str, num_rows: int) -> mg.GradientEstimator:
    """The estimator auto runs as candidate ``name`` with ``num_rows`` particles."""
    return CANDIDATES[name](num_rows)


def auto_estimator(names: tuple[str, ...] | None, num_rows: int) -> mg.GradientEstimator:
    """``mg.auto()`` (``names=None``: the default candidates) or over ``names`` only."""
    candidates = None if names is None else {name: candidate(name, num_rows) for name in names}
    return mg.auto(candidates=candidates)


def window_for(num_steps: int) -> int:
    return max(1, min(100, num_steps // 20))


def blr_problem(*, num_steps: int, candidates: tuple[str, ...], restricted: bool, num_particles: int = 50,
                learning_rate: float = 0.01, tolerance: float = 0.1, seed: int = 0) -> Problem:
    data = load_breast_cancer()
    args = (jnp.asarray(data.features), jnp.asarray(data.labels))
    objective = mg.elbo(num_particles)
    methods = [Method("pathwise", None, objective, is_default=True)]
    methods += [Method(name, {"w": candidate(name, num_particles)}, objective)
                for name in candidates if name != "pathwise"]
    methods.append(Method("auto", {"w": auto_estimator(candidates if restricted else None, num_particles)}, objective,
                          is_auto=True))
    settings = {"num_steps": num_steps, "num_particles": num_particles, "learning_rate": learning_rate,
                "optimizer": "adam", "num_data": int(args[0].shape[0]), "dim": int(args[0].shape[1])}
    return Problem("blr", f"Bayesian logistic regression (breast cancer), mg.elbo({num_particles}), "
                   f"Adam {learning_rate:g}, {num_steps} steps", blr_model, blr_guide, args, jax.random.key(seed),
                   num_steps, optax.adam(learning_rate), methods, "pathwise", None, tolerance, 1.0,
                   window_for(num_steps), settings)


def vae_problem(*, num_steps: int, candidates: tuple[str, ...], restricted: bool, latent_dim: int = 16,
                hidden: int = 64, batch_size: int = 32, learning_rate: float = 1e-3, measure_valued_k1: bool = True,
                seed: int = 0) -> Problem:
    digits = discrete_vae.load_binarized_digits()
    key_init, key_train = jax.random.split(jax.random.key(seed), 5)[:2]  # as discrete_vae.run draws them
    vae = discrete_vae.make_discrete_vae(latent_dim, hidden, key_init)
    objective = mg.elbo(2)
    default = mg.estimators.choice.preferred(dist.Bernoulli(logits=jnp.zeros(latent_dim)), 2)
    methods = [Method(name, {"z": candidate(name, 2)} if name != default else None, objective,
                      is_default=name == default) for name in candidates]
    if measure_valued_k1:
        methods.append(Method("measure_valued, elbo(1)", {"z": mg.measure_valued()}, mg.elbo(1)))
    methods.append(Method("auto", {"z": auto_estimator(candidates if restricted else None, 2)}, objective,
                          is_auto=True))
    settings = {"num_steps": num_steps, "latent_dim": latent_dim, "hidden": hidden, "batch_size": batch_size,
                "learning_rate": learning_rate, "num_particles": 2,
                "decisions": mg.selection.decision_steps([None], num_steps),
                "num_train": int(digits.train.shape[0])}
    return Problem("vae", f"Discrete VAE ({latent_dim} Bernoulli latents, {hidden}-unit MLPs), mg.elbo(2), batch "
                   f"{batch_size}, Adam {learning_rate:g}, {num_steps} steps", vae.model, vae.guide,
                   (jnp.asarray(digits.train), batch_size), key_train, num_steps, optax.adam(learning_rate), methods,
                   None, discrete_vae.TARGET, 0.0, float(digits.train.shape[0]), window_for(num_steps), settings)


def mixture_problem(*, num_steps: int, loc_candidates: tuple[str, ...], z_candidates: tuple[str, ...],
                    restricted: bool, num_data: int = 500, num_particles: int = 4, learning_rate: float = 0.05,
                    tolerance: float = 0.1, seed: int = 0) -> Problem:
    x = mixture_data(jax.random.key(2024 + seed), num_data)
    objective = mg.elbo(num_particles)
    preferred = mg.estimators.choice.preferred
    # one label per slice of the data plate, read by nothing outside it: the default sums over it
    default_z = preferred(dist.Bernoulli(logits=jnp.zeros(num_data)), num_particles, one_per_slice=True)
    methods = []
    for loc_name in loc_candidates:
        for z_name in z_candidates:
            default = loc_name == preferred(dist.Normal(), num_particles) and z_name == default_z
            estimators = None if default else {"loc": candidate(loc_name, num_particles),
                                               "z": candidate(z_name, num_particles)}
            methods.append(Method(f"loc={loc_name}, z={z_name}", estimators, objective, is_default=default))
    methods.sort(key=lambda m: not m.is_default)  # the reference first
    if restricted:
        auto = {"loc": auto_estimator(loc_candidates, num_particles), "z": auto_estimator(z_candidates, num_particles)}
    else:
        auto = "auto"
    methods.append(Method("auto", auto, objective, is_auto=True))
    reference = next(m.name for m in methods if m.is_default)
    settings = {"num_steps": num_steps, "num_data": num_data, "num_particles": num_particles,
                "learning_rate": learning_rate, "true_loc": 1.0, "true_shift": 2.0, "data_key": 2024 + seed}
    return Problem("mixture", f"Mixture: continuous loc (Normal guide) + {num_data} Bernoulli labels, "
                   f"mg.elbo({num_particles}), Adam {learning_rate:g}, {num_steps} steps", mixture_model,
                   mixture_guide, (x,), jax.random.key(seed), num_steps, optax.adam(learning_rate), methods,
                   reference, None, tolerance, 1.0, window_for(num_steps), settings)


# --------------------------------------------------------------------------- timing


class Phases:
    """Wall and compile seconds of one ``mg.fit`` call, cut into phases as it runs.

    ``enter(phase, **info)`` closes the open phase and opens the next. A phase's
    ``compile_seconds`` is the time covered by JAX's trace, lower and compile events
    (``jax.monitoring``) and by trainer builds (:meth:`one_time`) while it is open: the
    union of their intervals, since a trace nests the traces of the jitted functions it
    calls (and a build traces) and their durations would count twice.
    """

    def __init__(self):
        self.rows: list[dict] = []
        self._open: dict | None = None
        self._intervals: list[tuple[float, float]] = []

    def listener(self, event: str, duration: float, **_):
        if self._open is not None and event in COMPILE_EVENTS:
            end = time.perf_counter()
            self._intervals.append((end - duration, end))

    def one_time(self, start: float, end: float):
        """A one-time interval that is not a JAX event (building a trainer: NumPyro traces
        the model and guide eagerly), counted with the compile seconds."""
        if self._open is not None:
            self._intervals.append((start, end))

    def current(self) -> str | None:
        return None if self._open is None else self._open["phase"]

    def enter(self, phase: str, **info):
        now = time.perf_counter()
        self.close(now)
        self._open = dict(phase=phase, start=now, **info)

    def close(self, now: float | None = None):
        if self._open is not None:
            now = now or time.perf_counter()
            start = self._open.pop("start")
            self._open["wall_seconds"] = now - start
            self._open["compile_seconds"] = covered(self._intervals, start, now)
            self.rows.append(self._open)
            self._open, self._intervals = None, []


@contextlib.contextmanager
def timed_phases():
    """Yields a :class:`Phases` that times the ``mg.fit`` calls inside the block: ``setup``
    (until the auto driver starts; a fixed fit is all setup), then for an auto fit
    ``measure`` (between segments: the decisions) and ``segment`` (each ``mg.fit`` the
    driver runs, with the choices it ran), and ``finish`` (after the last segment)."""
    phases = Phases()
    original = selection.run

    def auto_run(run, training, state, *args, **kwargs):
        sites = selection.auto_sites(training.estimators)
        phases.enter("measure", step=int(np.asarray(state.step)))

        def fit(*fit_args, **fit_kwargs):
            start = int(np.asarray(fit_kwargs["resume_from"].step))
            chosen = selection.choices_in(fit_kwargs["resume_from"].objective_state)
            phases.enter("segment", step=start, steps=fit_kwargs["num_steps"] - start,
                         choices={name: sites[name].names[index] for name, index in chosen.items()})
            result = run.fit(*fit_args, **fit_kwargs)
            jax.block_until_ready(result.state)
            phases.enter("measure", step=fit_kwargs["num_steps"])
            return result

        return original(run._replace(fit=fit), training, state, *args, **kwargs)

    fit_module = sys.modules["mcgrad.fit"]
    original_trainer = fit_module.trainer

    def timed_trainer(*args, **kwargs):
        start = time.perf_counter()
        built = original_trainer(*args, **kwargs)
        phases.one_time(start, time.perf_counter())
        return built

    original_replayed = fit_module._replayed

    def timed_replayed(*args, **kwargs):
        # A fixed fit's compiled steps (outside auto's segments, which are timed whole).
        if selection.SEGMENT.get() or phases.current() not in ("setup", "wrapup"):
            return original_replayed(*args, **kwargs)
        phases.enter("steps")
        try:
            return original_replayed(*args, **kwargs)
        finally:
            phases.enter("wrapup")

    jax.monitoring.register_event_duration_secs_listener(phases.listener)
    try:
        # mg.fit calls selection.run and trainer through their modules (fit hands auto its trainer).
        with (mock.patch.object(selection, "run", auto_run), mock.patch.object(fit_module, "trainer", timed_trainer),
              mock.patch.object(fit_module, "_replayed", timed_replayed)):
            yield phases
    finally:
        phases.close()
        jax.monitoring.unregister_event_duration_listener(phases.listener)
    if phases.rows and phases.rows[-1]["phase"] == "measure":  # after the last segment: no decision, the wrap-up
        phases.rows[-1]["phase"] = "finish"


def fit_once(problem: Problem, method: Method):
    """One ``mg.fit`` call as a user makes it (no progress bar), its phases timed."""
    with timed_phases() as phases:
        phases.enter("setup")
        result = mg.fit(problem.model, problem.guide, *problem.args, key=problem.key, num_steps=problem.num_steps,
                        optimizer=problem.optimizer, objective=method.objective, estimators=method.estimators,
                        progress_bar=False)
        jax.block_until_ready(result.state)
    if result.diagnostics.choices is not None:  # which of auto's stops between segments decided
        decided = set(result.diagnostics.choices["step"])
        for row in phases.rows:
            if row["phase"] == "measure":
                row["decided"] = row["step"] in decided
    return result, phases.rows


def run_seconds(row: dict) -> float:
    return row["wall_seconds"] - row["compile_seconds"]


def summarize_fixed(calls: list[list[dict]], num_steps: int) -> dict:
    """A fixed fit's phases: ``setup`` and ``wrapup`` (the call outside its compiled steps:
    one-time, whatever the steps) and ``steps``; each the smallest run seconds over the calls."""
    first = calls[0]

    def least(phases: tuple[str, ...]) -> float:
        return min(sum(run_seconds(row) for row in rows if row["phase"] in phases) for rows in calls)

    steps = least(("steps",))
    return {
        "end_to_end_seconds": sum(row["wall_seconds"] for row in first),
        "compile_seconds": sum(row["compile_seconds"] for row in first),
        "run_seconds": least(("setup", "steps", "wrapup")),
        "setup_run_seconds": least(("setup", "wrapup")),
        "seconds_per_step": steps / num_steps,  # the compiled steps alone
    }


def summarize_auto(calls: list[list[dict]], num_steps: int) -> dict:
    """Auto's phases, the first call's: per stop between segments (``decided`` or not), the
    smallest run seconds over the calls that stopped at the same step and decided alike;
    per segment, its steps at the lowest run seconds a step of the calls' segments that
    ran the same choices (the same compiled program, wherever it starts) over no more
    steps (a shorter segment carries more of a call's fixed cost a step, so its rate is
    not below a longer one's). A repeated call can decide elsewhere (the choices and the
    ledger rest on timings) and cut its segments elsewhere: matched by start and length,
    a segment the first call alone ran kept that call's time, with the first runs of
    programs just compiled in it (the BLR's first call ran 0-1000 at 0.285 ms a step where
    its repeats, cut at 500, ran the same program at 0.21)."""
    first = calls[0]

    def of(rows, phase):
        return [row for row in rows if row["phase"] == phase]

    def same_stop(a, b):
        return a["step"] == b["step"] and a.get("decided") == b.get("decided")

    def same_program(a, b):
        return a["choices"] == b["choices"] and b["steps"] <= a["steps"]

    measures = [{"step": row["step"], "decided": row.get("decided"),
                 "run_seconds": min(run_seconds(r) for rows in calls for r in of(rows, "measure") if same_stop(r, row)),
                 "compile_seconds": row["compile_seconds"], "wall_seconds": row["wall_seconds"]}
                for row in of(first, "measure")]
    segments = []
    for row in of(first, "segment"):
        same = [r for rows in calls for r in of(rows, "segment") if same_program(row, r)]
        rate = min(run_seconds(r) / r["steps"] for r in same)
        segments.append({"step": row["step"], "steps": row["steps"], "choices": row["choices"],
                         "run_seconds": rate * row["steps"], "compile_seconds": row["compile_seconds"],
                         "wall_seconds": row["wall_seconds"], "calls_timed": len(same)})
    setup_run = min(sum(run_seconds(r) for r in of(rows, "setup")) for rows in calls)
    measurement_run = sum(m["run_seconds"] for m in measures)
    segment_run = sum(s["run_seconds"] for s in segments)
    return {
        "end_to_end_seconds": sum(row["wall_seconds"] for row in first),
        "compile_seconds": sum(row["compile_seconds"] for row in first),
        "setup_compile_seconds": sum(row["compile_seconds"] for row in of(first, "setup")),
        "measurement_compile_seconds": sum(m["compile_seconds"] for m in measures),
        "segment_compile_seconds": sum(s["compile_seconds"] for s in segments),
        "setup_run_seconds": setup_run,
        "measurement_run_seconds": measurement_run,
        "segment_run_seconds": segment_run,
        "run_seconds": setup_run + measurement_run + segment_run,
        "seconds_per_step": segment_run / num_steps,  # the segments alone
        "overhead": measurement_run / segment_run if segment_run > 0 else math.nan,
        "decisions": measures,
        "segments": segments,
        # Decisions rest on measured seconds, so a repeated call can choose otherwise.
        "choices_per_call": [choice_runs(of(rows, "segment")) for rows in calls],
        "decided_per_call": [[row["step"] for row in of(rows, "measure") if row.get("decided")] for rows in calls],
    }


def choice_runs(segments: list[dict]) -> list[dict]:
    """The choices a call ran, from the step each began: consecutive segments of the same
    choices joined (a stop that kept the choice, or a boundary without a decision)."""
    runs: list[dict] = []
    for segment in segments:
        if not runs or runs[-1]["choices"] != segment["choices"]:
            runs.append({"step": segment["step"], "choices": segment["choices"]})
    return runs


def time_to_step(summary: dict, steps: int | None, num_steps: int, is_auto: bool) -> float:
    """Run seconds (compile excluded) until ``steps`` steps are done (NaN for ``None``)."""
    if steps is None:
        return math.nan
    if not is_auto:
        return summary["setup_run_seconds"] + summary["seconds_per_step"] * steps
    total = summary["setup_run_seconds"]
    total += sum(m["run_seconds"] for m in summary["decisions"] if m["step"] < steps)
    for segment in summary["segments"]:
        done = min(max(steps - segment["step"], 0), segment["steps"])
        total += segment["run_seconds"] * done / segment["steps"]
    return total


# --------------------------------------------------------------------------- one problem


def smooth(losses: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` finite losses (a skipped, non-finite step is
    left out; NaN where a window has none)."""
    losses = np.asarray(losses, np.float64)
    finite = np.isfinite(losses)
    sums = np.cumsum(np.insert(np.where(finite, losses, 0.0), 0, 0.0))
    counts = np.cumsum(np.insert(finite, 0, False).astype(np.int64))
    index = np.arange(1, len(losses) + 1)
    start = np.maximum(index - window, 0)
    number = counts[index] - counts[start]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(number > 0, (sums[index] - sums[start]) / np.maximum(number, 1), np.nan)


def run_problem(problem: Problem, timing_calls: int, repeat_limit: float, log: Callable[[str], None],
                head_to_head: int = HEAD_TO_HEAD_CALLS) -> dict:
    """Fit ``problem`` with each method; its table and auto's decisions.

    Every method's first call gives its trajectory, compile and end-to-end seconds; then
    ``timing_calls − 1`` rounds call every method again, interleaved (the order rotating
    each round, so load that comes and goes falls on all alike), except those whose first
    call ran longer than ``repeat_limit`` seconds (timed well enough once).
    """
    # Every method's programs stay compiled between its calls (mg.fit keeps 8 by default;
    # the mixture has 19 methods, and auto a program per choice).
    cache, limit = mg.fit.cache, mg.fit.cache.max_entries
    cache.clear()
    cache.max_entries = max(limit, 4 * len(problem.methods) + 16)
    try:
        return _run_problem(problem, timing_calls, repeat_limit, log, head_to_head)
    finally:
        cache.max_entries = limit
        cache.clear()


def _run_problem(problem: Problem, timing_calls: int, repeat_limit: float, log: Callable[[str], None],
                 head_to_head: int) -> dict:
    # First-use costs of the process and the model (imports, eager primitives): a 2-step fit.
    mg.fit(problem.model, problem.guide, *problem.args, key=problem.key, num_steps=2, optimizer=problem.optimizer,
           objective=problem.methods[0].objective, progress_bar=False)
    calls, results = {}, {}
    for method in problem.methods:
        results[method.name], phases = fit_once(problem, method)
        calls[method.name] = [phases]
        log(f"{problem.name} / {method.name}: {sum(p['wall_seconds'] for p in phases):.1f} s end to end, "
            f"{sum(p['compile_seconds'] for p in phases):.1f} s compiling")
    repeated = [m for m in problem.methods
                if sum(run_seconds(p) for p in calls[m.name][0]) <= repeat_limit]
    for round_index in range(1, timing_calls):
        shift = round_index % max(1, len(repeated))
        for method in repeated[shift:] + repeated[:shift]:
            calls[method.name].append(fit_once(problem, method)[1])
    rows, curves, choices = {}, {}, None
    for method in problem.methods:
        result = results[method.name]
        losses = np.asarray(result.losses, np.float64) / problem.loss_scale
        smoothed = smooth(losses, problem.window)
        summary = (summarize_auto if method.is_auto else summarize_fixed)(calls[method.name], problem.num_steps)
        rows[method.name] = dict(
            summary, estimators=describe(method), is_auto=method.is_auto, is_default=method.is_default,
            final_loss=float(smoothed[-1]), nonfinite_steps=int(np.sum(~np.isfinite(losses))),
            timing_calls=len(calls[method.name]), calls=calls[method.name],
        )
        curves[method.name] = smoothed
        if method.is_auto:
            choices = result.diagnostics.choices
    if problem.target is not None:
        target = problem.target
    else:
        target = curves[problem.reference][-1] + problem.tolerance
    for name, row in rows.items():
        steps = discrete_vae.steps_to_target(curves[name], target)
        row["steps_to_target"] = steps
        row["time_to_target_seconds"] = time_to_step(row, steps, problem.num_steps, row["is_auto"])
    reference = reference_of(problem.name, rows)
    paired = None
    if reference is not None and head_to_head > 0:
        paired = paired_times(problem, rows, reference, head_to_head)
        log(f"{problem.name}: auto / {reference} head to head: {paired['ratio']:.2f}")
    stride = max(1, problem.num_steps // 200)
    return {
        "title": problem.title,
        "settings": dict(problem.settings, window=problem.window, target=target, reference=problem.reference,
                         tolerance=problem.tolerance if problem.target is None else None,
                         timing_calls=timing_calls, head_to_head_calls=head_to_head,
                         repeat_limit_seconds=repeat_limit),
        "methods": rows,
        "targets": targets(problem.name, rows, paired),
        "choices": choices,
        "curves": {name: {"stride": stride, "smoothed": smoothed[stride - 1::stride]} for name, smoothed in curves.items()},
    }


def reference_of(problem: str, rows: dict) -> str | None:
    """The fixed method auto is held to: pathwise on the BLR, else the fastest to target."""
    if problem == "blr":
        return "pathwise"
    times = {name: row["time_to_target_seconds"] for name, row in rows.items() if not row["is_auto"]}
    reached = {name: t for name, t in times.items() if math.isfinite(t)}
    return min(reached, key=reached.get) if reached else None


def paired_times(problem: Problem, rows: dict, reference: str, calls: int) -> dict:
    """Auto and ``reference`` timed again, ``calls`` each, alone and in turn (the order
    alternating): their times to target from these calls only (the steps to target are
    the first calls').

    The reference was picked as the fastest of the methods' timings, so its time there is
    a minimum over noisy timings of several near-equal combinations and reads low (the
    winner's curse): on the mixture, six combinations reach the target in 1007–1061 steps
    at 0.052–0.076 ms a step from one run to the next, whichever caught the machine's fast
    phases (see the module docstring). Timed afresh, after it was picked, the reference
    carries no such selection."""
    methods = {method.name: method for method in problem.methods}
    auto = next(name for name, row in rows.items() if row["is_auto"])
    timed: dict[str, list] = {auto: [], reference: []}
    for index in range(calls):
        for name in ([auto, reference] if index % 2 == 0 else [reference, auto]):
            timed[name].append(fit_once(problem, methods[name])[1])
    seconds = {}
    for name, name_calls in timed.items():
        is_auto = rows[name]["is_auto"]
        summary = (summarize_auto if is_auto else summarize_fixed)(name_calls, problem.num_steps)
        seconds[name] = time_to_step(summary, rows[name]["steps_to_target"], problem.num_steps, is_auto)
        if is_auto:
            choices = summary["choices_per_call"]
    return {"reference": reference, "calls": calls, "auto_seconds": seconds[auto],
            "reference_seconds": seconds[reference], "ratio": time_ratio(seconds[auto], seconds[reference]),
            "auto_choices_per_call": choices}


def time_ratio(numerator: float | None, denominator: float | None) -> float:
    """``numerator / denominator`` of two times to target, ``None`` (never reached) as
    infinite: ``inf`` where only the numerator never got there, 0 where only the
    denominator did not, NaN where neither did."""
    numerator, denominator = (math.inf if t is None else t for t in (numerator, denominator))
    return math.nan if math.isinf(numerator) and math.isinf(denominator) else numerator / denominator


def describe(method: Method) -> str:
    objective = f"mg.{method.objective.name}({method.objective.num_particles})"
    if method.estimators is None:
        return f"mg.fit's default, {objective}"
    if method.estimators == "auto":
        return f'estimators="auto", {objective}'
    return ", ".join(f"{site}: {estimator.name}" for site, estimator in method.estimators.items()) + f", {objective}"


def targets(problem: str, rows: dict, paired: dict | None = None) -> dict:
    """The issue's targets for one problem: auto against its reference (from the
    head-to-head calls where there are any, :func:`paired_times`), its overhead, and the
    default against auto."""
    auto = next(row for row in rows.values() if row["is_auto"])
    default = next(name for name, row in rows.items() if row["is_default"])
    fixed = {name: row for name, row in rows.items() if not row["is_auto"]}
    reference = reference_of(problem, rows)
    out: dict = {}
    if reference is not None:
        rounds = time_ratio(auto["time_to_target_seconds"], fixed[reference]["time_to_target_seconds"])
        ratio = paired["ratio"] if paired is not None else rounds
        out["auto_time_ratio"] = {"reference": reference, "value": ratio, "target": TIME_RATIO,
                                  "met": bool(math.isfinite(ratio) and ratio <= TIME_RATIO),
                                  "all_methods_rounds_value": rounds, "head_to_head": paired}
        out["auto_end_to_end_ratio"] = {"reference": reference,
                                        "value": auto["end_to_end_seconds"] / fixed[reference]["end_to_end_seconds"]}
    out["overhead"] = {"value": auto["overhead"], "target": OVERHEAD, "met": bool(auto["overhead"] <= OVERHEAD),
                       "measurement_run_seconds": auto["measurement_run_seconds"],
                       "segment_run_seconds": auto["segment_run_seconds"],
                       "measurement_compile_seconds": auto["measurement_compile_seconds"],
                       "default_compile_seconds": fixed[default]["compile_seconds"]}
    d = fixed[default]
    out["default_vs_auto"] = {
        "default": default,
        "time_to_target_default_over_auto": time_ratio(d["time_to_target_seconds"], auto["time_to_target_seconds"]),
        "end_to_end_default_over_auto": d["end_to_end_seconds"] / auto["end_to_end_seconds"],
        "final_loss_default": d["final_loss"], "final_loss_auto": auto["final_loss"],
        "auto_better_time_to_target": bool(time_ratio(d["time_to_target_seconds"], auto["time_to_target_seconds"]) > 1),
        "auto_better_end_to_end": bool(auto["end_to_end_seconds"] < d["end_to_end_seconds"]),
    }
    return out


# --------------------------------------------------------------------------- report


def _number(value):
    """JSON-safe: NaN and inf as None, numpy scalars as Python numbers."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _number(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_number(v) for v in value]
    return value


def choices_records(choices) -> list[dict]:
    if choices is None:
        return []
    return [_number(row) for row in choices.to_dict(orient="records")]


def fmt(value, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def markdown(results: dict) -> str:
    lines = []
    for name, problem in results["problems"].items():
        settings = problem["settings"]
        target = settings["target"]
        if settings["reference"]:
            what = (f"the smoothed loss ≤ `{settings['reference']}`'s final smoothed loss + {settings['tolerance']:g} "
                    f"= {target:.3f}")
        else:
            what = f"the smoothed −ELBO per image ≤ {target:g}"
        lines += [
            f"### {problem['title']}",
            "",
            (f"Target: {what} (trailing mean over {settings['window']} steps). *Time to target*: run seconds "
            "until then, compile excluded: the call's setup and wrap-up, and its compiled steps until then (auto: "
            "its setup, its segments, and its measurements at the decisions before then); *ms/step*: the compiled "
            "steps alone (auto: its segments); *final*: the final smoothed loss."),
            "",
            "| method | final | steps to target | ms/step | time to target s | time / auto's | compile s | end to end s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        rows = problem["methods"]
        auto = next(row for row in rows.values() if row["is_auto"])
        ordered = sorted(rows.items(), key=lambda item: (not item[1]["is_auto"], item[1]["time_to_target_seconds"]
                                                         if item[1]["time_to_target_seconds"] is not None else math.inf))
        for method, row in ordered:
            label = f"**{method}**" if row["is_auto"] else method + (" (default)" if row["is_default"] else "")
            if row["nonfinite_steps"]:
                label += f" ({row['nonfinite_steps']} non-finite steps skipped)"
            ratio = (row["time_to_target_seconds"] / auto["time_to_target_seconds"]
                     if row["time_to_target_seconds"] and auto["time_to_target_seconds"] else None)
            lines.append(
                f"| {label} | {fmt(row['final_loss'], '.3f')} | {fmt(row['steps_to_target'], 'd')} "
                f"| {fmt(1e3 * row['seconds_per_step'], '.3f')} | {fmt(row['time_to_target_seconds'], '.2f')} "
                f"| {fmt(ratio, '.2f')} | {fmt(row['compile_seconds'], '.1f')} | {fmt(row['end_to_end_seconds'], '.1f')} |"
            )
        def ran(runs):
            return " → ".join(f"{r['step']}: " + ", ".join(f"{site}={c}" for site, c in r["choices"].items())
                              for r in runs)

        chosen = ran(auto["choices_per_call"][0])
        decided = ", ".join(str(step) for step in auto["decided_per_call"][0])
        others = [call for call in auto["choices_per_call"][1:] if call != auto["choices_per_call"][0]]
        if others:
            chosen += (f" (the {len(others)} of {len(auto['choices_per_call']) - 1} repeated calls that chose otherwise: "
                       + "; ".join(ran(call) for call in others) + ")")
        repeats = "; ".join(", ".join(str(step) for step in call) for call in auto["decided_per_call"][1:])
        lines += [
            "",
            (f"Auto (ms/step: its segments alone): ran {chosen}; decided at steps {decided}"
             + (f" (the repeated calls: {repeats})" if repeats else "") + ". Run: measurements "
            f"{fmt(auto['measurement_run_seconds'], '.3f')} s, segments {fmt(auto['segment_run_seconds'], '.3f')} s "
            f"(overhead {fmt(100 * auto['overhead'], '.1f')}%), setup {fmt(auto['setup_run_seconds'], '.3f')} s; "
            f"compile: measurements {fmt(auto['measurement_compile_seconds'], '.1f')} s, segments "
            f"{fmt(auto['segment_compile_seconds'], '.1f')} s, setup {fmt(auto['setup_compile_seconds'], '.1f')} s."),
            "",
        ]
    lines += ["### Targets", "", ("| model | auto time to target / reference, head to head (all methods' rounds) "
              "| target ≤ 1.1 | measurement run / segment run "
              "| target ≤ 10% | measurement compile s (default's whole compile s) |"), "|---|---|---|---|---|---|"]
    for name, problem in results["problems"].items():
        t = problem["targets"]
        ratio = t.get("auto_time_ratio", {})
        o = t["overhead"]
        lines.append(
            f"| {name} | {fmt(ratio.get('value'), '.2f')} ({fmt(ratio.get('all_methods_rounds_value'), '.2f')}) "
            f"vs `{ratio.get('reference')}` "
            f"| {'met' if ratio.get('met') else 'not met'} | {fmt(100 * o['value'] if o['value'] is not None else None, '.1f')}% "
            f"| {'met' if o['met'] else 'not met'} | {fmt(o['measurement_compile_seconds'], '.1f')} "
            f"({fmt(o['default_compile_seconds'], '.1f')}) |"
        )
    lines += ["", "### The default estimators against auto", "",
              "| model | default | time to target default / auto | end to end default / auto | final default | final auto |",
              "|---|---|---|---|---|---|"]
    for name, problem in results["problems"].items():
        d = problem["targets"]["default_vs_auto"]
        lines.append(
            f"| {name} | `{d['default']}` | {fmt(d['time_to_target_default_over_auto'], '.2f')} "
            f"| {fmt(d['end_to_end_default_over_auto'], '.2f')} | {fmt(d['final_loss_default'], '.3f')} "
            f"| {fmt(d['final_loss_auto'], '.3f')} |"
        )
    lines += ["", "Above 1: auto is faster. " + results["machine"]["note"]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main

FULL_CANDIDATES = {
    "blr": ("pathwise", "score_function_loo", "measure_valued"),
    "vae": ("disarm", "score_function_loo", "measure_valued", "double_control_variate", "rebar"),
    "loc": ("pathwise", "score_function_loo", "measure_valued"),
    "z": ("score_function_loo", "measure_valued", "disarm", "double_control_variate", "rebar", "enumerate"),
}
QUICK_CANDIDATES = {
    "blr": ("pathwise", "score_function_loo"),
    "vae": ("disarm", "score_function_loo"),
    "loc": ("pathwise", "score_function_loo"),
    "z": ("score_function_loo", "measure_valued"),
}


def build_problems(args) -> list[Problem]:
    quick = args.quick
    candidates = QUICK_CANDIDATES if quick else FULL_CANDIDATES
    steps = {
        "blr": args.num_steps_blr or (100 if quick else 2000),
        "vae": args.num_steps_vae or (200 if quick else 8000),
        "mixture": args.num_steps_mixture or (100 if quick else 2000),
    }
    builders = {
        "blr": lambda: blr_problem(num_steps=steps["blr"], candidates=candidates["blr"], restricted=quick,
                                   num_particles=10 if quick else 50, seed=args.seed),
        "vae": lambda: vae_problem(num_steps=steps["vae"], candidates=candidates["vae"], restricted=quick,
                                   latent_dim=4 if quick else 16, hidden=16 if quick else 64,
                                   measure_valued_k1=not quick, seed=args.seed),
        "mixture": lambda: mixture_problem(num_steps=steps["mixture"], loc_candidates=candidates["loc"],
                                           z_candidates=candidates["z"], restricted=quick,
                                           num_data=args.num_data_mixture or (50 if quick else 500),
                                           seed=args.seed),
    }
    return [builders[name]() for name in args.problems]


def commit() -> str | None:
    """The repository's commit (``+`` when mcgrad/ has uncommitted changes), if git says."""
    import subprocess

    root = Path(__file__).parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "mcgrad"], cwd=root, capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+" if dirty else "")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny models, two candidates per site, one call per method: a smoke run")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    parser.add_argument("--figure", type=Path, default=None,
                        help=f"auto's decisions on the VAE (default {FIGURE}; --quick, --output-dir or "
                             "--problems without vae: in --output-dir)")
    parser.add_argument("--problems", nargs="+", choices=PROBLEMS, default=list(PROBLEMS))
    parser.add_argument("--num-steps-blr", type=int, default=None, help="default 2000 (--quick 100)")
    parser.add_argument("--num-steps-vae", type=int, default=None, help="default 8000 (--quick 200)")
    parser.add_argument("--num-steps-mixture", type=int, default=None, help="default 2000 (--quick 100)")
    parser.add_argument("--num-data-mixture", type=int, default=None,
                        help="the mixture's data points (labels), default 500 (--quick 50)")
    parser.add_argument("--timing-calls", type=int, default=None,
                        help="mg.fit calls per method, interleaved; run times are the smallest (default 7, --quick 1)")
    parser.add_argument("--head-to-head", type=int, default=None,
                        help="then auto and its reference alone, in turn, this many calls each, for the "
                             f"time-to-target target (default {HEAD_TO_HEAD_CALLS}, --quick 1; 0: none)")
    parser.add_argument("--repeat-limit", type=float, default=15.0,
                        help="methods whose first call ran longer (seconds) are not called again")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--update-docs", action="store_true", help="also write the tables into docs/benchmarks.md")
    args = parser.parse_args(argv)
    timing_calls = args.timing_calls or (1 if args.quick else TIMING_CALLS)

    def log(line):
        print(line, file=sys.stderr, flush=True)

    start, load_start = time.perf_counter(), os.getloadavg()
    problems = {}
    for problem in build_problems(args):
        head_to_head = args.head_to_head if args.head_to_head is not None else (1 if args.quick else HEAD_TO_HEAD_CALLS)
        problems[problem.name] = run_problem(problem, timing_calls, args.repeat_limit, log, head_to_head)
    load_end = os.getloadavg()
    figure_choices = next((problems[name]["choices"] for name in ("vae", "mixture", "blr") if name in problems), None)
    results = {
        "problems": {
            name: dict(
                {k: v for k, v in problem.items() if k not in ("choices", "methods")},
                methods={method: {k: v for k, v in row.items() if k != "calls"} | {"calls": row["calls"]}
                         for method, row in problem["methods"].items()},
                choices=choices_records(problem["choices"]),
            )
            for name, problem in problems.items()
        },
        "seconds": time.perf_counter() - start,
        "quick": args.quick,
        "machine": {
            "platform": platform.platform(), "devices": [str(d) for d in jax.devices()], "jax": jax.__version__,
            "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "commit": commit(),
            "load_average_start": load_start[0], "load_average_end": load_end[0],
            "note": f"Load average {load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end "
                    f"({os.cpu_count()} cores, shared).",
        },
    }
    results = _number(results)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "auto.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    text = markdown(results)
    (args.output_dir / "auto.md").write_text(text, encoding="utf-8")
    if figure_choices is not None:
        # The docs' figure is the full run's VAE; a quick, partial or redirected run keeps its own.
        docs_figure = not args.quick and "vae" in problems and args.output_dir == RESULTS
        figure = args.figure or (FIGURE if docs_figure else args.output_dir / FIGURE.name)
        figure.parent.mkdir(parents=True, exist_ok=True)
        mg.plotting.choices_figure(figure_choices).savefig(figure, dpi=110)
        results["figure"] = str(figure)
    if args.update_docs:
        replace_table("auto", text)
    print(text)
    return results


if __name__ == "__main__":
    main()

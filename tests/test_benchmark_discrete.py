"""benchmarks/discrete.py (issue 10) in --quick mode, and the correctness of the
hand-written estimators it compares mcgrad against."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
import pytest

import mcgrad as mg
from mcgrad.experiments import discrete_vae as experiment

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def benchmark_module():
    spec = importlib.util.spec_from_file_location("benchmark_discrete", ROOT / "benchmarks" / "discrete.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_benchmark(benchmark_module, tmp_path):
    """One --quick run: the JSON, the markdown table and the figure."""
    results = benchmark_module.main(["--quick", "--output-dir", str(tmp_path)])
    data = json.loads((tmp_path / "discrete.json").read_text())
    assert data["quick"] is True and data["settings"]["num_steps"] == 200
    rows = {row["method"]: row for row in data["table"]}
    assert set(rows) == {*benchmark_module.QUICK_METHODS, "mcgrad_disarm_no_diagnostics"}
    for name, row in rows.items():
        assert row["ms/step"] > 0 and row["compile s"] > 0, name
        assert math.isfinite(row["final -ELBO"]) and 10 < row["IWAE-10 (test, -bound)"] < 60, name
        assert all(row[f"encoder variance @{step}"] > 0 for step in (0, 100, 200)), name
    # Timed without diagnostics, the same trajectory: the diagnostics draw keys of their own.
    assert rows["mcgrad_disarm_no_diagnostics"]["final -ELBO"] == rows["mcgrad_disarm"]["final -ELBO"]
    assert set(data["curves"]) == set(rows)
    assert "mcgrad_disarm_time_ratio" in data["targets"] and "numpyro_over_mcgrad_time" in data["targets"]
    text = (tmp_path / "discrete.md").read_text(encoding="utf-8")
    assert "| hand_disarm | 2 |" in text and "Targets:" in text and "× hand DisARM" in text
    # Over seeds: seed 0 is the timed run's seed, and its trajectories are reproduced exactly.
    seeds = data["over_seeds"]
    assert seeds["seeds"] == [0, 1]
    again = {row["method"]: row for row in seeds["runs"] if row["seed"] == 0}
    assert set(again) == {"hand_disarm", "mcgrad_disarm"}
    for name, row in again.items():
        assert row["final -ELBO"] == pytest.approx(rows[name]["final -ELBO"], rel=1e-6), name
    assert "Over 2 seeds" in text and "mcgrad_disarm_over_seeds" in seeds["targets"]
    png = Path(results["figure"])
    assert png.parent == tmp_path and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_targets_from_a_table(benchmark_module):
    """Ratios and verdicts from a made-up table; a method that never reaches the target
    bounds the speed-up from below by its whole run."""
    table = pd.DataFrame(
        {
            "method": ["hand_disarm", "mcgrad_disarm", "mcgrad_disarm_k4", "mcgrad_straight_through_gumbel",
                       "numpyro_tracegraph_k2"],
            "biased": [False, False, False, True, False],
            "final -ELBO": [20.5, 20.45, 20.3, 19.0, 23.0],
            "time to target s": [10.0, 11.0, 9.0, 1.0, np.nan],
            "ms/step": [1.0, 1.1, 1.5, 1.0, 4.0],
        }
    )
    checks = benchmark_module.targets(table, num_steps=8000)
    assert checks["mcgrad_disarm_time_ratio"]["value"] == pytest.approx(1.1)
    assert checks["mcgrad_disarm_time_ratio"]["met"] and checks["mcgrad_disarm_final_gap"]["met"]
    best = checks["best_unbiased_mcgrad"]
    assert best["method"] == "mcgrad_disarm_k4" and best["met"]  # the biased one is not a candidate
    numpyro = checks["numpyro_over_mcgrad_time"]
    assert numpyro["relation"] == "≥" and numpyro["value"] == pytest.approx(4.0 * 8000 / 1000 / 9.0)


def test_targets_over_seeds(benchmark_module):
    """Paired over seeds: a method's time ratio is its steps × its ms/step over hand DisARM's on
    the same seed; a win needs the mean plus two standard errors on the winning side."""
    runs = pd.DataFrame(
        {
            "method": ["hand_disarm"] * 3 + ["mcgrad_disarm"] * 3 + ["mcgrad_measure_valued"] * 3,
            "seed": [0, 1, 2] * 3,
            "steps to target": [1000, 1200, 1100, 1000, 1200, 1100, 800, 1000, np.nan],
            "final -ELBO": [20.0, 20.2, 20.1, 20.05, 20.2, 20.15, 19.5, 19.6, 19.7],
        }
    )
    table = pd.DataFrame({"method": ["hand_disarm", "mcgrad_disarm", "mcgrad_measure_valued"],
                          "ms/step": [1.0, 1.1, 1.0]})
    summary = {row["method"]: row for row in benchmark_module.seed_summary(runs, table)}
    mine = summary["mcgrad_disarm"]
    assert mine["time / hand"] == pytest.approx(1.1) and mine["time / hand SE"] == pytest.approx(0.0, abs=1e-12)
    assert mine["final - hand"] == pytest.approx(0.1 / 3)
    measure = summary["mcgrad_measure_valued"]
    assert measure["reached"] == 2 and measure["time / hand"] == pytest.approx((0.8 + 1000 / 1200) / 2)
    checks = benchmark_module.seed_targets(list(summary.values()))
    assert checks["mcgrad_disarm_over_seeds"]["met"]
    best = checks["best_unbiased_over_seeds"]
    assert best["method"] == "mcgrad_measure_valued" and best["beats_hand_final"]
    # Two seeds' ratios, 0.8 and 0.83: the mean is below 1 but so close together that
    # the SE is tiny: a win; widen their spread past the mean's distance from 1 and it is not.
    assert best["beats_hand_time"]
    runs.loc[(runs["method"] == "mcgrad_measure_valued") & (runs["seed"] == 1), "steps to target"] = 1500
    checks = benchmark_module.seed_targets(benchmark_module.seed_summary(runs, table))
    assert not checks["best_unbiased_over_seeds"]["beats_hand_time"]


def test_smoothing_and_steps_to_target():
    smoothed = experiment.smooth(np.array([4.0, 2.0, 0.0, 2.0]), window=2)
    np.testing.assert_allclose(smoothed, [4.0, 3.0, 1.0, 1.0])
    assert experiment.steps_to_target(smoothed, 1.0) == 3
    assert experiment.steps_to_target(smoothed, 0.5) is None


# --------------------------------------------------------------------------- correctness

LATENT_DIM, HIDDEN, BATCH, NUM_KEYS = 4, 8, 8, 2000


@pytest.fixture(scope="module")
def small_vae():
    vae = experiment.make_discrete_vae(LATENT_DIM, HIDDEN, jax.random.key(0))
    batch = jnp.asarray(experiment.load_binarized_digits().train[:BATCH])
    return vae, experiment.initial_params(vae), batch


def exact_gradient(params: dict, batch: jax.Array) -> dict:
    """``∇ Σ_i E_q[log q(z|x_i) − log p(z) − log p(x_i|z)]`` by summing over all ``2^L`` codes."""
    codes = jnp.asarray(list(itertools.product([0.0, 1.0], repeat=LATENT_DIM)))  # [2^L, L]

    def negative_elbo(params):
        logits = experiment.mlp(params["encoder$params"], batch)  # [B, L]
        z = jnp.broadcast_to(codes[:, None, :], (codes.shape[0], *logits.shape))
        log_q = experiment.log_bernoulli(z, logits)  # [2^L, B]
        return jnp.sum(jnp.exp(log_q) * experiment.negative_elbo_terms(params, batch, z, logits))

    return jax.grad(negative_elbo)(params)


def flat(tree) -> np.ndarray:
    leaves = jax.tree.leaves(tree)
    return np.concatenate([np.reshape(np.asarray(leaf), (leaf.shape[0], -1)) for leaf in leaves], axis=1)


def within_five_standard_errors(samples: np.ndarray, expected: np.ndarray) -> tuple[bool, float]:
    """Every coordinate's mean over the ``[R, P]`` samples within 5 SE of ``expected``."""
    mean = samples.mean(axis=0)
    standard_error = samples.std(axis=0, ddof=1) / math.sqrt(samples.shape[0])
    excess = np.abs(mean - expected) - 5 * standard_error
    return bool(np.all(excess <= 1e-5 * (1 + np.abs(expected)))), float(np.max(excess))


def test_hand_and_mcgrad_disarm_agree_with_the_exact_gradient(small_vae):
    """Both implementations of DisARM are unbiased: over 2000 keys each, every coordinate
    (encoder and decoder) of either mean is within 5 standard errors of the exact gradient
    (by enumeration over the 16 codes), and the two means within 5 SE of each other."""
    vae, params, batch = small_vae
    keys = jax.random.split(jax.random.key(1), NUM_KEYS)
    exact = flat(jax.tree.map(lambda leaf: leaf[None], exact_gradient(params, batch)))[0]

    hand = jax.jit(jax.vmap(lambda k: jax.grad(experiment.hand_disarm, has_aux=True)(params, k, batch, 1.0)[0]))
    training = mg.trainer(vae.model, vae.guide, batch, None, key=jax.random.key(0), objective=mg.elbo(2),
                          optimizer=optax.set_to_zero(), estimators={"z": mg.disarm()})
    state = training.init(jax.random.key(0))._replace(params=params)
    with jax.numpy_rank_promotion("allow"):
        mine = jax.jit(jax.vmap(lambda k: training.estimate(state, k, batch, None)[1]))
        hand_samples, mcgrad_samples = flat(hand(keys)), flat(mine(jax.random.split(jax.random.key(11), NUM_KEYS)))
    assert hand_samples.shape == mcgrad_samples.shape == (NUM_KEYS, exact.size)
    assert np.abs(exact).max() > 0.1  # not trivially zero
    for name, samples in (("hand", hand_samples), ("mcgrad", mcgrad_samples)):
        ok, worst = within_five_standard_errors(samples, exact)
        assert ok, f"{name} DisARM: a coordinate {worst:.3g} beyond 5 SE of the exact gradient"
    difference = hand_samples.mean(axis=0) - mcgrad_samples.mean(axis=0)
    standard_error = np.sqrt(hand_samples.var(axis=0, ddof=1) / NUM_KEYS + mcgrad_samples.var(axis=0, ddof=1) / NUM_KEYS)
    assert np.all(np.abs(difference) <= 5 * standard_error + 1e-5 * (1 + np.abs(exact)))
    # The same estimator: the encoder's variance is of the same size (the decoder's differs:
    # the hand-written one averages the pair's decoder gradients, mcgrad takes the draw's).
    # flat() orders the leaves by key, "decoder$params" before "encoder$params".
    num_encoder = sum(leaf.size for leaf in jax.tree.leaves(params["encoder$params"]))
    encoder = slice(exact.size - num_encoder, None)
    ratio = mcgrad_samples[:, encoder].var(axis=0).sum() / hand_samples[:, encoder].var(axis=0).sum()
    assert 0.8 < ratio < 1.25, ratio


def test_hand_reinforce_is_unbiased(small_vae):
    _, params, batch = small_vae
    keys = jax.random.split(jax.random.key(2), NUM_KEYS)
    exact = flat(jax.tree.map(lambda leaf: leaf[None], exact_gradient(params, batch)))[0]
    hand = jax.jit(jax.vmap(lambda k: jax.grad(experiment.hand_reinforce_loo, has_aux=True)(params, k, batch, 1.0)[0]))
    ok, worst = within_five_standard_errors(flat(hand(keys)), exact)
    assert ok, worst


def test_hand_measure_valued_is_unbiased_and_cheap_in_variance(small_vae):
    """The hand-written measure-valued estimator against the exact gradient (5 SE), and its
    encoder variance far below hand DisARM's at the same parameters."""
    _, params, batch = small_vae
    exact = flat(jax.tree.map(lambda leaf: leaf[None], exact_gradient(params, batch)))[0]

    def samples(estimator, key):
        grads = jax.jit(jax.vmap(lambda k: jax.grad(estimator, has_aux=True)(params, k, batch, 1.0)[0]))
        return flat(grads(jax.random.split(key, NUM_KEYS)))

    measure, disarm = samples(experiment.hand_measure_valued, jax.random.key(5)), samples(experiment.hand_disarm,
                                                                                         jax.random.key(6))
    ok, worst = within_five_standard_errors(measure, exact)
    assert ok, worst
    num_encoder = sum(leaf.size for leaf in jax.tree.leaves(params["encoder$params"]))
    encoder = slice(exact.size - num_encoder, None)
    assert measure[:, encoder].var(axis=0).sum() < 0.5 * disarm[:, encoder].var(axis=0).sum()


def test_hand_iwae_bound_matches_mcgrads(small_vae):
    """The benchmark scores every method with its own IWAE code: it agrees with
    mg.evaluation.iwae_bound on the same parameters (different draws: within 0.2 nats)."""
    vae, params, _ = small_vae
    test = jnp.asarray(experiment.load_binarized_digits().test)
    mine = experiment.iwae_bound(params, test, jax.random.key(3), num_samples=50)
    with jax.numpy_rank_promotion("allow"):
        reference = float(mg.evaluation.iwae_bound(vae.model, vae.guide, params, test, None, key=jax.random.key(4),
                                                   num_samples=50).mean)
    assert abs(mine - reference) < 0.2, (mine, reference)


def test_digits_are_the_zoos():
    from models import data

    split = data.binarized_digits()
    digits = experiment.load_binarized_digits()
    np.testing.assert_array_equal(digits.train, split.train)
    np.testing.assert_array_equal(digits.test, split.test)

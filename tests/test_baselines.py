"""Baselines: their arithmetic against numpy, their state, and the variance they remove.

Unbiasedness of the score function with every baseline, on every family, is in
tests/estimators/test_unbiased.py.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import pytest

import mcgrad as mg

baselines = mg.baselines
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@pytest.fixture(autouse=True)
def rank_promotion_raises():
    """mcgrad's own array code must not rely on implicit rank promotion."""
    with jax.numpy_rank_promotion("raise"):
        yield


SIGNAL = jnp.array([1.0, 3.0, -2.0, 6.0])


def context(scores=None):
    return baselines.BaselineContext(scores=lambda: scores, num_samples=SIGNAL.shape[0])


def test_none_and_constant():
    out, _ = baselines.none().update(SIGNAL, baselines.none().init(None), context())
    np.testing.assert_array_equal(out, SIGNAL)
    out, _ = baselines.constant(1.5).update(SIGNAL, (), context())
    np.testing.assert_allclose(out, np.asarray(SIGNAL) - 1.5)


def test_leave_one_out_matches_numpy():
    out, _ = baselines.leave_one_out().update(SIGNAL, (), context())
    s = np.asarray(SIGNAL, np.float64)
    expected = [s[i] - np.delete(s, i).mean() for i in range(s.size)]
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_leave_one_out_per_slice_signals():
    """A signal [N, M] (one column per plate slice) is centred column by column."""
    signal = jnp.arange(12.0).reshape(4, 3) ** 1.5
    out, _ = baselines.leave_one_out().update(signal, (), context())
    s = np.asarray(signal, np.float64)
    for j in range(3):
        expected = [s[i, j] - np.delete(s[:, j], i).mean() for i in range(4)]
        np.testing.assert_allclose(out[:, j], expected, rtol=1e-5)


def test_leave_one_out_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2 samples"):
        baselines.leave_one_out().update(jnp.ones(1), (), context())
    with pytest.raises(ValueError, match="at least 2 samples"):
        mg.grad(
            lambda x: x,
            lambda p: dist.Normal(p, 1.0),
            estimator=mg.score_function(baselines.leave_one_out()),
            num_samples=1,
        )(0.0, jax.random.key(0))


def test_moving_average_matches_a_bias_corrected_recursion():
    decay = 0.7
    baseline = baselines.moving_average(decay)
    state = baseline.init(None)
    average, rng = 0.0, np.random.default_rng(0)
    for step in range(5):
        signal = rng.normal(size=4) + 3.0
        out, state = baseline.update(jnp.asarray(signal, jnp.float32), state, context())
        b = 0.0 if step == 0 else average / (1 - decay**step)
        np.testing.assert_allclose(out, signal - b, rtol=1e-5, atol=1e-5)
        average = decay * average + (1 - decay) * signal.mean()
    assert int(state.count) == 5


def test_optimal_constant_matches_numpy():
    """b_{i,d} = Σ_{j≠i} f_j s_jd² / Σ_{j≠i} s_jd², per coordinate, for a pytree of scores."""
    rng = np.random.default_rng(1)
    scores = {
        "a": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32),
    }
    out, _ = baselines.optimal_constant().update(SIGNAL, (), context(scores))
    f = np.asarray(SIGNAL, np.float64)
    for name in ("a", "b"):
        s2 = np.asarray(scores[name], np.float64).reshape(4, -1) ** 2
        expected = np.empty_like(s2)
        for i in range(4):
            keep = np.arange(4) != i
            b = (f[keep, None] * s2[keep]).sum(0) / s2[keep].sum(0)
            expected[i] = f[i] - b
        np.testing.assert_allclose(np.asarray(out[name]).reshape(4, -1), expected, rtol=1e-5, atol=1e-6)


def test_learned_converges_to_the_mean_and_is_strongly_typed():
    baseline = baselines.learned(optax.sgd(0.5))
    state = baseline.init(None)
    # A weak-typed state would be retyped by the first update, so a jitted step would
    # retrace on its own output.
    assert not any(getattr(leaf, "weak_type", False) for leaf in jax.tree.leaves(state))
    update = jax.jit(baseline.update)
    for _ in range(30):
        new_out, new_state = update(jnp.array([3.0, 5.0]), state, None)
        assert jax.tree.structure(new_state) == jax.tree.structure(state)
        state = new_state
    assert update._cache_size() == 1
    assert float(state.params) == pytest.approx(4.0, abs=1e-4)
    np.testing.assert_allclose(new_out, [-1.0, 1.0], atol=1e-3)


def test_learned_with_a_baseline_network():
    """``baseline_fn`` maps its own parameters (a pytree) to b."""
    baseline = baselines.learned(
        optax.sgd(0.05), init_params={"w": 0.0, "c": 1.0}, baseline_fn=lambda p: p["w"] * 2.0 + p["c"]
    )
    state = baseline.init(None)
    for _ in range(60):
        _, state = baseline.update(jnp.array([6.0, 8.0]), state, None)
    assert float(state.params["w"] * 2.0 + state.params["c"]) == pytest.approx(7.0, abs=1e-3)


def test_chain_composes_in_order():
    chained = baselines.chain(baselines.constant(1.0), baselines.moving_average(0.5), baselines.leave_one_out())
    state = chained.init(None)
    assert isinstance(state, tuple) and len(state) == 3
    out, new_state = chained.update(SIGNAL, state, context())
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    expected, _ = baselines.leave_one_out().update(SIGNAL - 1.0, (), context())  # moving average is 0 at first
    np.testing.assert_allclose(out, expected, rtol=1e-6)


# ---- variance: baselines lower it where theory says they must. With an offset cost
# f = (x − k)² + 10, the signal's mean dominates; a baseline close to E f removes it.

NUM_REPEATS, NUM_SAMPLES = 3000, 16


def _repeated(dist_fn, cost, params):
    estimators = {
        "none": mg.score_function(),
        "leave_one_out": mg.score_function(baselines.leave_one_out()),
        "optimal_constant": mg.score_function(baselines.optimal_constant()),
    }

    def run(params, key):
        keys = jax.random.split(key, NUM_REPEATS)
        return {
            name: jax.vmap(
                lambda k, e=estimator: mg.grad(cost, dist_fn, estimator=e, num_samples=NUM_SAMPLES)(params, k)
            )(keys)
            for name, estimator in estimators.items()
        }

    return jax.jit(run, compiler_options=FAST_COMPILE)(params, jax.random.key(21))


def _variance_gap(higher, lower):
    """Var(higher) − Var(lower) and its SE, paired over repeats that share their samples."""
    a, b = (np.asarray(v, np.float64) for v in (higher, lower))
    d = (a - a.mean()) ** 2 - (b - b.mean()) ** 2
    return d.mean(), d.std(ddof=1) / math.sqrt(d.size)


@pytest.mark.parametrize(
    "family, dist_fn, cost, params",
    [
        (
            "normal",
            lambda p: dist.Normal(p["loc"], p["scale"]),
            lambda x: (x - 0.5) ** 2 + 10.0,
            {"loc": 1.0, "scale": 1.0},
        ),
        ("bernoulli", lambda p: dist.Bernoulli(logits=p["logits"]), lambda x: 3.0 * x + 10.0, {"logits": 0.4}),
    ],
)
def test_leave_one_out_and_optimal_constant_lower_the_variance(family, dist_fn, cost, params):
    estimates = _repeated(dist_fn, cost, jax.tree.map(jnp.float32, params))
    for name in ("leave_one_out", "optimal_constant"):
        for leaf in params:
            gap, se = _variance_gap(estimates["none"][leaf], estimates[name][leaf])
            assert gap > 5 * se, (family, name, leaf, gap, se)

"""Property tests: unbiasedness on a Normal with a quadratic cost at random parameters.

For f(x) = (x − k)², x ~ N(μ, σ²): ∂μ E f = 2(μ − k), ∂σ E f = 2σ (REFERENCE.md). Each
estimator is compiled once with (μ, σ, k) as traced arguments, so hypothesis' examples
cost a run each, not a compilation. The key is fixed; the SE comes from the i.i.d.
per-sample gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mcgrad as mg

from .problems import FAST_COMPILE, assert_within_se

NUM_SAMPLES = 20_000

ESTIMATORS = {
    "pathwise": mg.pathwise(),
    "score_function": mg.score_function(),
    "measure_valued": mg.measure_valued(),
    "measure_valued-uncoupled": mg.measure_valued(coupling=False),
}


def _make(estimator):
    def run(loc, scale, k, key):
        grads = mg.per_sample_grads(
            lambda x: (x - k) ** 2,
            lambda p: dist.Normal(p["loc"], p["scale"]),
            estimator=estimator,
            num_samples=NUM_SAMPLES,
        )({"loc": loc, "scale": scale}, key)
        return jax.tree.map(lambda g: (jnp.mean(g), jnp.std(g, ddof=1) / np.sqrt(NUM_SAMPLES)), grads)

    return jax.jit(run, compiler_options=FAST_COMPILE)


COMPILED = {name: _make(estimator) for name, estimator in ESTIMATORS.items()}


@pytest.mark.parametrize("name", list(ESTIMATORS))
@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    loc=st.floats(-3.0, 3.0),
    scale=st.floats(0.2, 3.0),
    k=st.floats(-3.0, 3.0),
)
def test_normal_quadratic_unbiased(name, loc, scale, k):
    out = COMPILED[name](jnp.float32(loc), jnp.float32(scale), jnp.float32(k), jax.random.key(3))
    mean = {p: float(m) for p, (m, _) in out.items()}
    se = {p: float(s) for p, (_, s) in out.items()}
    exact = {"loc": 2.0 * (np.float32(loc) - np.float32(k)), "scale": 2.0 * np.float32(scale)}
    assert_within_se(mean, se, exact, f"{name} at loc={loc}, scale={scale}, k={k}: ")


@settings(max_examples=10, deadline=None, derandomize=True)
@given(rate=st.floats(0.2, 8.0), k=st.integers(-2, 6))
def test_poisson_quadratic_score_and_measure_valued(rate, k):
    """Discrete: E(x − k)² = λ + (λ − k)², so ∂λ = 1 + 2(λ − k)."""
    out = _POISSON(jnp.float32(rate), jnp.float32(k), jax.random.key(5))
    exact = 1.0 + 2.0 * (np.float32(rate) - k)
    for name, (mean, se) in out.items():
        assert_within_se(float(mean), float(se), exact, f"{name} at rate={rate}, k={k}: ")


def _poisson(rate, k, key):
    out = {}
    for name, estimator in (("score_function", mg.score_function()), ("measure_valued", mg.measure_valued())):
        g = mg.per_sample_grads(
            lambda x: (x - k) ** 2, lambda r: dist.Poisson(r), estimator=estimator, num_samples=NUM_SAMPLES
        )(rate, key)
        out[name] = (jnp.mean(g), jnp.std(g, ddof=1) / np.sqrt(NUM_SAMPLES))
    return out


_POISSON = jax.jit(_poisson, compiler_options=FAST_COMPILE)

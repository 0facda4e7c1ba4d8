"""Control variates: the delta method's exact expectation, zero residual variance on
quadratic costs, the full-covariance path, and clear errors.

Unbiasedness of ``with_control_variate(delta_method())`` around the score function and
pathwise on every family is in tests/estimators/test_unbiased.py.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import mcgrad as mg

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@pytest.fixture(autouse=True)
def rank_promotion_raises():
    """mcgrad's own array code must not rely on implicit rank promotion (NumPyro's
    multivariate sampling does: those calls opt out with ``allow``)."""
    with jax.numpy_rank_promotion("raise"):
        yield


def allow():
    return jax.numpy_rank_promotion("allow")


def test_order_must_be_one_or_two():
    with pytest.raises(ValueError, match="must be 1 or 2, got 3"):
        mg.delta_method(order=3)


def test_optimal_coefficient_needs_three_samples():
    estimator = mg.with_control_variate(mg.score_function(), mg.delta_method())
    with pytest.raises(ValueError, match="num_samples >= 3"):
        mg.grad(lambda x: x**2, lambda p: dist.Normal(p, 1.0), estimator=estimator, num_samples=2)(
            0.0, jax.random.key(0)
        )


def test_correlated_coordinates_are_refused():
    """Dirichlet coordinates are correlated and it has no covariance_matrix: E[h] from the
    variances alone would be wrong for a cost with cross terms (x₀·x₁), so it is an error
    rather than a silently biased gradient."""
    estimator = mg.with_control_variate(mg.pathwise(), mg.delta_method())
    fn = mg.grad(lambda x: x[0] * x[1], lambda p: dist.Dirichlet(p), estimator=estimator, num_samples=8)
    with pytest.raises(ValueError, match=r"needs the covariance .* Dirichlet has correlated coordinates"):
        with allow():
            fn(jnp.array([1.5, 2.0, 3.0]), jax.random.key(0))


# ---- the control variate itself: h = f and E[h] = E f exactly for a quadratic f

A = np.array([[1.0, 0.4, 0.0], [-0.3, 2.0, 0.5], [0.2, 0.0, 0.5]])
B = np.array([0.5, -1.0, 0.3])


def quadratic(x):
    return x @ jnp.asarray(A, jnp.float32) @ x + jnp.asarray(B, jnp.float32) @ x


def quadratic_exact(loc, cov):
    """E[xᵀAx + bᵀx] for mean ``loc`` and covariance ``cov`` (float64)."""
    return loc @ A @ loc + np.trace(A @ cov) + B @ loc


def _site(dist_fn, params, num_samples=2):
    with jax.numpy_rank_promotion("allow"):  # NumPyro's own sampling broadcasts
        return mg.problem_site(mg.Problem(quadratic, dist_fn, num_samples), params, jax.random.key(0))[0]


def test_delta_method_expectation_is_exact_for_a_quadratic():
    loc, scale = np.array([0.3, -0.5, 1.0]), np.array([1.2, 0.7, 0.5])

    def normal(p):
        return dist.Normal(p["loc"], p["scale"]).to_event(1)

    params = {"loc": jnp.asarray(loc, jnp.float32), "scale": jnp.asarray(scale, jnp.float32)}
    site = _site(normal, params)
    h, expected_h = mg.delta_method().build(site)
    exact = quadratic_exact(loc, np.diag(scale**2))
    assert np.asarray(expected_h(params)) == pytest.approx([exact, exact], rel=1e-5)  # one per row
    # at another distribution (the gradient is taken there): still exact
    loc2, scale2 = loc + 0.3, scale * 1.5
    moved = {"loc": jnp.asarray(loc2, jnp.float32), "scale": jnp.asarray(scale2, jnp.float32)}
    assert float(expected_h(moved)[0]) == pytest.approx(quadratic_exact(loc2, np.diag(scale2**2)), rel=1e-5)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3)), jnp.float32)
    assert np.asarray(h(x)) == pytest.approx(np.asarray(jax.vmap(quadratic)(x)), rel=1e-5, abs=1e-5)

    tril = np.array([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [-0.2, 0.3, 0.5]])

    def mvn(p):
        return dist.MultivariateNormal(p["loc"], scale_tril=p["tril"])

    mvn_params = {"loc": jnp.asarray(loc, jnp.float32), "tril": jnp.asarray(tril, jnp.float32)}
    _, expected_h = mg.delta_method().build(_site(mvn, mvn_params))
    assert float(expected_h(mvn_params)[0]) == pytest.approx(quadratic_exact(loc, tril @ tril.T), rel=1e-5)


def _tril(v):
    return jnp.array([[jnp.exp(v[0]), 0.0, 0.0], [v[1], jnp.exp(v[2]), 0.0], [v[3], v[4], jnp.exp(v[5])]])


def _tril_np(v):
    return np.array([[np.exp(v[0]), 0.0, 0.0], [v[1], np.exp(v[2]), 0.0], [v[3], v[4], np.exp(v[5])]])


PROBLEMS = {
    "normal": (
        lambda p: dist.Normal(p["loc"], p["scale"]),
        lambda x: (x - 0.5) ** 2,
        {"loc": 1.0, "scale": 1.5},
        lambda p: {"loc": 2 * (p["loc"] - 0.5), "scale": 2 * p["scale"]},
    ),
    "normal_to_event": (
        lambda p: dist.Normal(p["loc"], p["scale"]).to_event(1),
        quadratic,
        {"loc": np.array([0.3, -0.5, 1.0]), "scale": np.array([1.2, 0.7, 0.5])},
        lambda p: {"loc": (A + A.T) @ p["loc"] + B, "scale": 2 * np.diag(A) * p["scale"]},
    ),
    "multivariate_normal": (
        lambda p: dist.MultivariateNormal(p["loc"], scale_tril=_tril(p["l"])),
        quadratic,
        {"loc": np.array([0.3, -0.5, 1.0]), "l": np.array([0.1, 0.6, -0.2, -0.2, 0.3, -0.7])},
        None,  # finite differences of quadratic_exact
    ),
}


def _exact_gradient(name, params):
    exact = PROBLEMS[name][3]
    if exact is not None:
        return exact(params)
    grads = {"loc": np.zeros(3), "l": np.zeros(6)}
    for leaf in grads:
        for i in range(params[leaf].size):

            def at(step, leaf=leaf, i=i):
                p = {k: v.copy() for k, v in params.items()}
                p[leaf][i] += step
                return quadratic_exact(p["loc"], _tril_np(p["l"]) @ _tril_np(p["l"]).T)

            grads[leaf][i] = (at(1e-5) - at(-1e-5)) / 2e-5
    return grads


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_quadratic_cost_has_zero_residual_variance(name):
    """h = f for a quadratic, so every per-sample gradient is the exact gradient (the
    coefficient, optimal or 1, is 1): the residual variance is zero up to float32."""
    dist_fn, cost, params, _ = PROBLEMS[name]
    params = {k: np.asarray(v, np.float64) for k, v in params.items()}
    estimators = {
        "score_function": mg.score_function(),
        "score_function+cv": mg.with_control_variate(mg.score_function(), mg.delta_method()),
        "score_function+cv(1.0)": mg.with_control_variate(mg.score_function(), mg.delta_method(), 1.0),
        "pathwise": mg.pathwise(),
        "pathwise+cv": mg.with_control_variate(mg.pathwise(), mg.delta_method()),
    }

    def run(params, key):
        return {
            label: mg.per_sample_grads(cost, dist_fn, estimator=estimator, num_samples=2000)(params, key)
            for label, estimator in estimators.items()
        }

    with allow():  # NumPyro's batched / multivariate sampling
        out = jax.jit(run, compiler_options=FAST_COMPILE)(jax.tree.map(jnp.float32, params), jax.random.key(3))
    exact = _exact_gradient(name, params)
    for plain, wrapped in (("score_function", "score_function+cv"), ("score_function", "score_function+cv(1.0)"),
                           ("pathwise", "pathwise+cv")):  # fmt: skip
        for leaf in params:
            g = np.asarray(out[wrapped][leaf], np.float64)
            spread = np.asarray(out[plain][leaf], np.float64).std(axis=0)
            assert np.all(g.std(axis=0) < 1e-4 * (1.0 + spread)), (wrapped, leaf, g.std(axis=0), spread)
            np.testing.assert_allclose(
                g.mean(axis=0), exact[leaf], rtol=1e-4, atol=1e-4 * (1 + np.abs(exact[leaf]).max())
            )


def test_order_one_on_a_linear_cost_has_zero_residual_variance():
    estimator = mg.with_control_variate(mg.score_function(), mg.delta_method(order=1))
    g = jax.jit(
        mg.per_sample_grads(
            lambda x: 3.0 * x - 1.0, lambda p: dist.Normal(p, 0.7), estimator=estimator, num_samples=500
        )
    )(jnp.float32(0.4), jax.random.key(0))
    np.testing.assert_allclose(g, 3.0, rtol=1e-4)


# ---- a non-quadratic cost: unbiased through the full-covariance path, and less variance


def _cos_cross_exact(params):
    """E[cos x₀ + x₀x₁] = cos μ₀ e^{−Σ₀₀/2} + Σ₀₁ + μ₀μ₁ under MVN(μ, LLᵀ); ∇ by differences."""

    def value(p):
        cov = _tril_np(p["l"]) @ _tril_np(p["l"]).T
        return math.cos(p["loc"][0]) * math.exp(-cov[0, 0] / 2) + cov[0, 1] + p["loc"][0] * p["loc"][1]

    grads = {}
    for leaf in params:
        grads[leaf] = np.zeros_like(params[leaf])
        for i in range(params[leaf].size):
            up = {k: v.copy() for k, v in params.items()}
            down = {k: v.copy() for k, v in params.items()}
            up[leaf][i] += 1e-5
            down[leaf][i] -= 1e-5
            grads[leaf][i] = (value(up) - value(down)) / 2e-5
    return grads


def test_multivariate_normal_non_quadratic_unbiased_and_lower_variance():
    dist_fn = PROBLEMS["multivariate_normal"][0]
    params = {k: np.asarray(v, np.float64) for k, v in PROBLEMS["multivariate_normal"][2].items()}

    def cost(x):
        return jnp.cos(x[0]) + x[0] * x[1]

    num_repeats, num_samples = 400, 32
    estimators = {
        "score_function": mg.score_function(),
        "score_function+cv": mg.with_control_variate(mg.score_function(), mg.delta_method()),
        "pathwise+cv": mg.with_control_variate(mg.pathwise(), mg.delta_method()),
    }

    def run(params, key):
        keys = jax.random.split(key, num_repeats)
        return {
            label: jax.vmap(lambda k, e=e: mg.grad(cost, dist_fn, estimator=e, num_samples=num_samples)(params, k))(
                keys
            )
            for label, e in estimators.items()
        }

    with allow():
        out = jax.jit(run, compiler_options=FAST_COMPILE)(jax.tree.map(jnp.float32, params), jax.random.key(9))
    exact = _cos_cross_exact(params)
    for label in ("score_function+cv", "pathwise+cv"):
        for leaf in params:
            g = np.asarray(out[label][leaf], np.float64)
            se = g.std(axis=0, ddof=1) / math.sqrt(num_repeats)
            assert np.all(np.abs(g.mean(axis=0) - exact[leaf]) < 5 * se + 1e-5), (
                label,
                leaf,
                g.mean(0),
                exact[leaf],
                se,
            )
    for leaf in params:  # the delta method removes most of the score function's variance
        plain = np.asarray(out["score_function"][leaf]).var(axis=0)
        wrapped = np.asarray(out["score_function+cv"][leaf]).var(axis=0)
        assert np.all(wrapped < 0.5 * plain), (leaf, wrapped, plain)

"""Discrete estimators (ARM, DisARM, enumeration, Gumbel) against exact enumeration.

Exact answers: ``E[f(b)]`` summed over every configuration of the site, differentiated by
autodiff. Unbiased estimators must agree within 5 standard errors (from independent
repeated estimates at fixed keys); enumeration must agree to rounding; the toy problem's
per-coordinate variances must match the closed forms in REFERENCE.md.
"""

import itertools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from hypothesis import given, settings

import mcgrad as mg

NUM_REPEATS, NUM_SAMPLES = 4000, 2


def cost(b):
    """A cost that couples the coordinates nonlinearly (no estimator gets it for free)."""
    b = jnp.ravel(b).astype(jnp.float32)
    weights = jnp.arange(1, b.size + 1, dtype=jnp.float32) * 0.7
    return jnp.sin(jnp.dot(weights, b)) + (jnp.sum(b) - 0.8) ** 2


def exact_gradient(dist_fn, params, support, shape):
    """∇ E[cost] by summing over every configuration of a draw of ``shape``."""
    configurations = jnp.asarray(list(itertools.product(support, repeat=int(np.prod(shape)))))
    configurations = jnp.reshape(configurations, (-1,) + shape)

    def expectation(p):
        d = dist_fn(p)
        log_probs = jax.vmap(lambda v: jnp.sum(mg.log_prob(d, v)))(configurations)  # NumPyro's is wrong at logit 0
        return jnp.sum(jnp.exp(log_probs) * jax.vmap(cost)(configurations))

    return jax.grad(expectation)(params)


BERNOULLI = {
    "logits_zero": (lambda p: dist.Bernoulli(logits=p), jnp.zeros(1), (1,)),
    "logits_batch": (lambda p: dist.Bernoulli(logits=p), jnp.array([2.0, -2.0]), (2,)),
    "logits_event": (lambda p: dist.Bernoulli(logits=p).to_event(1), jnp.array([0.0, 2.0, -2.0]), (3,)),
    "logits_expand": (lambda p: dist.Bernoulli(logits=p).expand([2, 2]).to_event(1), jnp.array(0.5), (2, 2)),
    "probs_event": (lambda p: dist.Bernoulli(probs=p).to_event(1), jnp.array([0.3, 0.8]), (2,)),
}
CATEGORICAL = {
    "categorical_logits": (lambda p: dist.Categorical(logits=p), jnp.array([0.0, 2.0, -2.0]), ()),
    "categorical_batch": (
        lambda p: dist.Categorical(logits=p).to_event(1),
        jnp.array([[0.0, 2.0, -2.0], [1.0, -1.0, 0.5]]),
        (2,),
    ),
}
UNBIASED = {
    "arm": mg.arm,
    "disarm": mg.disarm,
    "enumerate": mg.enumerate,
    "score_function_loo": lambda: mg.score_function(baseline=mg.baselines.leave_one_out()),
    "measure_valued": mg.measure_valued,
    "rebar": mg.rebar,
    "double_control_variate": lambda: mg.double_control_variate(alpha=0.7),
    "relax": lambda: mg.relax(lambda w, z: w[0] * jnp.sum(jnp.tanh(z)) + w[1] * jnp.sum(z**2), jnp.array([0.3, -0.1])),
}
FOR_CATEGORICAL = ("arm", "disarm", "enumerate", "score_function_loo", "measure_valued")


def repeated_estimates(estimator, dist_fn, params, key, num_repeats=NUM_REPEATS, num_samples=NUM_SAMPLES):
    grad = mg.grad(cost, dist_fn, estimator=estimator, num_samples=num_samples)
    with jax.numpy_rank_promotion("allow"):  # NumPyro's own samplers broadcast batch shapes
        return jax.jit(jax.vmap(lambda k: grad(params, k)))(jax.random.split(key, num_repeats))


def assert_unbiased(estimates, exact, label):
    mean = np.mean(estimates, axis=0)
    se = np.std(estimates, axis=0) / np.sqrt(len(estimates))
    rounding = 1e-5 * np.maximum(1.0, np.abs(exact))  # float32 sums (enumeration has no other error)
    assert np.all(np.abs(mean - exact) < 5 * se + rounding), f"{label}: {mean} vs exact {exact} (SE {se})"


CASES = [(name, problem) for name in UNBIASED for problem in BERNOULLI] + [
    (name, problem) for name in FOR_CATEGORICAL for problem in CATEGORICAL
]


@pytest.mark.parametrize(("estimator", "problem"), CASES, ids=[f"{e}-{p}" for e, p in CASES])
def test_unbiased_against_enumeration(estimator, problem):
    dist_fn, params, shape = {**BERNOULLI, **CATEGORICAL}[problem]
    support = (0, 1) if problem in BERNOULLI else tuple(range(params.shape[-1]))
    exact = exact_gradient(dist_fn, params, support, shape)
    estimates = repeated_estimates(UNBIASED[estimator](), dist_fn, params, jax.random.key(10))
    assert_unbiased(estimates, exact, f"{estimator} on {problem}")


@settings(max_examples=8, deadline=None, derandomize=True)
@given(logits=st.lists(st.floats(-3.0, 3.0), min_size=3, max_size=3))
def test_antithetic_estimators_unbiased_for_random_logits(logits):
    params = jnp.asarray(logits, dtype=jnp.float32)
    dist_fn = BERNOULLI["logits_event"][0]
    exact = exact_gradient(dist_fn, params, (0, 1), (3,))
    for name in ("arm", "disarm"):
        with jax.numpy_rank_promotion("allow"):
            estimates = _compiled_antithetic[name](params, jax.random.key(3))
        assert_unbiased(estimates, exact, f"{name} at logits {logits}")


_compiled_antithetic = {
    name: jax.jit(
        lambda p, key, name=name: jax.vmap(
            lambda k: mg.grad(cost, BERNOULLI["logits_event"][0], estimator=UNBIASED[name](), num_samples=2)(p, k)
        )(jax.random.split(key, NUM_REPEATS))
    )
    for name in ("arm", "disarm")
}


# --------------------------------------------------------------------------- the toy problem


def toy_variance(estimator, t, num_samples, num_repeats=200_000):
    """Variance of one estimate (``num_samples`` samples or pairs) of ∂/∂φ E[(b − t)²] at φ = 0,
    and the standard error of that variance (from the fourth central moment)."""
    estimates = repeated_estimates(
        estimator, lambda p: dist.Bernoulli(logits=p), jnp.zeros(1), jax.random.key(7), num_repeats, num_samples
    )
    return _variance_and_se(np.asarray(estimates[:, 0], dtype=np.float64))


def _variance_and_se(x):
    centred = x - x.mean()
    variance = np.mean(centred**2)
    return variance, np.sqrt(max(np.mean(centred**4) - variance**2, 0.0) / len(x))


@pytest.mark.parametrize(
    ("name", "estimator", "num_samples", "t", "exact"),
    [
        ("score_function, 1 sample", mg.score_function, 1, 0.499, 1.5625e-2),
        ("leave-one-out, 2 samples", lambda: mg.score_function(mg.baselines.leave_one_out()), 2, 0.499, 2.5e-7),
        ("ARM, 1 pair", mg.arm, 2, 0.499, 8.3e-8),
        ("ARM, 1 pair, t = 0.45", mg.arm, 2, 0.45, 2.08e-4),
        ("leave-one-out, t = 0.45", lambda: mg.score_function(mg.baselines.leave_one_out()), 2, 0.45, 6.25e-4),
    ],
)
def test_toy_problem_variances_match_reference(name, estimator, num_samples, t, exact):
    global cost
    saved = cost
    cost = lambda b: jnp.sum((b - t) ** 2)  # noqa: E731
    try:
        variance, se = toy_variance(estimator(), t, num_samples)
    finally:
        cost = saved
    # REFERENCE.md gives 2–3 significant digits: the tolerance is 5 SE plus that rounding.
    assert abs(variance - exact) < 5 * se + 0.005 * exact, f"{name}: {variance:.4g} vs {exact:.4g} (SE {se:.2g})"


@pytest.mark.parametrize("t", [0.499, 0.45])
def test_disarm_has_zero_variance_on_the_one_coordinate_toy(t):
    g = mg.per_sample_grads(
        lambda b: jnp.sum((b - t) ** 2), lambda p: dist.Bernoulli(logits=p), estimator=mg.disarm(), num_samples=1000
    )(jnp.zeros(1), jax.random.key(0))
    np.testing.assert_allclose(g, (1 - 2 * t) * 0.25, rtol=1e-5)


def variance_before_and_after_training(estimator, f, num_samples, num_steps=200):
    """Total variance of the estimate at fixed logits ``[0, 2]`` with the estimator's initial
    state and after ``num_steps`` estimates have trained its state; and that state."""
    bernoulli = lambda p: dist.Bernoulli(logits=p)  # noqa: E731
    params = jnp.array([0.0, 2.0])
    step = jax.jit(mg.estimate(f, bernoulli, estimator=estimator, num_samples=num_samples))

    def variance(state):
        grads = jax.jit(jax.vmap(lambda k: step(params, state, k).grad))(jax.random.split(jax.random.key(1), 4000))
        return float(jnp.sum(jnp.var(grads, axis=0)))

    with jax.numpy_rank_promotion("allow"):  # NumPyro's sampler
        state = estimator.init(params)
        before = variance(state)
        for i in range(num_steps):
            state = step(params, state, jax.random.key(100 + i)).state
        return before, variance(state), state


def test_rebar_learns_its_control_variate_down_the_variance():
    # Started without a control variate (η = 0: the plain score function), the variance
    # gradient steps η and λ to a control variate that cuts the variance.
    before, after, state = variance_before_and_after_training(
        mg.rebar(scale=0.0, learning_rate=5e-2), lambda b: jnp.sum((b - 0.45) ** 2), num_samples=1
    )
    assert state.parameters["scale"] > 0.3 and after < 0.7 * before, (before, after, state.parameters)


def test_double_control_variate_learns_its_weight_down_the_variance():
    # Started at a poor weight (α = 1 triples the variance of plain leave-one-out on this
    # cost), the variance gradient steps α to where the Taylor term helps or stays out.
    before, after, state = variance_before_and_after_training(
        mg.double_control_variate(alpha=1.0, learning_rate=5e-2),
        lambda b: jnp.sum((b - 0.45) ** 2) + jnp.sin(2.0 * b[0] * b[1]),
        num_samples=2,
    )
    assert float(state.alpha) < 0.5 and after < 0.6 * before, (before, after, state.alpha)


def test_antithetic_pairs_need_an_even_count_and_an_averaging_objective():
    with pytest.raises(ValueError, match=r"disarm\(\) draws antithetic pairs.*site 'x'.*got 3"), jax.numpy_rank_promotion("allow"):
        mg.grad(cost, lambda p: dist.Bernoulli(logits=p), estimator=mg.disarm(), num_samples=3)(jnp.zeros(2), jax.random.key(0))
    with pytest.raises(ValueError, match=r"site\(s\) \['z'\].*num_particles must be even"):
        mg.trainer(model, guide, X, key=jax.random.key(0), objective=mg.elbo(3), optimizer=optax.sgd(0.1),
                   estimators={"z": mg.disarm()})
    with pytest.raises(ValueError, match=r"disarm\(\) at site 'z'.*multi-sample bound.*VIMCO"):
        mg.fit(model, guide, X, key=jax.random.key(0), num_steps=1, objective=mg.iwae(2), optimizer=optax.sgd(0.1),
               estimators={"z": mg.disarm()}, progress_bar=False)


def test_paired_particles_are_antithetic_and_both_feed_the_other_parameters():
    # Particles i and i + M/2 draw z from one set of uniforms (u and 1 − u): at logit 0 a
    # coordinate is 1 in exactly one of them. Both are ordinary draws, so both costs enter
    # the loss (the mean over particles) and the decoder's gradient.
    from mcgrad.inference import particles as engine

    training = mg.trainer(model, guide, X, key=jax.random.key(0), objective=mg.elbo(4),
                          optimizer=optax.sgd(0.1), estimators={"z": mg.disarm()})
    state = training.init(jax.random.key(0))
    params = training.params(state)
    program = engine.Program(guide, lambda *a: [], {"z": mg.disarm()}, keys=engine.count_site_keys(guide, params, jax.random.key(0), (X,), {})[1])
    drawn, _ = engine.draw_particles(program, params, jax.random.key(3), 4, (X,), {})
    z = np.asarray(drawn.sites["z"].value)
    at_zero = np.asarray(params["logits"]) == 0.0
    assert np.all((z[:2] + z[2:])[:, at_zero] == 1)
    assert not np.array_equal(z[0], z[1])  # different pairs are independent


def test_evaluation_counts():
    normal = lambda p: dist.Bernoulli(logits=p).to_event(1)  # noqa: E731
    params = jnp.zeros(3)
    with jax.numpy_rank_promotion("allow"):  # NumPyro's sampler
        assert mg.count_evaluations(cost, normal, mg.disarm(), params, num_samples=4) == 4  # 2 pairs
        assert mg.count_evaluations(cost, normal, mg.arm(), params, num_samples=4) == 4
        assert mg.count_evaluations(cost, normal, mg.enumerate(), params, num_samples=4) == 4 + 8 * 4
        # one re-run per coordinate (the other value; the draw's own is the row's cost)
        assert mg.count_evaluations(cost, normal, mg.measure_valued(), params, num_samples=4) == 4 + 3 * 4
        categorical = lambda p: dist.Categorical(logits=p).to_event(1)  # noqa: E731
        logits = jnp.zeros((2, 3))
        assert mg.count_evaluations(cost, categorical, mg.measure_valued(), logits, num_samples=4) == 4 + 2 * 2 * 4


@pytest.mark.parametrize("coupling", [True, False])
def test_measure_valued_sums_a_categorical_coordinate_exactly(coupling):
    # Every value of the coordinate is summed over, so each single draw gives the exact gradient.
    dist_fn, params, shape = CATEGORICAL["categorical_logits"]
    exact = exact_gradient(dist_fn, params, range(3), shape)
    g = mg.per_sample_grads(cost, dist_fn, estimator=mg.measure_valued(coupling), num_samples=200)(
        params, jax.random.key(0)
    )
    np.testing.assert_allclose(g, np.broadcast_to(exact, g.shape), atol=1e-5)


# --------------------------------------------------------------------------- errors and marks


@pytest.mark.parametrize(
    "make", [lambda: mg.gumbel_softmax(0.5), mg.rebar, mg.relax, mg.double_control_variate]
)
def test_bernoulli_only_estimators_name_the_site_and_the_fix(make):
    with pytest.raises(ValueError, match=r"site 'x'.*Categorical.*mg\.(score_function|enumerate)"):
        mg.grad(lambda k: 1.0 * k, lambda p: dist.Categorical(logits=p), estimator=make(), num_samples=2)(
            jnp.zeros(3), jax.random.key(0)
        )


@pytest.mark.parametrize("make", [mg.arm, mg.disarm])
def test_antithetic_estimators_refuse_other_families(make):
    with pytest.raises(ValueError, match=r"Bernoulli and Categorical sites.*site 'x' is Poisson.*mg\.score_function"):
        mg.grad(lambda k: 1.0 * k, lambda p: dist.Poisson(p), estimator=make(), num_samples=2)(1.0, jax.random.key(0))


def test_enumerate_refuses_large_supports_and_continuous_families():
    with pytest.raises(ValueError, match=r"site 'x'.*1024 configurations.*mg\.disarm"), jax.numpy_rank_promotion("allow"):
        mg.grad(cost, lambda p: dist.Bernoulli(logits=p).to_event(1), estimator=mg.enumerate(), num_samples=1)(
            jnp.zeros(10), jax.random.key(0)
        )
    with pytest.raises(ValueError, match=r"site 'x'.*Normal"):
        mg.grad(lambda x: x, lambda p: dist.Normal(p, 1.0), estimator=mg.enumerate(), num_samples=1)(
            0.0, jax.random.key(0)
        )


def test_only_the_relaxations_are_marked_biased():
    assert mg.gumbel_softmax(0.5).bias and "relaxed" in mg.gumbel_softmax(0.5).bias
    assert "discrete value" in mg.gumbel_softmax(0.5, straight_through=True).bias
    for make in (mg.arm, mg.disarm, mg.enumerate, mg.score_function, mg.measure_valued, mg.pathwise):
        assert make().bias is None


def test_straight_through_gumbel_is_biased_and_its_forward_value_discrete():
    estimator = mg.gumbel_softmax(0.5, straight_through=True)
    draws = estimator.sample(jax.random.key(0), dist.Bernoulli(logits=jnp.zeros(1000)), ())
    assert np.all(np.isclose(draws, 0.0, atol=1e-6) | np.isclose(draws, 1.0, atol=1e-6))
    estimates = repeated_estimates(estimator, BERNOULLI["logits_event"][0], jnp.array([0.0, 2.0, -2.0]), jax.random.key(1))
    exact = exact_gradient(BERNOULLI["logits_event"][0], jnp.array([0.0, 2.0, -2.0]), (0, 1), (3,))
    se = np.std(estimates, axis=0) / np.sqrt(len(estimates))
    assert np.any(np.abs(np.mean(estimates, axis=0) - exact) > 5 * se)  # measurably off


# --------------------------------------------------------------------------- per site in a model

LATENT, DATA = 2, 3
W = jnp.array([1.5, -2.0])
X = jnp.array([0.5, -1.0, 2.0])


def model(x):
    with numpyro.plate("data", DATA):
        z = numpyro.sample("z", dist.Bernoulli(0.4).expand([LATENT]).to_event(1))
        numpyro.sample("x", dist.Normal(jnp.sin(z @ W + z[..., 0] * z[..., 1]), 1.0), obs=x)


def guide(x):
    logits = numpyro.param("logits", jnp.array([[0.0, 2.0], [-2.0, 0.5], [1.0, -1.0]]))
    with numpyro.plate("data", DATA):
        numpyro.sample("z", dist.Bernoulli(logits=logits).to_event(1))


def exact_elbo_gradient(logits):
    configurations = jnp.asarray(list(itertools.product((0, 1), repeat=DATA * LATENT)), jnp.float32)
    configurations = configurations.reshape(-1, DATA, LATENT)

    def negative_elbo(l):
        q = dist.Bernoulli(logits=l).to_event(2)

        def one(z):
            log_p = jnp.sum(dist.Bernoulli(0.4).log_prob(z))
            log_p += jnp.sum(dist.Normal(jnp.sin(z @ W + z[..., 0] * z[..., 1]), 1.0).log_prob(X))
            return mg.log_prob(q, z) - log_p

        return jnp.sum(jnp.exp(jax.vmap(lambda z: mg.log_prob(q, z))(configurations)) * jax.vmap(one)(configurations))

    return jax.grad(negative_elbo)(logits)


@pytest.mark.parametrize(
    ("estimator", "num_particles"),
    [("disarm", 2), ("arm", 2), ("disarm", 4), ("enumerate", 1), ("measure_valued", 1), ("score_function_loo", 2), ("rebar", 1), ("relax", 1),
     ("double_control_variate", 2)],
)
def test_per_site_elbo_gradient_unbiased_inside_a_plate(estimator, num_particles):
    # Each slice of the plate replaced at once (measure-valued, enumeration) or its own
    # antithetic difference (ARM, DisARM): still the exact ELBO gradient in expectation.
    training = mg.trainer(
        model, guide, X, key=jax.random.key(0), objective=mg.elbo(num_particles),
        optimizer=optax.sgd(0.0), estimators={"z": UNBIASED[estimator]()},
    )
    state = training.init(jax.random.key(0))
    exact = exact_elbo_gradient(state.params["logits"])
    grads = jax.jit(jax.vmap(lambda k: training.estimate(state, k, X)[1]["logits"]))(jax.random.split(jax.random.key(5), 3000))
    assert_unbiased(np.asarray(grads).reshape(len(grads), -1), np.asarray(exact).ravel(), estimator)

"""Clear errors (DESIGN.md §7): each names the site, the distribution and the fix."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import mcgrad as mg

KEY = jax.random.key(0)


def normal(params):
    return dist.Normal(params["loc"], params["scale"])


PARAMS = {"loc": jnp.float32(0.2), "scale": jnp.float32(1.0)}


@pytest.mark.parametrize(
    "family, dist_fn, params",
    [
        ("Bernoulli", lambda p: dist.Bernoulli(probs=p), 0.3),
        ("Bernoulli", lambda p: dist.Bernoulli(logits=p), 0.3),
        ("Categorical", lambda p: dist.Categorical(logits=p), jnp.zeros(3)),
        ("Poisson", lambda p: dist.Poisson(p), 2.0),
    ],
)
def test_pathwise_without_rsample(family, dist_fn, params):
    fn = mg.grad(lambda x: 1.0 * x, dist_fn, estimator=mg.pathwise(), num_samples=4)
    for call in (fn, jax.jit(fn)):  # raised while tracing, jitted or not
        with pytest.raises(ValueError) as error:
            call(params, KEY)
        message = str(error.value)
        assert family in message and "rsample" in message and "site 'x'" in message
        assert "mg.score_function()" in message and "mg.measure_valued()" in message


def test_pathwise_without_rsample_names_the_wrappers():
    fn = mg.grad(
        lambda x: jnp.sum(x),
        lambda p: dist.Bernoulli(probs=p).expand([3]).to_event(1),
        estimator=mg.pathwise(),
        num_samples=4,
    )
    with pytest.raises(ValueError, match=r"Bernoulli.*inside Independent of ExpandedDistribution"):
        with jax.numpy_rank_promotion("allow"):
            fn(0.3, KEY)


@pytest.mark.parametrize(
    "family, dist_fn, params",
    [
        ("Beta", lambda p: dist.Beta(p, 2.0), 1.5),
        ("Laplace", lambda p: dist.Laplace(p, 1.0), 0.0),
        ("Dirichlet", lambda p: dist.Dirichlet(p), jnp.ones(3)),
    ],
)
def test_measure_valued_on_unregistered_family(family, dist_fn, params):
    fn = mg.grad(lambda x: jnp.sum(x), dist_fn, estimator=mg.measure_valued(), num_samples=4)
    with pytest.raises(ValueError) as error:
        fn(params, KEY)
    message = str(error.value)
    assert f"no weak derivative for {family}" in message and "site 'x'" in message
    for registered in ("Normal", "Poisson", "Gamma", "Exponential", "Weibull", "Uniform", "BernoulliProbs"):
        assert registered in message
    assert "mg.register_weak_derivative" in message and "mg.score_function()" in message


def test_measure_valued_needs_scalar_events(monkeypatch):
    from mcgrad.estimators import weak_derivatives

    monkeypatch.setattr(weak_derivatives, "_REGISTRY", dict(weak_derivatives._REGISTRY))
    mg.register_weak_derivative(dist.MultivariateNormal, mg.weak_derivative_for(dist.Normal(0.0, 1.0)))
    fn = mg.grad(
        lambda x: jnp.sum(x),
        lambda p: dist.MultivariateNormal(p, jnp.eye(2)),
        estimator=mg.measure_valued(),
        num_samples=4,
    )
    with pytest.raises(ValueError, match=r"scalar events.*event shape \(2,\)"):
        fn(jnp.zeros(2), KEY)


ESTIMATORS = {
    "pathwise": mg.pathwise(),
    "score_function": mg.score_function(),
    "measure_valued": mg.measure_valued(),
    "control_variate": mg.with_control_variate(mg.score_function(), mg.delta_method()),
}


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_cost_must_return_a_scalar(name):
    def vector_cost(x):
        return jnp.stack([x, x**2])

    fn = jax.jit(mg.grad(vector_cost, normal, estimator=ESTIMATORS[name], num_samples=4))
    with pytest.raises(ValueError, match=r"cost_fn must return a scalar .* site 'x'.*returned shape \(2,\)"):
        fn(PARAMS, KEY)


def test_non_finite_cost_raises_at_run_time():
    """``eqx.error_if``: a ``RuntimeError`` (``jax.errors.JaxRuntimeError`` under jit,
    ``EquinoxRuntimeError`` eagerly) carrying the message."""
    fn = mg.grad(lambda x: jnp.log(x), normal, estimator=mg.score_function(), num_samples=64)
    for call in (fn, jax.jit(fn)):
        with pytest.raises(RuntimeError, match=r"cost_fn returned a non-finite value .* site 'x' \(Normal\)"):
            jax.block_until_ready(call(PARAMS, KEY))


@pytest.mark.parametrize("name", ["pathwise", "measure_valued"])
def test_infinite_cost_raises_in_value_and_grad(name):
    fn = jax.jit(
        mg.value_and_grad(lambda x: jnp.where(x > 0.0, jnp.inf, x), normal, estimator=ESTIMATORS[name], num_samples=64)
    )
    with pytest.raises(RuntimeError, match="non-finite"):
        jax.block_until_ready(fn(PARAMS, KEY))


def test_grad_checks_the_gradient():
    """``grad`` does not evaluate the costs only to check them: a pathwise cost that is
    infinite where its derivative is finite passes, one whose derivative is not finite
    (``sqrt`` of a negative number) raises; a measure-valued gradient sees the costs."""
    infinite_where_positive = lambda x: jnp.where(x > 0.0, jnp.inf, x)  # noqa: E731
    pathwise = jax.jit(mg.grad(infinite_where_positive, normal, estimator=mg.pathwise(), num_samples=64))
    assert np.isfinite(pathwise(PARAMS, KEY)["loc"])
    square_root = jax.jit(mg.grad(jnp.sqrt, normal, estimator=mg.pathwise(), num_samples=64))
    with pytest.raises(RuntimeError, match=r"non-finite .* site 'x' \(Normal\)"):
        jax.block_until_ready(square_root(PARAMS, KEY))
    measure_valued = jax.jit(mg.grad(infinite_where_positive, normal, estimator=mg.measure_valued(), num_samples=64))
    with pytest.raises(RuntimeError, match="non-finite"):
        jax.block_until_ready(measure_valued(PARAMS, KEY))


def test_check_finite_false_returns_nan():
    fn = jax.jit(
        mg.grad(lambda x: jnp.log(x), normal, estimator=mg.score_function(), num_samples=64, check_finite=False)
    )
    grads = fn(PARAMS, KEY)
    assert np.isnan(grads["loc"])


def test_finite_costs_pass_the_guard():
    grads = jax.jit(mg.grad(lambda x: x**2, normal, estimator=mg.score_function(), num_samples=64))(PARAMS, KEY)
    assert np.isfinite(grads["loc"]) and np.isfinite(grads["scale"])


def test_score_function_on_a_parameter_dependent_support_is_a_clear_error():
    """``Uniform(0, θ)``: the score-function identity misses the moving boundary."""
    uniform = jax.jit(mg.grad(lambda x: x, lambda p: dist.Uniform(0.0, p), estimator=mg.score_function(), num_samples=8))
    with pytest.raises(ValueError, match=r"site 'x'.*support of Uniform depends on the parameters.*measure_valued"):
        uniform(1.5, KEY)
    # Fixed supports pass: an Exponential's half-line, a Uniform with constant bounds.
    exponential = mg.grad(lambda x: x, lambda p: dist.Exponential(p), estimator=mg.score_function(), num_samples=8)
    assert np.isfinite(exponential(1.5, KEY))
    fixed = mg.grad(lambda x: x, lambda p: dist.Uniform(0.0, 2.0), estimator=mg.score_function(), num_samples=8)
    assert fixed(1.5, KEY) == 0.0


@pytest.mark.parametrize("num_samples", [0, -2, 2.5, True])
def test_invalid_sample_counts_are_clear_errors(num_samples):
    for entry in (mg.grad, mg.value_and_grad, mg.per_sample_grads, mg.estimate):
        with pytest.raises(ValueError, match=r"num_samples must be a whole number >= 1"):
            entry(lambda x: x, lambda p: dist.Normal(p, 1.0), estimator=mg.pathwise(), num_samples=num_samples)


def quadratic(x):
    return x**2


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: mg.grad(quadratic, normal, estimator=mg.pathwise, num_samples=4)(PARAMS, KEY),
         r"estimator must be a GradientEstimator .* got the function mcgrad\.pathwise \(call it\)"),
        (lambda: mg.per_sample_grads(quadratic, normal, estimator="pathwise", num_samples=4)(PARAMS, KEY),
         r"estimator must be a GradientEstimator .* got str 'pathwise'"),
        (lambda: mg.grad(quadratic, normal, estimator=mg.pathwise(), num_samples=4)(PARAMS, 0),
         r"key must be a JAX random key: jax\.random\.key\(0\) .* got int 0"),
        (lambda: mg.grad(quadratic, lambda p: (p["loc"], p["scale"]), estimator=mg.pathwise(), num_samples=4)(
            PARAMS, KEY), r"dist_fn must return a NumPyro distribution, .* site 'x'; got a tuple of length 2"),
        (lambda: mg.score_function(baseline=mg.baselines.leave_one_out),
         r"score_function\(baseline=\.\.\.\) must be a Baseline .* got the function mcgrad\.leave_one_out \(call it\)"),
        (lambda: mg.with_control_variate(mg.score_function(), mg.control_variates.delta_method),
         r"must be a ControlVariate such as mg\.control_variates\.delta_method\(\), got the function"),
        (lambda: mg.compare(quadratic, normal, [mg.pathwise()], PARAMS, key=KEY, num_samples=4, num_repeats=5),
         r"compare\(estimators=\.\.\.\) must be a dict .* got a list of length 1"),
        (lambda: mg.compare(quadratic, normal, {"mine": mg.pathwise}, PARAMS, key=KEY, num_samples=4, num_repeats=5),
         r"the estimator 'mine' must be a GradientEstimator"),
        (lambda: mg.diagnose(quadratic, normal, mg.pathwise, PARAMS, key=KEY, num_samples=4, num_repeats=5),
         r"estimator must be a GradientEstimator"),
    ],
)
def test_a_factory_or_a_foreign_value_where_a_value_belongs(call, message):
    """The usual slips — the factory for its value, an int for a key, a dist_fn returning
    its parameters — are clear TypeErrors, not an AttributeError from deep inside."""
    with pytest.raises(TypeError, match=message):
        call()


def test_raw_keys_are_the_same_keys():
    """NumPyro's ``jax.random.PRNGKey`` gives the estimate of the typed key with the same
    seed, jitted and vmapped over a batch of raw keys alike."""
    fn = mg.grad(quadratic, normal, estimator=mg.score_function(), num_samples=8)
    np.testing.assert_array_equal(fn(PARAMS, jax.random.PRNGKey(5))["loc"], fn(PARAMS, jax.random.key(5))["loc"])
    raw = jax.jit(jax.vmap(fn, in_axes=(None, 0)))(PARAMS, jax.random.split(jax.random.PRNGKey(5), 3))
    typed = jax.jit(jax.vmap(fn, in_axes=(None, 0)))(PARAMS, jax.random.split(jax.random.key(5), 3))
    np.testing.assert_array_equal(raw["scale"], typed["scale"])

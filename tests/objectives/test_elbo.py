"""``mg.elbo``: unbiased gradients under every site estimator, sticking the landing,
subsampled plates, the arguments of each call (a new minibatch), and clear errors for
guides that do not match their model.

Gradients come from the public :class:`mcgrad.Trainer`: ``training.estimate`` at chosen
parameters and keys. It differentiates with respect to the unconstrained parameters
(``log scale`` for the positive ``scale``); the helpers map them back to the guide's own
parameters (``d/dscale = d/dlog scale / scale``), so every comparison is with the closed
form in ``(loc, scale)``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest

import mcgrad as mg
from tests.objectives._helpers import FAST_COMPILE, NUM_SE


X = jnp.array([0.8, 1.9, 1.1])
PARAMS = {"loc": jnp.asarray(0.4), "scale": jnp.asarray(0.8)}
# The exact posterior of z given X: N(ΣX / (n + 1), 1 / (n + 1)).
POSTERIOR = {"loc": jnp.asarray(float(X.sum()) / 4.0), "scale": jnp.asarray(0.5)}
POSITIVE = {"scale"}  # the guide's positive parameters: unconstrained as their log


def model(x):
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", dist.Normal(z, 1.0), obs=x)


def guide(x):
    loc = numpyro.param("loc", 0.0)
    scale = numpyro.param("scale", 1.0, constraint=dist.constraints.positive)
    numpyro.sample("z", dist.Normal(loc, scale))


def exact_loss(params, x=X):
    """E_q[log q(z) − log p(x, z)] in closed form for q = N(loc, scale²)."""
    loc, scale = params["loc"], params["scale"]
    n = x.shape[0]
    entropy = 0.5 * jnp.log(2 * jnp.pi * jnp.e * scale**2)
    prior = 0.5 * jnp.log(2 * jnp.pi) + 0.5 * (loc**2 + scale**2)
    likelihood = n * 0.5 * jnp.log(2 * jnp.pi) + 0.5 * jnp.sum((x - loc) ** 2 + scale**2)
    return -entropy + prior + likelihood


def make_trainer(objective, estimators=None, args=(X,), model=model, guide=guide, optimizer=None):
    return mg.trainer(
        model, guide, *args, key=jax.random.key(0), objective=objective,
        optimizer=optimizer if optimizer is not None else optax.sgd(0.0), estimators=estimators,
    )


def unconstrain(params):
    return {n: jnp.log(v) if n in POSITIVE else v for n, v in params.items()}


def sampler(training, args=(X,)):
    """A compiled ``(params, keys) -> (values, gradients)`` of independent estimates at
    constrained ``params``, gradients in the same coordinates."""
    initial = training.init(jax.random.key(1))

    def one(params, key):
        loss, grads, _ = training.estimate(initial._replace(params=unconstrain(params)), key, *args)
        return loss, {n: g / params[n] if n in POSITIVE else g for n, g in grads.items()}

    return jax.jit(jax.vmap(one, in_axes=(None, 0)), compiler_options=FAST_COMPILE)


def repeated(training, params, num_repeats, key, args=(X,), compiled=None):
    compiled = compiled if compiled is not None else sampler(training, args)
    values, grads = compiled(params, jax.random.split(key, num_repeats))
    return np.asarray(values, np.float64), {n: np.asarray(g, np.float64) for n, g in grads.items()}


def assert_unbiased(samples, exact, label):
    mean = samples.mean(axis=0)
    se = samples.std(axis=0, ddof=1) / np.sqrt(samples.shape[0])
    assert np.all(se > 0), f"{label}: zero standard error"
    assert np.all(np.abs(mean - exact) < NUM_SE * se), f"{label}: {mean} vs exact {exact} (SE {se})"


SITE_ESTIMATORS = {
    "pathwise": (lambda: mg.pathwise(), False),
    "pathwise-sticking_the_landing": (lambda: mg.pathwise(), True),
    "score_function-leave_one_out": (lambda: mg.score_function(baseline=mg.baselines.leave_one_out()), False),
    "measure_valued": (lambda: mg.measure_valued(), False),
}


@pytest.mark.parametrize("name", list(SITE_ESTIMATORS))
def test_gaussian_gradient_matches_closed_form(name):
    make, sticking_the_landing = SITE_ESTIMATORS[name]
    training = make_trainer(mg.elbo(num_particles=16, sticking_the_landing=sticking_the_landing), {"z": make()})
    assert training.estimators["z"].name == name.split("-")[0]  # the override took effect
    values, grads = repeated(training, PARAMS, 1000, jax.random.key(1))
    exact_value, exact_grad = jax.value_and_grad(exact_loss)(PARAMS)
    assert_unbiased(values, float(exact_value), f"{name} value")
    for param in PARAMS:
        assert_unbiased(grads[param], float(exact_grad[param]), f"{name} d/d{param}")


def test_sticking_the_landing_variance_at_and_near_the_exact_posterior():
    """At q = p(z | x), log q(z) − log p(x, z) is constant in z: STL's gradient is exactly 0
    for every sample, while the plain pathwise gradient keeps the score term's noise; near
    the posterior STL's variance is still clearly lower."""
    near = {"loc": POSTERIOR["loc"] + 0.05, "scale": POSTERIOR["scale"] * 1.05}
    num_repeats = 500
    at, close = {}, {}
    for stl in (False, True):
        compiled = sampler(make_trainer(mg.elbo(num_particles=4, sticking_the_landing=stl)))
        _, grads = repeated(None, POSTERIOR, num_repeats, jax.random.key(2), compiled=compiled)
        at[stl] = {n: g.var(ddof=1) for n, g in grads.items()}
        if not stl:  # the exact gradient at the optimum is zero
            for name, g in grads.items():
                assert_unbiased(g, 0.0, f"d/d{name}")
        _, grads = repeated(None, near, num_repeats, jax.random.key(3), compiled=compiled)
        close[stl] = {n: g.var(ddof=1) for n, g in grads.items()}
    se_log_ratio = np.sqrt(4 / (num_repeats - 1))
    for param in ("loc", "scale"):
        assert at[False][param] > 1e-2, at
        assert at[True][param] < 1e-8 * at[False][param], (param, at)
        assert np.log(close[False][param] / close[True][param]) > NUM_SE * se_log_ratio, (param, close)


# --------------------------------------------------------------------------- the arguments of each call

X_OTHER = jnp.array([-1.2, 0.4, -0.5])  # another minibatch of the same shape


def test_estimate_and_step_use_the_arguments_of_each_call():
    """A trainer built on example data A, called on a new minibatch B, gives exactly what a
    trainer built on B gives (same state, same key), and not what it gives on A."""
    on_a, on_b = make_trainer(mg.elbo(4), args=(X,)), make_trainer(mg.elbo(4), args=(X_OTHER,))
    state = on_a.init(jax.random.key(1))._replace(params=unconstrain(PARAMS))
    key = jax.random.key(5)
    new_batch = jax.jit(on_a.estimate)(state, key, X_OTHER)
    reference = jax.jit(on_b.estimate)(state, key, X_OTHER)
    old_batch = jax.jit(on_a.estimate)(state, key, X)
    np.testing.assert_allclose(new_batch[0], reference[0], rtol=1e-6)
    for name in PARAMS:
        np.testing.assert_allclose(new_batch[1][name], reference[1][name], rtol=1e-6, atol=1e-7)
    assert abs(float(new_batch[0]) - float(old_batch[0])) > 0.1, (new_batch[0], old_batch[0])
    assert abs(float(new_batch[1]["loc"]) - float(old_batch[1]["loc"])) > 0.1, (new_batch[1], old_batch[1])

    # The step too: one SGD step on B from trainer A lands where trainer B's step lands.
    step_a = make_trainer(mg.elbo(4), args=(X,), optimizer=optax.sgd(0.1))
    step_b = make_trainer(mg.elbo(4), args=(X_OTHER,), optimizer=optax.sgd(0.1))
    start = step_a.init(jax.random.key(1))._replace(params=unconstrain(PARAMS))
    after_new, info_new = jax.jit(step_a.step)(start, X_OTHER)
    after_ref, info_ref = jax.jit(step_b.step)(start, X_OTHER)
    after_old, _ = jax.jit(step_a.step)(start, X)
    np.testing.assert_allclose(info_new.loss, info_ref.loss, rtol=1e-6)
    for name in PARAMS:
        np.testing.assert_allclose(after_new.params[name], after_ref.params[name], rtol=1e-6, atol=1e-7)
    assert abs(float(after_new.params["loc"]) - float(after_old.params["loc"])) > 1e-2, (after_new.params, after_old.params)


def test_a_new_minibatch_gives_the_unbiased_gradient_for_that_minibatch():
    """Over many keys, the trainer built on X and called on X_OTHER estimates the closed-form
    gradient at X_OTHER (5 standard errors), not the one at X."""
    training = make_trainer(mg.elbo(4), args=(X,))
    values, grads = repeated(training, PARAMS, 1000, jax.random.key(6), args=(X_OTHER,))
    exact_value, exact_grad = jax.value_and_grad(lambda p: exact_loss(p, X_OTHER))(PARAMS)
    assert_unbiased(values, float(exact_value), "value")
    for param in PARAMS:
        assert_unbiased(grads[param], float(exact_grad[param]), f"d/d{param}")


# --------------------------------------------------------------------------- subsampled plates

LOCAL_X = jnp.array([0.5, -1.0, 2.0, 0.3, 1.4, -0.6])
LOCAL_LOC = jnp.array([0.2, -0.3, 0.9, 0.1, 0.6, -0.2])
LOCAL_LOGITS = jnp.array([0.4, -0.7, 1.1, 0.3, 0.8, -0.5])


def local_model(x, batch=None):
    with numpyro.plate("data", x.shape[0], subsample_size=batch) as index:
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        b = numpyro.sample("b", dist.Bernoulli(0.3))
        numpyro.sample("x", dist.Normal(z + b, 1.0), obs=x[index])


def local_guide(x, batch=None):
    loc = numpyro.param("loc", jnp.zeros(x.shape[0]))
    logits = numpyro.param("logits", jnp.full(x.shape[0], 0.1))
    with numpyro.plate("data", x.shape[0], subsample_size=batch) as index:
        numpyro.sample("z", dist.Normal(loc[index], 0.7))
        numpyro.sample("b", dist.Bernoulli(logits=logits[index]))


def local_exact_loss(params):
    """Σ_i E_q[log q_i − log p(z_i, b_i, x_i)]; the plate factorises, b_i is summed over."""
    loc, logits = params["loc"], params["logits"]
    s = 0.7
    q = jax.nn.sigmoid(logits)
    total = -0.5 * jnp.log(2 * jnp.pi * jnp.e * s**2) + 0.5 * jnp.log(2 * jnp.pi) + 0.5 * (loc**2 + s**2)
    for b, qb, prior in ((1.0, q, 0.3), (0.0, 1 - q, 0.7)):
        expected_nll = 0.5 * jnp.log(2 * jnp.pi) + 0.5 * ((LOCAL_X - loc - b) ** 2 + s**2)
        total = total + qb * (jnp.log(qb) - jnp.log(prior) + expected_nll)
    return jnp.sum(total)


@pytest.mark.parametrize("labels", ["default", "score_function"])
def test_subsampled_plate_gives_unbiased_full_data_gradient(labels):
    """A plate with subsample_size=2 of 6: each step sees two slices, scaled by 3; pathwise
    (z) and the labels' (b: the default's exact sum over each label's values, or the score
    function) gradients are unbiased for the full-data ELBO."""
    params = {"loc": LOCAL_LOC, "logits": LOCAL_LOGITS}  # both real: unconstrained as they are
    estimators = {"b": mg.score_function(baseline=mg.baselines.leave_one_out())} if labels == "score_function" else None
    training = make_trainer(mg.elbo(num_particles=8), args=(LOCAL_X, 2), model=local_model, guide=local_guide,
                            estimators=estimators)
    assert training.estimators["z"].name == "pathwise"
    assert training.estimators["b"].name == {"default": "measure_valued", "score_function": "score_function"}[labels]
    values, grads = repeated(training, params, 3000, jax.random.key(4), args=(LOCAL_X, 2))
    exact_value, exact_grad = jax.value_and_grad(local_exact_loss)(params)
    assert_unbiased(values, float(exact_value), "value")
    for name in params:
        assert_unbiased(grads[name], np.asarray(exact_grad[name]), f"d/d{name}")


# --------------------------------------------------------------------------- clear errors


def test_guide_missing_a_latent_site():
    def two_latents(x):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        w = numpyro.sample("w", dist.Gamma(2.0, 1.0))
        numpyro.sample("x", dist.Normal(z, w), obs=x)

    with pytest.raises(ValueError) as error:
        make_trainer(mg.elbo(2), args=(1.0,), model=two_latents)
    message = str(error.value)
    assert "'w'" in message and "Gamma" in message and "numpyro.sample('w'" in message and "AutoNormal" in message


def test_guide_missing_a_discrete_site_says_how_to_sum_it():
    """A mixture label the guide does not sample and the model does not mark for summing:
    the error names the site as discrete and gives the fixes that work (mark it to sum it
    out of the model, a discrete guide site, MixtureSameFamily), not AutoNormal."""

    def mixture(x):
        locs = numpyro.sample("locs", dist.Normal(0.0, 3.0).expand([2]).to_event(1))
        with numpyro.plate("data", x.shape[0]):
            c = numpyro.sample("c", dist.Categorical(jnp.ones(2) / 2))
            numpyro.sample("x", dist.Normal(locs[c], 1.0), obs=x)

    continuous_only = numpyro.infer.autoguide.AutoNormal(numpyro.handlers.block(mixture, hide=["c"]))
    with pytest.raises(ValueError) as error:
        make_trainer(mg.elbo(2), args=(X,), model=mixture, guide=continuous_only)
    message = str(error.value)
    assert "discrete latent site 'c' (Categorical" in message and "infer={'enumerate': 'parallel'}" in message
    assert "numpyro.sample('c', dist.Categorical" in message and "MixtureSameFamily" in message
    assert "hide=['c']" in message


def test_observed_site_in_the_guide():
    def observing_guide(x):
        guide(x)
        numpyro.sample("x", dist.Normal(0.0, 1.0), obs=x)

    with pytest.raises(ValueError) as error:
        make_trainer(mg.elbo(2), guide=observing_guide)
    message = str(error.value)
    assert "'x'" in message and "observed in the guide" in message and "obs=" in message


def latent_mean_on_three(x):
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", 3):
        numpyro.sample("x", dist.Normal(z, 1.0), obs=x)


def parameter_mean_on_three(x):
    with numpyro.plate("data", 3):
        numpyro.sample("x", dist.Normal(numpyro.param("loc", 0.0), 1.0), obs=x)


@pytest.mark.parametrize(
    ("objective", "sized_apart", "its_guide"),
    [(mg.elbo(2), latent_mean_on_three, guide), (mg.maximum_likelihood(), parameter_mean_on_three, None)],
)
def test_observed_shape_that_does_not_broadcast(objective, sized_apart, its_guide):
    """A plate sized 3 over 4 observations: NumPyro's check says only ``Incompatible shapes
    for broadcasting``; the error names the site, both shapes and the fix."""
    with pytest.raises(ValueError) as error:
        make_trainer(objective, args=(jnp.arange(4.0),), model=sized_apart, guide=its_guide)
    message = str(error.value)
    assert "observed site 'x' (Normal" in message and "(4,)" in message and "(3,)" in message
    assert "numpyro.plate('data', x.shape[0])" in message


def positive_below_zero(x):
    numpyro.sample("z", dist.Normal(0.0, numpyro.param("s", -1.0, constraint=dist.constraints.positive)))


def positive_at_zero(x):
    numpyro.sample("z", dist.Normal(0.0, numpyro.param("s", 0.0, constraint=dist.constraints.positive)))


def probability_at_one(x):
    numpyro.sample("z", dist.Normal(numpyro.param("p", 1.0, constraint=dist.constraints.unit_interval), 1.0))


def integer_location(x):
    numpyro.sample("z", dist.Normal(numpyro.param("loc", 0), 1.0))


def missing_location(x):
    numpyro.sample("z", dist.Normal(numpyro.param("loc", jnp.nan), 1.0))


@pytest.mark.parametrize(
    ("bad_guide", "message"),
    [
        (positive_below_zero, r"numpyro\.param\('s'\): its initial value \(-1\.0\) lies outside its constraint Positive"),
        (positive_at_zero, r"numpyro\.param\('s'\): its initial value \(0\.0\) .* or on its boundary"),
        (probability_at_one, r"numpyro\.param\('p'\): its initial value \(1\.0\) .* UnitInterval"),
        (integer_location, r"numpyro\.param\('loc'\): its initial value \(0\) is an integer array"),
        (missing_location, r"numpyro\.param\('loc'\): its initial value \(nan\) is not finite"),
    ],
)
def test_a_param_that_cannot_start_is_named(bad_guide, message):
    """An initial value outside (or on the edge of) its constraint, an integer or a NaN:
    NumPyro's own message names the distribution that refuses it (``Normal distribution got
    invalid scale parameter``) or JAX's the dtype; mcgrad's names the param and the fix."""
    with pytest.raises(ValueError, match=message):
        make_trainer(mg.elbo(2), guide=bad_guide)


def test_no_guide():
    with pytest.raises(ValueError, match="needs a guide.*maximum_likelihood"):
        make_trainer(mg.elbo(2), guide=None)


@pytest.mark.parametrize("num_particles", [0, 2.5, True])
def test_particle_count_is_a_whole_number(num_particles):
    with pytest.raises(ValueError, match=r"elbo\(num_particles=\.\.\.\) must be a whole number >= 1"):
        mg.elbo(num_particles)

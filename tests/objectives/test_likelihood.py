"""``mg.maximum_likelihood``: the closed-form Gaussian MLE (full data and plate
minibatches), a Gaussian mixture against EM, and clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest

import mcgrad as mg
from tests.objectives._helpers import FAST_COMPILE, NUM_SE


DATA = 1.5 + 2.0 * jax.random.normal(jax.random.key(0), (200,))
MLE = {"loc": float(np.mean(DATA)), "scale": float(np.std(DATA))}  # ddof=0: the MLE
MLE_SE = float(np.std(DATA)) / np.sqrt(DATA.shape[0])  # the statistical error of the MLE of loc


def gaussian(x, batch=None):
    loc = numpyro.param("loc", 0.0)
    scale = numpyro.param("scale", 1.0, constraint=dist.constraints.positive)
    with numpyro.plate("data", x.shape[0], subsample_size=batch) as index:
        numpyro.sample("x", dist.Normal(loc, scale), obs=x[index])


def negative_log_likelihood(params, x=DATA):
    return -jnp.sum(dist.Normal(params["loc"], params["scale"]).log_prob(x))


def test_full_data_fit_reaches_the_closed_form_mle():
    result = mg.fit(
        gaussian, None, DATA, key=jax.random.key(1), num_steps=500,
        optimizer=optax.adam(optax.exponential_decay(0.1, 500, 0.01)),
        objective=mg.maximum_likelihood(), progress_bar=False,
    )
    for name, value in MLE.items():  # deterministic gradients: converged to float precision
        np.testing.assert_allclose(result.params[name], value, rtol=1e-5)
    np.testing.assert_allclose(result.losses[-1], negative_log_likelihood(MLE), rtol=1e-6)


def test_minibatch_gradient_is_unbiased_for_the_full_data_gradient():
    """subsample_size=20 of 200: the surrogate is (n/B)·Σ_batch −log p, unbiased for the full NLL."""
    params = {"loc": jnp.asarray(0.7), "scale": jnp.asarray(2.5)}
    training = mg.trainer(gaussian, None, DATA, 20, key=jax.random.key(0), objective=mg.maximum_likelihood(),
                          optimizer=optax.sgd(0.0))
    # The trainer differentiates with respect to log scale: d/dscale = d/dlog scale / scale.
    state = training.init(jax.random.key(1))._replace(params={**params, "scale": jnp.log(params["scale"])})

    def one(key):
        loss, grads, _ = training.estimate(state, key, DATA, 20)
        return loss, {**grads, "scale": grads["scale"] / params["scale"]}

    num_repeats = 2000
    values, grads = jax.jit(jax.vmap(one), compiler_options=FAST_COMPILE)(jax.random.split(jax.random.key(2), num_repeats))
    exact_value, exact_grad = jax.value_and_grad(negative_log_likelihood)(params)
    for estimate, exact in [(values, exact_value)] + [(grads[n], exact_grad[n]) for n in params]:
        estimate = np.asarray(estimate, np.float64)
        se = estimate.std(ddof=1) / np.sqrt(num_repeats)
        assert abs(estimate.mean() - float(exact)) < NUM_SE * se, (estimate.mean(), exact, se)


def test_minibatch_fit_reaches_the_mle_within_a_fraction_of_its_standard_error():
    result = mg.fit(
        gaussian, None, DATA, 20, key=jax.random.key(1), num_steps=1000,
        optimizer=optax.adam(optax.exponential_decay(0.05, 1000, 0.01)),
        objective=mg.maximum_likelihood(), progress_bar=False,
    )
    # The optimisation error is small next to the statistical error of the MLE itself.
    for name, value in MLE.items():
        assert abs(float(result.params[name]) - value) < 0.25 * MLE_SE, (name, result.params, MLE)


# --------------------------------------------------------------------------- a mixture

MIXTURE_DATA = jnp.concatenate([
    -2.0 + 0.6 * jax.random.normal(jax.random.key(3), (120,)),
    1.5 + 1.0 * jax.random.normal(jax.random.key(4), (80,)),
])


def mixture(x):
    weights = numpyro.param("weights", jnp.array([0.5, 0.5]), constraint=dist.constraints.simplex)
    locs = numpyro.param("locs", jnp.array([-1.0, 1.0]))
    scales = numpyro.param("scales", jnp.array([1.0, 1.0]), constraint=dist.constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", dist.MixtureSameFamily(dist.Categorical(probs=weights), dist.Normal(locs, scales)), obs=x)


def expectation_maximisation(x, weights, locs, scales, num_steps=2000):
    x = np.asarray(x, np.float64)[:, None]
    for _ in range(num_steps):
        log_r = np.log(weights) - np.log(scales) - 0.5 * ((x - locs) / scales) ** 2
        r = np.exp(log_r - log_r.max(axis=1, keepdims=True))
        r /= r.sum(axis=1, keepdims=True)
        n = r.sum(axis=0)
        weights, locs = n / x.shape[0], (r * x).sum(axis=0) / n
        scales = np.sqrt((r * (x - locs) ** 2).sum(axis=0) / n)
    return {"weights": weights, "locs": locs, "scales": scales}


def test_mixture_same_family_fit_matches_expectation_maximisation():
    em = expectation_maximisation(MIXTURE_DATA, np.array([0.5, 0.5]), np.array([-1.0, 1.0]), np.array([1.0, 1.0]))
    with jax.numpy_rank_promotion("allow"):  # NumPyro's MixtureSameFamily broadcasts [n, 1] against [2]
        result = mg.fit(
            mixture, None, MIXTURE_DATA, key=jax.random.key(5), num_steps=1500,
            optimizer=optax.adam(optax.exponential_decay(0.05, 1500, 0.02)),
            objective=mg.maximum_likelihood(), progress_bar=False,
        )
        em_nll = float(-jnp.sum(dist.MixtureSameFamily(
            dist.Categorical(probs=jnp.asarray(em["weights"], jnp.float32)),
            dist.Normal(jnp.asarray(em["locs"], jnp.float32), jnp.asarray(em["scales"], jnp.float32)),
        ).log_prob(MIXTURE_DATA)))
    # Both reach the same maximum: the same likelihood, the same parameters.
    assert result.losses[-1] - em_nll < 1e-3 * abs(em_nll), (result.losses[-1], em_nll)
    for name, value in em.items():
        np.testing.assert_allclose(result.params[name], value, atol=1e-2, err_msg=name)


# --------------------------------------------------------------------------- clear errors


def likelihood_trainer(model, guide, *args, estimators=None):
    return mg.trainer(model, guide, *args, key=jax.random.key(0), objective=mg.maximum_likelihood(),
                      optimizer=optax.sgd(0.0), estimators=estimators)


def test_latent_site_is_a_clear_error():
    def with_latent(x):
        z = numpyro.sample("z", dist.Normal(numpyro.param("m", 0.0), 1.0))
        numpyro.sample("x", dist.Normal(z, 1.0), obs=x)

    with pytest.raises(ValueError) as error:
        likelihood_trainer(with_latent, None, 1.0)
    message = str(error.value)
    assert "'z'" in message and "Normal" in message and "latent" in message
    assert "MixtureSameFamily" in message and "mg.elbo()" in message


def test_guide_or_estimators_are_clear_errors():
    with pytest.raises(ValueError, match="guide=None"):
        likelihood_trainer(gaussian, gaussian, DATA)
    with pytest.raises(ValueError, match="no latent sites"):
        likelihood_trainer(gaussian, None, DATA, estimators={"x": mg.score_function()})


def test_data_with_nan_is_a_clear_error():
    data = DATA.at[7].set(jnp.nan)
    with pytest.raises(ValueError) as error:
        mg.fit(gaussian, None, data, key=jax.random.key(0), num_steps=10, optimizer=optax.adam(0.1),
               objective=mg.maximum_likelihood(), progress_bar=False)
    message = str(error.value)
    assert "argument 0" in message and "(200,)" in message and "1 NaN" in message and "mask" in message

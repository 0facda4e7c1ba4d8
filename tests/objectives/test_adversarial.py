"""``mg.adversarial``: a 1-D generator learns the data mean under each loss; a generator of
discrete data (a Bernoulli sample site) learns the pixel means through the score
function; per-site estimator overrides take effect; clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest

import mcgrad as mg
from tests.objectives._helpers import FAST_COMPILE


DATA = 2.0 + 0.5 * jax.random.normal(jax.random.key(0), (512, 1))  # mean 2, std 0.5


def generator(batch):
    loc = numpyro.param("loc", jnp.zeros(1))
    with numpyro.plate("batch", batch):
        noise = numpyro.sample("noise", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
    numpyro.deterministic("x", loc + 0.5 * noise)


def quadratic_critic(params, x):
    return (x @ params["w"] + params["b"]).squeeze(-1) - params["q"] * (x**2).squeeze(-1)


def linear_critic(params, x):
    return (x @ params["w"] + params["b"]).squeeze(-1)


QUADRATIC = {"w": jnp.zeros((1, 1)), "b": jnp.zeros(1), "q": jnp.zeros(())}
LINEAR = {"w": jnp.zeros((1, 1)), "b": jnp.zeros(1)}

# WGAN-GP does not converge to its equilibrium but circles it (Mescheder, Geiger, Nowozin,
# 2018): the penalty keeps the critic's slope near ±1 at the fakes, so the generator gets a
# unit gradient until the critic flips. A fast critic (5 steps at a high rate) and a small
# penalty keep the circle small. The generator starts 4 data standard deviations away;
# "learns the mean" is: ends within half a standard deviation of it.
LOSSES = {
    "minimax": {"critic": quadratic_critic, "critic_params": QUADRATIC, "critic_optimizer": optax.adam(0.02, b1=0.5)},
    "non_saturating": {
        "critic": quadratic_critic, "critic_params": QUADRATIC, "critic_optimizer": optax.adam(0.02, b1=0.5),
    },
    "wasserstein": {
        "critic": linear_critic, "critic_params": LINEAR, "critic_optimizer": optax.adam(0.2, b1=0.5),
        "critic_steps": 5, "gradient_penalty": 0.1,
    },
}


@pytest.mark.parametrize("loss", list(LOSSES))
def test_generator_learns_the_data_mean(loss):
    settings = dict(LOSSES[loss])
    critic, critic_params = settings.pop("critic"), settings.pop("critic_params")
    objective = mg.adversarial(critic, critic_params, data=DATA, loss=loss, **settings)
    result = mg.fit(
        generator, None, 64, key=jax.random.key(1), num_steps=400,
        optimizer=optax.adam(optax.exponential_decay(0.05, 400, 0.05)), objective=objective, progress_bar=False,
    )
    assert np.all(np.isfinite(result.losses))
    assert abs(float(result.params["loc"][0]) - float(DATA.mean())) < 0.5 * float(DATA.std()), result.params


# --------------------------------------------------------------------------- discrete data

PIXEL_MEANS = jnp.array([0.2, 0.8, 0.5, 0.9])
PIXELS = jax.random.bernoulli(jax.random.key(2), PIXEL_MEANS, (1024, 4)).astype(jnp.float32)


def pixel_generator(batch):
    logits = numpyro.param("logits", jnp.full(4, 0.1))
    with numpyro.plate("batch", batch):
        numpyro.sample("x", dist.Bernoulli(logits=logits).to_event(1))


def test_discrete_generator_learns_pixel_means_through_the_score_function():
    objective = mg.adversarial(
        lambda p, x: x @ p["w"] + p["b"], {"w": jnp.zeros(4), "b": jnp.zeros(())}, data=PIXELS,
        loss="non_saturating", critic_optimizer=optax.adam(0.05, b1=0.5),
    )
    training = mg.trainer(pixel_generator, None, 64, key=jax.random.key(0), objective=objective, optimizer=optax.sgd(0.0))
    assert training.estimators["x"].name == "score_function"  # no rsample: score function
    result = mg.fit(
        pixel_generator, None, 64, key=jax.random.key(1), num_steps=500,
        optimizer=optax.adam(optax.exponential_decay(0.05, 500, 0.1)), objective=objective, progress_bar=False,
    )
    probs = np.asarray(jax.nn.sigmoid(result.params["logits"]))
    # Within the sampling error of one critic batch of 64 (SD of a pixel mean ≤ 0.0625).
    np.testing.assert_allclose(probs, np.asarray(PIXELS.mean(axis=0)), atol=0.05)


# --------------------------------------------------------------------------- per-site estimators


def chosen_estimators(objective, generator, batch, estimators=None):
    """The estimator :func:`mcgrad.trainer` chose for each latent site of ``generator``."""
    return mg.trainer(
        generator, None, batch, key=jax.random.key(0), objective=objective, optimizer=optax.sgd(0.0),
        estimators=estimators,
    ).estimators


def test_estimator_overrides_and_model_annotations_take_effect():
    objective = mg.adversarial(linear_critic, LINEAR, data=DATA)
    assert chosen_estimators(objective, generator, 8)["noise"].name == "pathwise"
    overridden = chosen_estimators(objective, generator, 8, {"noise": mg.measure_valued()})
    assert overridden["noise"].name == "measure_valued"

    def annotated(batch):
        loc = numpyro.param("loc", jnp.zeros(1))
        with numpyro.plate("batch", batch):
            noise = numpyro.sample("noise", dist.Normal(0.0, 1.0).expand([1]).to_event(1),
                                   infer={"estimator": mg.score_function()})
        numpyro.deterministic("x", loc + 0.5 * noise)

    assert chosen_estimators(objective, annotated, 8)["noise"].name == "score_function"


def located_generator(batch):
    loc = numpyro.param("loc", jnp.zeros(1))
    with numpyro.plate("batch", batch):
        numpyro.sample("x", dist.Normal(loc, 0.5).to_event(1))


def test_every_site_estimator_gives_the_exact_generator_gradient():
    """With the critic held fixed (D(x) = x), the generator's gradient under pathwise,
    score-function and measure-valued estimators of its output site agrees with
    d/dloc E[softplus(−x)] = −E[σ(−x)], x ~ N(loc, 0.5²), within 5 standard errors."""
    objective = mg.adversarial(linear_critic, {"w": jnp.ones((1, 1)), "b": jnp.zeros(1)}, data=DATA,
                               loss="non_saturating", critic_optimizer=optax.sgd(0.0), num_particles=4)
    params = {"loc": jnp.array([0.5])}
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    exact = -np.sum(weights * (1.0 / (1.0 + np.exp(0.5 + 0.5 * nodes)))) / np.sqrt(2 * np.pi)
    for name, estimator in [("pathwise", mg.pathwise()), ("measure_valued", mg.measure_valued()),
                            ("score_function", mg.score_function(baseline=mg.baselines.leave_one_out()))]:
        training = mg.trainer(located_generator, None, 16, key=jax.random.key(0), objective=objective,
                              optimizer=optax.sgd(0.0), estimators={"x": estimator})
        assert training.estimators["x"].name == name
        state = training.init(jax.random.key(1))._replace(params=params)  # loc is real: unconstrained as it is

        def one(key, training=training, state=state):
            return training.estimate(state, key, 16)[1]["loc"][0]

        grads = np.asarray(jax.jit(jax.vmap(one), compiler_options=FAST_COMPILE)(jax.random.split(jax.random.key(3), 2000)), np.float64)
        mean, se = grads.mean(), grads.std(ddof=1) / np.sqrt(grads.size)
        assert abs(mean - exact) < 5 * se, (name, mean, exact, se)


# --------------------------------------------------------------------------- clear errors


def test_guide_and_unknown_site_are_clear_errors():
    objective = mg.adversarial(linear_critic, LINEAR, data=DATA)
    with pytest.raises(ValueError, match="guide=None"):
        mg.trainer(generator, generator, 8, key=jax.random.key(0), objective=objective, optimizer=optax.sgd(0.0))
    with pytest.raises(ValueError) as error:
        mg.trainer(generator, None, 8, key=jax.random.key(0), optimizer=optax.sgd(0.0),
                   objective=mg.adversarial(linear_critic, LINEAR, data=DATA, site="y"))
    message = str(error.value)
    assert "'y'" in message and "noise" in message and "'x'" in message

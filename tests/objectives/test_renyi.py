"""``mg.renyi``: the Rényi-α bound agrees with NumPyro's ``RenyiELBO`` in expectation (value
and gradient), is the IWAE bound at α = 0 particle for particle, gives unbiased gradients
for a discrete latent (VIMCO, measure-valued) against an exact enumeration of every
K-particle configuration, and refuses bad arguments clearly.

Estimates come from the public :class:`mcgrad.Trainer` (``training.estimate`` at chosen
parameters and keys), with respect to the unconstrained parameters; ``repeated`` maps
them back to the guide's own (``d/dscale = d/dlog scale / scale``)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import RenyiELBO

import mcgrad as mg
from tests.objectives._helpers import FAST_COMPILE, NUM_SE, at_params, make_trainer, mean_se, repeated


# --------------------------------------------------------------------------- against NumPyro's RenyiELBO

X = jnp.array([0.8, 1.9, 1.1])
PARAMS = {"loc": jnp.asarray(0.4), "scale": jnp.asarray(0.8)}


def model(x):
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))  # global: in no plate
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", dist.Normal(z, 1.0), obs=x)


def guide(x):
    loc = numpyro.param("loc", 0.0)
    scale = numpyro.param("scale", 1.0, constraint=dist.constraints.positive)
    numpyro.sample("z", dist.Normal(loc, scale))


def numpyro_renyi(alpha, num_particles, num_repeats, key):
    """NumPyro's ``RenyiELBO`` loss and its gradient in the constrained parameters, over keys.

    With the latent outside the data plate, no plate is common to every site: NumPyro
    forms one bound over the whole model, as mcgrad does."""
    loss = RenyiELBO(alpha, num_particles).loss

    def one(k):
        return jax.value_and_grad(lambda p: loss(k, p, model, guide, X))(PARAMS)

    values, grads = jax.jit(jax.vmap(one), compiler_options=FAST_COMPILE)(jax.random.split(key, num_repeats))
    return np.asarray(values, np.float64), {n: np.asarray(g, np.float64) for n, g in grads.items()}


@pytest.mark.parametrize("alpha", [0.5, -0.5, 2.0])
def test_value_and_gradient_agree_with_numpyro_renyi_elbo(alpha):
    """Both draw their particles from different keys: the expected loss and gradient agree
    within 5 standard errors of the difference of the means."""
    num_particles, num_repeats = 4, 2000
    training = make_trainer(model, guide, (X,), mg.renyi(alpha, num_particles))
    assert training.estimators["z"].name == "pathwise"
    assert training.objective.name == f"renyi({alpha:g})"
    values, grads = repeated(training, PARAMS, (X,), num_repeats, jax.random.key(1), positive={"scale"})
    reference_values, reference_grads = numpyro_renyi(alpha, num_particles, num_repeats, jax.random.key(2))
    pairs = [("value", values, reference_values)] + [(f"d/d{n}", grads[n], reference_grads[n]) for n in PARAMS]
    for label, ours, theirs in pairs:
        (a, se_a), (b, se_b) = mean_se(ours), mean_se(theirs)
        assert se_a > 0 and se_b > 0, (label, se_a, se_b)
        assert abs(a - b) < NUM_SE * np.hypot(se_a, se_b), (alpha, label, a, b, se_a, se_b)


# --------------------------------------------------------------------------- α = 0 is IWAE

X_DISCRETE = jnp.array([0.9, -1.3])


def discrete_model(x):
    z = numpyro.sample("z", dist.Bernoulli(0.3))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", dist.Normal(2.0 * z - 1.0, 1.0), obs=x)


def discrete_guide(x):
    numpyro.sample("z", dist.Bernoulli(logits=numpyro.param("logit", 0.4)))


@pytest.mark.parametrize(
    "model, guide, args, params, positive",
    [
        (model, guide, (X,), PARAMS, {"scale"}),
        (discrete_model, discrete_guide, (X_DISCRETE,), {"logit": jnp.asarray(0.4)}, set()),
    ],
    ids=["pathwise", "vimco"],
)
def test_alpha_zero_is_iwae_particle_for_particle(model, guide, args, params, positive):
    """The same particles (same key) give the same loss and gradient, pathwise and VIMCO.

    The key is one whose four Bernoulli draws are not all alike: with equal weights every
    α gives the same bound, and the last check would have nothing to tell apart."""
    estimates = {}
    for label, objective in [("renyi", mg.renyi(0.0, 4)), ("iwae", mg.iwae(4))]:
        training = make_trainer(model, guide, args, objective)
        state = at_params(training, params, positive)
        estimates[label] = jax.jit(training.estimate)(state, jax.random.key(5), *args)
    (renyi_loss, renyi_grads, _), (iwae_loss, iwae_grads, _) = estimates["renyi"], estimates["iwae"]
    np.testing.assert_allclose(renyi_loss, iwae_loss, rtol=1e-6)
    for name in params:
        np.testing.assert_allclose(renyi_grads[name], iwae_grads[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # and not just any bound: α = 0.5 gives another value at the same particles
    training = make_trainer(model, guide, args, mg.renyi(0.5, 4))
    other_loss = jax.jit(training.estimate)(at_params(training, params, positive), jax.random.key(5), *args)[0]
    assert abs(float(other_loss) - float(renyi_loss)) > 1e-4, (other_loss, renyi_loss)


# --------------------------------------------------------------------------- a discrete latent vs enumeration

K = 2
LOGIT = 0.4


def exact_renyi_loss(alpha, logit):
    """−E[1/(1−α) log (1/K) Σ_k w_k^{1−α}] over all 2^K configurations of K particles of one
    Bernoulli latent (K = 2: four), and its derivative in the guide's logit (float64)."""
    x = np.asarray(X_DISCRETE, np.float64)
    log_joint = np.array([
        np.log(0.3 if z else 0.7) + np.sum(-0.5 * (x - (2 * z - 1)) ** 2 - 0.5 * np.log(2 * np.pi)) for z in (0, 1)
    ])
    tuples = np.array(list(itertools.product((0, 1), repeat=K)))  # [2^K, K]

    def loss(logit):
        log_q = jnp.stack([jax.nn.log_sigmoid(-logit), jax.nn.log_sigmoid(logit)])
        log_weights = log_joint[tuples] - log_q[tuples]
        bound = (jax.nn.logsumexp((1 - alpha) * log_weights, axis=1) - np.log(K)) / (1 - alpha)
        probability = jnp.exp(jnp.sum(log_q[tuples], axis=1))
        return -jnp.sum(probability * bound)

    with jax.enable_x64(True):
        value, grad = jax.value_and_grad(loss)(jnp.asarray(np.float64(logit)))
    return float(value), float(grad)


@pytest.mark.parametrize(
    "name, make, alpha, num_repeats",
    [
        ("score_function", None, 0.5, 20000),
        ("score_function", None, -1.0, 20000),
        ("measure_valued", mg.measure_valued, 0.5, 4000),
    ],
)
def test_discrete_gradient_matches_enumeration(name, make, alpha, num_repeats):
    """The default for a Bernoulli latent is the score function with VIMCO's leave-one-out
    (the bound with one particle replaced by the others' mean); a measure-valued site
    re-costs the bound with one particle's draw replaced. Both are unbiased."""
    estimators = None if make is None else {"z": make()}
    training = make_trainer(discrete_model, discrete_guide, (X_DISCRETE,), mg.renyi(alpha, K), estimators)
    assert training.estimators["z"].name == name
    values, grads = repeated(training, {"logit": jnp.asarray(LOGIT)}, (X_DISCRETE,), num_repeats, jax.random.key(4))
    exact_value, exact_grad = exact_renyi_loss(alpha, LOGIT)
    (value, value_se), (grad, grad_se) = mean_se(values), mean_se(grads["logit"])
    assert value_se > 0 and grad_se > 0, (value_se, grad_se)
    assert abs(value - exact_value) < NUM_SE * value_se, (value, exact_value, value_se)
    assert abs(grad - exact_grad) < NUM_SE * grad_se, (grad, exact_grad, grad_se)


def test_default_score_function_is_vimco():
    """Key for key the default estimate is that of an explicit ``score_function(leave_one_out())``
    (VIMCO under the bound), not the one without a baseline."""
    grads = {}
    for label, estimators in [
        ("default", None),
        ("leave_one_out", {"z": mg.score_function(mg.baselines.leave_one_out())}),
        ("none", {"z": mg.score_function(mg.baselines.none())}),
    ]:
        training = make_trainer(discrete_model, discrete_guide, (X_DISCRETE,), mg.renyi(0.5, K), estimators)
        state = at_params(training, {"logit": jnp.asarray(LOGIT)})
        grads[label] = np.asarray(
            jax.vmap(lambda k, t=training, s=state: t.estimate(s, k, X_DISCRETE)[1]["logit"])(
                jax.random.split(jax.random.key(5), 8)
            )
        )
    np.testing.assert_allclose(grads["default"], grads["leave_one_out"], rtol=1e-6, atol=1e-7)
    assert np.max(np.abs(grads["default"] - grads["none"])) > 1e-3, grads


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("alpha", [1.0, 1, float("inf"), float("nan"), True, "0.5"])
def test_alpha_must_be_a_finite_number_other_than_one(alpha):
    with pytest.raises(ValueError) as error:
        mg.renyi(alpha, 4)
    message = str(error.value)
    assert "renyi(alpha=...)" in message and "other than 1" in message and "mg.elbo()" in message
    assert repr(alpha) in message


@pytest.mark.parametrize("num_particles", [1, 0, 2.5, True])
def test_num_particles_must_be_a_whole_number_of_at_least_two(num_particles):
    with pytest.raises(ValueError) as error:
        mg.renyi(0.5, num_particles)
    message = str(error.value)
    assert "renyi(num_particles=...)" in message and "whole number >= 2" in message and repr(num_particles) in message

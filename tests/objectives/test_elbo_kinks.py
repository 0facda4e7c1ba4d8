"""Fits are right at NumPyro's kinks: the −ELBO gradient with a Bernoulli guide at logits
exactly ``0`` (``jnp.zeros``, the most common initial value).

NumPyro 0.22's ``BernoulliLogits.log_prob`` has a wrong gradient at logits ``0`` (``x``
instead of ``x − ½``). mcgrad's estimates, through the public ``Trainer.estimate``,
match exact enumeration within 5 standard errors on a 4-point mixture (exact
``[−.55 .30 −.30 .90]``): for the default estimator (score function with leave-one-out),
for measure-valued, and for the plain score function. The plain score function is where
NumPyro's defect would show (a constant ``+½`` in every score: about ``+[1.0 .78 .8
1.5]`` of bias here); a leave-one-out baseline centres it away and measure-valued uses
no score, so those two guard against it coming back through ``log q``.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest

import mcgrad as mg
from tests.objectives._helpers import FAST_COMPILE, NUM_SE

X = jnp.array([1.1, -0.6, 0.6, -1.8])  # four points of a mixture of N(−1, 1) and N(1, 1)
PRIOR_PROB = 0.5


def model(x):
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Bernoulli(PRIOR_PROB))
        numpyro.sample("x", dist.Normal(2.0 * z - 1.0, 1.0), obs=x)


def guide(x):
    logits = numpyro.param("logits", jnp.zeros(x.shape[0]))  # exactly 0: NumPyro's kink
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("z", dist.Bernoulli(logits=logits))


def exact_gradient(logits: np.ndarray) -> np.ndarray:
    """∇ of L(l) = Σ_z q(z) c(z), c(z) = log q(z) − log p(x, z), over all 2⁴ assignments, in
    float64: ∇L = Σ_z q(z) ∇log q(z) c(z) (the term Σ_z q(z) ∇log q(z) is 0), with the
    exact score ∇_l log q(z) = z − σ(l)."""
    x = np.asarray(X, np.float64)
    logits = np.asarray(logits, np.float64)
    z = np.array(list(itertools.product([0.0, 1.0], repeat=len(x))))  # [16, 4]
    probs = 1 / (1 + np.exp(-logits))
    log_q = np.sum(z * np.log(probs) + (1 - z) * np.log1p(-probs), axis=1)
    log_prior = np.sum(z * np.log(PRIOR_PROB) + (1 - z) * np.log(1 - PRIOR_PROB), axis=1)
    log_likelihood = np.sum(-0.5 * (x - (2 * z - 1)) ** 2 - 0.5 * np.log(2 * np.pi), axis=1)
    cost = log_q - log_prior - log_likelihood
    return np.sum((np.exp(log_q) * cost)[:, None] * (z - probs), axis=0)


def test_exact_gradient_is_the_issues():
    np.testing.assert_allclose(exact_gradient(np.zeros(4)), [-0.55, 0.30, -0.30, 0.90], atol=1e-12)


ESTIMATORS = {
    "score_function-leave_one_out": ({"z": mg.score_function(baseline=mg.baselines.leave_one_out())}, "score_function"),
    "measure_valued": ({"z": mg.measure_valued()}, "measure_valued"),
    "score_function-none": ({"z": mg.score_function(baseline=mg.baselines.none())}, "score_function"),
}


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_gradient_at_zero_logits_matches_enumeration(name):
    estimators, expected = ESTIMATORS[name]
    training = mg.trainer(model, guide, X, key=jax.random.key(0), objective=mg.elbo(num_particles=8),
                          optimizer=optax.sgd(0.0), estimators=estimators)
    assert training.estimators["z"].name == expected
    state = training.init(jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(state.params["logits"]), np.zeros(4))  # logits exactly 0

    def one(key):
        return training.estimate(state, key, X)[1]["logits"]

    num_keys = 4000
    grads = np.asarray(jax.jit(jax.vmap(one), compiler_options=FAST_COMPILE)(jax.random.split(jax.random.key(2), num_keys)),
                       np.float64)
    mean, se = grads.mean(axis=0), grads.std(axis=0, ddof=1) / np.sqrt(num_keys)
    exact = exact_gradient(np.zeros(4))
    assert np.all(NUM_SE * se < 0.1), se  # power: NumPyro's bias (≥ ½ here) would fail
    # Measure-valued is exact for a Bernoulli (its weak derivative enumerates both values):
    # its spread is float32 rounding, so the tolerance has a rounding floor.
    assert np.all(np.abs(mean - exact) < NUM_SE * se + 1e-5), (name, mean, exact, se)

"""``mg.iwae``: the VIMCO and measure-valued gradients are unbiased against an exact
enumeration of all K-tuples, the default score function is VIMCO, the pathwise gradient
agrees with a hand-written reparameterized IWAE, and the bound sits between the ELBO and
log p(x), tightening as K grows.

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

import mcgrad as mg
from tests.objectives._helpers import FAST_COMPILE, NUM_SE, at_params, make_trainer, mean_se, repeated


# --------------------------------------------------------------------------- VIMCO vs enumeration

X_DISCRETE = jnp.array([0.9, -1.3])
LOGITS = jnp.array([0.4, -0.6])
K = 3


def discrete_model(x):
    with numpyro.plate("data", 2):
        z = numpyro.sample("z", dist.Bernoulli(0.4))
        numpyro.sample("x", dist.Normal(2.0 * z - 1.0, 1.0), obs=x)


def discrete_guide(x):
    logits = numpyro.param("logits", jnp.array([0.1, 0.1]))
    with numpyro.plate("data", 2):
        numpyro.sample("z", dist.Bernoulli(logits=logits))


def exact_iwae_loss(logits):
    """−E[log (1/K) Σ_k w_k] summed over all 4^K tuples of particle configurations."""
    x = np.asarray(X_DISCRETE, np.float64)
    configs = [np.array(c) for c in itertools.product([0.0, 1.0], repeat=2)]
    log_p = [np.sum(c * np.log(0.4) + (1 - c) * np.log(0.6) - 0.5 * (x - (2 * c - 1)) ** 2 - 0.5 * np.log(2 * np.pi))
             for c in configs]

    tuples = np.array(list(itertools.product(range(len(configs)), repeat=K)))  # [4^K, K]
    log_p = np.array(log_p)
    configs = np.stack(configs)  # [4, 2]

    def loss(logits):
        log_q = jnp.sum(configs * jax.nn.log_sigmoid(logits) + (1 - configs) * jax.nn.log_sigmoid(-logits), axis=1)
        log_weights = log_p[tuples] - log_q[tuples]
        probability = jnp.exp(jnp.sum(log_q[tuples], axis=1))
        return -jnp.sum(probability * (jax.nn.logsumexp(log_weights, axis=1) - np.log(K)))

    with jax.enable_x64(True):
        value, grad = jax.value_and_grad(loss)(jnp.asarray(np.asarray(logits, np.float64)))
    return float(value), np.asarray(grad)


@pytest.mark.parametrize(
    "name, make, num_repeats",
    [("score_function", None, 20000), ("measure_valued", mg.measure_valued, 4000)],
)
def test_gradient_matches_enumeration_of_all_k_tuples(name, make, num_repeats):
    """The default (score function with VIMCO's leave-one-out), and a measure-valued site,
    whose re-costed rows are the bound with one particle's draw replaced."""
    estimators = None if make is None else {"z": make()}
    training = make_trainer(discrete_model, discrete_guide, (X_DISCRETE,), mg.iwae(K), estimators)
    assert training.estimators["z"].name == name
    values, grads = repeated(training, {"logits": LOGITS}, (X_DISCRETE,), num_repeats, jax.random.key(1))
    exact_value, exact_grad = exact_iwae_loss(LOGITS)
    value, value_se = mean_se(values)
    assert abs(value - exact_value) < NUM_SE * value_se, (value, exact_value, value_se)
    grad, grad_se = mean_se(grads["logits"])
    assert np.all(grad_se > 0), grad_se
    assert np.all(np.abs(grad - exact_grad) < NUM_SE * grad_se), (grad, exact_grad, grad_se)


def test_default_estimator_is_vimco():
    """The default for a discrete site under a multi-sample bound is the score function with
    VIMCO's leave-one-out: key for key the estimate of an explicit
    ``score_function(leave_one_out())``, and not the one without a baseline."""
    grads = {}
    for label, estimators in [
        ("default", None),
        ("leave_one_out", {"z": mg.score_function(mg.baselines.leave_one_out())}),
        ("none", {"z": mg.score_function(mg.baselines.none())}),
    ]:
        training = make_trainer(discrete_model, discrete_guide, (X_DISCRETE,), mg.iwae(K), estimators)
        state = at_params(training, {"logits": LOGITS})
        grads[label] = np.asarray(jax.jit(training.estimate)(state, jax.random.key(7), X_DISCRETE)[1]["logits"])
    np.testing.assert_allclose(grads["default"], grads["leave_one_out"], rtol=1e-6, atol=1e-7)
    assert np.max(np.abs(grads["default"] - grads["none"])) > 1e-3, grads


# --------------------------------------------------------------------------- Gaussian

X = 1.5
PARAMS = {"loc": jnp.asarray(0.2), "scale": jnp.asarray(1.3)}
LOG_EVIDENCE = float(dist.Normal(0.0, np.sqrt(2.0)).log_prob(X))  # z ~ N(0, 1), x | z ~ N(z, 1)


def model(x):
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    numpyro.sample("x", dist.Normal(z, 1.0), obs=x)


def guide(x):
    loc = numpyro.param("loc", 0.0)
    scale = numpyro.param("scale", 1.0, constraint=dist.constraints.positive)
    numpyro.sample("z", dist.Normal(loc, scale))


def hand_written_iwae_gradients(params, num_particles, num_repeats, key):
    """Reparameterized IWAE written out: z_k = loc + scale·ε_k, −log mean_k p(x, z_k)/q(z_k)."""

    def loss(params, eps):
        z = params["loc"] + params["scale"] * eps
        log_w = (
            dist.Normal(0.0, 1.0).log_prob(z)
            + dist.Normal(z, 1.0).log_prob(X)
            - dist.Normal(params["loc"], params["scale"]).log_prob(z)
        )
        return -(jax.nn.logsumexp(log_w) - jnp.log(num_particles))

    eps = jax.random.normal(key, (num_repeats, num_particles))
    grads = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(params, eps)
    return {n: np.asarray(g, np.float64) for n, g in grads.items()}


def test_pathwise_gradient_matches_hand_written_iwae():
    num_repeats = 4000
    training = make_trainer(model, guide, (X,), mg.iwae(8))
    assert training.estimators["z"].name == "pathwise"
    _, grads = repeated(training, PARAMS, (X,), num_repeats, jax.random.key(2), positive={"scale"})
    reference = hand_written_iwae_gradients(PARAMS, 8, num_repeats, jax.random.key(3))
    for name in PARAMS:
        (a, se_a), (b, se_b) = mean_se(grads[name]), mean_se(reference[name])
        assert abs(a - b) < NUM_SE * np.hypot(se_a, se_b), (name, a, b, se_a, se_b)


def test_bound_between_elbo_and_log_evidence_and_tightens_with_k():
    """−loss: ELBO < IWAE-2 < IWAE-8 < IWAE-64 ≤ log p(x), the gap closing as K grows."""
    num_repeats = 8000  # at 2000 the IWAE-8 → IWAE-64 gap (about 0.033) was only about 5 standard errors
    bounds = {}
    for k, objective in [(1, mg.elbo(1)), (2, mg.iwae(2)), (8, mg.iwae(8)), (64, mg.iwae(64))]:
        training = make_trainer(model, guide, (X,), objective)
        state = at_params(training, PARAMS, positive={"scale"})
        values = jax.jit(
            jax.vmap(lambda key, training=training, state=state: training.estimate(state, key, X)[0]),
            compiler_options=FAST_COMPILE,
        )(jax.random.split(jax.random.key(10 + k), num_repeats))
        bounds[k] = mean_se(-np.asarray(values, np.float64))
    ks = sorted(bounds)
    for small, large in itertools.pairwise(ks):
        (a, se_a), (b, se_b) = bounds[small], bounds[large]
        assert b - a > NUM_SE * np.hypot(se_a, se_b), (small, large, bounds)
    value, se = bounds[64]
    assert value < LOG_EVIDENCE + NUM_SE * se, (value, LOG_EVIDENCE)
    # The gap shrinks like 1/K: K = 64 closes most of the ELBO's gap.
    assert LOG_EVIDENCE - value < 0.1 * (LOG_EVIDENCE - bounds[1][0]), (bounds, LOG_EVIDENCE)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("num_particles", [1, 2.5, True])
def test_iwae_needs_a_whole_number_of_at_least_two_particles(num_particles):
    with pytest.raises(ValueError, match=r"iwae\(num_particles=\.\.\.\) must be a whole number >= 2"):
        mg.iwae(num_particles)

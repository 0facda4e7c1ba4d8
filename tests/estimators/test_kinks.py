"""``mg.grad`` with ``mg.score_function()`` is right at NumPyro's kinks: logits exactly ``0``.

NumPyro 0.22's ``log_prob`` has a wrong gradient at logits ``0`` for Bernoulli (``x``
instead of ``x − ½``) and Binomial (``k`` instead of ``k − n/2``); a score-function
estimate there would be biased by ``(n/2)·E f``. Categorical and Geometric logits are
right in NumPyro and are checked here all the same. Each mean over ``R`` fixed keys of an
``N``-sample estimate matches the exact gradient, ``Σ_x p(x) f(x) ∇ log p(x)`` by
enumeration with the closed-form score, within 5 standard errors.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import mcgrad as mg

NUM_SE = 5.0
NUM_SAMPLES, NUM_KEYS = 100, 2000
SIGMA = 0.5  # σ(0)


def bernoulli_exact():
    x = np.array([0.0, 1.0])
    probs, scores = np.array([1 - SIGMA, SIGMA]), x - SIGMA
    return x, probs, scores


def binomial_exact(n=5):
    k = np.arange(n + 1, dtype=np.float64)
    probs = np.array([math.comb(n, int(i)) for i in k]) * SIGMA**k * (1 - SIGMA) ** (n - k)
    return k, probs, k - n * SIGMA


def geometric_exact(support=200):
    x = np.arange(support, dtype=np.float64)  # failures before the first success; tail < 2⁻¹⁹⁹
    return x, (1 - SIGMA) ** x * SIGMA, (1 - SIGMA) - x * SIGMA


# name: (dist_fn of the logits, logits, cost_fn, exact gradient, NumPyro's bias at 0 or None)
def problems():
    out = {}
    cost = lambda x: (x - 0.3) ** 2 + 1.0  # noqa: E731
    x, p, s = bernoulli_exact()
    out["bernoulli"] = (lambda l: dist.Bernoulli(logits=l), jnp.zeros(()), cost, np.sum(p * cost(x) * s), 0.5 * np.sum(p * cost(x)))
    cost = lambda k: (k - 1.0) ** 2  # noqa: E731
    k, p, s = binomial_exact()
    out["binomial"] = (lambda l: dist.Binomial(5, logits=l), jnp.zeros(()), cost, np.sum(p * cost(k) * s), 2.5 * np.sum(p * cost(k)))
    categories = np.arange(3)
    costs = (categories - 0.7) ** 2
    exact = np.array([np.sum(costs / 3 * ((categories == j) - 1 / 3)) for j in range(3)])  # π_j (f(j) − E f)
    out["categorical"] = (lambda l: dist.Categorical(logits=l), jnp.zeros(3), lambda k: (k - 0.7) ** 2, exact, None)
    x, p, s = geometric_exact()
    out["geometric"] = (lambda l: dist.Geometric(logits=l), jnp.zeros(()), lambda v: v, np.sum(p * x * s), None)
    return out


PROBLEMS = problems()


def test_exact_values():
    """The enumerations against closed forms: (f(1) − f(0))/4, 2(nσ − 1)nσ(1 − σ), π_j (f(j) − E f), −1."""
    np.testing.assert_allclose(PROBLEMS["bernoulli"][3], (1.49 - 1.09) / 4)
    np.testing.assert_allclose(PROBLEMS["binomial"][3], 2 * (5 * 0.5 - 1) * 5 * 0.25)
    costs = (np.arange(3) - 0.7) ** 2
    np.testing.assert_allclose(PROBLEMS["categorical"][3], (costs - costs.mean()) / 3)
    np.testing.assert_allclose(PROBLEMS["geometric"][3], -1.0)


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_score_function_at_zero_logits(name):
    dist_fn, logits, cost_fn, exact, numpyro_bias = PROBLEMS[name]
    grad_fn = mg.grad(cost_fn, dist_fn, estimator=mg.score_function(), num_samples=NUM_SAMPLES)
    keys = jax.random.split(jax.random.key(0), NUM_KEYS)
    grads = np.asarray(jax.jit(jax.vmap(grad_fn, in_axes=(None, 0)))(logits, keys), np.float64)
    mean, se = grads.mean(axis=0), grads.std(axis=0, ddof=1) / np.sqrt(NUM_KEYS)
    assert np.all(np.abs(mean - exact) < NUM_SE * se), (name, mean, exact, se)
    if numpyro_bias is not None:  # the test would see NumPyro's defect
        assert np.all(numpyro_bias > 2 * NUM_SE * se), (numpyro_bias, se)

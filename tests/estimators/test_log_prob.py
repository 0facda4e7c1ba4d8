r"""``log_prob``: exact gradients at the kinks where NumPyro 0.22's are wrong.

Every expected gradient is a closed form (computed in float64): Bernoulli logits
``x − σ(l)``, Binomial logits ``k − n·σ(l)``, Bernoulli / Binomial probs
``k/p − (n − k)/(1 − p)``, Geometric probs ``1/p − x/(1 − p)``, Multinomial probs
``x_j / p_j``. Float32 results are compared within a few float32 ulps (``ULPS``) of the
magnitudes involved: the rounding of a handful of operations, not a loose tolerance.
Tests run with rank promotion raising (``conftest.py``).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcgrad.estimators.log_prob import log_prob

EPS = float(np.finfo(np.float32).eps)
TINY = float(np.finfo(np.float32).tiny)
ULPS = 8


def sigmoid(logits: float) -> float:
    return 1.0 / (1.0 + math.exp(-logits))


def assert_close(actual, expected, ulps: int = ULPS):
    """Equal within ``ulps`` float32 ulps of ``max(1, |expected|)``."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    np.testing.assert_allclose(actual, expected, rtol=ulps * EPS, atol=ulps * EPS)


def log_binomial(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


# ---- the defects themselves (a sentinel: when NumPyro fixes them, the corrections can go)


@pytest.mark.skipif(numpyro.__version__ != "0.22.0", reason="documents NumPyro 0.22.0's defects")
def test_numpyro_022_defects():
    @jax.jit
    def numpyro_scores(zero, one):
        counts = jnp.array([2.0, 1.0, 0.0])
        return (
            jax.grad(lambda logit: dist.Bernoulli(logits=logit).log_prob(1.0))(zero),  # right: 1 − ½
            jax.grad(lambda logit: dist.Binomial(5, logits=logit).log_prob(2.0))(zero),  # right: 2 − 5/2
            jax.grad(lambda p: dist.Bernoulli(probs=p).log_prob(1.0))(one),  # right: 1
            jax.grad(lambda p: dist.Bernoulli(probs=p).log_prob(1.0))(one - EPS),  # right: 1/(1 − ε)
            dist.Geometric(probs=one).log_prob(0),  # right: log 1 = 0
            jax.grad(lambda p: dist.Multinomial(3, probs=p).log_prob(counts))(jnp.array([0.5, 0.5, zero])),
        )

    bernoulli, binomial, clamped, tied, geometric, multinomial = numpyro_scores(jnp.float32(0.0), jnp.float32(1.0))
    assert (float(bernoulli), float(binomial), float(clamped)) == (1.0, 2.0, 0.0)
    assert_close(tied, 0.5 / (1 - EPS))
    assert float(geometric) == -np.inf
    assert np.isnan(multinomial[2])  # right: 0 (count 0)


# ---- corrected families: exact gradient at the kinks, value as NumPyro's


def values_and_scores(make, parameters, values):
    """``log p(x)`` and ``∂ log p(x) / ∂ parameter`` of ``make(parameter)``, for each pair, and
    NumPyro's ``log p(x)``: one compiled, vectorised call."""

    def one(parameter, value):
        ours = jax.value_and_grad(lambda p: log_prob(make(p), value))(parameter)
        return ours, make(parameter).log_prob(value)

    parameters, values = jnp.asarray(parameters, jnp.float32), jnp.asarray(values, jnp.float32)
    (log_probs, scores), numpyro_log_probs = jax.jit(jax.vmap(one))(parameters, values)
    return log_probs, scores, numpyro_log_probs


def pairs(parameters, values):
    """Every ``(parameter, value)`` combination, as two flat lists."""
    grid = [(p, x) for p in parameters for x in values]
    return [p for p, _ in grid], [x for _, x in grid]


LOGITS = [0.0, 2.0, -2.0, 50.0, -50.0]


def test_bernoulli_logits():
    logits, x = pairs(LOGITS, [0.0, 1.0])
    log_probs, scores, numpyros = values_and_scores(lambda logit: dist.Bernoulli(logits=logit), logits, x)
    assert_close(scores, [xi - sigmoid(li) for li, xi in zip(logits, x)])  # x − ½ at logits 0
    assert_close(log_probs, numpyros)
    assert np.all(np.isfinite(log_probs)) and np.all(np.isfinite(scores))


def test_binomial_logits():
    logits, k = pairs(LOGITS, [0.0, 2.0, 5.0])
    log_probs, scores, numpyros = values_and_scores(lambda logit: dist.Binomial(5, logits=logit), logits, k)
    assert_close(scores, [ki - 5 * sigmoid(li) for li, ki in zip(logits, k)])  # k − n/2 at logits 0
    assert_close(log_probs, numpyros)
    assert np.all(np.isfinite(log_probs)) and np.all(np.isfinite(scores))


def exact_binomial(n, k, probs):
    """Closed-form ``log p`` and ``∂_p log p`` of Binomial(n, p) at ``k`` (positive probability)."""
    probs = float(np.float32(probs))
    value = log_binomial(n, k) + (k * math.log(probs) if k else 0.0) + ((n - k) * math.log1p(-probs) if n - k else 0.0)
    score = (k / probs if k else 0.0) - ((n - k) / (1 - probs) if n - k else 0.0)
    return value, score


def test_bernoulli_probs():
    """Every outcome of positive probability, at NumPyro's clamp points (0, τ, 1 − ε, 1), past
    them (1 − ε/2) and inside."""
    cases = [(p, x) for p in [TINY, 0.3, 1.0 - EPS, 1.0 - EPS / 2] for x in [0, 1]] + [(0.0, 0), (1.0, 1)]
    probs, x = [p for p, _ in cases], [x for _, x in cases]
    log_probs, scores, numpyros = values_and_scores(lambda p: dist.Bernoulli(probs=p), probs, x)
    exact = [exact_binomial(1, xi, pi) for pi, xi in cases]
    assert_close(scores, [score for _, score in exact])
    assert_close(log_probs, [value for value, _ in exact])
    inside = [TINY <= p <= 1 - EPS for p in probs]
    assert_close(log_probs[np.array(inside)], numpyros[np.array(inside)])


def test_binomial_probs():
    cases = [(0.0, 0), (0.3, 0), (0.3, 2), (0.3, 5), (1.0 - EPS, 3), (1.0 - EPS / 2, 3), (1.0, 5)]
    probs, k = [p for p, _ in cases], [k for _, k in cases]
    log_probs, scores, _ = values_and_scores(lambda p: dist.Binomial(5, probs=p), probs, k)
    exact = [exact_binomial(5, ki, pi) for pi, ki in cases]
    assert_close(scores, [score for _, score in exact])
    assert_close(log_probs, [value for value, _ in exact])


def test_geometric_probs():
    cases = [(0.3, 0), (0.3, 3), (1.0, 0)]
    probs, x = [p for p, _ in cases], [x for _, x in cases]
    log_probs, scores, _ = values_and_scores(lambda p: dist.Geometric(probs=p), probs, x)
    assert_close(scores, [1 / p - (xi / (1 - p) if xi else 0.0) for p, xi in cases])
    assert_close(log_probs, [math.log(p) + (xi * math.log1p(-p) if xi else 0.0) for p, xi in cases])


def test_probability_zero_outcomes_keep_numpyro_values_and_finite_gradients():
    """x > 0 at p = 0 (or x < n at p = 1): NumPyro's clamped value; the clamped term has
    derivative 0, the other term its exact one; never nan (NumPyro: nan for Binomial k = 5)."""
    log_probs, scores, numpyros = values_and_scores(lambda p: dist.Bernoulli(probs=p), [0.0, 1.0], [1.0, 0.0])
    assert np.array_equal(log_probs, numpyros) and np.array_equal(scores, [0.0, 0.0])
    cases = [(0.0, 5.0, 0.0), (0.0, 2.0, -3.0), (1.0, 2.0, 2.0)]  # (p, k, 0 / −(n − k)/(1 − p) / k/p)
    log_probs, scores, numpyros = values_and_scores(
        lambda p: dist.Binomial(5, probs=p), [p for p, _, _ in cases], [k for _, k, _ in cases]
    )
    assert np.array_equal(log_probs, numpyros) and np.array_equal(scores, [score for _, _, score in cases])


def test_multinomial_probs():
    probs = jnp.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    counts = jnp.array([[2.0, 1.0, 0.0], [3.0, 0.0, 0.0], [1.0, 0.0, 2.0]])
    log_probs, scores, numpyros = values_and_scores(lambda p: dist.Multinomial(3, probs=p), probs, counts)
    probs, counts = np.asarray(probs), np.asarray(counts)
    assert_close(scores, np.where(counts > 0, counts / np.where(probs > 0, probs, 1.0), 0.0))  # x_j / p_j
    assert_close(log_probs, numpyros)


# ---- wrappers: expand, to_event, mask, zero inflation; batched values


def test_wrappers_at_zero_logits():
    mask = jnp.array([True, False])
    values = jnp.array([[[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]], [[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]]])  # [N=2, 2, 3]

    def make(logits):
        return dist.Bernoulli(logits=logits).expand((2, 3)).to_event(1).mask(mask)

    @jax.jit
    def run(logits):
        log_probs, pullback = jax.vjp(lambda logit: log_prob(make(logit), values), logits)
        with jax.numpy_rank_promotion("allow"):
            return log_probs, pullback(jnp.ones_like(log_probs))[0], make(logits).log_prob(values)

    log_probs, score, numpyros = run(jnp.zeros(3))
    assert log_probs.shape == (2, 2)
    assert_close(score, np.sum(np.asarray(values)[:, 0, :] - 0.5, axis=0))  # unmasked rows: Σ_n (x − ½)
    assert_close(log_probs, numpyros)
    assert_close(log_probs, [[3 * math.log(0.5), 0.0]] * 2)


def test_binomial_to_event_and_expand():
    total_count = jnp.array([2.0, 5.0])
    counts = jnp.array([[1.0, 4.0], [2.0, 0.0], [0.0, 5.0]])[:, None, :]  # [N=3, 1, 2]

    def make(logit):
        return dist.Binomial(total_count, logits=logit).to_event(1).expand((4,))

    @jax.jit
    def run(logits):
        log_probs, pullback = jax.vjp(lambda logit: log_prob(make(logit), counts), logits)
        with jax.numpy_rank_promotion("allow"):
            return log_probs, pullback(jnp.ones_like(log_probs))[0], make(logits).log_prob(counts)

    log_probs, score, numpyros = run(jnp.zeros(2))
    assert log_probs.shape == (3, 4)
    assert_close(score, 4 * np.sum(np.asarray(counts)[:, 0, :] - np.asarray(total_count) / 2, axis=0))
    assert_close(log_probs, numpyros)


def test_mask_true_and_false():
    _, scores, _ = values_and_scores(lambda logit: dist.Bernoulli(logits=logit).mask(True), [0.0], [1.0])
    assert np.array_equal(scores, [0.5])
    log_probs, scores, _ = values_and_scores(lambda logit: dist.Bernoulli(logits=logit).mask(False), [0.0], [1.0])
    assert np.array_equal(log_probs, [0.0]) and np.array_equal(scores, [0.0])


@pytest.mark.parametrize("gate_name, gate", [("gate", 0.3), ("gate_logits", 0.0)])
def test_zero_inflated_base_is_corrected(gate_name, gate):
    """ZeroInflated(Binomial(5, logits = l), gate g) at l = 0: ∂_l = k − n/2 for k > 0, and for
    k = 0, ∂_l log(g + (1 − g)(1 − σ)ⁿ) = −(1 − g)·n·σ(1 − σ)ⁿ / p(0)."""

    def make(logit):
        return dist.ZeroInflatedDistribution(dist.Binomial(5, logits=logit), **{gate_name: gate})

    log_probs, scores, numpyros = values_and_scores(make, [0.0, 0.0], [2.0, 0.0])
    g = gate if gate_name == "gate" else sigmoid(gate)
    p_zero = g + (1 - g) * 0.5**5
    assert_close(scores, [2.0 - 2.5, -(1 - g) * 5 * 0.5 * 0.5**5 / p_zero])
    assert_close(log_probs, numpyros)


# ---- the score identity by exact enumeration: Σ_x p(x) f(x) ∇ log p(x) = ∇ Σ_x p(x) f(x)


def numpyro_log_prob(distribution, value):
    return distribution.log_prob(value)


def enumerated_score(make, logits, support, cost_fn, log_prob_fn=log_prob):
    """``Σ_x p(x) f(x) ∇ log p(x)`` over ``support`` (its first axis)."""

    def surrogate(logit):
        log_probs = log_prob_fn(make(logit), support)
        weights = jax.lax.stop_gradient(jnp.exp(log_probs) * cost_fn(support))
        return jnp.sum(weights * log_probs)

    return jax.jit(jax.grad(surrogate))(jnp.asarray(logits, jnp.float32))


def test_enumeration_bernoulli():
    """f(x) = (x − t)²: ∂_l E f = (1 − 2t)·σ(1 − σ) = (1 − 2t)/4 at l = 0 (REFERENCE.md)."""
    t = 0.45
    cost_fn = lambda x: (x - t) ** 2
    make, support = lambda logit: dist.Bernoulli(logits=logit), jnp.array([0.0, 1.0])
    assert_close(enumerated_score(make, 0.0, support, cost_fn), (1 - 2 * t) / 4)
    numpyros = enumerated_score(make, 0.0, support, cost_fn, numpyro_log_prob)
    assert abs(float(numpyros) - (1 - 2 * t) / 4) > 0.1  # NumPyro's score is biased here


def test_enumeration_independent_bernoulli():
    """Two coordinates, f(b) = Σ_d (b_d − t)², all four configurations enumerated."""
    t = 0.45
    support = jnp.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    ours = enumerated_score(
        lambda logit: dist.Bernoulli(logits=logit).to_event(1),
        jnp.zeros(2),
        support,
        lambda b: jnp.sum((b - t) ** 2, axis=-1),
    )
    assert_close(ours, np.full(2, (1 - 2 * t) / 4))


def test_enumeration_categorical():
    """K = 3, zero logits, f(k) = (k − 0.7)²: ∂_{l_j} E f = π_j (f(j) − E f)."""
    support = jnp.arange(3)
    cost_fn = lambda k: (k - 0.7) ** 2
    ours = enumerated_score(lambda logit: dist.Categorical(logits=logit), jnp.zeros(3), support, cost_fn)
    costs = (np.arange(3) - 0.7) ** 2
    assert_close(ours, (costs - costs.mean()) / 3)


def test_enumeration_binomial():
    """n = 4, l = 0, f(k) = (k − 1)²: E f = nσ(1 − σ) + (nσ − 1)², ∂_l = n(1 − 2σ)σ(1 − σ) + 2(nσ − 1)nσ(1 − σ)."""
    n = 4
    support = jnp.arange(n + 1, dtype=jnp.float32)
    make, cost_fn = lambda logit: dist.Binomial(n, logits=logit), lambda k: (k - 1.0) ** 2
    s = 0.5
    exact = n * (1 - 2 * s) * s * (1 - s) + 2 * (n * s - 1) * n * s * (1 - s)
    assert_close(enumerated_score(make, 0.0, support, cost_fn), exact)
    assert abs(float(enumerated_score(make, 0.0, support, cost_fn, numpyro_log_prob)) - exact) > 0.1


def test_enumeration_geometric_logits():
    """f(x) = x: E f = (1 − p)/p with p = σ(l), ∂_l E f = −(1 − p)/p = −1 at l = 0; support
    truncated at 64 (the tail Σ_{x ≥ 64} is below 2⁻⁵⁰)."""
    ours = enumerated_score(
        lambda logit: dist.Geometric(logits=logit), 0.0, jnp.arange(64, dtype=jnp.float32), lambda x: x
    )
    assert_close(ours, -1.0)


# ---- properties: random logits, jit, vmap


@jax.jit
def bernoulli_and_binomial(logits, x, k):
    bernoulli = jax.value_and_grad(lambda logit: log_prob(dist.Bernoulli(logits=logit), x))(logits)
    binomial = jax.value_and_grad(lambda logit: log_prob(dist.Binomial(7, logits=logit), k))(logits)
    numpyro_values = dist.Bernoulli(logits=logits).log_prob(x), dist.Binomial(7, logits=logits).log_prob(k)
    return bernoulli, binomial, numpyro_values


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    logits=st.one_of(st.just(0.0), st.floats(-40.0, 40.0, width=32)),
    x=st.sampled_from([0.0, 1.0]),
    k=st.integers(0, 7),
)
def test_random_logits_match_closed_form(logits, x, k):
    (value, score), (binomial_value, binomial_score), (numpyro_value, numpyro_binomial) = bernoulli_and_binomial(
        jnp.float32(logits), jnp.float32(x), jnp.float32(k)
    )
    s = sigmoid(float(np.float32(logits)))
    softplus = float(np.logaddexp(0.0, np.float64(np.float32(logits))))
    assert_close(score, x - s)
    assert_close(binomial_score, k - 7 * s, ulps=4 * ULPS)
    assert_close(value, x * logits - softplus, ulps=2 * ULPS)
    assert_close(binomial_value, log_binomial(7, k) + k * logits - 7 * softplus, ulps=4 * ULPS)
    assert_close(value, numpyro_value)
    assert_close(binomial_value, numpyro_binomial, ulps=4 * ULPS)


def test_jit_and_vmap_over_logits():
    logits = jnp.array([0.0, 2.0, -2.0, 50.0, -50.0])
    score = jax.jit(jax.vmap(jax.grad(lambda logit, x: log_prob(dist.Bernoulli(logits=logit), x))))
    for x in [0.0, 1.0]:
        assert_close(score(logits, jnp.full(5, x)), [x - sigmoid(float(logit)) for logit in logits])


# ---- validation and delegation


def test_out_of_support_is_minus_infinity_with_validation():
    with pytest.warns(UserWarning, match="Out-of-support"):
        value, score = jax.value_and_grad(lambda logit: log_prob(dist.Bernoulli(logits=logit), 2.0))(0.0)
    assert float(value) == -np.inf and float(score) == 0.0
    with pytest.warns(UserWarning, match="Out-of-support"):
        value = log_prob(dist.Binomial(5, logits=0.0), 6.0)
    assert float(value) == -np.inf


def test_without_validation_the_formula_is_numpyros():
    with numpyro.validation_enabled(False):
        assert_close(log_prob(dist.Bernoulli(logits=1.5), 2.0), dist.Bernoulli(logits=1.5).log_prob(2.0))
        logits = jnp.array([jnp.inf, -jnp.inf, jnp.inf, -jnp.inf])
        values = jnp.array([1.0, 1.0, 0.0, 0.0])
        assert np.array_equal(log_prob(dist.Bernoulli(logits=logits), values), [0.0, -np.inf, -np.inf, 0.0])
        assert np.array_equal(
            log_prob(dist.Bernoulli(logits=logits), values), dist.Bernoulli(logits=logits).log_prob(values)
        )


@pytest.mark.parametrize(
    "make, value",
    [
        (lambda p: dist.Normal(p, 2.0), 0.3),
        (lambda p: dist.Categorical(logits=jnp.stack([p, 0.0 * p, -p])), 1),
        (lambda p: dist.Geometric(logits=p), 3.0),
        (lambda p: dist.Poisson(jnp.exp(p)), 2.0),
        (lambda p: dist.Normal(p, 2.0).expand((3,)).to_event(1), jnp.array([0.3, -1.0, 2.0])),
    ],
    ids=["Normal", "CategoricalLogits", "GeometricLogits", "Poisson", "Independent(Normal)"],
)
def test_uncorrected_families_are_numpyros(make, value):
    """Delegated: the very same computation as NumPyro's, value and gradient (same jaxpr)."""

    def ours(p):
        return log_prob(make(p), value)

    def numpyros(p):
        return make(p).log_prob(value)

    for fn in [lambda f: f, jax.grad]:
        ours_traced, numpyros_traced = (
            str(jax.make_jaxpr(fn(lambda p, f=f: jnp.sum(f(p))))(jnp.float32(0.7))) for f in [ours, numpyros]
        )
        assert ours_traced == numpyros_traced


def test_continuous_value_gradient_is_numpyros():
    normal = dist.Normal(1.0, 2.0)
    assert float(jax.grad(lambda x: log_prob(normal, x))(0.3)) == float(jax.grad(normal.log_prob)(0.3))

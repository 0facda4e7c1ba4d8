"""The weak-derivative registry: lookup, user registration, and the samplers themselves."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import mcgrad as mg
from mcgrad.estimators import weak_derivatives

from .problems import FAST_COMPILE, assert_within_se

REGISTERED = ["BernoulliLogits", "BernoulliProbs", "CategoricalLogits", "CategoricalProbs", "Exponential", "Gamma",
              "Normal", "Poisson", "Uniform", "Weibull"]  # fmt: skip


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry, restored after the test."""
    monkeypatch.setattr(weak_derivatives, "_REGISTRY", dict(weak_derivatives._REGISTRY))


def test_registered_families():
    assert set(REGISTERED) <= set(mg.registered_families())


def test_subclasses_inherit_their_family():
    class Shifted(dist.Normal):
        pass

    assert mg.weak_derivative_for(Shifted(0.0, 1.0)) is mg.weak_derivative_for(dist.Normal(0.0, 1.0))
    assert mg.weak_derivative_for(dist.Laplace(0.0, 1.0)) is None


# ---- a user registration: Laplace(μ, b), density e^{−|x−μ|/b} / 2b.
# ∂μ p = (1/2b)(p⁺ − p⁻) with p± = μ ± b·Exp(1);
# ∂b p = (1/b)(p⁺ − p) with p⁺ = μ + b·S·Gamma(2, 1), S a random sign.


def _laplace_loc(key, parameters, num_samples, coupling):
    loc, scale = parameters["loc"], parameters["scale"]
    shape = (num_samples,) + jnp.shape(loc)
    key_plus, key_minus = jax.random.split(key)
    e_plus = jax.random.exponential(key_plus, shape)
    e_minus = e_plus if coupling else jax.random.exponential(key_minus, shape)
    loc, scale = loc[None], scale[None]  # against [num_samples, *shape] draws
    return 1.0 / (2.0 * scale[0]), loc + scale * e_plus, loc - scale * e_minus


def _laplace_scale(key, parameters, num_samples, coupling):
    loc, scale = parameters["loc"], parameters["scale"]
    shape = (num_samples,) + jnp.shape(scale)
    key_gamma, key_sign, key_minus = jax.random.split(key, 3)
    sign = jnp.where(jax.random.bernoulli(key_sign, 0.5, shape), 1.0, -1.0)
    magnitude = jax.random.gamma(key_gamma, 2.0, shape)
    minus = jax.random.laplace(key_minus, shape)
    loc, scale = loc[None], scale[None]  # against [num_samples, *shape] draws
    return 1.0 / scale[0], loc + scale * sign * magnitude, loc + scale * minus


LAPLACE = mg.WeakDerivative(lambda d: {"loc": d.loc, "scale": d.scale}, {"loc": _laplace_loc, "scale": _laplace_scale})


def _laplace_exact(loc, scale, k):
    """Exact gradients for (x − k)² and cos x under Laplace(loc, scale)."""
    quadratic = {"loc": 2.0 * (loc - k), "scale": 4.0 * scale}  # E = (μ − k)² + 2b²
    denominator = 1.0 + scale**2  # E cos x = cos μ / (1 + b²)
    cosine = {"loc": -math.sin(loc) / denominator, "scale": -2.0 * scale * math.cos(loc) / denominator**2}
    return quadratic, cosine


def test_register_a_new_family(registry):
    with pytest.raises(ValueError, match="no weak derivative for Laplace"):
        mg.grad(lambda x: x, lambda p: dist.Laplace(p, 1.0), estimator=mg.measure_valued(), num_samples=4)(
            0.0, jax.random.key(0)
        )
    mg.register_weak_derivative(dist.Laplace, LAPLACE)
    assert "Laplace" in mg.registered_families()
    loc, scale, k, n = 0.4, 1.3, -0.2, 50_000

    def run(params, key):
        def laplace(p):
            return dist.Laplace(p["loc"], p["scale"])

        return [
            mg.per_sample_grads(cost, laplace, estimator=mg.measure_valued(), num_samples=n)(params, key)
            for cost in (lambda x: (x - k) ** 2, jnp.cos)
        ]

    draws = jax.jit(run, compiler_options=FAST_COMPILE)(
        {"loc": jnp.float32(loc), "scale": jnp.float32(scale)}, jax.random.key(11)
    )
    for name, grads, exact in zip(("quadratic", "cos"), draws, _laplace_exact(loc, scale, k), strict=True):
        g = jax.tree.map(lambda a: np.asarray(a, np.float64), grads)
        mean = jax.tree.map(lambda a: a.mean(), g)
        se = jax.tree.map(lambda a: a.std(ddof=1) / math.sqrt(n), g)
        assert_within_se(mean, se, exact, f"Laplace / {name}: ")


def test_a_registered_subclass_overrides_its_parent(registry):
    """Registration is by class and looked up along the MRO: a subclass entry wins."""

    class MyNormal(dist.Normal):
        pass

    entry = mg.WeakDerivative(lambda d: {"loc": d.loc}, {"loc": weak_derivatives._normal_loc})
    mg.register_weak_derivative(MyNormal, entry)
    assert mg.weak_derivative_for(MyNormal(0.0, 1.0)) is entry
    assert mg.weak_derivative_for(dist.Normal(0.0, 1.0)) is not entry


# ---- every registered sampler, called directly with batched parameters: the shapes of
# the contract, under jax_numpy_rank_promotion="raise" (mcgrad's own array code).

BATCH = (2, 3)
N = 5


_ONES = np.ones(BATCH, np.float32)
PARAMETERS = {  # as the estimator passes them: broadcast to the batch
    "Normal": {"loc": 0.5 * _ONES, "scale": 2.0 * _ONES},
    "Poisson": {"rate": 2.0 * _ONES},
    "Exponential": {"rate": 2.0 * _ONES},
    "Gamma": {"concentration": 2.0 * _ONES, "rate": 3.0 * _ONES},
    "Weibull": {"scale": 2.0 * _ONES, "concentration": 1.5 * _ONES},
    "Uniform": {"low": -_ONES, "high": 2.0 * _ONES},
}


FINITE = {"BernoulliLogits": (dist.Bernoulli(logits=np.zeros(3)), 2), "BernoulliProbs": (dist.Bernoulli(probs=0.3), 2),
          "CategoricalLogits": (dist.Categorical(logits=np.zeros(5)), 5),
          "CategoricalProbs": (dist.Categorical(probs=np.full((2, 4), 0.25)), 4)}  # fmt: skip


@pytest.mark.parametrize("family", list(FINITE))
def test_finite_families_are_summed_over_their_values_not_sampled(family):
    distribution, num_values = FINITE[family]
    entry = mg.weak_derivative_for(distribution)
    assert type(distribution).__name__ == family
    assert entry.support_size(distribution) == num_values and entry.samplers == {}


@pytest.mark.parametrize("family", [family for family in REGISTERED if family not in FINITE])
def test_sampler_shapes(family):
    cls = next(c for c in weak_derivatives._REGISTRY if c.__name__ == family)
    entry = weak_derivatives._REGISTRY[cls]
    parameters = PARAMETERS[family]
    for coupling in (True, False):
        for index, (name, sampler) in enumerate(entry.samplers.items()):
            constant, positive, negative = sampler(jax.random.key(index), parameters, N, coupling)
            shape = jnp.shape(parameters[name])
            assert jnp.shape(constant) == shape, (family, name, coupling, jnp.shape(constant))
            assert positive.shape == (N,) + shape and negative.shape == (N,) + shape, (family, name, coupling)
            assert bool(jnp.all(jnp.isfinite(constant)))


# ---- the sampler path with a trailing parameter axis (a vector parameter per coordinate):
# no built-in family takes it since Categorical is summed over its values; a user's
# registration may. Categorical probs by samplers: ∂_{p_k} Σ_j p_j f(j) = f(k), so
# p⁺ = δ_k with c = 1, and any p⁻ whose mean the simplex's tangent cancels: the
# distribution itself, one draw shared by all K (coupled) or one each.


def _categorical_probs_by_samplers(key, parameters, num_samples, coupling):
    probs = parameters["probs"]  # [*batch, K]
    num_values = probs.shape[-1]
    shape = (num_samples,) + probs.shape
    positive = jnp.broadcast_to(jnp.arange(num_values), shape)
    logits = jnp.log(probs)
    if coupling:
        draw = jax.random.categorical(key, logits, shape=(num_samples,) + probs.shape[:-1])
        negative = jnp.broadcast_to(draw[..., None], shape)
    else:
        negative = jax.random.categorical(key, jnp.broadcast_to(logits[..., None, :], probs.shape + (num_values,)),
                                          shape=shape)
    return jnp.ones_like(probs), positive, negative


@pytest.mark.parametrize("coupling", [True, False])
def test_a_registered_vector_parameter_per_coordinate_is_unbiased(registry, coupling):
    class SampledCategorical(dist.CategoricalProbs):
        pass

    mg.register_weak_derivative(SampledCategorical, mg.WeakDerivative(lambda d: {"probs": d.probs},
                                                                      {"probs": _categorical_probs_by_samplers}))
    assert mg.weak_derivative_for(SampledCategorical(probs=jnp.full(3, 1 / 3))).support_size is None
    logits = jnp.array([[0.3, -0.4, 1.1], [-0.8, 0.2, 0.5]])  # two coordinates, K = 3 values each
    weights = jnp.array([0.5, 2.0])

    def cost(x):
        return jnp.sum(weights * (x - 1.3) ** 2)

    def exact_expectation(logits):
        values = (jnp.arange(3.0) - 1.3) ** 2
        return jnp.sum(weights * jnp.sum(jax.nn.softmax(logits) * values[None], axis=-1))

    num_samples = 20_000
    estimate = mg.per_sample_grads(cost, lambda t: SampledCategorical(probs=jax.nn.softmax(t)),
                                   estimator=mg.measure_valued(coupling=coupling), num_samples=num_samples)
    with jax.numpy_rank_promotion("allow"):  # NumPyro's Categorical sampling promotes ranks
        grads = jax.jit(estimate, compiler_options=FAST_COMPILE)(logits, jax.random.key(5))
    g = np.asarray(grads, np.float64)
    assert g.shape == (num_samples, 2, 3)
    assert_within_se(g.mean(0), g.std(0, ddof=1) / math.sqrt(num_samples), np.asarray(jax.grad(exact_expectation)(logits)),
                     f"coupling={coupling}: ")

"""mg.evaluation: exact values on conjugate models, statistical checks with SE-based tolerances."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import mcgrad as mg
from mcgrad import evaluation

# ----------------------------------------------------------------------------- conjugate Gaussian
# z ~ N(0, 1), x | z ~ N(z, 1): p(x) = N(0, 2), p(z | x) = N(x/2, 1/2).


def conjugate_model(x, batch_size=None):
    with numpyro.plate("data", x.shape[0], subsample_size=batch_size) as index:
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        numpyro.sample("x", dist.Normal(z, 1.0), obs=x[index])


def exact_posterior_guide(x, batch_size=None):
    with numpyro.plate("data", x.shape[0], subsample_size=batch_size) as index:
        numpyro.sample("z", dist.Normal(x[index] / 2, np.sqrt(0.5)))


def shifted_guide(x, batch_size=None):
    shift = numpyro.param("shift", 0.0)
    with numpyro.plate("data", x.shape[0], subsample_size=batch_size) as index:
        numpyro.sample("z", dist.Normal(x[index] / 2 + shift, 1.0))


DATA = jnp.linspace(-2.0, 2.0, 9)
LOG_EVIDENCE = dist.Normal(0.0, np.sqrt(2.0)).log_prob(DATA)


def gaussian_model(x):
    loc = numpyro.param("loc", 0.0)
    scale = numpyro.param("scale", 1.0, constraint=dist.constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", dist.Normal(loc, scale), obs=x)


def test_log_likelihood_is_the_sum_of_observed_log_probs():
    params = {"loc": 0.3, "scale": 1.7}
    result = evaluation.log_likelihood(gaussian_model, params, DATA)
    expected = dist.Normal(0.3, 1.7).log_prob(DATA)
    np.testing.assert_allclose(result.per_datum, expected, rtol=1e-6)
    np.testing.assert_allclose(result.total, jnp.sum(expected), rtol=1e-6)
    np.testing.assert_allclose(result.mean, jnp.mean(expected), rtol=1e-6)


def test_log_likelihood_sums_event_dims_and_sites_per_datum():
    def two_site_model(x, y):
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", dist.Normal(jnp.zeros(3), 1.0).to_event(1), obs=x)
            numpyro.sample("y", dist.Bernoulli(probs=0.25), obs=y)

    x, y = jnp.ones((5, 3)), jnp.array([0.0, 1.0, 1.0, 0.0, 1.0])
    with jax.numpy_rank_promotion("allow"):
        result = evaluation.log_likelihood(two_site_model, {}, x, y)
    expected = 3 * dist.Normal(0.0, 1.0).log_prob(1.0) + jnp.where(y > 0, jnp.log(0.25), jnp.log(0.75))
    np.testing.assert_allclose(result.per_datum, expected, rtol=1e-6)


def test_log_likelihood_refuses_latent_sites_and_minibatches():
    with pytest.raises(ValueError, match="latent"):
        evaluation.log_likelihood(conjugate_model, {}, DATA)

    def subsampled(x):
        with numpyro.plate("data", x.shape[0], subsample_size=3) as index:
            numpyro.sample("x", dist.Normal(0.0, 1.0), obs=x[index])

    with pytest.raises(ValueError, match="full held-out data"):
        evaluation.log_likelihood(subsampled, {}, DATA)


def test_iwae_bound_is_exact_with_the_exact_posterior():
    for num_samples in (1, 7):
        bound = evaluation.iwae_bound(
            conjugate_model, exact_posterior_guide, {}, DATA, key=jax.random.key(0), num_samples=num_samples
        )
        np.testing.assert_allclose(bound.per_datum, LOG_EVIDENCE, atol=1e-5)
        np.testing.assert_allclose(bound.total, jnp.sum(LOG_EVIDENCE), rtol=1e-5)


def test_iwae_bound_increases_with_k_towards_log_evidence():
    """E[L_K] is nondecreasing in K and below log p(x); checked on the mean over many data."""
    data = jax.random.normal(jax.random.key(1), (2000,)) * np.sqrt(2.0)
    exact = jnp.mean(dist.Normal(0.0, np.sqrt(2.0)).log_prob(data))
    means, errors = [], []
    for num_samples in (1, 10, 100):
        bound = evaluation.iwae_bound(
            conjugate_model, shifted_guide, {"shift": 0.7}, data, key=jax.random.key(2), num_samples=num_samples,
            batch_size=50,
        )
        means.append(float(bound.mean))
        errors.append(float(jnp.std(bound.per_datum - dist.Normal(0.0, np.sqrt(2.0)).log_prob(data)) / np.sqrt(2000)))
    # analytic ELBO of q = N(x/2 + 0.7, 1): E_q[log p(x, z) − log q(z)]
    assert means[0] < means[1] < means[2] < float(exact)
    assert means[1] - means[0] > 5 * (errors[0] + errors[1])
    assert float(exact) - means[2] < 0.1


def test_iwae_bound_with_one_sample_matches_the_analytic_elbo():
    shift = 0.7
    data = jax.random.normal(jax.random.key(3), (4000,)) * np.sqrt(2.0)
    bound = evaluation.iwae_bound(
        conjugate_model, shifted_guide, {"shift": shift}, data, key=jax.random.key(4), num_samples=1
    )
    # E_q[log p(x, z) - log q(z)] = log p(x) - KL(q || p(z|x)), both Gaussian
    posterior_var, guide_var = 0.5, 1.0
    kl = 0.5 * (guide_var / posterior_var + shift**2 / posterior_var - 1 + np.log(posterior_var / guide_var))
    exact = dist.Normal(0.0, np.sqrt(2.0)).log_prob(data) - kl
    difference = bound.per_datum - exact
    standard_error = float(jnp.std(difference) / np.sqrt(data.shape[0]))
    assert abs(float(jnp.mean(difference))) < 5 * standard_error


def test_iwae_bound_with_a_global_latent_is_a_joint_bound():
    def global_model(x):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def exact_guide(x):  # p(z | x) = N(Σx/(n+1), 1/(n+1))
        n = x.shape[0]
        numpyro.sample("z", dist.Normal(jnp.sum(x) / (n + 1), 1 / np.sqrt(n + 1)))

    x = DATA[:4]
    bound = evaluation.iwae_bound(global_model, exact_guide, {}, x, key=jax.random.key(0), num_samples=3)
    covariance = jnp.eye(4) + jnp.ones((4, 4))
    exact = dist.MultivariateNormal(jnp.zeros(4), covariance).log_prob(x)
    np.testing.assert_allclose(bound.total, exact, rtol=1e-5)


# ----------------------------------------------------------------------------- MMD


def test_mmd_is_unbiased_for_identical_distributions():
    estimates = []
    for seed in range(20):
        keys = jax.random.split(jax.random.key(seed), 2)
        x, y = jax.random.normal(keys[0], (200, 2)), jax.random.normal(keys[1], (200, 2))
        estimates.append(float(evaluation.mmd(x, y, bandwidth=1.0).mmd2))
    estimates = np.array(estimates)
    assert abs(estimates.mean()) < 5 * estimates.std(ddof=1) / np.sqrt(len(estimates))


def test_mmd_detects_a_shift_and_not_its_absence():
    keys = jax.random.split(jax.random.key(0), 3)
    x, y = jax.random.normal(keys[0], (400, 2)), jax.random.normal(keys[1], (400, 2))
    same = evaluation.mmd(x, y, num_permutations=200, key=keys[2])
    shifted = evaluation.mmd(x, y.at[:, 0].add(0.5), num_permutations=200, key=keys[2])
    assert float(same.p_value) > 0.01
    assert float(shifted.p_value) < 0.01
    assert float(shifted.mmd2) > 10 * abs(float(same.mmd2))


def test_mmd_median_bandwidth_and_exact_value():
    x = jnp.array([[0.0], [1.0]])
    y = jnp.array([[3.0], [4.0]])
    result = evaluation.mmd(x, y, bandwidth=1.0)
    k = lambda d: np.exp(-(d**2) / 2)  # noqa: E731
    expected = k(1) + k(1) - 2 * (k(3) + k(4) + k(2) + k(3)) / 4
    np.testing.assert_allclose(result.mmd2, expected, rtol=1e-5)
    # median of pairwise distances {1, 3, 4, 2, 3, 1} is 2.5
    np.testing.assert_allclose(evaluation.median_bandwidth(jnp.concatenate([x, y])), 2.5, rtol=1e-6)


# ----------------------------------------------------------------------------- classifier test, coverage, accuracy


def test_classifier_two_sample_test_near_chance_for_identical_samples():
    rng = np.random.default_rng(0)
    result = evaluation.classifier_two_sample_test(rng.normal(size=(1000, 3)), rng.normal(size=(1000, 3)))
    standard_error = np.sqrt(0.25 / result.num_test)
    assert abs(result.accuracy - 0.5) < 4 * standard_error
    assert result.p_value > 0.001


def test_classifier_two_sample_test_detects_a_difference():
    rng = np.random.default_rng(1)
    ring = rng.normal(size=(1000, 2))
    ring /= np.linalg.norm(ring, axis=1, keepdims=True)
    blob = rng.normal(scale=0.6, size=(1000, 2))
    linear = evaluation.classifier_two_sample_test(ring, blob, classifier="logistic")
    nonlinear = evaluation.classifier_two_sample_test(ring, blob, classifier="knn")
    assert nonlinear.accuracy > 0.85 and nonlinear.p_value < 1e-10
    assert linear.accuracy < nonlinear.accuracy  # a linear classifier cannot see a ring


def test_mode_coverage_counts():
    modes = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0], [4.0, 4.0]])
    rng = np.random.default_rng(0)
    # 600 samples on mode 0, 300 on mode 1, 10 on mode 2 (below a quarter of the fair share), 90 far away
    samples = np.concatenate(
        [
            modes[0] + 0.1 * rng.normal(size=(600, 2)),
            modes[1] + 0.1 * rng.normal(size=(300, 2)),
            modes[2] + 0.1 * rng.normal(size=(10, 2)),
            np.full((90, 2), 2.0),
        ]
    )
    coverage = evaluation.mode_coverage(samples, modes, radius=0.5)
    assert coverage.num_covered == 2 and coverage.num_modes == 4
    np.testing.assert_array_equal(coverage.counts, [600, 300, 10, 0])
    assert coverage.high_quality_fraction == pytest.approx(0.91)
    assert evaluation.mode_coverage(samples, modes, radius=0.5, min_fraction=0.005).num_covered == 3


def test_downstream_accuracy_separates_informative_from_random_features():
    from models.data import iris

    features, species = iris()
    informative = evaluation.downstream_accuracy(features, species)
    noise = evaluation.downstream_accuracy(np.random.default_rng(0).normal(size=(150, 4)), species)
    assert informative.accuracy > 0.85
    assert noise.accuracy < 0.6
    explicit = evaluation.downstream_accuracy(features[::2], species[::2], features[1::2], species[1::2])
    assert explicit.accuracy > 0.85


def test_exported_as_mg_evaluation():
    assert mg.evaluation is evaluation
    assert "evaluation" in mg.__all__

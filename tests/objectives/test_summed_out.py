"""A discrete site summed out of the model (marked ``infer={"enumerate": "parallel"}``, as
for NumPyro's ``TraceEnum_ELBO``, and not sampled by the guide): the objective is the one
of the model with the site marginalised, step for step the same as the model written with
``dist.MixtureSameFamily``; the pointwise log-likelihood is the marginal; what cannot be
summed slice by slice is a clear error."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro.infer import autoguide

import mcgrad as mg

X = jnp.array([-2.1, -1.7, 2.2, 1.9, -2.4, 2.6, 0.3, 1.5, -1.2, 2.0, -2.2, 1.8])
WEIGHTS = jnp.array([0.3, 0.5, 0.2])


def labelled(x, batch_size=None):
    locs = numpyro.sample("locs", dist.Normal(0.0, 3.0).expand([3]).to_event(1))
    with numpyro.plate("data", x.shape[0], subsample_size=batch_size) as index:
        c = numpyro.sample("c", dist.Categorical(WEIGHTS), infer={"enumerate": "parallel"})
        numpyro.sample("x", dist.Normal(locs[c], 1.0), obs=x[index])


def mixture(x, batch_size=None):
    locs = numpyro.sample("locs", dist.Normal(0.0, 3.0).expand([3]).to_event(1))
    with numpyro.plate("data", x.shape[0], subsample_size=batch_size) as index:
        numpyro.sample("x", dist.MixtureSameFamily(dist.Categorical(WEIGHTS), dist.Normal(locs, 1.0)), obs=x[index])


def coin_labelled(x, batch_size=None):
    locs = numpyro.sample("locs", dist.Normal(0.0, 3.0).expand([2]).to_event(1))
    with numpyro.plate("data", x.shape[0], subsample_size=batch_size) as index:
        b = numpyro.sample("c", dist.Bernoulli(0.3), infer={"enumerate": "parallel"})  # float values 0., 1.
        numpyro.sample("x", dist.Normal(jnp.where(b > 0.5, locs[1], locs[0]), 1.0), obs=x[index])


def coin_mixture(x, batch_size=None):
    locs = numpyro.sample("locs", dist.Normal(0.0, 3.0).expand([2]).to_event(1))
    with numpyro.plate("data", x.shape[0], subsample_size=batch_size) as index:
        mixing = dist.Categorical(jnp.array([0.7, 0.3]))
        numpyro.sample("x", dist.MixtureSameFamily(mixing, dist.Normal(locs, 1.0)), obs=x[index])


def fit(model, objective, batch_size=None, num_steps=60):
    guide = autoguide.AutoNormal(numpyro.handlers.block(model, hide=["c"]))
    return mg.fit(model, guide, X, batch_size, key=jax.random.key(0), num_steps=num_steps,
                  optimizer=optax.adam(0.05), objective=objective, progress_bar=False)


@pytest.mark.parametrize(
    ("labelled_model", "mixture_model", "objective", "batch_size"),
    [
        (labelled, mixture, mg.elbo(2), None),
        (labelled, mixture, mg.iwae(3), None),
        (labelled, mixture, mg.elbo(2), 5),
        (coin_labelled, coin_mixture, mg.elbo(2), None),
    ],
)
def test_the_summed_label_is_the_mixture(labelled_model, mixture_model, objective, batch_size):
    """The same guide draws, the same minibatches: the loss of every step and the fitted
    parameters agree with the MixtureSameFamily model to float rounding (the subsampled
    case checks the plate scale: log Σ_k of the unscaled terms, then scaled; the coin, a
    Bernoulli label of float values)."""
    summed, marginal = fit(labelled_model, objective, batch_size), fit(mixture_model, objective, batch_size)
    np.testing.assert_allclose(summed.losses, marginal.losses, rtol=1e-5)
    np.testing.assert_allclose(summed.params["locs_auto_loc"], marginal.params["locs_auto_loc"], rtol=1e-4, atol=1e-5)
    assert summed.losses[-1] < summed.losses[0] - 1.0  # it trains


def test_the_pointwise_log_likelihood_is_the_marginal():
    """to_inference_data's log_likelihood of x: log Σ_k w_k N(x_n; locs_k, 1) for each draw
    (NumPyro's log_likelihood would draw the label from its prior); ArviZ's loo runs."""
    import arviz as az

    result = fit(labelled, mg.elbo(2), num_steps=100)
    data = result.to_inference_data(num_samples=20, key=jax.random.key(1))
    locs = np.asarray(data.posterior["locs"])[0]  # [20, 3]
    exact = jax.nn.logsumexp(jnp.log(WEIGHTS) + dist.Normal(locs[:, None, :], 1.0).log_prob(X[None, :, None]), axis=-1)
    np.testing.assert_allclose(np.asarray(data.log_likelihood["x"])[0], exact, rtol=1e-5, atol=1e-5)
    assert np.isfinite(az.loo(data).elpd_loo)


def test_the_held_out_bound_is_the_mixtures():
    """mg.evaluation.iwae_bound sums the label out too: the same bound, datum by datum, as
    the MixtureSameFamily model's at the same parameters and keys."""
    result = fit(labelled, mg.elbo(2), num_steps=40)
    guides = {model: autoguide.AutoNormal(numpyro.handlers.block(model, hide=["c"])) for model in (labelled, mixture)}
    bounds = {model: mg.evaluation.iwae_bound(model, guides[model], result.params, X, key=jax.random.key(2),
                                              num_samples=16) for model in (labelled, mixture)}
    np.testing.assert_allclose(bounds[labelled].per_datum, bounds[mixture].per_datum, rtol=1e-5, atol=1e-5)
    assert np.isfinite(bounds[labelled].mean)


def guide_locs(x):
    numpyro.sample("locs", dist.Normal(numpyro.param("loc", jnp.zeros(3)), 1.0).to_event(1))


def two_labels(x):
    locs = numpyro.sample("locs", dist.Normal(0.0, 3.0).expand([3]).to_event(1))
    with numpyro.plate("data", x.shape[0]):
        c = numpyro.sample("c", dist.Categorical(WEIGHTS), infer={"enumerate": "parallel"})
        d = numpyro.sample("d", dist.Bernoulli(0.5), infer={"enumerate": "parallel"})
        numpyro.sample("x", dist.Normal(locs[c] + d, 1.0), obs=x)


def labels_summed_outside(x):
    locs = numpyro.sample("locs", dist.Normal(0.0, 3.0).expand([3]).to_event(1))
    with numpyro.plate("data", x.shape[0]):
        c = numpyro.sample("c", dist.Categorical(WEIGHTS), infer={"enumerate": "parallel"})
    numpyro.sample("total", dist.Normal(jnp.sum(locs[c]), 1.0), obs=jnp.sum(x))


def counts(x):
    locs = numpyro.sample("locs", dist.Normal(0.0, 3.0).expand([3]).to_event(1))
    with numpyro.plate("data", x.shape[0]):
        n = numpyro.sample("n", dist.Poisson(2.0), infer={"enumerate": "parallel"})
        numpyro.sample("x", dist.Normal(locs[0] + n, 1.0), obs=x)


def bits(x):
    locs = numpyro.sample("locs", dist.Normal(0.0, 3.0).expand([3]).to_event(1))
    with numpyro.plate("data", x.shape[0]):
        b = numpyro.sample("b", dist.Bernoulli(0.5).expand([2]).to_event(1), infer={"enumerate": "parallel"})
        numpyro.sample("x", dist.Normal(locs[0] + b.sum(-1), 1.0), obs=x)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (two_labels, r"marks \['c', 'd'\] for enumeration.* mcgrad sums out one model-only site"),
        (labels_summed_outside, r"site 'total' \(Normal\) reads the summed-out site 'c' across its plates \['data'\]"),
        (counts, r"site 'n' \(Poisson.*\) is marked for enumeration, but mcgrad sums out only a Bernoulli or Categorical"),
        (bits, r"site 'b' \(Bernoulli.*\) is marked for enumeration, .* one value per slice of its plates"),
    ],
)
def test_what_cannot_be_summed_slice_by_slice_is_named(model, message):
    with pytest.raises(ValueError, match=message):
        mg.trainer(model, guide_locs, X, key=jax.random.key(0), objective=mg.elbo(2), optimizer=optax.adam(0.1))

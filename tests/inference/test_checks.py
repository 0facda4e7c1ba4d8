"""Checks of a program before it is fitted (``mcgrad.inference.checks``, through ``mg.fit``
and ``mg.trainer``): missing data that the model masks is fitted as if it were dropped,
data the model does not mask is a clear error naming the site and the argument, infinite
data is refused up front; NumPyro's own warnings for a missing plate and for a guide site
that is not in the model, once, at the user's line; a site-named error when the guide
draws values outside the model's support.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro.infer import SVI
from numpyro.infer.autoguide import AutoDelta, AutoNormal

import mcgrad as mg
from mcgrad.inference.costs import site_log_prob

X = jnp.array([0.5, jnp.nan, 1.5, 2.0, jnp.nan, -0.3])
OBSERVED = ~jnp.isnan(X)
FIT = {"key": jax.random.key(0), "num_steps": 150, "optimizer": optax.adam(0.05), "progress_bar": False}


def model(x, mask=None):
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", x.shape[0]), numpyro.handlers.mask(mask=True if mask is None else mask):
        numpyro.sample("x", dist.Normal(z, 1.0), obs=x)


def guide(x, mask=None):
    loc = numpyro.param("loc", 0.0)
    scale = numpyro.param("scale", 1.0, constraint=dist.constraints.positive)
    numpyro.sample("z", dist.Normal(loc, scale))


def assert_same_params(a, b):
    for name in a:
        assert np.all(np.isfinite(np.asarray(a[name]))), name
        np.testing.assert_allclose(np.asarray(a[name]), np.asarray(b[name]), rtol=1e-5, atol=1e-6, err_msg=name)


# --------------------------------------------------------------------------- masked missing data


def test_masked_nan_fits_as_if_dropped():
    masked = mg.fit(model, guide, X, OBSERVED, objective=mg.elbo(4), **FIT)
    dropped = mg.fit(model, guide, X[OBSERVED], objective=mg.elbo(4), **FIT)
    assert np.all(np.isfinite(masked.losses))
    assert_same_params(masked.params, dropped.params)


def test_masked_nan_fits_as_if_dropped_under_maximum_likelihood():
    def likelihood(x, mask=None):
        loc = numpyro.param("loc", 0.0)
        with numpyro.plate("data", x.shape[0]), numpyro.handlers.mask(mask=True if mask is None else mask):
            numpyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    masked = mg.fit(likelihood, None, X, OBSERVED, objective=mg.maximum_likelihood(), **FIT)
    dropped = mg.fit(likelihood, None, X[OBSERVED], objective=mg.maximum_likelihood(), **FIT)
    assert_same_params(masked.params, dropped.params)


def test_masked_rows_of_an_event_fit_as_if_dropped():
    """Rows of a two-dimensional observation (``to_event(1)``) masked with ``dist.mask``."""
    rows = jnp.array([[0.2, 1.1], [jnp.nan, jnp.nan], [1.4, 0.7], [jnp.nan, 0.3]])
    observed = ~jnp.any(jnp.isnan(rows), axis=1)

    def rows_model(x, mask=None):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        with numpyro.plate("data", x.shape[0]):
            fn = dist.Normal(z, 1.0).expand([2]).to_event(1)
            numpyro.sample("x", fn if mask is None else fn.mask(mask), obs=x)

    masked = mg.fit(rows_model, guide, rows, observed, objective=mg.elbo(4), **FIT)
    dropped = mg.fit(rows_model, guide, rows[observed], objective=mg.elbo(4), **FIT)
    assert_same_params(masked.params, dropped.params)


def test_masked_nan_under_numpyro_svi():
    """Inside NumPyro's jitted SVI the data are tracers: the check steps aside, and the
    masked NaN still never reaches the gradient."""
    svi = SVI(model, guide, numpyro.optim.Adam(0.05), mg.elbo(4))
    result = svi.run(jax.random.key(0), 100, X, OBSERVED, progress_bar=False)
    assert np.all(np.isfinite(np.asarray(result.losses)))
    assert all(np.isfinite(float(v)) for v in result.params.values())


def test_a_mask_on_the_site_keeps_the_gradient_finite():
    """A site whose own ``mask`` (not a ``MaskedDistribution``) hides a NaN: ``where(mask,
    log p, 0)`` alone would have the gradient ``0 · ∇ log p(NaN) = NaN``."""

    def log_density(loc):
        site = {"fn": dist.Normal(loc, 1.0), "value": jnp.array([1.0, jnp.nan]), "mask": jnp.array([True, False])}
        return jnp.sum(site_log_prob(site))

    value, gradient = jax.value_and_grad(log_density)(0.5)
    assert float(gradient) == pytest.approx(0.5)  # d/dloc of −(1 − loc)²/2: the first entry only
    assert float(value) == pytest.approx(float(dist.Normal(0.5, 1.0).log_prob(1.0)))


# --------------------------------------------------------------------------- data errors


def test_unmasked_nan_names_the_site_and_the_argument():
    with pytest.raises(ValueError) as error:
        mg.fit(model, guide, X, objective=mg.elbo(4), **FIT)
    message = str(error.value)
    assert "site 'x'" in message and "2 NaN" in message and "argument 0" in message and "(6,)" in message
    assert "numpyro.handlers.mask" in message


def test_partly_masked_nan_counts_the_unmasked_ones():
    mask = OBSERVED.at[1].set(True)  # entry 1 is NaN but scored
    with pytest.raises(ValueError, match=r"site 'x'.* 1 NaN values where the model does not mask them"):
        mg.trainer(model, guide, X, mask, key=jax.random.key(0), objective=mg.elbo(4), optimizer=optax.sgd(0.1))


def test_unmasked_nan_in_a_keyword_argument():
    def keyword_model(x=None):
        model(x)

    def keyword_guide(x=None):
        guide(x)

    with pytest.raises(ValueError, match=r"site 'x'.*keyword 'x'"):
        mg.fit(keyword_model, keyword_guide, x=X, objective=mg.elbo(4), **FIT)


def test_infinite_data_is_refused_up_front():
    with pytest.raises(ValueError) as error:
        mg.fit(model, guide, X.at[0].set(jnp.inf), OBSERVED, objective=mg.elbo(4), **FIT)
    message = str(error.value)
    assert "argument 0" in message and "1 infinite" in message
    # mg.trainer (no up-front check) refuses it on the trace.
    with pytest.raises(ValueError, match=r"site 'x'.*NaN or infinite"):
        mg.trainer(model, guide, jnp.array([0.5, -jnp.inf]), key=jax.random.key(0), objective=mg.elbo(4),
                   optimizer=optax.sgd(0.1))


def test_check_data_with_the_model_checks_every_call():
    """``check_data(args, kwargs, model)`` checks on a trace of the model, needing no
    setup: a fit that reuses a compiled program for new data of the same shapes (which
    skips setup) checks its data with it."""
    from mcgrad.fit import check_data

    check_data((X, OBSERVED), {}, model)  # masked: fine
    with pytest.raises(ValueError, match=r"site 'x'.* 2 NaN .*argument 0"):
        check_data((X, jnp.ones_like(OBSERVED)), {}, model)
    check_data((X, jnp.ones_like(OBSERVED)), {})  # without the model: only ±inf is checked


# --------------------------------------------------------------------------- NumPyro's warnings


def record(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [w for w in caught if issubclass(w.category, UserWarning)]


def test_missing_plate_warns_once_like_numpyro():
    """``x[:, None]`` under a plate of 4 broadcasts to 16 observations; NumPyro's Trace_ELBO
    warns, and so does mcgrad, once, at the caller's line."""
    data = jnp.array([0.3, 1.2, -0.4, 0.8])[:, None]
    caught = record(lambda: mg.fit(model, guide, data, objective=mg.elbo(2), **{**FIT, "num_steps": 3}))
    messages = [str(w.message) for w in caught]
    expected = ("Missing a plate statement for batch dimension -2 at site 'x'. You can use "
                "`numpyro.util.format_shapes` utility to check shapes at all sites of your model.")
    assert messages == [expected]
    assert caught[0].filename == __file__
    # The right shape: no warning.
    assert record(lambda: mg.fit(model, guide, data[:, 0], objective=mg.elbo(2), **{**FIT, "num_steps": 3})) == []


def test_missing_plate_warns_under_maximum_likelihood():
    def likelihood(x):
        loc = numpyro.param("loc", 0.0)
        with numpyro.plate("data", 4):
            numpyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    caught = record(lambda: mg.trainer(likelihood, None, jnp.zeros((4, 1)), key=jax.random.key(0),
                                       objective=mg.maximum_likelihood(), optimizer=optax.sgd(0.1)))
    assert [str(w.message)[:55] for w in caught] == ["Missing a plate statement for batch dimension -2 at sit"]


def test_guide_site_not_in_the_model_warns_like_numpyro():
    def extra_guide(x, mask=None):
        guide(x)
        numpyro.sample("w", dist.Normal(0.0, 1.0))

    caught = record(lambda: mg.trainer(model, extra_guide, X[OBSERVED], key=jax.random.key(0),
                                       objective=mg.elbo(2), optimizer=optax.sgd(0.1)))
    assert len(caught) == 1 and "Found non-auxiliary vars in guide but not model" in str(caught[0].message)
    assert "'w'" in str(caught[0].message) and caught[0].filename == __file__


# --------------------------------------------------------------------------- support mismatch


def bernoulli_model():
    numpyro.sample("b", dist.Bernoulli(0.3))


def normal_guide_for(name):
    def normal_guide():
        numpyro.sample(name, dist.Normal(numpyro.param("loc", 0.0), 1.0))

    return normal_guide


def half_normal_model():
    numpyro.sample("s", dist.HalfNormal(1.0))


@pytest.mark.parametrize(
    "model_fn, name, expected",
    [
        (bernoulli_model, "b", ["BernoulliProbs", "Normal", "discrete", "dist.Bernoulli(logits="]),
        (half_normal_model, "s", ["HalfNormal", "Normal", "Positive", "dist.LogNormal", "AutoNormal"]),
    ],
)
def test_support_mismatch_is_a_site_named_error(model_fn, name, expected):
    with pytest.raises(ValueError) as error:
        mg.fit(model_fn, normal_guide_for(name), objective=mg.elbo(2), **{**FIT, "num_steps": 3})
    message = str(error.value)
    assert message.startswith(f"site '{name}': the model's ")
    for part in expected:
        assert part in message, (part, message)


@pytest.mark.parametrize("autoguide", [AutoNormal, AutoDelta])
def test_autoguides_match_the_support(autoguide):
    """AutoNormal maps to the support; AutoDelta's point mass (support ``real``) holds a
    positive value: neither is a mismatch."""
    result = mg.fit(half_normal_model, autoguide(half_normal_model), objective=mg.elbo(2), **{**FIT, "num_steps": 3})
    assert np.all(np.isfinite(result.losses))


def test_guide_draws_outside_a_discrete_support():
    """Both discrete, different supports: the guide's draw (always 2) is checked."""

    def categorical_guide():
        numpyro.sample("b", dist.Categorical(probs=jnp.array([0.0, 0.0, 1.0])))

    with pytest.raises(ValueError, match=r"site 'b': .*BernoulliProbs support is Boolean\(\), but the guide drew values "
                                         r"outside it \(CategoricalProbs\)"):
        mg.trainer(bernoulli_model, categorical_guide, key=jax.random.key(0), objective=mg.elbo(2),
                   optimizer=optax.sgd(0.1))

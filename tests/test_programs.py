"""``mcgrad.programs``: what a fingerprint tells apart, and what it names instead of walking."""

import numpyro
import numpyro.distributions as dist
import optax

import mcgrad as mg
from mcgrad import programs
from mcgrad.estimators import base


def test_values_built_apart_share_a_fingerprint_and_other_settings_do_not():
    assert programs.fingerprint(mg.elbo(4)) == programs.fingerprint(mg.elbo(4))
    assert programs.fingerprint(mg.elbo(4)) != programs.fingerprint(mg.elbo(2))
    assert programs.fingerprint(optax.adam(1e-2)) == programs.fingerprint(optax.adam(1e-2))
    assert programs.fingerprint(optax.adam(1e-2)) != programs.fingerprint(optax.adam(1e-3))


def test_a_library_function_is_named_and_a_users_function_is_walked():
    named = programs.fingerprint(base.split_parameters)
    assert named[:3] == ("library function", "mcgrad.estimators.base", "split_parameters")

    def model_with(scale):
        def model():
            numpyro.sample("x", dist.Normal(0.0, scale))
        return model

    # The user's closure is walked: the same code and cells agree, another cell does not.
    assert programs.fingerprint(model_with(1.0)) == programs.fingerprint(model_with(1.0))
    assert programs.fingerprint(model_with(1.0)) != programs.fingerprint(model_with(2.0))
    assert programs.fingerprint(model_with(1.0))[0] == "function"


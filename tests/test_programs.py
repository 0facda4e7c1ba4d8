"""``mcgrad.programs``: what a fingerprint tells apart, and what it names instead of walking."""

import time

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
import optax
import pytest

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


def test_compile_time_is_the_union_of_nested_spans():
    covered = programs.covered
    assert covered([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0), (5.2, 5.7)], 0.0, 10.0) == pytest.approx(4.0)
    assert covered([(0.0, 2.0)], 1.0, 10.0) == pytest.approx(1.0)  # clipped to the phase
    assert covered([], 0.0, 1.0) == 0.0


def test_the_one_time_clock_counts_new_programs_and_setup_not_runs():
    square = jax.jit(lambda x: jnp.tanh(x) ** 2 + 1.0)
    with programs.one_time_clock() as seconds:
        square(jnp.ones(7)).block_until_ready()
        first = seconds()
        square(jnp.ones(7)).block_until_ready()  # compiled: nothing more
        assert first > 0.0 and seconds() == first
        cache = programs.ProgramCache()
        cache.get("slow", lambda: time.sleep(0.05))  # a build the cache did not hold
        assert seconds() >= first + 0.05
        built = seconds()
        cache.get("slow", lambda: time.sleep(0.05))  # held: no build
        assert seconds() == built
        with programs.one_time("first run"):  # what a caller marks as one-time work
            time.sleep(0.02)
        assert seconds() >= built + 0.02
        marked = seconds()
    square(jnp.ones(8)).block_until_ready()  # after the block: not counted
    assert seconds() == marked

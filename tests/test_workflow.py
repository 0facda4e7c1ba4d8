"""Workflow grade: compile once and fit many, batched restarts, failures that keep the last
good state, checkpoints a crash or a mismatched resume cannot misuse."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest

import mcgrad as mg

X = jnp.array([0.8, 1.3, -0.2, 1.1, 0.5])


def model(x):
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", dist.Normal(z, 1.0), obs=x)


def guide(x):
    loc = numpyro.param("loc", 0.0)
    scale = numpyro.param("scale", 1.0, constraint=dist.constraints.positive)
    numpyro.sample("z", dist.Normal(loc, scale))


def fit(**kwargs):
    settings = {"key": jax.random.key(0), "num_steps": 30, "optimizer": optax.adam(0.05), "objective": mg.elbo(4),
                "progress_bar": False}
    settings.update(kwargs)
    return mg.fit(model, guide, X, **settings)


class CompileCounter:
    """Counts XLA programs made while active: backend compiles, and programs read from JAX's
    on-disk cache (the suite runs with one, see the root conftest.py), which a program
    mcgrad failed to reuse would come from (jax.monitoring's events)."""

    def __init__(self):
        self.count = 0
        self.active = False
        jax.monitoring.register_event_duration_secs_listener(self.listen_duration)
        jax.monitoring.register_event_listener(self.listen)

    def listen_duration(self, event, duration, **_):
        self.listen(event)

    def listen(self, event, **_):
        if self.active and event.endswith(("backend_compile_duration", "compilation_cache/cache_hits")):
            self.count += 1


COMPILES = CompileCounter()


def test_a_second_fit_reuses_the_compiled_program():
    first = fit(key=jax.random.key(1))  # a fresh optimizer and objective in every call, as a user writes it
    COMPILES.active = True
    try:
        second = fit(key=jax.random.key(2))
    finally:
        COMPILES.active = False
    assert COMPILES.count == 0
    assert not np.array_equal(first.losses, second.losses)  # another key: another run
    # The same key gives the same run whether its program came from the cache or not.
    again = fit(key=jax.random.key(1))
    mg.fit.cache.clear()
    fresh = fit(key=jax.random.key(1))
    np.testing.assert_array_equal(again.losses, first.losses)
    np.testing.assert_array_equal(fresh.losses, first.losses)


def subsampled_model(x):
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", 40, subsample_size=8) as index:
        numpyro.sample("x", dist.Normal(z, 1.0), obs=x[index])


def test_a_second_fit_of_a_subsampled_model_compiles_nothing():
    # An eager trace (the initial parameters, the data check) draws the minibatch: NumPyro's
    # CPU draw, a scan over a function made afresh at each call, compiled again in every fit.
    x = jnp.linspace(-1.0, 2.0, 40)
    settings = {"num_steps": 5, "optimizer": optax.adam(0.05), "objective": mg.elbo(2), "progress_bar": False}
    mg.fit(subsampled_model, guide, x, key=jax.random.key(0), **settings)
    COMPILES.active = True
    try:
        mg.fit(subsampled_model, guide, x, key=jax.random.key(1), **settings)
    finally:
        COMPILES.active = False
    assert COMPILES.count == 0


GUIDE_TRACES = itertools.count()  # fingerprinted by identity: counting does not change the program's key


def counted_guide(x):
    next(GUIDE_TRACES)
    guide(x)


def test_resuming_the_same_program_again_traces_no_guide():
    # A resumed state is checked against the initial state's shapes, an abstract trace of
    # the guide and model (~10 ms for a small VAE, 5% of a 2000-step segment): once per
    # program, not at every resumed call.
    settings = {"key": jax.random.key(0), "optimizer": optax.adam(0.05), "objective": mg.elbo(2), "progress_bar": False}
    first = mg.fit(model, counted_guide, X, num_steps=5, **settings)
    second = mg.fit(model, counted_guide, X, num_steps=10, resume_from=first.state, **settings)
    before = next(GUIDE_TRACES)
    third = mg.fit(model, counted_guide, X, num_steps=15, resume_from=second.state, **settings)
    assert next(GUIDE_TRACES) == before + 1 and int(third.state.step) == 15


def test_another_setting_is_another_program():
    slow, fast = fit(optimizer=optax.adam(0.01)), fit(optimizer=optax.adam(0.5))
    assert abs(float(slow.params["loc"]) - float(fast.params["loc"])) > 0.1
    mg.fit.cache.clear()
    np.testing.assert_array_equal(fit(optimizer=optax.adam(0.5)).losses, fast.losses)
    elbo_2 = fit(objective=mg.elbo(2))
    mg.fit.cache.clear()
    np.testing.assert_array_equal(fit(objective=mg.elbo(2)).losses, elbo_2.losses)


def test_a_mutated_closure_is_seen():
    scale = {"value": 1.0}

    def scaled_model(x):
        z = numpyro.sample("z", dist.Normal(0.0, scale["value"]))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", dist.Normal(z, 1.0), obs=x)

    settings = {"key": jax.random.key(0), "num_steps": 30, "optimizer": optax.adam(0.05), "objective": mg.elbo(4),
                "progress_bar": False}
    wide = mg.fit(scaled_model, guide, X, **settings)
    scale["value"] = 0.1
    narrow = mg.fit(scaled_model, guide, X, **settings)
    assert float(narrow.params["loc"]) < float(wide.params["loc"]) - 0.1  # the tighter prior took effect


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist, optax
    import mcgrad as mg

    def model(x):
        z = numpyro.sample("z", dist.Bernoulli(0.5))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", dist.Normal(2.0 * z - 1.0, 1.0), obs=x)

    def guide(x):
        numpyro.sample("z", dist.Bernoulli(logits=numpyro.param("logits", jnp.zeros(()))))

    x = jnp.array([0.8, 1.3, -0.2, 1.1, 0.5])
    rss = []
    for i in range(int(sys.argv[1])):
        mg.fit(model, guide, x, key=jax.random.key(i), num_steps=1, optimizer=optax.adam(0.05),
               objective=mg.elbo(4), progress_bar=False)
        rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    print(json.dumps({"rss_kib": rss, "hits": mg.fit.cache.hits, "misses": mg.fit.cache.misses}))
    """
)


def test_hundreds_of_fits_in_one_process_keep_memory_flat():
    """Before: each fit recompiled and kept its program (~6 MB a fit; XLA ran out of memory
    after ~380 fits)."""
    process = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, "300"], capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    report = json.loads(process.stdout.strip().splitlines()[-1])
    assert report["misses"] == 1 and report["hits"] == 299
    rss = np.asarray(report["rss_kib"]) / 1024
    assert rss[-1] - rss[9] <= 50.0, f"peak RSS grew {rss[-1] - rss[9]:.1f} MB after the tenth fit"


def test_batched_restarts_are_independent_fits_in_one_program():
    keys = jax.random.split(jax.random.key(7), 3)
    batched = fit(key=keys, num_steps=20)
    assert batched.losses.shape == (3, 20)
    assert batched.params["loc"].shape == (3,) and batched.params["scale"].shape == (3,)
    assert batched.diagnostics.variance["loc"].shape[0] == 3
    for restart in range(3):
        single = fit(key=keys[restart], num_steps=20)
        np.testing.assert_allclose(batched.losses[restart], single.losses, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(batched.params["loc"][restart], single.params["loc"], rtol=1e-5, atol=1e-6)
    idata = batched.to_inference_data(num_samples=50)
    assert idata.posterior["z"].shape == (3, 50)  # restarts are chains
    assert idata.fit["loss"].shape == (3, 20)
    best = int(np.argmin(batched.losses[:, -5:].mean(axis=1)))
    assert 0 <= best < 3


def test_an_overflowing_update_is_skipped_and_the_error_state_is_finite():
    with pytest.raises(mg.NonFiniteError) as error:
        fit(optimizer=optax.sgd(1e37), max_nonfinite=2)
    state = error.value.state
    assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(state.params))
    assert int(state.num_nonfinite) == 3


def barrier_model(x):
    loc = numpyro.param("loc", 0.0)
    numpyro.factor("barrier", 0.01 * jnp.sqrt(3.0 - loc))  # NaN once loc passes 3
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", dist.Normal(loc, 1.0), obs=x)


def test_checkpoints_are_written_periodically_without_a_progress_bar(tmp_path):
    path = tmp_path / "run.ckpt"
    data = 5.0 + jax.random.normal(jax.random.key(2), (50,))
    with pytest.raises(mg.NonFiniteError) as error:
        mg.fit(barrier_model, None, data, key=jax.random.key(0), num_steps=100, optimizer=optax.adam(0.1),
               objective=mg.maximum_likelihood(), progress_bar=False, max_nonfinite=0, checkpoint_path=path)
    stopped_at = int(error.value.state.step)
    assert path.exists()
    leaves, metadata = mg.checkpoints.load(path)
    # Written at the end of the chunk that failed (the default chunk is 1/20 of the run).
    assert 0 < int(leaves[".state.step"]) == stopped_at < metadata["num_losses"] < 100


def test_resuming_with_another_key_or_fewer_steps_is_refused(tmp_path):
    path = tmp_path / "run.ckpt"
    fit(num_steps=20, checkpoint_path=path)
    with pytest.raises(mg.checkpoints.CheckpointMismatchError, match="another key"):
        fit(num_steps=30, resume_from=path, key=jax.random.key(99))
    with pytest.raises(ValueError, match="already taken 20 steps"):
        fit(num_steps=10, resume_from=path)
    resumed = fit(num_steps=30, resume_from=path)
    np.testing.assert_array_equal(resumed.losses, fit(num_steps=30).losses)

"""``mg.fit``: the two drivers agree, checkpoints resume bit for bit (and refuse another
run's file), the non-finite guard skips bad steps and stops with the last finite state, the
step keeps its state's structure and does not recompile between chunks, and the result
feeds ArviZ. The trainer under ``fit`` and the honesty of its diagnostics: test_trainer.py."""

import importlib
import os
import subprocess
import sys

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest

import mcgrad as mg

fit_module = importlib.import_module("mcgrad.fit")  # mg.fit is the function

X = jnp.array([0.6, 1.7, 1.1])
TRACES = {"model": 0}  # times `model` was traced: a Python side effect runs only when traced


def model(x):
    TRACES["model"] += 1
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", x.shape[0]):
        b = numpyro.sample("b", dist.Bernoulli(0.3))
        numpyro.sample("x", dist.Normal(z + b, 1.0), obs=x)


def guide(x):
    loc = numpyro.param("loc", 0.0)
    scale = numpyro.param("scale", 1.0, constraint=dist.constraints.positive)
    logits = numpyro.param("logits", jnp.full(x.shape[0], 0.3))
    numpyro.sample("z", dist.Normal(loc, scale))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("b", dist.Bernoulli(logits=logits))


# A moving-average baseline puts estimator state in the FitState, which checkpoints must carry.
ESTIMATORS = {"b": mg.score_function(baseline=mg.baselines.moving_average(0.9))}


def run(num_steps=100, **kwargs):
    settings = {"key": jax.random.key(0), "num_steps": num_steps, "optimizer": optax.adam(0.05),
                "objective": mg.elbo(4), "estimators": ESTIMATORS, "progress_bar": False}
    settings.update(kwargs)
    return mg.fit(model, guide, X, **settings)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def traced_run(**kwargs):
    """``run(**kwargs)`` and how many times it traced the model."""
    before = TRACES["model"]
    result = run(**kwargs)
    return result, TRACES["model"] - before


@pytest.fixture(scope="module")
def reference_and_traces():
    """100 steps in one scan (one compiled program), and the model traces that took."""
    return traced_run()


@pytest.fixture(scope="module")
def reference(reference_and_traces):
    return reference_and_traces[0]


def types(tree):
    return [(x.shape, x.dtype, x.weak_type) for x in jax.tree.leaves(tree)]


def test_progress_bar_and_scan_drivers_give_the_same_result_without_recompiling(reference_and_traces):
    reference, one_program = reference_and_traces
    with_bar, traces = traced_run(progress_bar=True, chunk_size=25)  # four chunks of 25 steps
    assert traces == one_program > 0  # compiled once, reused by chunks 2-4
    np.testing.assert_array_equal(with_bar.losses, reference.losses)
    assert_trees_equal(with_bar.params, reference.params)
    assert_trees_equal(with_bar.state, reference.state)
    np.testing.assert_array_equal(with_bar.diagnostics.steps, reference.diagnostics.steps)
    for name in reference.diagnostics.variance:
        np.testing.assert_array_equal(with_bar.diagnostics.variance[name], reference.diagnostics.variance[name])


def test_a_shorter_last_chunk_reuses_the_compiled_program_bit_for_bit(reference):
    # The chunk's trip count is an argument of its program: a shorter last chunk runs the same
    # program for fewer steps. (A state whose types change after a step, which would recompile
    # chunk 2, fails the test above.)
    _, one_chunk = traced_run(num_steps=40, progress_bar=True, chunk_size=30, diagnostics_every=2)  # 30 + 10
    with_bar, traces = traced_run(progress_bar=True, chunk_size=30)  # 30 + 30 + 30 + 10
    assert traces == one_chunk > 0  # chunks 2-4 reuse the program of the first
    assert with_bar.losses.shape == (100,) and int(with_bar.state.step) == 100
    np.testing.assert_array_equal(with_bar.losses, reference.losses)
    assert_trees_equal(with_bar.state, reference.state)
    np.testing.assert_array_equal(with_bar.diagnostics.steps, reference.diagnostics.steps)


def test_default_chunks_divide_the_run_when_they_can():
    assert fit_module.default_chunk_size(2000) == 100
    assert fit_module.default_chunk_size(50) == 5  # 3 does not divide 50, 5 does
    assert fit_module.default_chunk_size(97) == 5  # a prime: the last chunk is shorter


def test_steps_keep_the_state_structure_and_types(reference):
    initial = run(num_steps=0).state  # the state fit starts from (no step taken)
    assert int(initial.step) == 0 and int(reference.state.step) == 100
    assert jax.tree.structure(reference.state) == jax.tree.structure(initial)
    assert types(reference.state) == types(initial)  # weak types too: a change would recompile


def test_checkpoint_resume_is_exact(reference, tmp_path):
    path = tmp_path / "fit.ckpt"
    first = run(num_steps=50, checkpoint_path=path, diagnostics_every=2)  # the default of a 100-step run
    assert int(first.state.step) == 50 and path.exists()
    template = run(num_steps=0).state  # the initial state of the same run: the file's structure
    state, losses, diagnostics = mg.load_checkpoint(path, like=template)
    assert_trees_equal(state, first.state)
    np.testing.assert_array_equal(losses, first.losses)
    np.testing.assert_array_equal(diagnostics.steps, first.diagnostics.steps)
    for name in first.diagnostics.variance:
        np.testing.assert_array_equal(diagnostics.variance[name], first.diagnostics.variance[name])
        np.testing.assert_array_equal(diagnostics.snr[name], first.diagnostics.snr[name])
    resumed = run(num_steps=100, resume_from=path)
    np.testing.assert_array_equal(resumed.losses, reference.losses)  # the checkpoint carries the history
    assert_trees_equal(resumed.params, reference.params)
    assert_trees_equal(resumed.state, reference.state)
    np.testing.assert_array_equal(resumed.diagnostics.steps, reference.diagnostics.steps)
    for name in reference.diagnostics.variance:
        np.testing.assert_array_equal(resumed.diagnostics.variance[name], reference.diagnostics.variance[name])
    # Resuming from a FitState in memory follows the same trajectory.
    from_state = run(num_steps=100, resume_from=first.state)
    np.testing.assert_array_equal(from_state.losses, reference.losses[50:])
    assert_trees_equal(from_state.params, reference.params)


def test_checkpoint_is_data_not_a_pickle(tmp_path):
    path = tmp_path / "fit.ckpt"
    run(num_steps=10, checkpoint_path=path)
    leaves, metadata = mg.checkpoints.load(path)  # readable without a template, nothing executed
    assert metadata == {  # every step recorded: max(1, 10 // 50)
        "num_losses": 10, "num_records": 10, "num_nonfinite": 0, "objective": {"name": "elbo", "num_particles": 4},
        "key": np.asarray(jax.random.key_data(jax.random.key(0))).tolist(),
    }
    assert ".state.params['loc']" in leaves and ".state.objective_state['b'].average" in leaves


def test_a_checkpoint_of_another_optimizer_or_guide_is_refused(tmp_path):
    path = tmp_path / "fit.ckpt"
    run(num_steps=10, checkpoint_path=path)
    with pytest.raises(mg.checkpoints.CheckpointMismatchError, match=r"leaf .*\.state\.optimizer_state"):
        run(num_steps=20, resume_from=path, optimizer=optax.sgd(0.05))  # adam's state is not sgd's
    # the same for a state in memory (SGD would run with Adam's state, silently)
    with pytest.raises(ValueError, match=r"resume_from=<FitState>\): the state's optimizer_state"):
        run(num_steps=20, resume_from=run(num_steps=10).state, optimizer=optax.sgd(0.05))
    with pytest.raises(mg.checkpoints.CheckpointMismatchError, match=r"objective elbo with 4 particles.*elbo with 8"):
        run(num_steps=20, resume_from=path, objective=mg.elbo(8))  # same state structure, another objective

    def fixed_scale_guide(x):  # no "scale" parameter
        loc = numpyro.param("loc", 0.0)
        logits = numpyro.param("logits", jnp.full(x.shape[0], 0.3))
        numpyro.sample("z", dist.Normal(loc, 1.0))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("b", dist.Bernoulli(logits=logits))

    with pytest.raises(mg.checkpoints.CheckpointMismatchError, match=r"leaf .*\.state\.params\['scale'\]") as error:
        mg.fit(model, fixed_scale_guide, X, key=jax.random.key(0), num_steps=20, optimizer=optax.adam(0.05),
               objective=mg.elbo(4), estimators=ESTIMATORS, progress_bar=False, resume_from=path)
    assert str(path) in str(error.value)


def test_a_truncated_checkpoint_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "fit.ckpt"
    first = run(num_steps=10, checkpoint_path=path)
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    with pytest.raises(mg.checkpoints.CheckpointError, match="truncated") as error:
        mg.load_checkpoint(path, like=first.state)
    assert str(path) in str(error.value)
    with pytest.raises(mg.checkpoints.CheckpointError):
        run(num_steps=20, resume_from=path)


def test_diagnostics_are_recorded_with_several_particles(reference):
    diagnostics = reference.diagnostics
    assert diagnostics.steps.size == 50 and diagnostics.steps[1] - diagnostics.steps[0] == 2  # every 100 // 50
    for name in ("loc", "scale", "logits"):
        assert np.all(np.isfinite(diagnostics.variance[name])) and np.all(diagnostics.variance[name] > 0)
        assert np.all(np.isfinite(diagnostics.snr[name])) and np.all(diagnostics.snr[name] > 0)
    assert diagnostics.num_nonfinite == 0


def test_to_inference_data_works_with_arviz(reference):
    idata = reference.to_inference_data(num_samples=200, key=jax.random.key(1))
    assert idata.posterior["z"].shape == (1, 200)
    assert idata.posterior["b"].shape == (1, 200, 3)
    assert idata.log_likelihood["x"].shape == (1, 200, 3)
    np.testing.assert_array_equal(idata.observed_data["x"], X)
    np.testing.assert_array_equal(idata.fit["loss"], reference.losses)
    summary = az.summary(idata, var_names=["z"], kind="stats")
    # The guide's Normal(loc, scale): the summary's mean and sd match it within sampling error.
    loc, scale = float(reference.params["loc"]), float(reference.params["scale"])
    assert abs(summary.loc["z", "mean"] - loc) < 5 * scale / np.sqrt(200)
    assert abs(summary.loc["z", "sd"] / scale - 1) < 5 * np.sqrt(1 / (2 * 199))
    loo = az.loo(idata)
    assert np.isfinite(loo.elpd_loo) and loo.n_data_points == 3


def test_maximum_likelihood_result_to_inference_data():
    def gaussian(x):
        loc = numpyro.param("loc", 0.0)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    result = mg.fit(gaussian, None, X, key=jax.random.key(0), num_steps=20, optimizer=optax.adam(0.1),
                    objective=mg.maximum_likelihood(), progress_bar=False)
    idata = result.to_inference_data()
    assert idata.posterior["loc"].shape == (1, 1)
    np.testing.assert_allclose(idata.log_likelihood["x"].values[0, 0], dist.Normal(result.params["loc"], 1.0).log_prob(X), rtol=1e-6)


LOST_STAMP_RACE = """
import pathlib, sys
rename = pathlib.Path.replace
def lose_the_race(self, target):
    # Another process renamed its temporary file first: today's stamp exists, ours is gone.
    if self.name == "daily_warning.tmp":
        rename(self, target)
        raise FileNotFoundError(2, "No such file or directory", str(self))
    return rename(self, target)
pathlib.Path.replace = lose_the_race
try:
    import {module}
except FileNotFoundError:
    sys.exit(3)
"""


@pytest.mark.parametrize("module, returncode", [("arviz", 3), ("mcgrad.posterior", 0)])
def test_posterior_imports_arviz_through_a_lost_daily_stamp_race(tmp_path, module, returncode):
    """ArviZ 0.23's import fails in the process that loses its daily-stamp rename; mcgrad's doesn't."""
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path), PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, "-c", LOST_STAMP_RACE.format(module=module)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == returncode, done.stderr[-2000:]


# --------------------------------------------------------------------------- the non-finite guard

DATA = 5.0 + jax.random.normal(jax.random.key(2), (50,))


def barrier_model(x):
    """The likelihood pulls loc to 5; the factor is NaN once loc passes 3."""
    loc = numpyro.param("loc", 0.0)
    numpyro.factor("barrier", 0.01 * jnp.sqrt(3.0 - loc))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", dist.Normal(loc, 1.0), obs=x)


def fit_barrier(num_steps, **kwargs):
    return mg.fit(barrier_model, None, DATA, key=jax.random.key(0), num_steps=num_steps, optimizer=optax.adam(0.1),
                  objective=mg.maximum_likelihood(), progress_bar=False, **kwargs)


def test_nonfinite_run_stops_with_the_last_finite_state():
    with pytest.raises(mg.NonFiniteError) as error:
        fit_barrier(100, max_nonfinite=5)
    losses = error.value.losses
    first_bad = int(np.argmax(~np.isfinite(losses)))
    assert 0 < first_bad < 95 and np.all(np.isfinite(losses[:first_bad])) and np.all(np.isnan(losses[first_bad:]))
    state = error.value.state
    assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(state))
    # The run halts once more than max_nonfinite steps failed.
    assert int(state.num_nonfinite) == 6 and int(state.step) == first_bad + 6
    # The skipped steps changed nothing: params and optimizer are those after the last finite step.
    last_finite = fit_barrier(first_bad).state
    assert_trees_equal(state.params, last_finite.params)
    assert_trees_equal(state.optimizer_state, last_finite.optimizer_state)
    assert float(state.params["loc"]) > 3.0  # the step that crossed the barrier was finite; the next was not
    message = str(error.value)
    assert "non-finite loss or update" in message and "max_nonfinite=5" in message
    assert "error.state" in message and "last finite state" in message and "6 steps" in message


BAD_DATUM = jnp.abs(DATA).at[3].set(-1.0)


def log_normal(x):
    """A minibatch holding the negative datum gives LogNormal a NaN log-density."""
    loc = numpyro.param("loc", 0.0)
    with numpyro.plate("data", x.shape[0], subsample_size=10) as index:
        numpyro.sample("x", dist.LogNormal(loc, 1.0), obs=x[index])


LOG_NORMAL = {"optimizer": optax.adam(0.05), "objective": mg.maximum_likelihood(), "max_nonfinite": 60,
              "diagnostics_every": 4}


def fit_log_normal(key=jax.random.key(0), **kwargs):
    return mg.fit(log_normal, None, BAD_DATUM, key=key, num_steps=60, progress_bar=False, **LOG_NORMAL, **kwargs)


def test_occasional_nonfinite_steps_are_skipped_and_counted():
    """Those steps are skipped (NaN loss, params unchanged) and the fit carries on."""
    result = fit_log_normal()
    skipped = ~np.isfinite(result.losses)
    assert 0 < skipped.sum() < 60
    assert int(result.state.num_nonfinite) == skipped.sum() == result.diagnostics.num_nonfinite
    assert np.isfinite(float(result.params["loc"]))


def test_replayed_chunks_skip_the_guarded_runs_steps_wherever_the_run_is_cut():
    """fit's chunks run without the per-step check; one that fails it is replayed with its
    failing steps skipped. The same steps are skipped as under the guard of trainer.run
    (the same values up to rounding: another program), and the result is the same bit for
    bit however the run is cut into chunks."""
    whole = fit_log_normal()
    for chunk_size in (7, 13):
        chunked = fit_log_normal(chunk_size=chunk_size)
        np.testing.assert_array_equal(chunked.losses, whole.losses)
        assert_trees_equal(chunked.state, whole.state)
    key_setup, key_run = jax.random.split(jax.random.key(0))
    training = mg.trainer(log_normal, None, BAD_DATUM, key=key_setup, **LOG_NORMAL)
    guarded, infos = jax.jit(training.run, static_argnums=1)(training.init(key_run), 60, BAD_DATUM)
    skipped = np.isnan(whole.losses)
    assert 0 < skipped.sum() < 60
    np.testing.assert_array_equal(np.isnan(infos.loss), skipped)
    np.testing.assert_allclose(whole.losses[~skipped], infos.loss[~skipped], rtol=1e-5)
    assert int(guarded.num_nonfinite) == int(whole.state.num_nonfinite) == skipped.sum()
    np.testing.assert_allclose(whole.state.params["loc"], guarded.params["loc"], rtol=1e-5)


def test_restarts_skip_their_own_failing_steps():
    """A batch of restarts, each failing at its own steps: each skips what it would alone."""
    keys = jax.random.split(jax.random.key(3), 3)
    batched = fit_log_normal(keys, chunk_size=20)
    patterns = set()
    for i, key in enumerate(keys):
        alone = fit_log_normal(key)
        np.testing.assert_array_equal(np.isnan(batched.losses[i]), np.isnan(alone.losses))
        np.testing.assert_allclose(batched.losses[i], alone.losses, rtol=1e-5)
        assert int(batched.state.num_nonfinite[i]) == int(alone.state.num_nonfinite) > 0
        patterns.add(tuple(np.flatnonzero(np.isnan(alone.losses))))
    assert len(patterns) == 3  # the restarts fail at different steps

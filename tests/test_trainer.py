"""``mg.trainer``: the pure step under ``jit`` (no recompile, state structure kept, the
model arguments of each step), ``run`` and ``fit`` follow the same keys (``fit`` the
unguarded steps bit for bit), and the training diagnostics are honest: the variance
``fit`` records is the variance of the gradient the step used, for every objective and
estimator."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest

import mcgrad as mg
from mcgrad.programs import compiler_options

X = jnp.array([0.6, 1.7, 1.1, -0.4, 2.3, 0.9])  # 6 data points
TRACES = {"model": 0}  # times a model below was traced (a Python side effect runs only when traced)


def normal_model(x):
    TRACES["model"] += 1
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", dist.Normal(z, 1.0), obs=x)


def normal_guide(x):
    loc = numpyro.param("loc", 0.3)
    scale = numpyro.param("scale", 0.8, constraint=dist.constraints.positive)
    numpyro.sample("z", dist.Normal(loc, scale))


def bernoulli_model(x):
    TRACES["model"] += 1
    with numpyro.plate("data", x.shape[0]):
        b = numpyro.sample("b", dist.Bernoulli(0.3))
        numpyro.sample("x", dist.Normal(2.0 * b - 1.0, 1.0), obs=x)


def bernoulli_guide(x):
    logits = numpyro.param("logits", jnp.linspace(-1.0, 1.0, x.shape[0]))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("b", dist.Bernoulli(logits=logits))


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def types(tree):
    return [(x.shape, x.dtype, x.weak_type) for x in jax.tree.leaves(tree)]


# --------------------------------------------------------------------------- honest diagnostics

LEAVE_ONE_OUT = {"b": mg.score_function(baseline=mg.baselines.leave_one_out())}

# name: (model, guide, objective, estimators, the estimator expected on the latent site)
PROBLEMS = {
    "elbo-pathwise": (normal_model, normal_guide, mg.elbo(8), None, "pathwise"),
    "elbo-score-function-leave-one-out": (bernoulli_model, bernoulli_guide, mg.elbo(8), LEAVE_ONE_OUT, "score_function"),
    "elbo-measure-valued": (normal_model, normal_guide, mg.elbo(8), {"z": mg.measure_valued()}, "measure_valued"),
    "iwae-pathwise": (normal_model, normal_guide, mg.iwae(8), None, "pathwise"),
    "iwae-vimco": (bernoulli_model, bernoulli_guide, mg.iwae(8), LEAVE_ONE_OUT, "score_function"),
    "iwae-dreg": (normal_model, normal_guide, mg.iwae(8, doubly_reparameterized=True), None, "pathwise"),
}
NUM_RECORDS = 400  # S steps, each recorded
NUM_KEYS = 2000  # R independent estimates for the empirical variance


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_recorded_variance_is_the_variance_of_the_step_gradient(name):
    """With the parameters held fixed (``sgd(0.0)``, stateless estimators) every record is
    an unbiased estimate, from 3 gradients, of the same variance: their mean over ``S``
    records agrees with the variance of ``R`` independent ``training.estimate`` calls.

    The standard errors are distribution-free (score-function gradients are far from
    Gaussian): the spread of the records over ``sqrt(S)``, and for the empirical variance,
    the mean over coordinates of squared deviations, the spread of its ``R`` terms over
    ``sqrt(R)`` (which is ``≈ empirical·sqrt(2/(R−1))`` for Gaussian gradients).
    """
    model, guide, objective, estimators, site_estimator = PROBLEMS[name]
    key = jax.random.key(11)
    settings = {"objective": objective, "optimizer": optax.sgd(0.0), "estimators": estimators}
    result = mg.fit(model, guide, X, key=key, num_steps=NUM_RECORDS, diagnostics_every=1, diagnostics_replicates=2,
                    progress_bar=False, **settings)
    np.testing.assert_array_equal(result.diagnostics.steps, np.arange(NUM_RECORDS))

    key_setup, key_run = jax.random.split(key)  # as fit derives them
    training = mg.trainer(model, guide, X, key=key_setup, **settings)
    assert training.estimators[next(iter(training.estimators))].name == site_estimator
    state = training.init(key_run)
    assert_trees_equal(result.state.params, state.params)  # the parameters never moved
    keys = jax.random.split(jax.random.key(12), NUM_KEYS)
    grads = jax.jit(jax.vmap(lambda k: training.estimate(state, k, X)[1]))(keys)

    for param in state.params:
        recorded = result.diagnostics.variance[param].astype(np.float64)
        assert recorded.shape == (NUM_RECORDS,) and np.all(np.isfinite(recorded))
        g = np.reshape(np.asarray(grads[param], np.float64), (NUM_KEYS, -1))
        squared = np.mean((g - g.mean(axis=0)) ** 2, axis=1) * NUM_KEYS / (NUM_KEYS - 1)
        empirical = squared.mean()
        assert empirical > 0
        se = np.sqrt(recorded.var(ddof=1) / NUM_RECORDS + squared.var(ddof=1) / NUM_KEYS)
        assert abs(recorded.mean() - empirical) < 5 * se, (param, recorded.mean(), empirical, se)


def test_default_diagnostics_fit_in_memory_with_many_particles():
    """40 000 particles of a 5-point Bernoulli model: the records are 3 gradient estimates,
    not a per-particle Jacobian (which tried to allocate 64 GB)."""
    data = X[:5]
    # the score function: the default's exact sum over each label would leave no variance to record
    result = mg.fit(bernoulli_model, bernoulli_guide, data, key=jax.random.key(0), num_steps=20,
                    optimizer=optax.adam(0.05), objective=mg.elbo(num_particles=40_000), progress_bar=False,
                    estimators={"b": mg.score_function(baseline=mg.baselines.leave_one_out())})
    diagnostics = result.diagnostics
    assert diagnostics.steps.size == 20  # the default: every max(1, 20 // 50) steps
    assert np.all(np.isfinite(diagnostics.variance["logits"])) and np.all(diagnostics.variance["logits"] > 0)
    assert np.all(np.isfinite(diagnostics.snr["logits"])) and np.all(diagnostics.snr["logits"] > 0)
    assert np.all(np.isfinite(result.losses))


# --------------------------------------------------------------------------- the trainer contract


def normal_trainer(data, **kwargs):
    settings = {"key": jax.random.key(0), "objective": mg.elbo(4), "optimizer": optax.adam(0.05), "diagnostics_every": 3}
    settings.update(kwargs)
    return mg.trainer(normal_model, normal_guide, data, **settings)


def test_jitted_step_does_not_recompile_and_keeps_the_state_structure():
    training = normal_trainer(X)
    step = jax.jit(training.step)
    initial = training.init(jax.random.key(1))
    before = TRACES["model"]
    state, _ = step(initial, X)
    traced = TRACES["model"] - before
    assert traced > 0
    state, _ = step(state, X)
    state, _ = step(state, X[::-1])  # new data of the same shape: the same program
    assert TRACES["model"] - before == traced
    assert int(state.step) == 3
    assert jax.tree.structure(state) == jax.tree.structure(initial)
    assert types(state) == types(initial)  # weak types too: a change would recompile


def test_run_is_the_same_as_jitted_steps():
    training = normal_trainer(X)
    initial = training.init(jax.random.key(1))
    scanned, infos = jax.jit(training.run, static_argnums=1)(initial, 7, X)
    step = jax.jit(training.step)
    state, losses, variances = initial, [], []
    for _ in range(7):
        state, info = step(state, X)
        losses.append(info.loss)
        variances.append(info.gradient_variance["loc"])
    assert_trees_equal(scanned, state)
    np.testing.assert_array_equal(infos.loss, np.stack(losses))
    np.testing.assert_array_equal(infos.gradient_variance["loc"], np.stack(variances))
    assert np.all(np.isfinite(infos.gradient_variance["loc"][::3]))  # recorded every 3 steps
    assert np.all(np.isnan(infos.gradient_variance["loc"][1::3]))


def primitive_names(jaxpr) -> set[str]:
    """Every primitive of a jaxpr, inside loops and branches too."""
    names = set()
    for equation in jaxpr.eqns:
        names.add(equation.primitive.name)
        for value in equation.params.values():
            for inner in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(inner, jax.extend.core.ClosedJaxpr):
                    names |= primitive_names(inner.jaxpr)
                elif isinstance(inner, jax.extend.core.Jaxpr):
                    names |= primitive_names(inner)
    return names


def test_batched_restarts_take_the_replicates_in_a_branch_not_at_every_step():
    # Under vmap, a branch on a batched predicate becomes a select that computes both sides:
    # with the records scheduled from the batched state.step, four batched restarts of the
    # discrete VAE ran the replicates at every step (3.3x the step). fit schedules them from
    # an unbatched step count, so the branch stays one.
    training = normal_trainer(X)
    states = jax.vmap(training.init)(jax.random.split(jax.random.key(1), 3))

    def primitives(first_step):
        def advance(state):
            return training.advance(state, 6, 6, (X,), {}, guard=False, first_step=first_step)

        return primitive_names(jax.make_jaxpr(jax.vmap(advance))(states).jaxpr)

    assert "cond" in primitives(jnp.int32(0))
    assert "cond" not in primitives(None)  # the state's own (batched) step: the select


def test_fit_is_trainer_run_from_the_run_key():
    key = jax.random.key(5)
    settings = {"objective": mg.elbo(4), "optimizer": optax.adam(0.05), "diagnostics_every": 3, "max_nonfinite": 10}
    result = mg.fit(normal_model, normal_guide, X, key=key, num_steps=12, progress_bar=False, **settings)
    key_setup, key_run = jax.random.split(key)
    training = mg.trainer(normal_model, normal_guide, X, key=key_setup, **settings)
    # fit runs the trainer's steps without the per-step check (and replays a chunk that
    # fails it): bit for bit under the same XLA options as fit's programs (LLVM's level
    # changes rounding), and the guarded run up to rounding (another program).
    unguarded = jax.jit(lambda state: training.advance(state, 12, 12, (X,), {}, guard=False),
                        compiler_options=compiler_options())
    state, infos = unguarded(training.init(key_run))
    assert_trees_equal(result.state, state)
    assert_trees_equal(result.params, training.params(state))
    np.testing.assert_array_equal(result.losses, infos.loss)
    np.testing.assert_array_equal(result.diagnostics.steps, [0, 3, 6, 9])
    np.testing.assert_array_equal(result.diagnostics.variance["scale"], infos.gradient_variance["scale"][::3])
    guarded, guarded_infos = jax.jit(training.run, static_argnums=1)(training.init(key_run), 12, X)
    np.testing.assert_allclose(result.losses, guarded_infos.loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(result.state), jax.tree.leaves(guarded)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_step_uses_the_arguments_it_is_given():
    """A minibatch loop: ``z ~ N(0, 1)``, ``x_i ~ N(z, 1)``, guide ``N(loc, σ)`` with a
    tiny fixed σ. The pathwise gradient on a batch ``B`` of 4 is ``5(loc + σε̄) − ΣB``, so
    SGD with rate ``η`` maps ``loc → (1 − 5η) loc + η ΣB`` (plus noise ``5ησε̄``): on the
    first half only it settles at ``ΣA / 5``; alternating halves, at the 2-cycle
    ``a = ((1 − 5η) η ΣB + η ΣA) / (1 − (1 − 5η)²)`` after each step on ``A``."""
    sigma, rate, num_steps = 0.01, 0.05, 200

    def guide(x):
        numpyro.sample("z", dist.Normal(numpyro.param("loc", 0.0), sigma))

    data = jnp.linspace(0.0, 2.0, 8)
    first, second = data[:4], data[4:]
    training = mg.trainer(normal_model, guide, first, key=jax.random.key(0), objective=mg.elbo(1),
                          optimizer=optax.sgd(rate))
    step = jax.jit(training.step)

    # One step: the loss is the estimate on this step's batch, with the step's own key.
    initial = training.init(jax.random.key(1))
    _, step_key = jax.random.split(jax.random.wrap_key_data(initial.key))
    _, info = step(initial, second)
    loss, _, _ = training.estimate(initial, step_key, second)
    np.testing.assert_array_equal(info.loss, loss)

    def loop(batches):
        state = initial
        for i in range(num_steps):
            state, _ = step(state, batches[i % 2])
        return float(training.params(state)["loc"])

    contraction = 1 - 5 * rate
    noise_sd = 5 * rate * sigma / np.sqrt(1 - contraction**2)  # stationary sd of the noise
    only_first = loop((first, first))
    assert abs(only_first - float(first.sum()) / 5) < 5 * noise_sd
    alternating = loop((first, second))  # the last step (199) was on `second`: start the cycle there
    after_first = (contraction * rate * float(second.sum()) + rate * float(first.sum())) / (1 - contraction**2)
    after_second = contraction * after_first + rate * float(second.sum())
    assert abs(alternating - after_second) < 5 * noise_sd
    assert abs(alternating - only_first) > 100 * noise_sd


# --------------------------------------------------------------------------- argument validation


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"num_steps": -5}, "num_steps"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"diagnostics_every": -1}, "diagnostics_every"),
        ({"diagnostics_replicates": 0}, "diagnostics_replicates"),
        ({"max_nonfinite": -1}, "max_nonfinite"),
        ({"num_steps": 2.5}, "num_steps"),
    ],
)
def test_fit_refuses_invalid_settings(settings, message):
    arguments = {"key": jax.random.key(0), "num_steps": 5, "optimizer": optax.adam(0.05), "objective": mg.elbo(2),
                 "progress_bar": False}
    arguments.update(settings)
    with pytest.raises(ValueError, match=f"{message} must be a whole number"):
        mg.fit(normal_model, normal_guide, X, **arguments)


@pytest.mark.parametrize(
    ("settings", "error", "message"),
    [
        ({"objective": mg.elbo}, TypeError, r"got the function mcgrad\.elbo \(call it: objective=mcgrad\.elbo\(\.\.\.\)\)"),
        ({"objective": "elbo"}, TypeError, r"objective must be an mcgrad objective .* got str 'elbo'"),
        ({"optimizer": optax.adam}, TypeError, r"got the function optax\.adam \(call it with its settings"),
        ({"optimizer": numpyro.optim.Adam(0.05)}, TypeError, r"a NumPyro optimizer \(numpyro\.optim\.Adam\): mcgrad takes optax's"),
        ({"key": 0}, TypeError, r"key must be a JAX random key: jax\.random\.key\(0\) .* got int 0"),
        ({"key": jnp.zeros(3)}, TypeError, r"got an array of shape \(3,\) and dtype float32"),
        ({"estimators": [mg.pathwise()]}, TypeError, r"estimators is a dict of per-site estimators .* got a list of length 1"),
        ({"estimators": {"z": mg.pathwise}}, TypeError, r"site 'z': .* got the function mcgrad\.pathwise \(call it\)"),
    ],
)
def test_fit_and_trainer_name_a_factory_or_a_foreign_object_where_a_value_belongs(settings, error, message):
    """The usual slips of a NumPyro or optax user: the factory for its value, NumPyro's own
    optimizer, an int for a key. Each is a clear error, before any tracing."""
    arguments = {"key": jax.random.key(0), "optimizer": optax.adam(0.05), "objective": mg.elbo(2)}
    arguments.update(settings)
    with pytest.raises(error, match=message):
        mg.fit(normal_model, normal_guide, X, num_steps=5, progress_bar=False, **arguments)
    if "key" not in settings:  # the trainer takes the same objective, optimizer and estimators
        with pytest.raises(error, match=message):
            mg.trainer(normal_model, normal_guide, X, **arguments)


def test_fit_takes_numpyros_raw_keys_as_the_same_keys():
    """``jax.random.PRNGKey(0)`` (NumPyro's idiom: a raw ``uint32[2]``) is the typed
    ``jax.random.key(0)``: the same run bit for bit, and a batch of raw keys the same
    restarts. It was read as a batch of two scalar keys before."""
    arguments = {"num_steps": 20, "optimizer": optax.adam(0.05), "objective": mg.elbo(2), "progress_bar": False}
    typed = mg.fit(normal_model, normal_guide, X, key=jax.random.key(3), **arguments)
    raw = mg.fit(normal_model, normal_guide, X, key=jax.random.PRNGKey(3), **arguments)
    np.testing.assert_array_equal(raw.losses, typed.losses)
    restarts = mg.fit(normal_model, normal_guide, X, key=jax.random.split(jax.random.PRNGKey(3), 2), **arguments)
    typed_restarts = mg.fit(normal_model, normal_guide, X, key=jax.random.split(jax.random.key(3), 2), **arguments)
    assert restarts.losses.shape == (2, 20)
    np.testing.assert_array_equal(restarts.losses, typed_restarts.losses)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: mg.elbo(0), r"elbo\(num_particles=...\) must be a whole number >= 1, got 0"),
        (lambda: mg.elbo(2.5), r"elbo\(num_particles=...\) must be a whole number >= 1, got 2.5"),
        (lambda: mg.iwae(1), r"iwae\(num_particles=...\) must be a whole number >= 2, got 1"),
    ],
)
def test_objectives_refuse_invalid_particle_counts(make, message):
    with pytest.raises(ValueError, match=message):
        make()

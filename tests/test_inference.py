"""Per-site estimation over NumPyro programs (``mcgrad.inference``).

* Exactness: on small models with discrete latents, the gradient of the ELBO surrogate
  under every site estimator (score function with no / leave-one-out / moving-average
  baseline, coupled measure-valued, and a mix) agrees with the exact gradient from
  enumerating every latent configuration, within 5 standard errors of repeated
  independent estimates.
* Rao-Blackwellization: on local latents in a plate, mcgrad's score-function gradient
  (each site's signal restricted to its own slice) is unbiased and has clearly lower
  variance than the same estimator without it (the latent declared as one ``to_event``
  site, so its signal is the whole particle's cost) and than hand-written REINFORCE.
* Per-site choices: defaults, ``estimators={...}``, ``infer={"estimator": ...}``, and
  the clear errors for wrong ones.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import mcgrad as mg

NUM_SE = 5.0


# --------------------------------------------------------------------------- helpers


# These tests are dominated by XLA compile time, not run time: compile with cheap
# backend optimisation (the numbers are the same; only the generated code is slower).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def repeated_gradients(bound, params, state, args, num_repeats, key):
    """Mean, standard error and variance of ``num_repeats`` independent (value, gradient) estimates."""

    def one(k):
        def mean_surrogate(p):
            s, _ = bound.surrogate(p, state, k, args, {})
            return jnp.mean(s)

        return jax.value_and_grad(mean_surrogate)(params)

    estimates = jax.jit(jax.vmap(one), compiler_options=FAST_COMPILE)(jax.random.split(key, num_repeats))
    estimates = jax.tree.map(lambda g: np.asarray(g, np.float64), estimates)
    mean = jax.tree.map(lambda g: g.mean(axis=0), estimates)
    se = jax.tree.map(lambda g: g.std(axis=0, ddof=1) / np.sqrt(num_repeats), estimates)
    variance = jax.tree.map(lambda g: g.var(axis=0, ddof=1), estimates[1])
    return mean, se, variance


def assert_within_se(mean, se, exact, label=""):
    for name in exact:
        m, s, e = np.asarray(mean[name]), np.asarray(se[name]), np.asarray(exact[name], np.float64)
        assert np.all(s > 0), f"{label}{name}: zero standard error {s}"
        z = np.abs(m - e) / s
        assert np.all(z < NUM_SE), f"{label}{name}: estimate {m} vs exact {e} (SE {s}, |z| {z})"


def warm_state(bound, average=5.0):
    """Give moving-average baselines a non-trivial state (a running average ``average``).

    The state does not depend on the samples it is used with, so estimates stay unbiased."""
    return {
        name: mg.baselines.MovingAverageState(jnp.asarray(average), jnp.asarray(3, jnp.int32))
        if isinstance(state, mg.baselines.MovingAverageState)
        else state
        for name, state in bound.init_state.items()
    }


ESTIMATORS = {
    "score_function-none": lambda: mg.score_function(baseline=mg.baselines.none()),
    "score_function-leave_one_out": lambda: mg.score_function(baseline=mg.baselines.leave_one_out()),
    "score_function-moving_average": lambda: mg.score_function(baseline=mg.baselines.moving_average(0.8)),
    "measure_valued-coupled": lambda: mg.measure_valued(coupling=True),
}


# --------------------------------------------------------------------------- model A: a plate of 3


X_PLATE = jnp.array([1.0, -0.5, 2.0])
LOGITS_PLATE = jnp.array([0.3, -0.2, 0.5])


def plate_model(x):
    with numpyro.plate("data", 3):
        z = numpyro.sample("z", dist.Bernoulli(0.4))
        numpyro.sample("x", dist.Normal(2.0 * z - 1.0, 1.0), obs=x)


def plate_guide(x):
    logits = numpyro.param("logits", jnp.zeros(3))
    with numpyro.plate("data", 3):
        numpyro.sample("z", dist.Bernoulli(logits=logits))


def plate_exact_loss(params):
    """E_q[log q(z) − log p(x, z)] by summing over all 2³ configurations (float64)."""
    logits = np.asarray(params["logits"], np.float64)
    x = np.asarray(X_PLATE, np.float64)

    def loss(logits):
        q = 1.0 / (1.0 + jnp.exp(-logits))
        total = 0.0
        for zs in itertools.product([0.0, 1.0], repeat=3):
            z = np.array(zs)
            log_q = jnp.sum(z * jnp.log(q) + (1 - z) * jnp.log1p(-q))
            log_p = np.sum(z * np.log(0.4) + (1 - z) * np.log(0.6) - 0.5 * (x - (2 * z - 1)) ** 2 - 0.5 * np.log(2 * np.pi))
            total = total + jnp.exp(log_q) * (log_q - log_p)
        return total

    with jax.enable_x64(True):
        value, grad = jax.value_and_grad(loss)(jnp.asarray(logits))
    return float(value), {"logits": np.asarray(grad)}


# --------------------------------------------------------------------------- model B: z2 depends on z1


X_CHAIN = 0.7
PRIOR_Z2 = np.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]])
MEANS_Z2 = np.array([-1.0, 0.0, 2.0])
CHAIN_PARAMS = {"a": jnp.array(0.2), "b": jnp.array([[0.1, -0.4, 0.3], [-0.2, 0.5, 0.0]])}


def chain_model(x):
    z1 = numpyro.sample("z1", dist.Bernoulli(0.4))
    z2 = numpyro.sample("z2", dist.Categorical(probs=jnp.asarray(PRIOR_Z2)[z1.astype(jnp.int32)]))
    numpyro.sample("x", dist.Normal(jnp.asarray(MEANS_Z2)[z2] + z1, 1.0), obs=x)


def chain_guide(x):
    a = numpyro.param("a", 0.0)
    b = numpyro.param("b", jnp.zeros((2, 3)))
    z1 = numpyro.sample("z1", dist.Bernoulli(logits=a))
    numpyro.sample("z2", dist.Categorical(logits=b[z1.astype(jnp.int32)]))


def chain_exact_loss(params):
    def loss(a, b):
        total = 0.0
        for z1 in (0, 1):
            log_q1 = jax.nn.log_sigmoid(a) if z1 else jax.nn.log_sigmoid(-a)
            log_q2 = jax.nn.log_softmax(b[z1])
            for z2 in range(3):
                log_q = log_q1 + log_q2[z2]
                log_p = (
                    np.log(0.4 if z1 else 0.6)
                    + np.log(PRIOR_Z2[z1, z2])
                    - 0.5 * (X_CHAIN - MEANS_Z2[z2] - z1) ** 2
                    - 0.5 * np.log(2 * np.pi)
                )
                total = total + jnp.exp(log_q) * (log_q - log_p)
        return total

    with jax.enable_x64(True):
        a, b = jnp.asarray(np.float64(params["a"])), jnp.asarray(np.asarray(params["b"], np.float64))
        value, (grad_a, grad_b) = jax.value_and_grad(loss, argnums=(0, 1))(a, b)
    return float(value), {"a": np.asarray(grad_a), "b": np.asarray(grad_b)}


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_plate_model_gradient_matches_enumeration(name):
    params = {"logits": LOGITS_PLATE}
    objective = mg.elbo(num_particles=200)
    bound = objective.setup(plate_model, plate_guide, (X_PLATE,), {}, {"z": ESTIMATORS[name]()}, jax.random.key(0))
    assert bound.estimators["z"].config["name"] == name.split("-")[0]
    state = warm_state(bound, average=6.0)
    (value, grad), (value_se, grad_se), _ = repeated_gradients(bound, params, state, (X_PLATE,), 200, jax.random.key(1))
    exact_value, exact_grad = plate_exact_loss(params)
    assert abs(value - exact_value) < NUM_SE * value_se, (value, exact_value, value_se)
    assert_within_se(grad, grad_se, exact_grad, f"{name}: ")


@pytest.mark.parametrize("name", ["score_function-none", "measure_valued-coupled", "mixed"])
def test_dependent_sites_gradient_matches_enumeration(name):
    """z2's distribution depends on z1: z1's signal must include z2's terms, z2's need not.

    (The baselines are covered on the plate model; no baseline is the case where a wrong
    Rao-Blackwellization shows as bias rather than being partly centred away.)"""
    if name == "mixed":
        estimators = {"z1": mg.measure_valued(), "z2": mg.score_function(baseline=mg.baselines.leave_one_out())}
    else:
        estimators = {"z1": ESTIMATORS[name](), "z2": ESTIMATORS[name]()}
    objective = mg.elbo(num_particles=200)
    bound = objective.setup(chain_model, chain_guide, (X_CHAIN,), {}, estimators, jax.random.key(0))
    state = warm_state(bound, average=2.0)
    (value, grad), (value_se, grad_se), _ = repeated_gradients(
        bound, CHAIN_PARAMS, state, (X_CHAIN,), 200, jax.random.key(2)
    )
    exact_value, exact_grad = chain_exact_loss(CHAIN_PARAMS)
    assert abs(value - exact_value) < NUM_SE * value_se, (value, exact_value, value_se)
    assert_within_se(grad, grad_se, exact_grad, f"{name}: ")


# --------------------------------------------------------------------------- Rao-Blackwellization

NUM_LOCAL = 8
X_LOCAL = jnp.array([1.2, -0.7, 0.3, 2.1, -1.5, 0.9, -0.2, 1.6])
# No logit exactly 0: NumPyro's Bernoulli(logits).log_prob has a wrong gradient there
# (max(x, 0) and |x| at their kinks), which biases every score-function estimate.
LOGITS_LOCAL = jnp.array([0.5, -0.3, 0.1, 1.0, -1.2, 0.4, 0.2, 0.8])
PRIOR_PROB = 0.4


def local_model(x):
    with numpyro.plate("data", NUM_LOCAL):
        z = numpyro.sample("z", dist.Bernoulli(PRIOR_PROB))
        numpyro.sample("x", dist.Normal(2.0 * z - 1.0, 1.0), obs=x)


def local_guide_plate(x):
    logits = numpyro.param("logits", jnp.zeros(NUM_LOCAL))
    with numpyro.plate("data", NUM_LOCAL):
        numpyro.sample("z", dist.Bernoulli(logits=logits))


def local_guide_event(x):
    """The same distribution as one site without a plate: nothing to Rao-Blackwellize over."""
    logits = numpyro.param("logits", jnp.zeros(NUM_LOCAL))
    numpyro.sample("z", dist.Bernoulli(logits=logits).to_event(1))


def local_exact_gradient(logits):
    """The ELBO factorises over the plate: d/dlogit_i of Σ_z q_i(z)(log q_i − log p(z) − log p(x_i|z))."""
    logits = np.asarray(logits, np.float64)
    x = np.asarray(X_LOCAL, np.float64)
    q = 1 / (1 + np.exp(-logits))
    cost = {z: np.log(q if z else 1 - q) - np.log(PRIOR_PROB if z else 1 - PRIOR_PROB) + 0.5 * (x - (2 * z - 1)) ** 2
            for z in (0, 1)}
    # d/dlogit Σ_z q(z) cost(z) = q(1−q)(cost(1) − cost(0)) (the E[d log q] term is zero).
    return q * (1 - q) * (cost[1] - cost[0])


def plain_reinforce_gradients(logits, num_particles, num_repeats, key):
    """Hand-written REINFORCE without Rao-Blackwellization: sg(total cost) · ∇ log q(z)."""
    x = X_LOCAL

    def one(k):
        def surrogate(logits):
            z = jax.lax.stop_gradient(dist.Bernoulli(logits=logits).sample(k, (num_particles,)))
            log_q = jnp.sum(dist.Bernoulli(logits=logits).log_prob(z), axis=1)
            log_p = jnp.sum(dist.Bernoulli(PRIOR_PROB).log_prob(z) + dist.Normal(2.0 * z - 1.0, 1.0).log_prob(x[None]), axis=1)
            cost = log_q - log_p
            return jnp.mean(cost + jax.lax.stop_gradient(cost) * (log_q - jax.lax.stop_gradient(log_q)))

        return jax.grad(surrogate)(logits)

    with jax.numpy_rank_promotion("allow"):
        return np.asarray(jax.jit(jax.vmap(one), compiler_options=FAST_COMPILE)(jax.random.split(key, num_repeats)), np.float64)


def test_rao_blackwellization_lowers_variance_and_stays_unbiased():
    num_particles, num_repeats = 8, 2000
    params = {"logits": LOGITS_LOCAL}
    estimators = {"z": mg.score_function(baseline=mg.baselines.none())}
    exact = {"logits": local_exact_gradient(LOGITS_LOCAL)}
    results = {}
    for label, guide in [("rao_blackwellized", local_guide_plate), ("plain", local_guide_event)]:
        bound = mg.elbo(num_particles).setup(local_model, guide, (X_LOCAL,), {}, estimators, jax.random.key(0))
        (_, grad), (_, se), variance = repeated_gradients(
            bound, params, bound.init_state, (X_LOCAL,), num_repeats, jax.random.key(3)
        )
        assert_within_se(grad, se, exact, f"{label}: ")
        results[label] = variance["logits"]
    hand = plain_reinforce_gradients(LOGITS_LOCAL, num_particles, num_repeats, jax.random.key(4))
    assert_within_se({"logits": hand.mean(0)}, {"logits": hand.std(0, ddof=1) / np.sqrt(num_repeats)}, exact, "hand: ")
    results["hand"] = hand.var(0, ddof=1)

    # Sample variances of n Gaussian-ish estimates: SE of log(variance) ≈ sqrt(2 / (n − 1)).
    se_log_ratio = np.sqrt(2 * 2 / (num_repeats - 1))
    for reference in ("plain", "hand"):
        log_ratio = np.log(results[reference] / results["rao_blackwellized"])
        assert np.all(log_ratio > NUM_SE * se_log_ratio), (reference, np.exp(log_ratio))
        # Both references are the same estimator: their variances agree within sampling error.
    log_plain_vs_hand = np.log(results["plain"] / results["hand"])
    assert np.all(np.abs(log_plain_vs_hand) < NUM_SE * se_log_ratio), np.exp(log_plain_vs_hand)


# --------------------------------------------------------------------------- per-site choices


def test_default_estimators():
    def model():
        numpyro.sample("c", dist.Normal(0.0, 1.0))
        numpyro.sample("d", dist.Bernoulli(0.5))

    def guide():
        numpyro.sample("c", dist.Normal(numpyro.param("loc", 0.0), 1.0))
        numpyro.sample("d", dist.Bernoulli(logits=numpyro.param("logit", 0.0)))

    many = mg.elbo(4).setup(model, guide, (), {}, None, jax.random.key(0)).estimators
    assert many["c"].config["name"] == "pathwise"
    assert many["d"].config["name"] == "score_function"
    one = mg.elbo(1).setup(model, guide, (), {}, None, jax.random.key(0)).estimators
    assert one["d"].config["name"] == "score_function"
    signal = jnp.array([1.0, 3.0])
    # leave-one-out for several particles, a moving average (zero at first) for one
    loo, _ = many["d"].config["baseline"].update(signal, many["d"].init(None), None)
    np.testing.assert_allclose(loo, [-2.0, 2.0])
    first, _ = one["d"].config["baseline"].update(signal, one["d"].init(None), None)
    np.testing.assert_allclose(first, signal)


def test_infer_annotation_in_model_and_guide_and_override_precedence():
    def model():
        numpyro.sample("a", dist.Bernoulli(0.5), infer={"estimator": mg.measure_valued()})
        numpyro.sample("b", dist.Normal(0.0, 1.0))

    def guide():
        numpyro.sample("a", dist.Bernoulli(logits=numpyro.param("la", 0.0)))
        numpyro.sample("b", dist.Normal(numpyro.param("lb", 0.0), 1.0), infer={"estimator": mg.score_function()})

    chosen = mg.elbo(4).setup(model, guide, (), {}, None, jax.random.key(0)).estimators
    assert chosen["a"].config["name"] == "measure_valued"
    assert chosen["b"].config["name"] == "score_function"
    overridden = mg.elbo(4).setup(model, guide, (), {}, {"a": mg.score_function()}, jax.random.key(0)).estimators
    assert overridden["a"].config["name"] == "score_function"


def test_pathwise_on_discrete_site_is_a_clear_error():
    with pytest.raises(ValueError) as error:
        mg.elbo(4).setup(plate_model, plate_guide, (X_PLATE,), {}, {"z": mg.pathwise()}, jax.random.key(0))
    message = str(error.value)
    assert "'z'" in message and "Bernoulli" in message and "rsample" in message
    assert "score_function" in message


def test_measure_valued_on_unregistered_family_is_a_clear_error():
    def model():
        numpyro.sample("k", dist.Geometric(0.3))

    def guide():
        numpyro.sample("k", dist.Geometric(probs=numpyro.param("p", 0.5, constraint=dist.constraints.unit_interval)))

    with pytest.raises(ValueError) as error:
        mg.elbo(4).setup(model, guide, (), {}, {"k": mg.measure_valued()}, jax.random.key(0))
    message = str(error.value)
    assert "'k'" in message and "Geometric" in message and "register_weak_derivative" in message


def test_unknown_estimator_key_is_a_clear_error():
    with pytest.raises(ValueError) as error:
        mg.elbo(4).setup(plate_model, plate_guide, (X_PLATE,), {}, {"zz": mg.score_function()}, jax.random.key(0))
    message = str(error.value)
    assert "zz" in message and "'z'" in message and "guide" in message


def test_whole_objective_wrapper_as_site_estimator_is_a_clear_error():
    wrapped = mg.with_control_variate(mg.score_function(), mg.delta_method())
    with pytest.raises(ValueError) as error:
        mg.elbo(4).setup(plate_model, plate_guide, (X_PLATE,), {}, {"z": wrapped}, jax.random.key(0))
    assert "'z'" in str(error.value)


# --------------------------------------------------------------------------- particle keys


def _two_site_program(x):
    with numpyro.plate("data", 3):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    noise = jax.random.normal(numpyro.prng_key())
    numpyro.sample("x", dist.Normal(b, 1.0), obs=x)
    return a, b, noise


def test_the_key_table_counts_what_seed_would_key():
    from mcgrad import inference

    # a, b and the prng_key call; not the observed x, nor the plate (no subsampling: its
    # indices need no key)
    trace, num_site_keys = inference.trace_program(_two_site_program, {}, jax.random.key(0), (1.0,), {})
    assert num_site_keys == 3 and {"a", "b", "x"} <= set(trace)


@pytest.mark.parametrize("num_site_keys", [3, 1])  # the full table, and one too short (spare keys)
def test_each_site_and_particle_draws_from_its_own_key(num_site_keys):
    from mcgrad import inference

    setup = inference.ParticleSetup(_two_site_program, None, {}, num_site_keys=num_site_keys)
    keys = inference.particle_keys(setup, jax.random.key(0), 2)
    assert keys.shape == (2, 3 + num_site_keys)

    def draws(row):
        return inference._SiteKeys(_two_site_program, row[3:], row[2])(1.0)

    first, second = draws(keys[0]), draws(keys[1])
    values = [np.ravel(np.asarray(v)) for v in (*first, *second)]
    flat = np.concatenate(values)
    assert len(np.unique(flat)) == flat.size  # no two draws share a key
    np.testing.assert_array_equal(np.concatenate([np.ravel(v) for v in draws(keys[0])]), np.concatenate(values[:3]))

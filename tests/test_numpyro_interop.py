"""mcgrad and NumPyro side by side.

* ``mg.fit`` with the pathwise ELBO reaches the same loss as NumPyro's ``SVI`` with
  ``Trace_ELBO`` (same model, guide, optimizer, number of particles), for a model with
  global latents (Bayesian linear regression) and one with local latents (per-group
  means in a plate).
* ``mg.elbo(...)`` is a ``loss`` for ``numpyro.infer.SVI``: with continuous latents it
  matches ``Trace_ELBO``; with discrete latents (which ``Trace_ELBO`` cannot take without
  enumeration) it matches ``TraceGraph_ELBO``.

"The same loss": the averages of the last 10% of the per-step Monte Carlo losses agree
within 5 standard errors, and the exact (closed-form or enumerated) loss at each run's
final parameters is within 5 standard errors of the exact optimum. Every run uses Adam
with an exponentially decaying step size, so the final parameters settle instead of
jittering around the optimum.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro.infer import SVI, Trace_ELBO, TraceGraph_ELBO

import mcgrad as mg

NUM_SE = 5.0
LOG_2PI = float(np.log(2 * np.pi))


def tail_mean(losses, fraction=0.1):
    tail = np.asarray(losses, np.float64)[-max(2, int(len(losses) * fraction)):]
    return tail.mean(), tail.std(ddof=1) / np.sqrt(tail.size)


def assert_same_loss(first, second, exact_first, exact_second, optimum):
    (a, se_a), (b, se_b) = tail_mean(first), tail_mean(second)
    print(f"tail means {a:.4f} ± {se_a:.4f} vs {b:.4f} ± {se_b:.4f}; exact at the final params "
          f"{exact_first:.4f} and {exact_second:.4f}; optimum {optimum:.4f}")
    assert abs(a - b) < NUM_SE * np.hypot(se_a, se_b), (a, b, se_a, se_b)
    for exact, se in ((exact_first, se_a), (exact_second, se_b)):
        assert -1e-4 * abs(optimum) < exact - optimum < NUM_SE * se, (exact, optimum, se)


def minimise(loss, params, num_steps=3000, learning_rate=0.05):
    """The exact optimum of a closed-form loss, by full-batch Adam."""
    optimizer = optax.adam(optax.exponential_decay(learning_rate, num_steps, 0.01))

    @jax.jit
    def run(params):
        def step(carry, _):
            params, state = carry
            updates, state = optimizer.update(jax.grad(loss)(params), state, params)
            return (optax.apply_updates(params, updates), state), None

        return jax.lax.scan(step, (params, optimizer.init(params)), None, length=num_steps)[0][0]

    return float(loss(run(params)))


def schedule(num_steps, learning_rate=0.05):
    return optax.exponential_decay(learning_rate, num_steps, 0.02)


def numpyro_svi(model, guide, elbo, num_steps, learning_rate, *args):
    """NumPyro's SVI with optax's Adam (``learning_rate`` may be a schedule)."""
    svi = SVI(model, guide, numpyro.optim.optax_to_numpyro(optax.adam(learning_rate)), loss=elbo)
    result = svi.run(jax.random.key(7), num_steps, *args, progress_bar=False)
    return result.params, np.asarray(result.losses)


# --------------------------------------------------------------------------- global latents

FEATURES = jax.random.normal(jax.random.key(0), (30, 3))
TARGETS = FEATURES @ jnp.array([1.0, -2.0, 0.5]) + 0.5 * jax.random.normal(jax.random.key(1), (30,))


def regression(features, targets):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    with numpyro.plate("data", features.shape[0]):
        numpyro.sample("y", dist.Normal(features @ w, 0.5), obs=targets)


def regression_guide(features, targets):
    loc = numpyro.param("loc", jnp.zeros(3))
    scale = numpyro.param("scale", jnp.full(3, 0.1), constraint=dist.constraints.positive)
    numpyro.sample("w", dist.Normal(loc, scale).to_event(1))


def regression_exact_loss(params):
    """E_q[log q(w) − log p(w) − log p(y | w)] for q = N(loc, diag(scale²))."""
    loc, scale = params["loc"], params["scale"]
    entropy = jnp.sum(0.5 * jnp.log(2 * jnp.pi * jnp.e * scale**2))
    prior = jnp.sum(0.5 * LOG_2PI + 0.5 * (loc**2 + scale**2))
    squared = jnp.sum((TARGETS - FEATURES @ loc) ** 2) + jnp.sum(FEATURES**2 @ scale**2)
    likelihood = TARGETS.shape[0] * (0.5 * LOG_2PI + jnp.log(0.5)) + squared / (2 * 0.25)
    return -entropy + prior + likelihood


@pytest.fixture(scope="module")
def regression_reference():
    params, losses = numpyro_svi(regression, regression_guide, Trace_ELBO(num_particles=4), 800, schedule(800),
                                  FEATURES, TARGETS)
    optimum = minimise(regression_exact_loss, {"loc": jnp.zeros(3), "scale": jnp.ones(3)})
    return params, losses, optimum


def test_fit_matches_numpyro_svi_with_global_latents(regression_reference):
    params, losses, optimum = regression_reference
    result = mg.fit(regression, regression_guide, FEATURES, TARGETS, key=jax.random.key(3), num_steps=800,
                    optimizer=optax.adam(schedule(800)), objective=mg.elbo(num_particles=4), progress_bar=False)
    assert result.losses.shape == (800,)
    assert_same_loss(result.losses, losses, float(regression_exact_loss(result.params)),
                     float(regression_exact_loss(params)), optimum)


def test_svi_with_mcgrad_elbo_matches_trace_elbo(regression_reference):
    params, losses, optimum = regression_reference
    ours, our_losses = numpyro_svi(regression, regression_guide, mg.elbo(num_particles=4), 800, schedule(800),
                                   FEATURES, TARGETS)
    assert_same_loss(our_losses, losses, float(regression_exact_loss(ours)), float(regression_exact_loss(params)), optimum)


# --------------------------------------------------------------------------- local latents

NUM_GROUPS, PER_GROUP = 5, 4
GROUP = jnp.repeat(jnp.arange(NUM_GROUPS), PER_GROUP)
GROUP_MEANS = jnp.array([-1.0, 0.5, 2.0, 0.0, 1.2])
OBSERVATIONS = GROUP_MEANS[GROUP] + 0.5 * jax.random.normal(jax.random.key(4), (NUM_GROUPS * PER_GROUP,))


def hierarchical(group, y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    with numpyro.plate("groups", NUM_GROUPS):
        theta = numpyro.sample("theta", dist.Normal(mu, 1.0))
    with numpyro.plate("data", y.shape[0]):
        numpyro.sample("y", dist.Normal(theta[group], 0.5), obs=y)


def hierarchical_guide(group, y):
    mu_loc = numpyro.param("mu_loc", 0.0)
    mu_scale = numpyro.param("mu_scale", 1.0, constraint=dist.constraints.positive)
    theta_loc = numpyro.param("theta_loc", jnp.zeros(NUM_GROUPS))
    theta_scale = numpyro.param("theta_scale", jnp.ones(NUM_GROUPS), constraint=dist.constraints.positive)
    numpyro.sample("mu", dist.Normal(mu_loc, mu_scale))
    with numpyro.plate("groups", NUM_GROUPS):
        numpyro.sample("theta", dist.Normal(theta_loc, theta_scale))


def hierarchical_exact_loss(params):
    m, s = params["mu_loc"], params["mu_scale"]
    tm, ts = params["theta_loc"], params["theta_scale"]
    entropy = 0.5 * jnp.log(2 * jnp.pi * jnp.e * s**2) + jnp.sum(0.5 * jnp.log(2 * jnp.pi * jnp.e * ts**2))
    prior_mu = 0.5 * LOG_2PI + jnp.log(5.0) + (m**2 + s**2) / (2 * 25.0)
    prior_theta = jnp.sum(0.5 * LOG_2PI + 0.5 * ((tm - m) ** 2 + ts**2 + s**2))
    likelihood = jnp.sum(0.5 * LOG_2PI + jnp.log(0.5) + ((OBSERVATIONS - tm[GROUP]) ** 2 + ts[GROUP] ** 2) / (2 * 0.25))
    return -entropy + prior_mu + prior_theta + likelihood


def test_fit_matches_numpyro_svi_with_local_latents():
    params, losses = numpyro_svi(hierarchical, hierarchical_guide, Trace_ELBO(num_particles=4), 1000,
                                 schedule(1000), GROUP, OBSERVATIONS)
    result = mg.fit(hierarchical, hierarchical_guide, GROUP, OBSERVATIONS, key=jax.random.key(5), num_steps=1000,
                    optimizer=optax.adam(schedule(1000)), objective=mg.elbo(num_particles=4), progress_bar=False)
    optimum = minimise(hierarchical_exact_loss, {"mu_loc": 0.0, "mu_scale": 1.0, "theta_loc": jnp.zeros(NUM_GROUPS),
                                                 "theta_scale": jnp.ones(NUM_GROUPS)})
    assert_same_loss(result.losses, losses, float(hierarchical_exact_loss(result.params)),
                     float(hierarchical_exact_loss(params)), optimum)


# --------------------------------------------------------------------------- discrete latents

X_DISCRETE = jnp.array([1.3, -0.4, 0.8, -1.6, 2.2, 0.1])
PRIOR = 0.4


def mixture_model(x):
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Bernoulli(PRIOR))
        numpyro.sample("x", dist.Normal(2.0 * z - 1.0, 1.0), obs=x)


def mixture_guide(x):
    logits = numpyro.param("logits", jnp.full(x.shape[0], 0.2))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("z", dist.Bernoulli(logits=logits))


def mixture_exact_loss(params):
    """Σ_i Σ_z q_i(z) (log q_i(z) − log p(z) − log p(x_i | z)), enumerated."""
    q = jax.nn.sigmoid(params["logits"])
    total = 0.0
    for z, qz, prior in ((1.0, q, PRIOR), (0.0, 1 - q, 1 - PRIOR)):
        log_likelihood = -0.5 * LOG_2PI - 0.5 * (X_DISCRETE - (2 * z - 1)) ** 2
        total = total + qz * (jnp.log(qz) - jnp.log(prior) - log_likelihood)
    return float(jnp.sum(total))


def test_svi_with_mcgrad_elbo_matches_tracegraph_elbo_on_discrete_latents():
    reference, reference_losses = numpyro_svi(mixture_model, mixture_guide, TraceGraph_ELBO(num_particles=8), 1000,
                                              schedule(1000, 0.1), X_DISCRETE)
    ours, our_losses = numpyro_svi(mixture_model, mixture_guide, mg.elbo(num_particles=8), 1000, schedule(1000, 0.1),
                                   X_DISCRETE)
    # The guide family holds the exact posterior, so the optimum is −log p(x).
    log_evidence = float(jnp.sum(jnp.logaddexp(
        jnp.log(PRIOR) + dist.Normal(1.0, 1.0).log_prob(X_DISCRETE),
        jnp.log(1 - PRIOR) + dist.Normal(-1.0, 1.0).log_prob(X_DISCRETE),
    )))
    assert_same_loss(our_losses, reference_losses, mixture_exact_loss(ours), mixture_exact_loss(reference), -log_evidence)

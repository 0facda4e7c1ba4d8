"""The contract every estimator follows, checked for each one of a registry.

Under ``jax.jit`` and ``jax.vmap`` (over keys and over parameters), with no
recompilation on later calls (a trace counter in ``cost_fn`` and ``_cache_size``),
parameters as an arbitrary pytree (the gradient has the same structure), same key →
same result, ``mean(per_sample_grads) == grad`` for one key, the value of
``value_and_grad`` is the mean cost, and ``estimate`` returns a state of the same
structure, shapes and dtypes as ``init`` (so it can be a ``lax.scan`` carry and a second
call does not recompile).

The problem has non-scalar parameter leaves feeding a scalar Normal, so mcgrad's own
array code runs under ``jax_numpy_rank_promotion="raise"`` (tests/estimators/conftest.py).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import mcgrad as mg

from .problems import FAST_COMPILE

baselines = mg.baselines

ESTIMATORS = {
    "pathwise": lambda: mg.pathwise(),
    "score_function": lambda: mg.score_function(),
    "score_function-leave_one_out": lambda: mg.score_function(baselines.leave_one_out()),
    "score_function-moving_average": lambda: mg.score_function(baselines.moving_average(0.9)),
    "score_function-optimal_constant": lambda: mg.score_function(baselines.optimal_constant()),
    "score_function-learned": lambda: mg.score_function(baselines.learned()),
    "score_function-chain(moving_average, leave_one_out)": lambda: mg.score_function(
        baselines.chain(baselines.moving_average(0.9), baselines.leave_one_out())
    ),
    "score_function-chain(learned, optimal_constant)": lambda: mg.score_function(
        baselines.chain(baselines.learned(), baselines.optimal_constant())
    ),
    "measure_valued": lambda: mg.measure_valued(),
    "measure_valued-uncoupled": lambda: mg.measure_valued(coupling=False),
    "measure_valued-batch_size": lambda: mg.measure_valued(batch_size=16),
    "control_variate-score_function": lambda: mg.with_control_variate(mg.score_function(), mg.delta_method()),
    "control_variate-pathwise-fixed": lambda: mg.with_control_variate(mg.pathwise(), mg.delta_method(), 1.0),
    "control_variate-measure_valued": lambda: mg.with_control_variate(mg.measure_valued(), mg.delta_method()),
}
STATEFUL = {"moving_average", "learned", "chain"}

NUM_SAMPLES = 64
PARAMS = {"w": jnp.array([0.3, -0.2]), "s": ({"raw": jnp.array(0.1)},)}
OTHER_PARAMS = {"w": jnp.array([-0.1, 0.4]), "s": ({"raw": jnp.array(-0.3)},)}


def dist_fn(params):
    loc = params["w"][0] + 0.5 * params["w"][1]
    return dist.Normal(loc, jax.nn.softplus(params["s"][0]["raw"]))


def exact_value(params):
    loc = float(params["w"][0] + 0.5 * params["w"][1])
    scale = math.log1p(math.exp(float(params["s"][0]["raw"])))
    return (loc - 0.5) ** 2 + scale**2 + math.cos(loc) * math.exp(-(scale**2) / 2)


class Counting:
    """A cost that counts how often it is traced (a Python side effect)."""

    def __init__(self):
        self.traces = 0

    def __call__(self, x):
        self.traces += 1
        return (x - 0.5) ** 2 + jnp.cos(x)


def same_structure(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert jnp.shape(x) == jnp.shape(y) and jnp.result_type(x) == jnp.result_type(y), (x, y)


def build(name):
    """One compiled program per estimator, holding every driver, reused by the checks."""
    estimator = ESTIMATORS[name]()
    cost = Counting()
    kwargs = dict(estimator=estimator, num_samples=NUM_SAMPLES)
    grad = mg.grad(cost, dist_fn, **kwargs)
    value_and_grad = mg.value_and_grad(cost, dist_fn, **kwargs)
    per_sample = mg.per_sample_grads(cost, dist_fn, **kwargs)
    step = mg.estimate(cost, dist_fn, **kwargs)

    def everything(params, state, key):
        value, vg_grad = value_and_grad(params, key)
        out = step(params, state, key)

        def scan_step(carry, k):
            new = step(params, carry, k)
            return new.state, new.value

        scanned, _ = jax.lax.scan(scan_step, state, jax.random.split(key, 3))
        return {
            "value": value,
            "vg_grad": vg_grad,
            "per_sample": per_sample(params, key),
            "estimate": out,
            "scanned_state": scanned,
        }

    # The backend optimisation level changes neither tracing nor caching, and the default
    # one doubles the compile time of these programs.
    compiled = jax.jit(everything, compiler_options=FAST_COMPILE)
    return name, estimator, cost, compiled, grad


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_contract(name):
    """All checks share one compiled program (one test per estimator, so pytest-xdist
    does not compile it on both workers)."""
    setup = build(name)
    check_jit_no_recompile_and_determinism(setup)
    check_outputs_follow_params_structure(setup)
    check_drivers_agree(setup)
    check_state_structure_unchanged_by_a_step(setup)
    check_vmap_over_keys_and_params(setup)


def check_jit_no_recompile_and_determinism(setup):
    name, estimator, cost, compiled, _ = setup
    state = estimator.init(PARAMS)
    first = compiled(PARAMS, state, jax.random.key(0))
    traces = cost.traces
    assert traces > 0
    again = compiled(PARAMS, state, jax.random.key(0))
    other = compiled(OTHER_PARAMS, first["estimate"].state, jax.random.key(1))  # the new state: no retrace
    assert cost.traces == traces, "second call retraced"
    assert compiled._cache_size() == 1
    # same key, same result (bitwise); another key, another estimate
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(first["vg_grad"]["w"], other["vg_grad"]["w"])


def check_outputs_follow_params_structure(setup):
    name, estimator, _, compiled, _ = setup
    state = estimator.init(PARAMS)
    out = compiled(PARAMS, state, jax.random.key(0))
    same_structure(out["vg_grad"], PARAMS)
    same_structure(out["estimate"].grad, PARAMS)
    assert jax.tree.structure(out["per_sample"]) == jax.tree.structure(PARAMS)
    for leaf, param in zip(jax.tree.leaves(out["per_sample"]), jax.tree.leaves(PARAMS), strict=True):
        assert leaf.shape == (NUM_SAMPLES,) + param.shape
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(out))


def check_drivers_agree(setup):
    """value_and_grad's grad = estimate's grad = mean of per_sample_grads (one key), and
    the value is the mean cost of the samples (``grad`` is checked in the vmap check)."""
    name, estimator, _, compiled, _ = setup
    out = compiled(PARAMS, estimator.init(PARAMS), jax.random.key(0))
    for a, b in zip(jax.tree.leaves(out["vg_grad"]), jax.tree.leaves(out["estimate"].grad), strict=True):
        np.testing.assert_array_equal(a, b)
    for mean, g in zip(jax.tree.leaves(out["per_sample"]), jax.tree.leaves(out["vg_grad"]), strict=True):
        np.testing.assert_allclose(np.mean(np.asarray(mean, np.float64), axis=0), g, rtol=1e-5, atol=1e-5)
    costs = np.asarray(out["estimate"].info.costs, np.float64)
    assert costs.shape == (NUM_SAMPLES,)
    np.testing.assert_allclose(out["value"], costs.mean(), rtol=1e-5)
    np.testing.assert_allclose(out["estimate"].value, costs.mean(), rtol=1e-5)
    se = costs.std(ddof=1) / math.sqrt(NUM_SAMPLES)
    assert abs(costs.mean() - exact_value(PARAMS)) < 5 * se


def check_state_structure_unchanged_by_a_step(setup):
    name, estimator, _, compiled, _ = setup
    state = estimator.init(PARAMS)
    out = compiled(PARAMS, state, jax.random.key(0))
    same_structure(out["estimate"].state, state)
    same_structure(out["scanned_state"], state)
    if any(word in name for word in STATEFUL):
        changed = [
            not np.array_equal(a, b)
            for a, b in zip(jax.tree.leaves(out["estimate"].state), jax.tree.leaves(state), strict=True)
        ]
        assert any(changed), "a stateful baseline's state did not move"


def check_vmap_over_keys_and_params(setup):
    name, estimator, _, compiled, grad = setup
    keys = jax.random.split(jax.random.key(2), 3)
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), PARAMS, OTHER_PARAMS)
    batched = jax.jit(
        lambda params, stacked, keys: (
            jax.vmap(grad, in_axes=(None, 0))(params, keys),
            jax.vmap(grad, in_axes=(0, None))(stacked, keys[0]),
        ),
        compiler_options=FAST_COMPILE,
    )
    over_keys, over_params = batched(PARAMS, stacked, keys)

    def single(params, key):  # value_and_grad's, from the already compiled program
        return compiled(params, estimator.init(params), key)["vg_grad"]

    for i, key in enumerate(keys):
        for a, b in zip(jax.tree.leaves(over_keys), jax.tree.leaves(single(PARAMS, key)), strict=True):
            np.testing.assert_allclose(a[i], b, rtol=2e-5, atol=2e-5)
    for i, params in enumerate((PARAMS, OTHER_PARAMS)):
        for a, b in zip(jax.tree.leaves(over_params), jax.tree.leaves(single(params, keys[0])), strict=True):
            np.testing.assert_allclose(a[i], b, rtol=2e-5, atol=2e-5)


def test_cost_may_depend_on_params():
    """Problem: a cost closing over θ is differentiated in θ as well. For
    f(x; θ) = (x − μ_θ)², E f = σ², so ∂μ = 0 and ∂σ = 2σ for every estimator."""
    params = {"loc": jnp.float32(0.7), "scale": jnp.float32(1.3)}

    def run(params, key):
        out = {}
        for name in ("pathwise", "score_function", "measure_valued", "control_variate-score_function"):
            estimator = ESTIMATORS[name]()
            samples = mg.per_sample_grads(
                lambda x: (x - params["loc"]) ** 2,
                lambda p: dist.Normal(p["loc"], p["scale"]),
                estimator=estimator,
                num_samples=20_000,
            )
            out[name] = samples(params, key)
        return out

    out = jax.jit(run, compiler_options=FAST_COMPILE)(params, jax.random.key(4))
    for name, grads in out.items():
        for parameter, exact in (("loc", 0.0), ("scale", 2 * 1.3)):
            g = np.asarray(grads[parameter], np.float64)
            se = g.std(ddof=1) / math.sqrt(g.size)
            assert abs(g.mean() - exact) < 5 * se + 1e-5, (name, parameter, g.mean(), se)


@pytest.mark.xfail(
    reason="XLA CPU miscompile (jax/jaxlib 0.10.2): one program holding jacfwd of a Beta "
    "rsample and jacfwd of its log_prob at stop_gradient samples gives a wrong ∂ log p / ∂β "
    "(log x used for log(1 − x)) for N = 10⁵ (not for N ≤ 2¹⁴); reproduces in pure JAX with "
    "jax.random.dirichlet. Not mcgrad's code; passes when the two are compiled apart.",
    strict=False,
)
def test_pathwise_and_score_function_in_one_program():
    params = {"a": jnp.float32(2.0), "b": jnp.float32(3.0)}

    def dist_fn(p):
        return dist.Beta(p["a"], p["b"])

    def cost(x):
        return 3.0 + 0.0 * x

    n = 100_000
    score = mg.per_sample_grads(cost, dist_fn, estimator=mg.score_function(), num_samples=n)
    path = mg.per_sample_grads(cost, dist_fn, estimator=mg.pathwise(), num_samples=n)
    key = jax.random.key(1)
    with jax.numpy_rank_promotion("allow"):  # NumPyro's Beta needs it
        alone = jax.jit(score)(params, key)
        together = jax.jit(lambda p, k: (path(p, k), score(p, k)))(params, key)[1]
    np.testing.assert_allclose(together["b"], alone["b"], rtol=1e-4, atol=1e-4)

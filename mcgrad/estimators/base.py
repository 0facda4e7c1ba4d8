"""The one contract every gradient estimator follows, and the drivers written once over it.

An estimator of ∇θ E_{p_θ(x)}[f(x)] is a value: a :class:`GradientEstimator` holding two
pure functions. ``surrogate(key, params, state, problem)`` returns a per-sample surrogate
``s`` of shape ``[N]`` such that

* the value of ``s[i]`` is the cost of sample ``i``, so ``mean(s)`` is the plain Monte
  Carlo estimate of the objective, and
* ``∇θ mean(s)`` is the estimator's gradient estimate and ``∇θ s[i]`` is the
  contribution of sample ``i`` (its mean over ``i`` is the estimate).

``grad``, ``value_and_grad``, ``per_sample_grads`` and ``estimate`` are generic over that
contract: adding an estimator is writing one ``surrogate``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import equinox as eqx
import jax
import jax.numpy as jnp
from numpyro.distributions import Distribution

Params = Any  # a pytree of arrays
EstimatorState = Any  # a pytree of arrays
Array = jax.Array


class CostFn(Protocol):
    """One sample in, a scalar cost out. mcgrad vmaps it over samples."""

    def __call__(self, x: Array) -> Array: ...


class DistFn(Protocol):
    """Parameters (any pytree) in, a NumPyro distribution out."""

    def __call__(self, params: Params) -> Distribution: ...


class Problem(NamedTuple):
    """What is estimated: ∇θ E_{dist_fn(θ)}[cost_fn(x)] from ``num_samples`` samples.

    ``site`` names the sample site in error messages (``"x"`` outside a model).
    ``cost_fn`` may close over traced parameters (as an ELBO's ``log q`` term does); its
    direct dependence on θ is then differentiated as well.
    """

    cost_fn: CostFn
    dist_fn: DistFn
    num_samples: int
    site: str = "x"


class EstimatorInfo(NamedTuple):
    """What one estimate cost and saw.

    Attributes:
        costs: the ``[N]`` costs ``f(x_i)`` of the plain Monte Carlo samples.
        num_evaluations: evaluations of ``cost_fn`` spent (a Python int, static).
    """

    costs: Array
    num_evaluations: int


class SurrogateFn(Protocol):
    def __call__(
        self, key: Array, params: Params, state: EstimatorState, problem: Problem
    ) -> tuple[Array, tuple[EstimatorState, EstimatorInfo]]: ...


class GradientEstimator(NamedTuple):
    """A Monte Carlo gradient estimator: settings captured in a closure, state returned.

    Attributes:
        init: ``params -> state``; the state any baseline or learned part carries.
        surrogate: ``(key, params, state, problem) -> (s [N], (new_state, info))``
            under the contract of this module.
        config: the factory's name and settings (e.g. ``{"name": "score_function",
            "baseline": ...}``), read by :mod:`mcgrad.inference` to apply the same
            estimator to one sample site of a NumPyro program.
    """

    init: Callable[[Params], EstimatorState]
    surrogate: SurrogateFn
    config: dict | None = None


class EmptyState(NamedTuple):
    """The state of an estimator that keeps none."""


def init_empty_state(params: Params) -> EmptyState:
    del params
    return EmptyState()


# --------------------------------------------------------------------------- helpers


def gradient_only(x: Array) -> Array:
    """``x - stop_gradient(x)``: zero in value, the gradient of ``x`` in derivative."""
    return x - jax.lax.stop_gradient(x)


def describe(distribution: Distribution) -> str:
    """A short name for a distribution in error messages, wrappers included."""
    inner = distribution
    wrappers = []
    while hasattr(inner, "base_dist"):
        wrappers.append(type(inner).__name__)
        inner = inner.base_dist
    name = type(inner).__name__
    return f"{name} (inside {' of '.join(wrappers)})" if wrappers else name


def evaluate_costs(cost_fn: CostFn, samples: Array, site: str = "x") -> Array:
    """``vmap(cost_fn)(samples)``, checked to give one scalar per sample.

    Raises:
        ValueError: at trace time, when ``cost_fn`` returns anything but a scalar.
    """
    costs = jax.vmap(cost_fn)(samples)
    if jnp.shape(costs) != samples.shape[:1]:
        one = jnp.shape(costs)[1:]
        raise ValueError(
            f"cost_fn must return a scalar for one sample of site '{site}', but for a sample "
            f"of shape {samples.shape[1:]} it returned shape {one}. Reduce it to a scalar, "
            "e.g. `jnp.sum(...)`."
        )
    return costs


def linear_surrogate(values: Array, params: Params, per_sample_gradients: Params) -> Array:
    """The surrogate whose value is ``values`` and whose per-sample gradient is given.

    ``s_i = values_i + Σ_leaves ⟨θ − sg(θ), sg(G_i)⟩`` for per-sample gradients ``G``
    (every leaf with a leading axis of ``N``). Used by estimators that compute their
    per-sample gradients explicitly (per-parameter baselines, control variates).
    """

    def leaf_term(theta, grads):
        delta = gradient_only(theta)
        grads = jax.lax.stop_gradient(grads)
        return jnp.sum(jnp.reshape(delta, (1, -1)) * jnp.reshape(grads, (grads.shape[0], -1)), axis=1)

    terms = jax.tree.leaves(jax.tree.map(leaf_term, params, per_sample_gradients))
    return values + sum(terms, jnp.zeros_like(values))


def surrogate_jacobian(
    estimator: GradientEstimator, key: Array, params: Params, state: EstimatorState, problem: Problem
) -> tuple[Params, tuple[Array, EstimatorState, EstimatorInfo]]:
    """Per-sample gradients ``∇θ s_i`` (leading axis ``N`` on every leaf) and the surrogate.

    Forward mode when there are fewer parameter coordinates than samples (the usual
    variance study: cost ``O(|θ|·N)``), reverse mode otherwise.
    """

    def surrogate(p):
        s, (new_state, info) = estimator.surrogate(key, p, state, problem)
        return s, (s, new_state, info)

    num_coordinates = sum(int(jnp.size(leaf)) for leaf in jax.tree.leaves(params))
    jacobian_fn = jax.jacfwd if num_coordinates < problem.num_samples else jax.jacrev
    jacobian, aux = jacobian_fn(surrogate, has_aux=True)(params)
    return jacobian, aux


# --------------------------------------------------------------------------- drivers


class Estimate(NamedTuple):
    """The output of :func:`estimate`: objective value, gradient, new state and info."""

    value: Array
    grad: Params
    state: EstimatorState
    info: EstimatorInfo


def _guard_finite(value: Array | None, grads: Params, problem: Problem, params: Params) -> Params:
    """Raise (``eqx.error_if``) if ``value`` (when given) or any gradient is not finite.

    ``grad`` passes no value: checking the cost values would mean computing them, which
    a gradient alone does not need (a pathwise gradient never evaluates ``f`` itself, a
    measure-valued one only at the perturbed samples), and at small ``D`` that is up to a
    third of the estimate's time. A non-finite cost reaches the gradient of the score
    function and the measure-valued estimators; under pathwise a cost can be non-finite
    where its derivative is not (``log`` of a negative number), which ``value_and_grad``
    catches.
    """
    name = describe(problem.dist_fn(jax.lax.stop_gradient(params)))
    message = (
        f"cost_fn returned a non-finite value (nan or inf) for a sample of site "
        f"'{problem.site}' ({name}), or its gradient is not finite. Check the cost's domain "
        "for the values this distribution can draw, or clip or transform its input."
    )
    finite = jnp.isfinite(value) if value is not None else jnp.array(True)
    for leaf in jax.tree.leaves(grads):
        finite = finite & jnp.all(jnp.isfinite(leaf))
    return eqx.error_if(grads, ~finite, message)


def estimate(
    cost_fn: CostFn,
    dist_fn: DistFn,
    *,
    estimator: GradientEstimator,
    num_samples: int,
    check_finite: bool = True,
) -> Callable[[Params, EstimatorState, Array], Estimate]:
    """The stateful entry point: ``(params, state, key) -> Estimate``.

    Use it for estimators that carry state between calls (moving-average or learned
    baselines); start from ``estimator.init(params)``.

    Example:
        >>> import jax, jax.numpy as jnp, mcgrad as mg, numpyro.distributions as dist
        >>> estimator = mg.score_function(baseline=mg.baselines.moving_average(0.9))
        >>> step = mg.estimate(lambda x: x ** 2, lambda p: dist.Normal(p, 1.0),
        ...                    estimator=estimator, num_samples=10)
        >>> state = estimator.init(1.0)
        >>> out = step(1.0, state, jax.random.key(0))
        >>> out.grad.shape, jax.tree.structure(out.state) == jax.tree.structure(state)
        ((), True)
    """
    return _estimate_fn(estimator, Problem(cost_fn, dist_fn, num_samples), "value" if check_finite else None)


def _estimate_fn(estimator: GradientEstimator, problem: Problem, check: str | None):
    """``estimate`` with ``check`` = ``"value"`` (value and gradient), ``"gradient"`` or ``None``."""

    def estimate_fn(params: Params, state: EstimatorState, key: Array) -> Estimate:
        def mean_surrogate(p):
            s, (new_state, info) = estimator.surrogate(key, p, state, problem)
            return jnp.mean(s), (new_state, info)

        (value, (new_state, info)), grads = jax.value_and_grad(mean_surrogate, has_aux=True)(params)
        if check is not None:
            grads = _guard_finite(value if check == "value" else None, grads, problem, params)
        return Estimate(value, grads, new_state, info)

    return estimate_fn


def value_and_grad(
    cost_fn: CostFn,
    dist_fn: DistFn,
    *,
    estimator: GradientEstimator,
    num_samples: int,
    check_finite: bool = True,
) -> Callable[[Params, Array], tuple[Array, Params]]:
    """``(params, key) -> (value, grad)``: the Monte Carlo value of E[f] and its gradient.

    The estimator's state starts fresh on every call (``estimator.init(params)``).

    Example:
        >>> import jax, jax.numpy as jnp, mcgrad as mg, numpyro.distributions as dist
        >>> fn = mg.value_and_grad(lambda x: x ** 2, lambda p: dist.Normal(p["loc"], 1.0),
        ...                        estimator=mg.pathwise(), num_samples=1000)
        >>> value, grad = fn({"loc": 1.0}, jax.random.key(0))
        >>> bool(abs(grad["loc"] - 2.0) < 0.3)   # ∇μ E[x²] = 2μ
        True
    """
    inner = estimate(cost_fn, dist_fn, estimator=estimator, num_samples=num_samples, check_finite=check_finite)

    def fn(params: Params, key: Array) -> tuple[Array, Params]:
        out = inner(params, estimator.init(params), key)
        return out.value, out.grad

    return fn


def grad(
    cost_fn: CostFn,
    dist_fn: DistFn,
    *,
    estimator: GradientEstimator,
    num_samples: int,
    check_finite: bool = True,
) -> Callable[[Params, Array], Params]:
    """``(params, key) -> grad``, a pytree shaped like ``params``.

    With ``check_finite`` it raises if the gradient estimate is not finite. It does not
    evaluate the costs only to check them (a pathwise gradient never needs ``f`` itself):
    :func:`value_and_grad` also checks the value.

    Example:
        >>> import jax, mcgrad as mg, numpyro.distributions as dist
        >>> g = mg.grad(lambda x: x, lambda p: dist.Normal(p, 1.0),
        ...             estimator=mg.measure_valued(), num_samples=100)(0.5, jax.random.key(0))
        >>> bool(abs(g - 1.0) < 0.2)
        True
    """
    inner = _estimate_fn(estimator, Problem(cost_fn, dist_fn, num_samples), "gradient" if check_finite else None)
    return lambda params, key: inner(params, estimator.init(params), key).grad


def per_sample_grads(
    cost_fn: CostFn,
    dist_fn: DistFn,
    *,
    estimator: GradientEstimator,
    num_samples: int,
) -> Callable[[Params, Array], Params]:
    """``(params, key) -> per-sample gradients``: every leaf gets a leading axis ``N``.

    Their mean over the leading axis is the estimate of :func:`grad` for the same key;
    their empirical variance is the single-sample variance of the estimator.

    Example:
        >>> import jax, mcgrad as mg, numpyro.distributions as dist
        >>> g = mg.per_sample_grads(lambda x: x ** 2, lambda p: dist.Normal(p, 1.0),
        ...                         estimator=mg.score_function(), num_samples=5)(1.0, jax.random.key(0))
        >>> g.shape
        (5,)
    """
    problem = Problem(cost_fn, dist_fn, num_samples)

    def fn(params: Params, key: Array) -> Params:
        jacobian, _ = surrogate_jacobian(estimator, key, params, estimator.init(params), problem)
        return jacobian

    return fn

"""Shared ground truth for the estimator tests, written once.

* ``COSTS``: the cost functions (constant, linear, quadratic, cos, and a
  non-differentiable step), each usable with ``jax.numpy`` and ``numpy``.
* ``PROBLEMS``: distributions (every registered family, pathwise-only families, batched,
  event-shaped and pytree-parameterised ones) with an exact float64 expectation of any
  separable cost computed by SciPy quadrature or enumeration over the support,
  independently of the code under test.
* ``exact_gradient``: ∇θ E[f] by a fourth-order central difference of that expectation.
* ``ESTIMATORS``: the estimator configurations under test and where they apply.
* ``estimate_all``: one compiled call per problem running every estimator on every
  cost (the cost index is vmapped), returning each estimate's mean and standard error.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from scipy import integrate, stats

import mcgrad as mg

# --------------------------------------------------------------------------- costs


class Cost(NamedTuple):
    """An elementwise cost ``fn(x, threshold, xp)`` for ``xp`` in {numpy, jax.numpy}."""

    name: str
    fn: Callable[[Any, float, Any], Any]
    differentiable: bool


def _step(x, threshold, xp):
    return xp.where(x > threshold, 1.0, 0.0)


COSTS: tuple[Cost, ...] = (
    Cost("constant", lambda x, t, xp: 3.0 + 0.0 * x, True),
    Cost("linear", lambda x, t, xp: 2.0 * x - 1.0, True),
    Cost("quadratic", lambda x, t, xp: (x - 0.5) ** 2, True),
    Cost("cos", lambda x, t, xp: xp.cos(x), True),
    Cost("step", _step, False),
)
COST_BY_NAME = {cost.name: cost for cost in COSTS}


# --------------------------------------------------------------------------- exact expectations (float64)

_QUAD = dict(epsabs=1e-13, epsrel=1e-11, limit=400)
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _quad_expect(log_pdf, low, high, f, threshold):
    """∫ f·exp(log_pdf) over [low, high], split at the step's threshold (pdfs via ``math``:
    SciPy's ``stats`` pdfs cost ~50 µs a call)."""
    edges = [low] + ([threshold] if low < threshold < high else []) + [high]
    integrand = lambda x: float(f(x)) * math.exp(log_pdf(x))  # noqa: E731
    return sum(integrate.quad(integrand, a, b, **_QUAD)[0] for a, b in zip(edges[:-1], edges[1:], strict=True))


def normal_marginal(loc, scale):
    log_pdf = lambda x: -0.5 * ((x - loc) / scale) ** 2 - math.log(scale) - _LOG_SQRT_2PI  # noqa: E731
    return lambda f, t: _quad_expect(log_pdf, loc - 14 * scale, loc + 14 * scale, f, t)


def exponential_marginal(rate):
    return lambda f, t: _quad_expect(lambda x: math.log(rate) - rate * x, 0.0, 80.0 / rate, f, t)


def gamma_marginal(concentration, rate):
    a, b = concentration, rate
    log_pdf = lambda x: a * math.log(b) + (a - 1) * math.log(x) - b * x - math.lgamma(a) if x > 0 else -math.inf  # noqa: E731
    high = stats.gamma.isf(1e-30, a, scale=1.0 / b)
    return lambda f, t: _quad_expect(log_pdf, 0.0, high, f, t)


def weibull_marginal(scale, concentration):
    lam, k = scale, concentration
    log_pdf = lambda x: math.log(k / lam) + (k - 1) * math.log(x / lam) - (x / lam) ** k if x > 0 else -math.inf  # noqa: E731
    return lambda f, t: _quad_expect(log_pdf, 0.0, lam * 80.0 ** (1.0 / k), f, t)


def uniform_marginal(low, high):
    return lambda f, t: _quad_expect(lambda x: -math.log(high - low), low, high, f, t)


def beta_marginal(a, b):
    log_norm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    log_pdf = lambda x: log_norm + (a - 1) * math.log(x) + (b - 1) * math.log1p(-x) if 0 < x < 1 else -math.inf  # noqa: E731
    return lambda f, t: _quad_expect(log_pdf, 0.0, 1.0, f, t)


def discrete_marginal(support, pmf):
    support, pmf = np.asarray(support, np.float64), np.asarray(pmf, np.float64)
    return lambda f, t: float(np.sum(pmf * f(support)))


def bernoulli_marginal(probs):
    return discrete_marginal([0.0, 1.0], [1.0 - probs, probs])


def categorical_marginal(probs):
    return discrete_marginal(np.arange(len(probs)), probs)


def poisson_marginal(rate):
    support = np.arange(0, int(rate + 40 * math.sqrt(rate) + 60))
    return discrete_marginal(support, stats.poisson.pmf(support, rate))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def softmax(x):
    e = np.exp(np.asarray(x) - np.max(x))
    return e / e.sum()


def softplus(x):
    return np.log1p(np.exp(x))


# --------------------------------------------------------------------------- problems


class Problem(NamedTuple):
    """∇θ E_{dist_fn(θ)}[Σ_k w_k f(x_k) + cross·x_0·x_1] for the costs f of ``COSTS``.

    Attributes:
        name: test id.
        params: the user's parameters (a pytree of float64 numpy values).
        dist_fn: ``params -> numpyro distribution`` (jax).
        marginals: ``params (numpy) -> [E_k]``, one exact expectation operator
            ``E_k(f, breakpoint)`` per coordinate of ``x`` (flattened).
        threshold: where the step cost jumps.
        weights: ``w`` (one per coordinate).
        cross: coefficient of the non-separable term ``x_0·x_1`` (coordinates 0 and 1).
        cross_moment: ``params -> E[x_0 x_1]``; ``None`` for independent coordinates.
        has_rsample / has_moments: whether pathwise / the delta method apply.
        score_ok: the score function is unbiased (support independent of θ).
        registered: measure_valued has a weak derivative for it.
        fallback: measure_valued covers some parameter by its leave-one-out score
            function (per-sample terms not independent).
        projected: parameters are raw Categorical probabilities on the simplex: only the
            gradient's component tangent to the simplex is defined, so compare
            ``g − mean(g)`` over the last axis (see the note in test_unbiased.py).
        needs_rank_promotion: NumPyro's own sampling / log_prob of it promotes ranks.
        only: the estimator names run on it (``None``: every one that applies). Baselines
            that only shift the learning signal by a sample-independent constant
            (moving average, learned) run on the scalar families only; the
            pathwise-only families get pathwise, the plain score function and the
            pathwise control variate.
    """

    name: str
    params: Any
    dist_fn: Callable
    marginals: Callable[[Any], list]
    threshold: float
    weights: tuple[float, ...] = (1.0,)
    cross: float = 0.0
    cross_moment: Callable[[Any], float] | None = None
    has_rsample: bool = False
    has_moments: bool = True
    score_ok: bool = True
    registered: bool = True
    fallback: bool = False
    projected: bool = False
    needs_rank_promotion: bool = False
    only: tuple[str, ...] | None = None

    @property
    def jax_params(self):
        return jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), self.params)

    def rank_context(self):
        return allow_rank_promotion(self.needs_rank_promotion)

    def expectation(self, params, cost: Cost) -> float:
        """Exact E[cost] at ``params`` (float64)."""
        operators = self.marginals(params)
        assert len(operators) == len(self.weights), self.name

        def f(x):
            return cost.fn(np.asarray(x, np.float64), self.threshold, np)

        total = sum(w * e(f, self.threshold) for w, e in zip(self.weights, operators, strict=True))
        if self.cross:
            if self.cross_moment is not None:
                moment = self.cross_moment(params)
            else:
                identity = lambda x: np.asarray(x, np.float64)  # noqa: E731
                moment = operators[0](identity, 0.0) * operators[1](identity, 0.0)
            total += self.cross * moment
        return total

    def jax_cost(self, cost: Cost) -> Callable:
        """The same cost for one sample ``x`` of the distribution, in jax."""
        weights = np.asarray(self.weights, np.float32)

        def fn(x):
            flat = jnp.ravel(x).astype(jnp.float32)
            out = jnp.sum(jnp.asarray(weights) * cost.fn(flat, self.threshold, jnp))
            if self.cross:
                out = out + self.cross * flat[0] * flat[1]
            return out

        return fn

    def project(self, tree):
        """Tangent-space projection for raw simplex probabilities (identity otherwise)."""
        if not self.projected:
            return tree
        return jax.tree.map(lambda a: a - np.mean(a, axis=-1, keepdims=True), tree)


def allow_rank_promotion(needed: bool = True):
    """Trace under ``jax_numpy_rank_promotion="allow"`` when NumPyro's code needs it."""
    return jax.numpy_rank_promotion("allow") if needed else contextlib.nullcontext()


def _f(a):
    return np.asarray(a, np.float64)


def _dirichlet_cross(params):
    alpha = _f(params["concentration"])
    total = alpha.sum()
    return alpha[0] * alpha[1] / (total * (total + 1.0))


def _dirichlet_marginals(params):
    alpha = _f(params["concentration"])
    return [beta_marginal(a, alpha.sum() - a) for a in alpha]


PATHWISE_FAMILY_ESTIMATORS = ("pathwise", "score_function", "control_variate-pathwise")
SHAPED_ESTIMATORS = (
    "pathwise",
    "score_function",
    "score_function-leave_one_out",
    "score_function-optimal_constant",
    "measure_valued",
    "control_variate-score_function",
    "control_variate-pathwise",
)

PROBLEMS: tuple[Problem, ...] = (
    # ---- every registered family, scalar
    Problem(
        "normal",
        {"loc": 0.3, "scale": 1.2},
        lambda p: dist.Normal(p["loc"], p["scale"]),
        lambda p: [normal_marginal(p["loc"], p["scale"])],
        threshold=0.8,
        has_rsample=True,
    ),
    Problem(
        "bernoulli_probs",
        {"probs": 0.3},
        lambda p: dist.Bernoulli(probs=p["probs"]),
        lambda p: [bernoulli_marginal(p["probs"])],
        threshold=0.5,
    ),
    Problem(
        "bernoulli_logits",
        {"logits": -0.4},
        lambda p: dist.Bernoulli(logits=p["logits"]),
        lambda p: [bernoulli_marginal(sigmoid(p["logits"]))],
        threshold=0.5,
    ),
    Problem(
        "categorical_probs",
        {"probs": np.array([0.2, 0.5, 0.3])},
        lambda p: dist.Categorical(probs=p["probs"]),
        lambda p: [categorical_marginal(_f(p["probs"]))],
        threshold=1.5,
        has_moments=False,  # NumPyro's Categorical has no mean (nan)
        projected=True,
        needs_rank_promotion=True,
    ),
    Problem(
        "categorical_logits",
        {"logits": np.array([0.1, -0.3, 0.4])},
        lambda p: dist.Categorical(logits=p["logits"]),
        lambda p: [categorical_marginal(softmax(p["logits"]))],
        threshold=1.5,
        has_moments=False,
    ),
    Problem(
        "poisson",
        {"rate": 2.5},
        lambda p: dist.Poisson(p["rate"]),
        lambda p: [poisson_marginal(p["rate"])],
        threshold=2.5,
    ),
    Problem(
        "exponential",
        {"rate": 1.5},
        lambda p: dist.Exponential(p["rate"]),
        lambda p: [exponential_marginal(p["rate"])],
        threshold=0.6,
        has_rsample=True,
    ),
    Problem(
        "gamma",
        {"concentration": 2.5, "rate": 1.5},
        lambda p: dist.Gamma(p["concentration"], p["rate"]),
        lambda p: [gamma_marginal(p["concentration"], p["rate"])],
        threshold=1.5,
        has_rsample=True,
        fallback=True,
    ),
    Problem(
        "weibull",
        {"scale": 1.3, "concentration": 1.8},
        lambda p: dist.Weibull(p["scale"], p["concentration"]),
        lambda p: [weibull_marginal(p["scale"], p["concentration"])],
        threshold=1.0,
        has_rsample=True,
        fallback=True,
    ),
    Problem(
        "uniform",
        {"low": -0.5, "high": 1.5},
        lambda p: dist.Uniform(p["low"], p["high"]),
        lambda p: [uniform_marginal(p["low"], p["high"])],
        threshold=0.7,
        has_rsample=True,
        score_ok=False,  # support depends on θ: E[∇ log p] ≠ 0 (boundary term missing)
    ),
    # ---- pathwise-only families (implicit reparameterization)
    Problem(
        "beta",
        {"concentration1": 2.0, "concentration0": 3.0},
        lambda p: dist.Beta(p["concentration1"], p["concentration0"]),
        lambda p: [beta_marginal(p["concentration1"], p["concentration0"])],
        threshold=0.35,
        has_rsample=True,
        registered=False,
        needs_rank_promotion=True,
        only=PATHWISE_FAMILY_ESTIMATORS,
    ),
    Problem(
        "dirichlet",
        {"concentration": np.array([1.5, 2.0, 3.0])},
        lambda p: dist.Dirichlet(p["concentration"]),
        _dirichlet_marginals,
        threshold=0.3,
        weights=(1.0, -0.5, 2.0),
        cross=1.5,
        cross_moment=_dirichlet_cross,
        has_rsample=True,
        has_moments=False,  # correlated coordinates: delta_method refuses it (test_control_variates.py)
        registered=False,
        needs_rank_promotion=True,
        only=PATHWISE_FAMILY_ESTIMATORS,
    ),
    # ---- batched, event-shaped, pytree parameters
    Problem(
        "normal_to_event",
        {"loc": np.array([0.3, -0.5, 1.0]), "scale": np.array([1.2, 0.7, 0.5])},
        lambda p: dist.Normal(p["loc"], p["scale"]).to_event(1),
        lambda p: [normal_marginal(m, s) for m, s in zip(_f(p["loc"]), _f(p["scale"]), strict=True)],
        threshold=0.2,
        weights=(1.0, 0.5, -1.0),
        cross=1.0,
        has_rsample=True,
        needs_rank_promotion=True,
        only=SHAPED_ESTIMATORS,
    ),
    Problem(
        "normal_expand",
        {"loc": 0.3, "scale": 0.8},
        lambda p: dist.Normal(p["loc"], p["scale"]).expand([3]),
        lambda p: [normal_marginal(p["loc"], p["scale"])] * 3,
        threshold=0.2,
        weights=(1.0, 0.5, -1.0),
        cross=1.0,
        has_rsample=True,
        needs_rank_promotion=True,
        only=SHAPED_ESTIMATORS,
    ),
    Problem(
        "bernoulli_logits_to_event",
        {"logits": np.array([-0.4, 0.2, 1.0])},
        lambda p: dist.Bernoulli(logits=p["logits"]).to_event(1),
        lambda p: [bernoulli_marginal(q) for q in sigmoid(_f(p["logits"]))],
        threshold=0.5,
        weights=(1.0, 0.5, -1.0),
        cross=1.0,
        needs_rank_promotion=True,
        only=SHAPED_ESTIMATORS,
    ),
    Problem(
        "categorical_batch",
        {"logits": np.array([[0.1, -0.3, 0.4], [1.0, 0.0, -1.0]])},
        lambda p: dist.Categorical(logits=p["logits"]).to_event(1),
        lambda p: [categorical_marginal(softmax(row)) for row in _f(p["logits"])],
        threshold=0.5,
        weights=(1.0, -0.7),
        cross=1.0,
        has_moments=False,
        needs_rank_promotion=True,
        only=SHAPED_ESTIMATORS,
    ),
    Problem(
        "poisson_expand",
        {"rate": 2.0},
        lambda p: dist.Poisson(p["rate"]).expand([3]),
        lambda p: [poisson_marginal(p["rate"])] * 3,
        threshold=1.5,
        weights=(1.0, 0.5, -1.0),
        cross=1.0,
        needs_rank_promotion=True,
        only=SHAPED_ESTIMATORS,
    ),
    Problem(
        "gamma_to_event",
        {"concentration": np.array([2.0, 3.0]), "rate": np.array([1.0, 2.5])},
        lambda p: dist.Gamma(p["concentration"], p["rate"]).to_event(1),
        lambda p: [gamma_marginal(a, b) for a, b in zip(_f(p["concentration"]), _f(p["rate"]), strict=True)],
        threshold=1.0,
        weights=(1.0, -0.5),
        cross=1.0,
        has_rsample=True,
        fallback=True,
        needs_rank_promotion=True,
        only=SHAPED_ESTIMATORS,
    ),
    Problem(
        "normal_pytree",
        {"loc": {"a": np.array([0.3, -0.2])}, "scale": ({"raw": np.array([0.1, -0.5])},)},
        lambda p: dist.Normal(p["loc"]["a"], jax.nn.softplus(p["scale"][0]["raw"])).to_event(1),
        lambda p: [
            normal_marginal(m, s) for m, s in zip(_f(p["loc"]["a"]), softplus(_f(p["scale"][0]["raw"])), strict=True)
        ],
        threshold=0.0,
        weights=(1.0, 0.5),
        cross=1.0,
        has_rsample=True,
        needs_rank_promotion=True,
        only=SHAPED_ESTIMATORS,
    ),
    Problem(
        "categorical_weights",  # probs = w / Σw: raw weights in, the normalisation pulled back
        {"weights": (np.array([1.0, 2.0]), 0.5)},
        lambda p: dist.Categorical(
            probs=jnp.append(p["weights"][0], p["weights"][1]) / (jnp.sum(p["weights"][0]) + p["weights"][1])
        ),
        lambda p: [
            categorical_marginal(
                np.append(_f(p["weights"][0]), p["weights"][1]) / (np.sum(p["weights"][0]) + p["weights"][1])
            )
        ],
        threshold=0.5,
        has_moments=False,
        needs_rank_promotion=True,
        only=SHAPED_ESTIMATORS,
    ),
)
PROBLEM_BY_NAME = {problem.name: problem for problem in PROBLEMS}


# --------------------------------------------------------------------------- exact gradients


def _flatten(params):
    leaves, treedef = jax.tree.flatten(params)
    shapes = [np.shape(leaf) for leaf in leaves]
    flat = np.concatenate([np.ravel(np.asarray(leaf, np.float64)) for leaf in leaves])

    def unflatten(vector):
        out, start = [], 0
        for shape in shapes:
            size = int(np.prod(shape))
            piece = vector[start : start + size]
            out.append(float(piece[0]) if shape == () else piece.reshape(shape))
            start += size
        return jax.tree.unflatten(treedef, out)

    return flat, unflatten


def finite_difference_gradient(fn: Callable[[Any], float], params) -> Any:
    """∇ fn at ``params`` (any pytree) by a fourth-order central difference, float64."""
    flat, unflatten = _flatten(params)
    gradient = np.zeros_like(flat)
    for i in range(flat.size):
        h = 1e-3 * max(1.0, abs(flat[i]))

        def at(step, i=i, h=h):
            shifted = flat.copy()
            shifted[i] += step * h
            return fn(unflatten(shifted))

        gradient[i] = (-at(2) + 8 * at(1) - 8 * at(-1) + at(-2)) / (12 * h)
    return unflatten(gradient)


@functools.cache
def exact_gradient(problem_name: str, cost_name: str):
    """∇θ E[f] for a problem of ``PROBLEMS`` and a cost of ``COSTS`` (float64 pytree)."""
    problem, cost = PROBLEM_BY_NAME[problem_name], COST_BY_NAME[cost_name]
    return finite_difference_gradient(lambda p: problem.expectation(p, cost), problem.params)


@functools.cache
def exact_value(problem_name: str, cost_name: str) -> float:
    problem = PROBLEM_BY_NAME[problem_name]
    return problem.expectation(problem.params, COST_BY_NAME[cost_name])


# --------------------------------------------------------------------------- estimators


class EstimatorSpec(NamedTuple):
    """An estimator configuration and the problems it applies to.

    ``kind``: "pathwise", "score", "measure", "cv_score" or "cv_pathwise".
    ``independent``: per-sample gradients are i.i.d. (SE from their std); otherwise the SE
    comes from repeated independent estimates. ``warm_baseline``: a stateful baseline,
    whose state is first updated with a few made-up signals so the baseline it subtracts
    is not trivially zero (any state independent of the current samples keeps the
    estimator unbiased).
    """

    name: str
    build: Callable[[], mg.GradientEstimator]
    kind: str
    independent: bool = True
    warm_baseline: mg.baselines.Baseline | None = None

    def applies(self, problem: Problem) -> bool:
        if problem.only is not None and self.name not in problem.only:
            return False
        if self.kind == "pathwise":
            return problem.has_rsample
        if self.kind == "score":
            return problem.score_ok
        if self.kind == "measure":
            return problem.registered
        if self.kind == "cv_score":
            return problem.score_ok and problem.has_moments
        if self.kind == "cv_pathwise":
            return problem.has_rsample and problem.has_moments
        raise AssertionError(self.kind)

    def costs(self) -> tuple[Cost, ...]:
        if self.kind in ("pathwise", "cv_pathwise"):
            return tuple(cost for cost in COSTS if cost.differentiable)
        return COSTS

    def is_independent(self, problem: Problem) -> bool:
        return self.independent and not (self.kind == "measure" and problem.fallback)

    def initial_state(self, estimator: mg.GradientEstimator, params):
        state = estimator.init(params)
        if self.warm_baseline is not None:
            for value in (2.0, 5.0, 3.0):
                _, state = self.warm_baseline.update(jnp.full((8,), value), state, None)
        return state


baselines = mg.baselines


def _score_function(name, baseline=None, *, independent=False, warm=False) -> EstimatorSpec:
    return EstimatorSpec(
        name,
        lambda: mg.score_function(baseline),
        "score",
        independent=independent,
        warm_baseline=baseline if warm else None,
    )


ESTIMATORS: tuple[EstimatorSpec, ...] = (
    EstimatorSpec("pathwise", mg.pathwise, "pathwise"),
    _score_function("score_function", independent=True),
    _score_function("score_function-leave_one_out", baselines.leave_one_out()),
    _score_function("score_function-moving_average", baselines.moving_average(0.8), warm=True),
    _score_function("score_function-optimal_constant", baselines.optimal_constant()),
    _score_function("score_function-learned", baselines.learned(), warm=True),
    EstimatorSpec("measure_valued", mg.measure_valued, "measure"),
    EstimatorSpec("measure_valued-uncoupled", lambda: mg.measure_valued(coupling=False), "measure"),
    EstimatorSpec(
        "control_variate-score_function",
        lambda: mg.with_control_variate(mg.score_function(), mg.delta_method()),
        "cv_score",
        independent=False,
    ),
    EstimatorSpec(
        "control_variate-pathwise",
        lambda: mg.with_control_variate(mg.pathwise(), mg.delta_method()),
        "cv_pathwise",
        independent=False,
    ),
)
ESTIMATOR_BY_NAME = {spec.name: spec for spec in ESTIMATORS}


# --------------------------------------------------------------------------- running estimates


class Estimates(NamedTuple):
    """Per cost name: the estimate's mean, its standard error, and the raw draws."""

    mean: dict[str, Any]
    se: dict[str, Any]


def _cost_switch(problem: Problem, costs: tuple[Cost, ...]):
    branches = [problem.jax_cost(cost) for cost in costs]

    def cost_fn_for(index):
        return lambda x: jax.lax.switch(index, branches, x)

    return cost_fn_for


def _summaries(problem, costs, draws, count) -> Estimates:
    """Mean and SE over axis 1 of every leaf of ``draws`` ([C, count, ...]), in float64."""
    draws = jax.tree.map(lambda a: np.asarray(a, np.float64), draws)
    mean, se = {}, {}
    for index, cost in enumerate(costs):
        one = problem.project(jax.tree.map(lambda a, index=index: a[index], draws))
        mean[cost.name] = jax.tree.map(lambda a: a.mean(axis=0), one)
        se[cost.name] = jax.tree.map(lambda a: a.std(axis=0, ddof=1) / math.sqrt(count), one)
    return Estimates(mean, se)


# XLA's backend optimisation is most of the compile time of these one-shot statistical
# programs and buys nothing here; contract tests keep the default options.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def per_sample_fn(spec: EstimatorSpec, problem: Problem, num_samples: int):
    """``(params, key) -> per-sample gradients [C, N, ...]`` for every cost of ``spec``."""
    costs = spec.costs()
    estimator = spec.build()
    cost_fn_for = _cost_switch(problem, costs)

    def run(params, key):
        def one(index):
            fn = mg.per_sample_grads(cost_fn_for(index), problem.dist_fn, estimator=estimator, num_samples=num_samples)
            return fn(params, key)

        return jax.vmap(one)(jnp.arange(len(costs)))

    return run


def repeated_fn(spec: EstimatorSpec, problem: Problem, num_samples: int, num_repeats: int):
    """``(params, key) -> [C, R, ...]``: ``R`` independent estimates of ``N`` samples each
    (from ``spec.initial_state``)."""
    costs = spec.costs()
    estimator = spec.build()
    cost_fn_for = _cost_switch(problem, costs)

    def run(params, key):
        def one(index):
            step = mg.estimate(cost_fn_for(index), problem.dist_fn, estimator=estimator, num_samples=num_samples)
            state = spec.initial_state(estimator, params)
            return jax.vmap(lambda k: step(params, state, k).grad)(jax.random.split(key, num_repeats))

        return jax.vmap(one)(jnp.arange(len(costs)))

    return run


def estimate_all(
    problem: Problem,
    specs: list[EstimatorSpec],
    key,
    *,
    num_samples: int,
    num_repeats: int,
    repeat_samples: int,
) -> dict[str, Estimates]:
    """Every spec on ``problem`` for every cost, in one compiled program per group.

    Specs with i.i.d. per-sample terms use ``num_samples`` per-sample gradients (SE from
    their std); the others ``num_repeats`` estimates of ``repeat_samples`` samples.
    """
    results = {}
    for group in ("pathwise", "score", "measure"):
        members = [spec for spec in specs if _PROGRAM_GROUP[spec.kind] == group]
        if not members:
            continue
        runs, counts = [], []
        for spec in members:
            if spec.is_independent(problem):
                runs.append(per_sample_fn(spec, problem, num_samples))
                counts.append(num_samples)
            else:
                runs.append(repeated_fn(spec, problem, repeat_samples, num_repeats))
                counts.append(num_repeats)
        run_all = jax.jit(
            lambda params, key, runs=runs: [run(params, key) for run in runs], compiler_options=FAST_COMPILE
        )
        with problem.rank_context():
            draws = run_all(problem.jax_params, key)
        for spec, d, count in zip(members, draws, counts, strict=True):
            results[spec.name] = _summaries(problem, spec.costs(), d, count)
    return results


# Estimators share a compiled program with the others of their group only. XLA on CPU
# (jax 0.10.2) miscompiles one program holding both the forward-mode Jacobian of a
# Dirichlet/Beta rsample and that of its log_prob at a stop_gradient sample, for N = 10⁵
# (see test_contract.py::test_pathwise_and_score_function_in_one_program).
_PROGRAM_GROUP = {
    "pathwise": "pathwise",
    "cv_pathwise": "pathwise",
    "score": "score",
    "cv_score": "score",
    "measure": "measure",
}


# --------------------------------------------------------------------------- assertions

FLOAT32_FLOOR = 2e-5  # float32 rounding of an average of O(1) terms, relative to 1 + |exact|


def assert_within_se(estimate, se, exact, label: str, num_se: float = 5.0) -> None:
    """|estimate − exact| < num_se·SE on every leaf element (plus a float32 rounding floor)."""
    estimate_leaves, treedef = jax.tree.flatten(estimate)
    exact_leaves = treedef.flatten_up_to(exact)
    se_leaves = treedef.flatten_up_to(se)
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(estimate)[0]]
    failures = []
    for path, e, s, x in zip(paths, estimate_leaves, se_leaves, exact_leaves, strict=True):
        e, s, x = (np.asarray(v, np.float64) for v in (e, s, x))
        assert e.shape == x.shape, f"{label}{path}: shape {e.shape} != exact {x.shape}"
        tolerance = num_se * s + FLOAT32_FLOOR * (1.0 + np.abs(x))
        bad = np.abs(e - x) > tolerance
        if np.any(bad):
            failures.append(
                f"{label}{path}: estimate {e.tolist()} exact {x.tolist()} se {s.tolist()} "
                f"(|z| = {(np.abs(e - x) / np.maximum(s, 1e-300)).tolist()})"
            )
    assert not failures, "\n".join(failures)

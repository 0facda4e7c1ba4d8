"""The one contract every gradient estimator follows, and the drivers written once over it.

An estimator of ∇θ E_{p_θ(x)}[f(x)] is a value, a :class:`GradientEstimator`: settings
captured in a closure, pure functions, all changing state returned. It answers two
questions about one sample site, wherever that site lives:

* ``sample(key, distribution, sample_shape)``: how the site's values are drawn — with a
  gradient path through the draw (pathwise) or without one (score function,
  measure-valued);
* ``terms(key, state, site)``: the surrogate terms it adds for the site's ``N`` rows of
  draws, zero in value, whose gradient is the rest of its estimate.

A :class:`Site` is what the estimator sees of the site: the rows' draws, their costs, the
parameters of their distribution and a few operations over the rows (re-cost a replaced
value, draw again with the same randomness, map over rows, per-row gradients). Two
drivers build sites and nothing else knows how:

* :func:`surrogate` here, for ``mg.grad``-style problems: ``N`` i.i.d. draws from
  ``dist_fn(params)`` and a cost function;
* the particle engine (:mod:`mcgrad.inference.particles`), for a sample site of a NumPyro
  program: one row per particle, the row's cost Rao-Blackwellized over the program.

The contract that makes everything compose: the per-row surrogate ``s_i = cost_i +
terms_i`` has the plain Monte Carlo cost as its value, and ``∇θ mean(s)`` is the
estimate. ``grad``, ``value_and_grad``, ``per_sample_grads`` and ``estimate`` are generic
over it, and so is every objective of :func:`mcgrad.fit`: adding an estimator is one file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions import Distribution

from mcgrad.estimators.distributions import describe, elementwise, own_log_prob, unwrap

Params = Any  # a pytree of arrays
EstimatorState = Any  # a pytree of arrays
Array = jax.Array


class CostFn(Protocol):
    """One sample in, a scalar cost out. mcgrad vmaps it over samples."""

    def __call__(self, x: Array) -> Array: ...


class DistFn(Protocol):
    """Parameters (any pytree) in, a NumPyro distribution out."""

    def __call__(self, params: Params) -> Distribution: ...


class SampleFn(Protocol):
    """``(key, distribution, sample_shape) -> values``, as ``Distribution.sample``."""

    def __call__(self, key: Array, distribution: Distribution, sample_shape: tuple[int, ...]) -> Array: ...


class PairSampleFn(Protocol):
    """``(key, distribution, sample_shape, is_partner) -> values``: one member of the
    antithetic pair drawn from ``key``, ``sample``'s draw where ``is_partner`` is false and
    its partner where true (a traced boolean in a model: one draw serves both)."""

    def __call__(
        self, key: Array, distribution: Distribution, sample_shape: tuple[int, ...], is_partner: Any
    ) -> Array: ...


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


class Site(NamedTuple):
    """One sample site as an estimator sees it: ``N`` rows of draws and what they cost.

    Rows are independent draws: the ``N`` samples of :func:`grad`, or the particles of a
    NumPyro program in :func:`mcgrad.fit`. The operations hide how the rows are laid
    out (one shared distribution, or one per particle), so an estimator written against
    them serves both.

    Attributes:
        name: the site's name, for error messages.
        value: ``[N, ...]``, the rows' draws (the estimator's ``sample``).
        cost: the learning signal of each row, without gradient: ``[N]``, or ``[N, ...]``
            per slice of the site's plates (Rao-Blackwellized: only the cost terms the
            row's draw can change).
        parameters: the distribution's parameters (floating-point leaves),
            differentiable in the user's parameters. Every operation below takes them
            explicitly, so an estimator can differentiate through them.
        map: ``map(fn, parameters, *row_args)`` applies ``fn(distribution, *args)`` to each
            row's distribution and the row's slice of ``row_args``; outputs gain a leading
            ``N``.
        jacobian: ``jacobian(fn, parameters)``: per-row gradients of ``fn(parameters) ->
            [N]`` with respect to ``parameters`` (leading axis ``N``). Row ``i`` of ``fn``
            may use other rows only under ``stop_gradient``.
        recost: ``values [N, ...] -> [N]``: each row's cost had its draw been
            ``values[i]`` (every other draw of the row kept: common random numbers).
            Differentiable in ``values``; the parameters enter it without gradient.
        resample: ``resample(sample_fn, parameters)``: the rows' draws again, with
            ``sample_fn`` and the same randomness as ``value`` (differentiable in
            ``parameters`` where ``sample_fn`` is).
        leave_one_out: ``[N]``, each row's cost with that row left out, for objectives
            whose cost couples the rows (VIMCO for multi-sample bounds); ``None`` means
            the mean of the other rows' costs.
        free_parameters: whether ``parameters`` are free coordinates of the family, so the
            score ``∇ log p`` has mean zero coordinate by coordinate (the user's
            parameters in :func:`grad`; a program site's distribution leaves, such as
            Categorical ``probs`` on the simplex, need not be). Per-coordinate baselines
            need it.
        recost_slices: ``values [N, ...] -> shaped like cost``: :attr:`recost` per slice,
            Rao-Blackwellized as ``cost`` is; ``None`` where ``cost`` has one entry per row
            (then it is ``recost``). Use :meth:`recost_like_cost`.
        plate_axes: axes of one row's draw (``value.shape[1:]``) that are plates of
            conditionally independent slices: replacing the draw in slice ``j`` changes
            slice ``j``'s entry of ``recost_slices`` and the cost terms outside the plate.
        coupled: ``() -> bool``: whether some cost term outside one of the plates reads
            the draw (an observed sum over the slices, say), so that replacing several
            slices at once would change that term by all the replacements together
            (computed on demand: it traces the program once). Estimators that replace
            coordinates (measure-valued, enumeration) replace every slice at once along
            :meth:`slice_axes` only; those that replace several slices' coordinates
            together take costs from :meth:`coupled_as_rows`.
    """

    name: str
    value: Array
    cost: Array
    parameters: Any
    map: Callable[..., Any]
    jacobian: Callable[[Callable[[Any], Array], Any], Any]
    recost: Callable[[Array], Array]
    resample: Callable[[SampleFn, Any], Array]
    leave_one_out: Array | None = None
    free_parameters: bool = False
    recost_slices: Callable[[Array], Array] | None = None
    plate_axes: tuple[int, ...] = ()
    coupled: Callable[[], bool] = bool

    @property
    def num_rows(self) -> int:
        return self.value.shape[0]

    def recost_like_cost(self, values: Array) -> Array:
        """Each row's cost had its draw been ``values[i]``, shaped like :attr:`cost`."""
        return (self.recost_slices or self.recost)(values)

    def family(self) -> Distribution:
        """The family of the rows' distribution (inside ``expand`` / ``to_event``), seen while
        :attr:`map` traces it: read its type and static shapes only (its leaves are tracers)."""
        seen = []
        self.map(lambda distribution: seen.append(unwrap(distribution)) or jnp.zeros(()), self.parameters)
        return seen[0]

    def slice_axes(self) -> tuple[int, ...]:
        """The plate axes an estimator may replace all at once: :attr:`plate_axes` where
        costs come per slice and no term outside the plates couples the slices
        (:attr:`coupled`); none otherwise."""
        return () if self.recost_slices is None or self._slices_coupled() else self.plate_axes

    def _slices_coupled(self) -> bool:
        return self.recost_slices is not None and bool(self.plate_axes) and self.coupled()

    def coupled_as_rows(self) -> Site:
        """This site with one cost per row (the particle's total: one more evaluation of
        each row) where a term couples its slices, else the site itself. Per-slice costs
        stay right for one coordinate replaced at a time (the slices it does not touch
        keep their costs) but not for several slices' coordinates replaced together,
        each of whose costs would miss the others' share."""
        if not self._slices_coupled():
            return self
        return self._replace(cost=jax.lax.stop_gradient(self.recost(self.value)), recost_slices=None, plate_axes=())


def per_coordinate(cost: Array, value_shape: tuple[int, ...]) -> Array:
    """A learning signal ``[N, *s]`` (one entry per row, or per slice) broadcast to the draws'
    ``[N, *value_shape]``: every coordinate of a slice sees its slice's signal."""
    cost = jnp.reshape(cost, cost.shape + (1,) * (1 + len(value_shape) - cost.ndim))
    return jnp.broadcast_to(cost, cost.shape[:1] + tuple(value_shape))


def coordinate_log_probs(site: Site, values: Array) -> Array:
    """``log p_θ(values)`` of each coordinate of the rows' draws, ``[N, *value_shape]``
    (``to_event`` wrappers looked through), differentiable in the site's parameters: for
    estimators that weigh a replaced value by its probability (enumeration, the
    measure-valued sum over a finite family's values)."""
    log_probs = site.map(lambda d, v: own_log_prob(elementwise(d), v), site.parameters, values)
    return jnp.broadcast_to(log_probs, site.value.shape)


def coordinate_groups(value_shape: tuple[int, ...], plate_axes: tuple[int, ...]) -> tuple[np.ndarray, int]:
    """Coordinates of one draw that may be replaced together: those that differ only along
    ``plate_axes``. Returns ``(group of each flattened coordinate, number of groups)``."""
    group_shape = tuple(1 if axis in plate_axes else size for axis, size in enumerate(value_shape))
    num_groups = int(np.prod(group_shape, dtype=int))
    groups = np.broadcast_to(np.arange(num_groups).reshape(group_shape), value_shape).ravel()
    return groups, num_groups


class SiteInfo(NamedTuple):
    """What an estimator's ``terms`` spent beyond the rows' own cost.

    Attributes:
        num_evaluations: extra evaluations of the cost (re-costs), a Python int.
    """

    num_evaluations: int = 0


class EstimatorInfo(NamedTuple):
    """What one estimate cost and saw.

    Attributes:
        costs: the ``[N]`` costs ``f(x_i)`` of the plain Monte Carlo samples.
        num_evaluations: evaluations of ``cost_fn`` spent (a Python int, static).
    """

    costs: Array
    num_evaluations: int


class TermsFn(Protocol):
    def __call__(self, key: Array, state: EstimatorState, site: Site) -> tuple[Array, EstimatorState, SiteInfo]: ...


def check_nothing(distribution: Distribution, site: str) -> None:
    """The ``check`` of an estimator that applies to every distribution."""
    del distribution, site


class GradientEstimator(NamedTuple):
    """A Monte Carlo gradient estimator: settings captured in a closure, state returned.

    Attributes:
        init: ``params -> state``; the state its baseline or learned parts carry.
        sample: ``(key, distribution, sample_shape) -> values``: how a site's values are
            drawn. A draw that carries a gradient (``rsample``) makes the cost's own
            gradient part of the estimate.
        terms: ``(key, state, site) -> (terms [N], new_state, SiteInfo)``: surrogate terms,
            zero in value, whose gradient is the rest of the estimate (see :class:`Site`).
        check: ``(distribution, site_name) -> None``: raise a clear ``ValueError`` when the
            estimator does not apply to the distribution (called before drawing).
        name: a short label for tables, progress bars and diagnostics.
        reparameterized: whether ``sample`` carries the gradient through the draw. An
            ELBO then keeps ``∇ log q`` at the drawn value (the pathwise estimate needs
            it); otherwise it drops that zero-mean term, which only adds variance.
        bias: ``None`` for an unbiased estimator; otherwise what makes it biased (the
            relaxations), shown by ``compare`` and ``diagnose``.
        partner: for antithetic estimators, ``(key, distribution, sample_shape,
            is_partner) -> values`` (:class:`PairSampleFn`): with ``is_partner`` true the
            draw paired with ``sample``'s from the same key, else ``sample``'s. Rows then come
            in pairs, row ``i + N/2`` the partner of row ``i`` (``N`` must be even): both
            are ordinary draws of the distribution, so each row's cost is a plain Monte
            Carlo sample (and a model's other parameters learn from both), and ``terms``
            reads the pair from ``site.value`` and ``site.cost``.
        auto: set by :func:`mcgrad.auto` only: its settings before the estimator meets a
            site, the site's candidates and current choice after
            (:mod:`mcgrad.estimators.choice`). ``None`` for every other estimator.
    """

    init: Callable[[Params], EstimatorState]
    sample: SampleFn
    terms: TermsFn
    check: Callable[[Distribution, str], None] = check_nothing
    name: str = "custom"
    reparameterized: bool = False
    bias: str | None = None
    partner: PairSampleFn | None = None
    auto: Any = None


class EmptyState(NamedTuple):
    """The state of an estimator (or baseline) that keeps none."""


def init_empty_state(params: Params) -> EmptyState:
    del params
    return EmptyState()


def draw_without_gradient(key: Array, distribution: Distribution, sample_shape: tuple[int, ...] = ()) -> Array:
    """``stop_gradient(distribution.sample(...))``: a draw that carries no gradient path."""
    return jax.lax.stop_gradient(distribution.sample(key, sample_shape))


# --------------------------------------------------------------------------- helpers


def gradient_only(x: Array) -> Array:
    """``x - stop_gradient(x)``: zero in value, the gradient of ``x`` in derivative."""
    return x - jax.lax.stop_gradient(x)


def row_sum(x: Array, num_rows: int) -> Array:
    """Sum every axis but the leading one: ``[N, ...] -> [N]``."""
    return jnp.reshape(x, (num_rows, -1)).sum(axis=1)


def linear_terms(parameters: Any, per_row_gradients: Any, num_rows: int) -> Array:
    """``[N]`` terms, zero in value, whose gradient in ``parameters`` is the row's given one.

    ``t_i = Σ_leaves ⟨θ − sg(θ), sg(G_i)⟩`` for per-row gradients ``G`` (every leaf with a
    leading ``N``). A leaf of ``parameters`` either has that leading ``N`` itself (one set
    of parameters per row) or is shared by the rows.
    """

    def leaf_term(theta, grads):
        delta = gradient_only(jnp.asarray(theta))
        if delta.ndim < grads.ndim:
            delta = jnp.expand_dims(delta, 0)
        return row_sum(delta * jax.lax.stop_gradient(grads), num_rows)

    terms = jax.tree.leaves(jax.tree.map(leaf_term, parameters, per_row_gradients))
    return sum(terms, jnp.zeros((num_rows,)))


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


def split_parameters(distribution: Distribution) -> tuple[tuple[Array, ...], tuple, Callable[..., Distribution]]:
    """A distribution's floating-point leaves (its parameters), its other leaves (integer
    counts and the like), and ``rebuild(parameters, others) -> distribution``."""
    leaves, treedef = jax.tree.flatten(distribution)
    floating = tuple(jnp.issubdtype(jnp.result_type(leaf), jnp.inexact) for leaf in leaves)

    def rebuild(parameters: Sequence[Array], others: Sequence[Any]) -> Distribution:
        parameters, others = iter(parameters), iter(others)
        return jax.tree.unflatten(treedef, [next(parameters) if f else next(others) for f in floating])

    parameters = tuple(leaf for leaf, f in zip(leaves, floating) if f)
    others = tuple(leaf for leaf, f in zip(leaves, floating) if not f)
    return parameters, others, rebuild


def shared_jacobian(fn: Callable[[Any], Array], parameters: Any, num_rows: int) -> Any:
    """Per-row gradients of ``fn(parameters) -> [N]`` for parameters shared by the rows:
    forward mode when there are fewer coordinates than rows, reverse mode otherwise."""
    num_coordinates = sum(int(jnp.size(leaf)) for leaf in jax.tree.leaves(parameters))
    return (jax.jacfwd if num_coordinates < num_rows else jax.jacrev)(fn)(parameters)


# --------------------------------------------------------------------------- the driver


def paired_rows(num_rows: int, site: str, name: str) -> int:
    """Half of ``num_rows``, the number of antithetic pairs.

    Raises:
        ValueError: for an odd number of rows.
    """
    if num_rows % 2:
        raise ValueError(
            f"{name} draws antithetic pairs, so site '{site}' needs an even number of rows "
            f"(num_samples in mg.grad, num_particles in a model), got {num_rows}: 2 is one pair."
        )
    return num_rows // 2


def problem_site(
    problem: Problem, params: Params, key: Array, sample: SampleFn = None, partner: PairSampleFn | None = None
) -> tuple[Site, Array]:
    """The :class:`Site` of ``problem``'s ``N`` draws at ``params`` (drawn with ``sample``,
    default without gradient), and their costs ``[N]`` (with whatever gradient the draw
    carries). The rows share one distribution; ``parameters`` are the user's ``params``.
    With ``partner``, rows ``i`` and ``i + N/2`` are an antithetic pair from one key.

    Example:
        >>> import jax, jax.numpy as jnp, mcgrad as mg, numpyro.distributions as dist
        >>> problem = mg.Problem(lambda x: x ** 2, lambda p: dist.Normal(p, 1.0), num_samples=3)
        >>> site, costs = mg.problem_site(problem, 0.5, jax.random.key(0))
        >>> site.value.shape, site.map(lambda d: d.mean, site.parameters).tolist()
        ((3,), [0.5, 0.5, 0.5])
    """
    num_samples = problem.num_samples
    sample = sample if sample is not None else draw_without_gradient

    def draw(first: SampleFn, second: SampleFn, distribution) -> Array:
        if partner is None:
            return first(key, distribution, (num_samples,))
        half = paired_rows(num_samples, problem.site, "the estimator")
        return jnp.concatenate([first(key, distribution, (half,)), second(key, distribution, (half,))])

    value = draw(sample, lambda *draw_args: partner(*draw_args, True), problem.dist_fn(params))
    costs = evaluate_costs(problem.cost_fn, value, problem.site)

    def map_rows(fn, parameters, *row_args):
        shared = problem.dist_fn(parameters)
        if row_args:
            return jax.vmap(lambda *args: fn(shared, *args))(*row_args)
        return jax.vmap(lambda _: fn(shared), axis_size=num_samples)(jnp.zeros(num_samples))

    site = Site(
        name=problem.site,
        value=jax.lax.stop_gradient(value),
        cost=jax.lax.stop_gradient(costs),
        parameters=params,
        map=map_rows,
        jacobian=lambda fn, parameters: shared_jacobian(fn, parameters, num_samples),
        recost=lambda values: evaluate_costs(problem.cost_fn, values, problem.site),
        resample=lambda sample_fn, parameters: draw(sample_fn, sample_fn, problem.dist_fn(parameters)),
        free_parameters=True,
    )
    return site, costs


def surrogate(
    estimator: GradientEstimator, key: Array, params: Params, state: EstimatorState, problem: Problem
) -> tuple[Array, tuple[EstimatorState, EstimatorInfo]]:
    """The per-sample surrogate ``s [N]`` of ``problem`` under ``estimator``.

    Draws ``N`` samples with ``estimator.sample`` from ``dist_fn(params)``, costs them, and
    adds the estimator's terms for the :class:`Site` of those draws: ``mean(s)`` is the
    Monte Carlo estimate of the objective in value and the estimate in gradient.
    """
    key_sample, key_terms = jax.random.split(key)
    estimator.check(problem.dist_fn(params), problem.site)
    if estimator.partner is not None:
        paired_rows(problem.num_samples, problem.site, f"{estimator.name}()")
    site, costs = problem_site(problem, params, key_sample, estimator.sample, estimator.partner)
    terms, new_state, info = estimator.terms(key_terms, state, site)
    return costs + terms, (new_state, EstimatorInfo(site.cost, problem.num_samples + info.num_evaluations))


def surrogate_jacobian(
    estimator: GradientEstimator, key: Array, params: Params, state: EstimatorState, problem: Problem
) -> tuple[Params, tuple[Array, EstimatorState, EstimatorInfo]]:
    """Per-sample gradients ``∇θ s_i`` (leading axis ``N`` on every leaf) and the surrogate.

    Forward mode when there are fewer parameter coordinates than samples (the usual
    variance study: cost ``O(|θ|·N)``), reverse mode otherwise.
    """

    def per_sample(p):
        s, (new_state, info) = surrogate(estimator, key, p, state, problem)
        return s, (s, new_state, info)

    num_coordinates = sum(int(jnp.size(leaf)) for leaf in jax.tree.leaves(params))
    jacobian_fn = jax.jacfwd if num_coordinates < problem.num_samples else jax.jacrev
    return jacobian_fn(per_sample, has_aux=True)(params)


# --------------------------------------------------------------------------- drivers


def check_whole_number(name: str, value, minimum: int, why: str = "") -> None:
    """Raise a clear ``ValueError`` unless ``value`` is a whole number ``≥ minimum`` (``True``
    is not a count); ``why`` is appended to the message."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}{why}, got {value!r}.")


def describe_argument(value) -> str:
    """How an argument reads in an error message: a function by its package and name
    (``the function optax.adam``: most often a factory passed where its value was meant),
    an array by its shape and dtype, a container by its length, a scalar or string as
    itself, anything else by its type."""
    if callable(value) and hasattr(value, "__name__") and not isinstance(value, type):
        package = (getattr(value, "__module__", None) or "").split(".")[0]
        return f"the function {package + '.' if package else ''}{value.__name__}"
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"an array of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, (tuple, list, dict, set)):
        return f"a {type(value).__name__} of length {len(value)}"
    if isinstance(value, (bool, int, float, complex, str)) or value is None:
        text = repr(value)
        return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"
    return f"a {type(value).__name__}"


def check_instance(value, expected: type, where: str, example: str, kind: str | None = None):
    """``value`` if it is an ``expected`` (called ``kind`` in the message, default its class
    name), else a clear ``TypeError`` naming ``where`` it was passed, an ``example`` of the
    right value, and what came instead (most often the factory for its value:
    ``mg.pathwise`` for ``mg.pathwise()``, which gets "call it")."""
    if not isinstance(value, expected):
        hint = " (call it)" if callable(value) and not isinstance(value, type) else ""
        raise TypeError(f"{where} must be a {kind or expected.__name__} such as {example}, got "
                        f"{describe_argument(value)}{hint}.")
    return value


def check_estimator(estimator, where: str = "estimator") -> GradientEstimator:
    """``estimator`` if it is a :class:`GradientEstimator`, else a clear ``TypeError``."""
    return check_instance(estimator, GradientEstimator, where, "mg.score_function() or mg.pathwise()")


def typed_key(key) -> Array:
    """``key`` as a typed key array: a ``jax.random.key`` as it is, a raw
    ``jax.random.PRNGKey`` (``uint32[..., 2]``, NumPyro's idiom) wrapped; a batch of either.
    Anything else is a clear ``TypeError``. Works on traced keys too."""
    if isinstance(key, (jax.Array, np.ndarray)):
        if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
            return key
        if key.dtype == np.uint32 and key.ndim >= 1 and key.shape[-1] == 2:
            return jax.random.wrap_key_data(key)
    raise TypeError(f"key must be a JAX random key: jax.random.key(0) (or jax.random.PRNGKey(0)), or a batch of "
                    f"them (jax.random.split(jax.random.key(0), n)); got {describe_argument(key)}.")


def _checked_dist_fn(dist_fn: DistFn, site: str) -> DistFn:
    """``dist_fn`` with a clear ``TypeError`` where it returns something other than a NumPyro
    distribution (checked when traced: no cost in the compiled program)."""

    def checked(params):
        distribution = dist_fn(params)
        if not isinstance(distribution, Distribution):
            raise TypeError(f"dist_fn must return a NumPyro distribution, e.g. dist.Normal(params['loc'], 1.0), for "
                            f"site '{site}'; got {describe_argument(distribution)}.")
        return distribution

    return checked


def _problem(cost_fn: CostFn, dist_fn: DistFn, num_samples: int) -> Problem:
    """The :class:`Problem`, with clear errors for a sample count that is not a whole number
    ``≥ 1`` and a ``dist_fn`` that returns no distribution."""
    check_whole_number("num_samples", num_samples, 1)
    problem = Problem(cost_fn, dist_fn, int(num_samples))
    return problem._replace(dist_fn=_checked_dist_fn(dist_fn, problem.site))


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
    check_estimator(estimator)
    return _estimate_fn(estimator, _problem(cost_fn, dist_fn, num_samples), "value" if check_finite else None)


def _estimate_fn(estimator: GradientEstimator, problem: Problem, check: str | None):
    """``estimate`` with ``check`` = ``"value"`` (value and gradient), ``"gradient"`` or ``None``."""

    def estimate_fn(params: Params, state: EstimatorState, key: Array) -> Estimate:
        key = typed_key(key)

        def mean_surrogate(p):
            s, (new_state, info) = surrogate(estimator, key, p, state, problem)
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
    check_estimator(estimator)
    if estimator.auto is not None:
        return _chosen_at_first_call(
            estimator, cost_fn, dist_fn, num_samples,
            lambda chosen: value_and_grad(cost_fn, dist_fn, estimator=chosen, num_samples=num_samples, check_finite=check_finite),
        )
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
    check_estimator(estimator)
    if estimator.auto is not None:
        return _chosen_at_first_call(
            estimator, cost_fn, dist_fn, num_samples,
            lambda chosen: grad(cost_fn, dist_fn, estimator=chosen, num_samples=num_samples, check_finite=check_finite),
        )
    inner = _estimate_fn(estimator, _problem(cost_fn, dist_fn, num_samples), "gradient" if check_finite else None)
    return lambda params, key: inner(params, estimator.init(params), key).grad


def _chosen_at_first_call(estimator: GradientEstimator, cost_fn: CostFn, dist_fn: DistFn, num_samples: int, build):
    """``mg.auto()`` in ``grad``/``value_and_grad``: at the first call, :func:`mcgrad.select`
    ranks the candidates at that call's params (keys folded from its key); every call then
    runs ``build(winner)``. Choosing times compiled candidates, so the first call needs
    concrete params and key (not under ``jit``)."""
    _problem(cost_fn, dist_fn, num_samples)
    built: list[Callable] = []

    def fn(params: Params, key: Array):
        if not built:
            if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((params, key))):
                raise ValueError(
                    "mg.auto() in mg.grad chooses at its first call by timing the compiled candidates, which "
                    "needs concrete params and key: make the first call outside jax.jit, or choose with "
                    "mg.select(...) and pass its estimator."
                )
            from mcgrad.diagnostics import select

            settings = estimator.auto
            choice = select(
                cost_fn, dist_fn, params, key=jax.random.fold_in(key, 1), candidates=settings.candidates and dict(settings.candidates),
                num_samples=num_samples, num_repeats=settings.num_estimates,
            )
            built.append(build(choice.estimator))
        return built[0](params, key)

    return fn


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
    check_estimator(estimator)
    problem = _problem(cost_fn, dist_fn, num_samples)

    def fn(params: Params, key: Array) -> Params:
        jacobian, _ = surrogate_jacobian(estimator, typed_key(key), params, estimator.init(params), problem)
        return jacobian

    return fn

"""``mg.fit`` and the pure training step under it.

Three layers, as in blackjax: :func:`trainer` binds a model, guide, objective and
optimizer once and returns a :class:`Trainer` of pure functions (``init``, ``step``,
``run``, ``params``) for users who write their own loop; :func:`fit` is the convenience on
top (compiled chunks, a progress bar, checkpoints, the non-finite guard's error, ArviZ
output).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mcgrad import checkpoints, parallel, selection
from mcgrad.diagnostics import running_moments
from mcgrad.estimators.base import check_whole_number, describe_argument, typed_key
from mcgrad.inference.params import constrain, find_params
from mcgrad.objectives.base import Objective
from mcgrad.programs import ProgramCache, compiler_options, fingerprint

Array = jax.Array


class FitState(NamedTuple):
    """Everything needed to resume bit for bit.

    Attributes:
        params: unconstrained ``numpyro.param`` values.
        optimizer_state: the optax state.
        objective_state: baseline states, a critic, … (the objective's own).
        key: the raw key data (``uint32``) the next step splits.
        step: steps taken.
        num_nonfinite: steps skipped because the loss or the update was not finite.
    """

    params: dict
    optimizer_state: Any
    objective_state: Any
    key: Array
    step: Array
    num_nonfinite: Array


class StepInfo(NamedTuple):
    """What one step reports: the Monte Carlo loss, whether it was finite, and (every
    ``diagnostics_every`` steps, NaN otherwise) per-parameter gradient variance and SNR."""

    loss: Array
    finite: Array
    gradient_variance: dict
    gradient_snr: dict


class TrainingDiagnostics(NamedTuple):
    """Gradient variance and SNR per parameter, recorded during training.

    At a recorded step the step's own gradient estimate ``ĝ_0`` and ``R`` more, from
    independent keys at the same parameters and state, give for each coordinate ``d`` the
    unbiased variance ``V_d`` of the gradient the step used (whatever the objective or
    estimator: particles coupled by IWAE, VIMCO or leave-one-out baselines included).
    ``variance[name][j]`` is the mean of ``V_d`` over the parameter's coordinates at step
    ``steps[j]``; ``snr[name][j]`` is ``‖ḡ‖ / sqrt(Σ_d V_d)`` over them (``ḡ`` the mean
    of the ``R + 1`` estimates).

    With ``mg.auto()`` sites, ``choices`` is the table of every decision
    (:func:`mcgrad.selection.decision_table`: per step, site and candidate the measured
    variance, seconds, efficiency and which was chosen); ``None`` otherwise.
    """

    steps: np.ndarray
    variance: dict
    snr: dict
    num_nonfinite: int
    choices: Any = None


class NonFiniteError(RuntimeError):
    """Too many non-finite steps; ``.state`` is the last finite state, ``.losses`` the losses so far."""

    def __init__(self, message: str, state: FitState, losses: np.ndarray):
        super().__init__(message)
        self.state = state
        self.losses = losses


class FitResult(NamedTuple):
    """The outcome of :func:`fit` (like NumPyro's ``SVIRunResult``, plus more).

    Attributes:
        params: constrained parameter values keyed by ``numpyro.param`` name.
        losses: ``[num_steps]`` Monte Carlo losses (NaN on skipped steps).
        state: the final :class:`FitState` (resume from it bit for bit).
        diagnostics: :class:`TrainingDiagnostics`.
        model, guide, args, kwargs: what was fitted, for :meth:`to_inference_data`.
    """

    params: dict
    losses: np.ndarray
    state: FitState
    diagnostics: TrainingDiagnostics
    model: Callable
    guide: Callable | None
    args: tuple
    kwargs: dict

    def to_inference_data(self, num_samples: int = 1000, key: Array | None = None):
        """An ArviZ ``InferenceData``: posterior drawn from the guide, log-likelihood, traces.

        See :func:`mcgrad.posterior.to_inference_data`.
        """
        from mcgrad.posterior import to_inference_data

        return to_inference_data(self, num_samples=num_samples, key=key)


# --------------------------------------------------------------------------- the trainer


class Trainer(NamedTuple):
    """A model, guide, objective and optimizer bound once: pure functions for a training loop.

    Attributes:
        init: ``key -> FitState``, the initial state.
        step: ``(state, *args, **kwargs) -> (state, StepInfo)``: one step on the model's
            arguments of this step (a new minibatch each call, say): estimate the gradient
            with the per-site estimators, skip the update if the loss or a gradient is not
            finite, apply the optax update, and every ``diagnostics_every`` steps record
            the gradient's variance. Pure; ``jax.jit`` it (non-array arguments such as
            plate sizes: ``equinox.filter_jit`` or ``static_argnums``).
        run: ``(state, num_steps, *args, **kwargs) -> (state, StepInfo)``: ``num_steps``
            steps in one compiled loop on the same arguments (every info field gains a
            leading ``num_steps``).
        params: ``state -> constrained params`` (what ``numpyro.param`` returns).
        estimate: ``(state, key, *args, **kwargs) -> (loss, grads, objective_state)``: one
            gradient estimate at the state's parameters with ``key`` (no update):
            ``grads`` are with respect to the unconstrained parameters. For variance
            studies and tests of an objective.
        estimators: the estimator chosen for each latent site.
        objective: the objective.
        advance: ``(state, num_steps, length, args, kwargs, *, guard, first_step) -> (state,
            StepInfo)``: what ``step`` and ``run`` are: ``num_steps`` steps (may be traced,
            at most the static ``length``) in one ``while_loop`` over gradient estimates,
            a recorded step's replicates in a branch. ``first_step`` (default: the state's
            step) schedules the records; pass it unbatched under ``vmap``. Infos have a
            leading ``length`` (zeros after ``num_steps``).
    """

    init: Callable[[Array], FitState]
    step: Callable[..., tuple[FitState, StepInfo]]
    run: Callable[..., tuple[FitState, StepInfo]]
    params: Callable[[FitState], dict]
    estimate: Callable[..., tuple[Array, dict, Any]]
    estimators: dict
    objective: Objective
    advance: Callable[..., tuple[FitState, StepInfo]]


def trainer(
    model: Callable | None,
    guide: Callable | None,
    *args: Any,
    key: Array,
    objective: Objective,
    optimizer: optax.GradientTransformation,
    estimators: dict | str | None = None,
    diagnostics_every: int = 0,
    diagnostics_replicates: int = 2,
    max_nonfinite: int | None = None,
    shard: bool = True,
    **kwargs: Any,
) -> Trainer:
    r"""Bind a NumPyro model (and guide) to an objective and an optimizer: ``init``/``step``/``run``.

    The model and guide are traced once here, on example arguments (their shapes and
    structure: plates, sites, parameters); the step then takes the arguments of each
    step, so a loop can feed a new minibatch every call. Every estimator works per site
    through the same protocol (see :class:`~mcgrad.GradientEstimator`).

    Gradient diagnostics are honest for every objective: at a recorded step the step's
    own estimate and ``diagnostics_replicates`` more, from independent keys at the same
    parameters and state, give the variance of the gradient the step used. Cost: that
    many extra gradient estimates every ``diagnostics_every`` steps, in a branch of the
    compiled step taken only then (:attr:`Trainer.advance`); memory ``O(|θ|)`` beside the
    step's own.

    Args:
        model: the NumPyro model (the generator for :func:`mcgrad.adversarial`; ``None``
            for :func:`mcgrad.expectation`).
        guide: the NumPyro guide (``None`` without one).
        *args: example arguments of the model and guide.
        key: a ``jax.random.key`` for tracing and the initial parameters.
        objective: e.g. :func:`mcgrad.elbo`.
        optimizer: an optax optimizer.
        estimators: per-site overrides, e.g. ``{"z": mg.measure_valued()}``, or ``"auto"``.
            An ``mg.auto()`` site runs its first applicable candidate here (the measuring
            and switching is :func:`fit`'s); its state keeps every candidate's.
        diagnostics_every: record gradient variance every this many steps (0: never).
        diagnostics_replicates: extra gradient estimates per record (``≥ 1``).
        max_nonfinite: after this many skipped (non-finite) steps every further step
            leaves the state alone (``None``: never), so a compiled run stops where it
            went wrong.
        shard: lay particles out over ``jax.devices()`` when there are several.
        **kwargs: example keyword arguments of the model and guide.

    Returns:
        A :class:`Trainer`.

    Example:
        >>> import jax, jax.numpy as jnp, mcgrad as mg, numpyro, numpyro.distributions as dist, optax
        >>> def model(x):
        ...     z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        ...     with numpyro.plate("data", x.shape[0]):
        ...         numpyro.sample("x", dist.Normal(z, 1.0), obs=x)
        >>> def guide(x):
        ...     numpyro.sample("z", dist.Normal(numpyro.param("loc", 0.0), 0.5))
        >>> data = jnp.linspace(0.0, 2.0, 8)
        >>> training = mg.trainer(model, guide, data[:4], key=jax.random.key(0),
        ...                       objective=mg.elbo(8), optimizer=optax.adam(0.05))
        >>> step = jax.jit(training.step)
        >>> state = training.init(jax.random.key(1))
        >>> for i in range(200):                      # a new minibatch every step
        ...     state, info = step(state, data[4 * (i % 2): 4 * (i % 2) + 4])
        >>> round(float(training.params(state)["loc"]), 1)   # between the two batches' 4x̄/5 (0.34, 1.26)
        0.8
    """
    check_whole_number("diagnostics_every", diagnostics_every, 0)
    check_whole_number("diagnostics_replicates", diagnostics_replicates, 1)
    check_setup(objective, optimizer)
    bound = objective.setup(model, guide, args, kwargs, estimators, key)
    param_constraints = bound.params.constraints
    mesh = parallel.device_mesh()
    particle_shard = parallel.particle_sharding(objective.num_particles, mesh) if shard and mesh.size > 1 else None

    def params_of(state: FitState) -> dict:
        return constrain(state.params, param_constraints)

    traced = [(fn, args, kwargs) for fn in (guide, model) if fn is not None]

    def initial_params(params_key: Array) -> dict:
        """The unconstrained initial parameters a seeded run of guide and model gives."""
        if not traced:
            return bound.params.unconstrained
        found = find_params(traced, params_key).unconstrained
        return found if set(found) == set(bound.params.unconstrained) else bound.params.unconstrained

    def init(run_key: Array, params_key: Array | None = None) -> FitState:
        unconstrained = bound.params.unconstrained if params_key is None else initial_params(params_key)
        params = _strongly_typed(unconstrained)
        return FitState(
            params,
            optimizer.init(params),
            _strongly_typed(bound.init_state),
            jax.random.key_data(run_key),
            jnp.zeros((), jnp.int32),
            jnp.zeros((), jnp.int32),
        )

    def gradient(params, objective_state, step_key, args, kwargs):
        def mean_surrogate(p):
            s, (new_state, _) = bound.surrogate(
                constrain(p, param_constraints), objective_state, step_key, args, kwargs, particle_shard
            )
            return jnp.mean(s), new_state

        (loss, new_state), grads = jax.value_and_grad(mean_surrogate, has_aux=True)(params)
        return loss, grads, new_state

    def nan_statistics(params):
        nan = jnp.full((), jnp.nan)
        return {name: nan for name in params}, {name: nan for name in params}

    def take_step(state: FitState, key: Array, loss, grads, objective_state, variance, snr, guard: bool):
        """The update from the step's estimate. With ``guard`` a step whose loss or new state
        (parameters, optimizer state) is not finite is skipped, the state kept, and once
        halted nothing changes; without it every step is taken (see ``advance``)."""
        updates, new_optimizer_state = optimizer.update(grads, state.optimizer_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        if not guard:
            finite = jnp.isfinite(loss)
            new_state = FitState(new_params, new_optimizer_state, objective_state, jax.random.key_data(key),
                                 state.step + 1, state.num_nonfinite)
            return new_state, StepInfo(jnp.where(finite, loss, jnp.nan), finite, variance, snr)
        # Halted (more than max_nonfinite skipped steps): the state stays where it went wrong.
        halted = state.num_nonfinite > max_nonfinite if max_nonfinite is not None else jnp.array(False)
        # The state is what the guard keeps finite: a non-finite gradient reaches it through
        # every optax update (an optimizer that sanitises gradients, optax.zero_nans, keeps
        # it finite and the step is taken).
        finite = _all_finite(loss, new_params, new_optimizer_state) & ~halted

        # Selects, not branches: the update is computed every step and kept only where it is
        # finite. A branch runs the update as a computation of its own and copies the state
        # around it: 10-15% of the discrete VAE's step.
        def kept(new, old):
            return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

        new_state = FitState(
            kept(new_params, state.params),
            kept(new_optimizer_state, state.optimizer_state),
            kept(objective_state, state.objective_state),
            jnp.where(halted, state.key, jax.random.key_data(key)),
            jnp.where(halted, state.step, state.step + 1),
            jnp.where(halted, state.num_nonfinite, state.num_nonfinite + (~finite).astype(jnp.int32)),
        )
        return new_state, StepInfo(jnp.where(finite, loss, jnp.nan), finite, variance, snr)

    def advance(state: FitState, num_steps: Array | int, length: int, args: tuple, kwargs: dict, *,
                guard: bool = True, first_step: Array | int | None = None):
        """``num_steps`` (``≤ length``, may be traced) steps in one ``while_loop``: the
        step's gradient estimate and the update. On a recorded step a branch takes ``R + 1``
        estimates at the step's parameters and state (the step's own key first, so the first
        is the step's own estimate ``ĝ_0``; then ``R = diagnostics_replicates`` keys of their
        own) and their statistics by Welford's update. The branch recomputes ``ĝ_0`` (one
        estimate per record) rather than take the step's gradient: as an operand of the
        branch that gradient was materialised every step, not fused into the update (6% of
        the discrete VAE's step; now 1-2%). Whether a step is recorded depends on
        ``first_step`` (the step count at the start, unbatched: the restarts of a batched fit
        step in lockstep; default ``state.step``) and the loop index: a predicate on the
        batched ``state.step`` became, under ``vmap``, a select that ran the replicates at
        every step (3.3x the step of four batched restarts).

        ``guard=False`` takes every step without the check (``info.finite`` is then the
        loss's), and the update overwrites the state with no select: the check and the
        selects around it copy the state every step, a fifth of the discrete VAE's step.
        NaN and ±inf stay in a state once there (every optax update adds to the parameters
        and decays its moments), so where all losses and the end state are finite no step
        would have been skipped, and the guarded run is the same up to rounding.
        :func:`fit` runs so and replays a chunk that fails the check with its failing
        steps skipped (``_replayed``).
        Returns the state and the ``[length]`` infos (zeros after ``num_steps``)."""
        loss_dtype = jnp.result_type(*jax.tree.leaves(state.params)) if state.params else jnp.float32
        variance, snr = nan_statistics(state.params)
        info = StepInfo(jnp.zeros((), loss_dtype), jnp.array(False), variance, snr)
        infos = jax.tree.map(lambda leaf: jnp.zeros((length, *leaf.shape), leaf.dtype), info)
        zeros = jax.tree.map(jnp.zeros_like, state.params)
        first_step = state.step if first_step is None else first_step

        def recorded_statistics(state: FitState, step_key: Array):
            def add(replicate, moments):  # replicate 0: the step's own estimate; then keys of their own
                other = jax.random.fold_in(jax.random.fold_in(step_key, 1), replicate - 1)
                key = jax.random.wrap_key_data(
                    jnp.where(replicate == 0, jax.random.key_data(step_key), jax.random.key_data(other))
                )
                _, more, _ = gradient(state.params, state.objective_state, key, args, kwargs)
                return running_moments(replicate + 1, *moments, more)

            moments = jax.lax.fori_loop(0, diagnostics_replicates + 1, add, (zeros, zeros))
            return _replicate_statistics(*moments, diagnostics_replicates + 1)

        def one_step(carry):
            index, state, infos = carry
            key, step_key = jax.random.split(jax.random.wrap_key_data(state.key))
            loss, grads, objective_state = gradient(state.params, state.objective_state, step_key, args, kwargs)
            if diagnostics_every:
                recorded = (first_step + index) % diagnostics_every == 0
                statistics = jax.lax.cond(recorded, lambda: recorded_statistics(state, step_key),
                                          lambda: (variance, snr))
            else:
                statistics = (variance, snr)
            state, info = take_step(state, key, loss.astype(loss_dtype), grads, objective_state, *statistics, guard)
            infos = jax.tree.map(lambda buffer, value: buffer.at[index].set(value), infos, info)
            return index + 1, state, infos

        carry = (jnp.zeros((), jnp.int32), state, infos)
        _, state, infos = jax.lax.while_loop(lambda c: c[0] < num_steps, one_step, carry)
        return state, infos

    def step(state: FitState, *args, **kwargs) -> tuple[FitState, StepInfo]:
        state, infos = advance(state, 1, 1, args, kwargs)
        return state, jax.tree.map(lambda leaf: leaf[0], infos)

    def run(state: FitState, num_steps: int, *args, **kwargs) -> tuple[FitState, StepInfo]:
        return advance(state, num_steps, num_steps, args, kwargs)

    def estimate(state: FitState, step_key: Array, *args, **kwargs):
        return gradient(state.params, state.objective_state, step_key, args, kwargs)

    return Trainer(init, step, run, params_of, estimate, bound.estimators, objective, advance)


def _all_finite(*trees) -> Array:
    finite = jnp.array(True)
    for leaf in jax.tree.leaves(trees):
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            finite = finite & jnp.all(jnp.isfinite(leaf))
    return finite


def _replicate_statistics(mean: dict, squares: dict, num: int) -> tuple[dict, dict]:
    """Per parameter, from ``num`` independent estimates (their mean and summed squared
    deviations): the mean coordinate variance (``ddof=1``) and ``‖mean‖ / sqrt(Σ variance)``."""
    variance, snr = {}, {}
    for name in mean:
        means = jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree.leaves(mean[name])])
        coordinate_variance = jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree.leaves(squares[name])]) / (num - 1)
        variance[name] = jnp.mean(coordinate_variance)
        snr[name] = jnp.sqrt(jnp.sum(means**2) / (jnp.sum(coordinate_variance) + 1e-30))
    return variance, snr


# --------------------------------------------------------------------------- drivers


def _chunk_runner(advance: Callable, static_inputs: Any, batched: bool) -> Callable:
    """A jitted ``(state, array_inputs, num_steps, first_step, length) -> (state, infos,
    clean)``: ``num_steps`` (traced) unguarded steps of at most ``length`` from step
    ``first_step`` (traced, unbatched), so a run's shorter last chunk reuses the program.
    ``clean`` (per restart when ``batched``) says the guard would have skipped none of
    them: every loss and the end state are finite."""

    @functools.partial(jax.jit, static_argnames=("length",), compiler_options=compiler_options())
    def run_chunk(state, array_inputs, num_steps, first_step, *, length):
        args, kwargs = eqx.combine(array_inputs, static_inputs)

        def chunk(state):
            state, infos = advance(state, num_steps, length, args, kwargs, guard=False, first_step=first_step)
            ran = jnp.arange(length) < num_steps
            return state, infos, jnp.all(infos.finite | ~ran) & _all_finite(state.params, state.optimizer_state)

        return jax.vmap(chunk)(state) if batched else chunk(state)

    return run_chunk


def _replayed(run: Callable, state: FitState, num_steps: int, max_nonfinite: int) -> tuple[FitState, StepInfo]:
    """``num_steps`` steps of the unguarded ``run(state, n) -> (state, [n] infos, clean)``
    with the guard's result. Where a run is not clean, its steps are run again up to the
    first failing one, which is skipped (the state kept, the key and step moved on, the
    loss NaN, counted), and the rest run again; a restart that has failed more than
    ``max_nonfinite`` times stays where it is. The same program throughout, so the result
    is the one a single run gives, bit for bit, wherever the run is cut into chunks.

    The failing step is found by bisection from the first non-finite loss (a state can
    turn non-finite under a finite loss). After a failure a run is twice as long as the
    stretch before it, so a run with many bad steps costs a few times its clean cost."""

    def steps(state, n):
        end, infos, clean = run(state, n)
        halted = np.asarray(state.num_nonfinite) > max_nonfinite
        if not np.any(halted):
            return end, infos, clean
        return _where(halted, state, end), _where(halted, _stopped(infos), infos), clean | halted

    pieces, span = [], num_steps
    while num_steps > 0:
        end, infos, clean = steps(state, min(span, num_steps))
        if np.all(clean):
            pieces.append(infos)
            state, num_steps, span = end, num_steps - min(span, num_steps), 2 * span
            continue
        failed = ~np.asarray(infos.finite) & ~clean[..., None]
        first = int(np.min(np.argmax(failed, axis=-1)[np.any(failed, axis=-1)], initial=failed.shape[-1] - 1))
        probes = {}

        def prefix(n):
            if n not in probes:
                probes[n] = steps(state, n)
            return probes[n]

        # Invariant: after lo steps every restart is clean, after hi some restart is not.
        lo, hi, guess = 0, first + 1, first
        while hi - lo > 1:
            mid = guess if lo < guess < hi else (lo + hi) // 2
            guess = None
            lo, hi = (mid, hi) if np.all(prefix(mid)[2]) else (lo, mid)
        failing = ~prefix(hi)[2] if np.ndim(state.step) else np.array(True)
        if lo:
            state, infos, _ = prefix(lo)
            pieces.append(infos)
        taken, infos, _ = steps(state, 1)
        skipped = state._replace(key=taken.key, step=taken.step, num_nonfinite=state.num_nonfinite + 1)
        state = _where(failing, skipped, taken)
        pieces.append(_where(failing, infos._replace(loss=np.full_like(infos.loss, np.nan),
                                                     finite=np.zeros_like(infos.finite)), infos))
        num_steps, span = num_steps - hi, 2 * hi
    return state, jax.tree.map(lambda *leaves: np.concatenate(leaves, axis=-1), *pieces)


def _where(mask: np.ndarray, a: Any, b: Any) -> Any:
    """Per restart (the leading axis of each leaf where ``mask`` has one): ``a`` where ``mask``
    (arrays stay JAX arrays of their type, so the next chunk reuses its program)."""

    def pick(x, y):
        if np.ndim(mask) == 0:
            return x if mask else y
        return jnp.where(np.reshape(mask, np.shape(mask) + (1,) * (np.ndim(x) - 1)), x, y).astype(y.dtype)

    return jax.tree.map(pick, a, b)


def _stopped(infos: StepInfo) -> StepInfo:
    """The infos of steps a halted run did not take: NaN, not finite."""
    return jax.tree.map(lambda x: np.zeros_like(x) if x.dtype == bool else np.full_like(x, np.nan), infos)


def default_chunk_size(num_steps: int) -> int:
    """About 1/20 of the run, preferring a size that divides it (equal chunks)."""
    target = max(1, math.ceil(num_steps / 20))
    for size in range(target, min(num_steps, 2 * target) + 1):
        if num_steps % size == 0:
            return size
    return target


_PROGRAMS = ProgramCache(max_entries=16)


# --------------------------------------------------------------------------- checkpoints


class _Checkpoint(NamedTuple):
    """What a checkpoint holds, the state first (so a mismatch names its leaf first)."""

    state: FitState
    losses: np.ndarray
    steps: np.ndarray
    variance: dict
    snr: dict


def save_checkpoint(
    path: str | Path,
    state: FitState,
    losses: np.ndarray,
    diagnostics: TrainingDiagnostics,
    objective: Objective | None = None,
    key: Array | None = None,
) -> None:
    """Write the whole state (params, optimizer, objective state, key, step) and history.

    The file is :mod:`mcgrad.checkpoints`' format: arrays and a structure description,
    never code, so loading it never executes anything. With ``objective`` (its name and
    particle count) and ``key`` (the run's key), they are recorded and checked on resume.
    """
    tree = _Checkpoint(
        state,
        np.asarray(losses),
        np.asarray(diagnostics.steps),
        {n: np.asarray(v) for n, v in diagnostics.variance.items()},
        {n: np.asarray(v) for n, v in diagnostics.snr.items()},
    )
    metadata = {
        "num_losses": len(losses),
        "num_records": len(diagnostics.steps),
        "num_nonfinite": int(diagnostics.num_nonfinite),
    }
    if objective is not None:
        metadata["objective"] = {"name": objective.name, "num_particles": int(objective.num_particles)}
    if key is not None:
        metadata["key"] = np.asarray(jax.random.key_data(key)).tolist()
    checkpoints.save(path, tree, metadata)


def load_checkpoint(
    path: str | Path, like: FitState, objective: Objective | None = None, key: Array | None = None
) -> tuple[FitState, np.ndarray, TrainingDiagnostics]:
    """Read a checkpoint written by :func:`save_checkpoint` (or ``fit(checkpoint_path=...)``).

    ``like`` is a state of the same run's structure (``Trainer.init(key)``): a file whose
    state has another structure (another model or guide, another optimizer's state, other
    estimator states) is refused with :class:`mcgrad.checkpoints.CheckpointMismatchError`
    naming the first leaf that differs; with ``objective``, so is a file written under
    another objective or particle count, and with ``key`` a file a run with another key
    wrote. An optimizer's settings (its learning rate, say) leave no trace in its state and
    are not checked.
    """
    _, metadata = checkpoints.load(path)
    if key is not None and "key" in metadata and metadata["key"] != np.asarray(jax.random.key_data(key)).tolist():
        raise checkpoints.CheckpointMismatchError(
            f"checkpoint {path} was written by a run with another key: resuming it with this key would "
            "not continue that run. Pass the key the run started with, or start afresh."
        )
    recorded = metadata.get("objective")
    if objective is not None and recorded is not None:
        expected = {"name": objective.name, "num_particles": int(objective.num_particles)}
        if recorded != expected:
            raise checkpoints.CheckpointMismatchError(
                f"checkpoint {path} was written by objective {recorded['name']} with "
                f"{recorded['num_particles']} particles, but this run uses {expected['name']} with "
                f"{expected['num_particles']}. Resume with the objective that wrote it, or start afresh."
            )
    num_losses, num_records = metadata["num_losses"], metadata["num_records"]
    names = list(like.params)
    template = _Checkpoint(
        like,
        np.zeros(num_losses, np.float32),
        np.zeros(num_records, np.int64),
        {n: np.zeros(num_records, np.float32) for n in names},
        {n: np.zeros(num_records, np.float32) for n in names},
    )
    tree, _ = checkpoints.load(path, like=template)
    diagnostics = TrainingDiagnostics(
        np.asarray(tree.steps),
        {n: np.asarray(v) for n, v in tree.variance.items()},
        {n: np.asarray(v) for n, v in tree.snr.items()},
        metadata["num_nonfinite"],
    )
    return tree.state, np.asarray(tree.losses), diagnostics


# --------------------------------------------------------------------------- fit


def check_resumable(state: FitState, like: Any) -> None:
    """Raise a clear error where ``state`` (a ``fit(resume_from=...)``) does not have the
    structure of this fit's initial state ``like`` (its shapes: ``jax.eval_shape``): one
    made with other estimators, another optimizer or another model keeps states this run
    cannot step: its first trace fails deep inside (``'EmptyState' object has no attribute
    'states'``, a DisARM fit's state given to an auto one), or worse, it runs (an Adam
    state given to SGD). Leaf by leaf, as a checkpoint is checked
    (:func:`mcgrad.checkpoints.first_difference`).

    Example:
        >>> import jax.numpy as jnp
        >>> old = FitState({"loc": jnp.zeros(2)}, (), {}, jnp.zeros(2, jnp.uint32), 0, 0)
        >>> check_resumable(old, old._replace(objective_state={"z": jnp.zeros(())}))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: fit(resume_from=<FitState>): the state's objective_state ...
    """
    for field in FitState._fields:
        problem = checkpoints.first_difference(checkpoints.leaf_records(getattr(like, field)),
                                               checkpoints.leaf_records(getattr(state, field)), "this fit's", "the state")
        if problem is not None:
            raise ValueError(
                f"fit(resume_from=<FitState>): the state's {field} does not fit this fit's ({problem}). "
                "A state resumes only the fit "
                "that made it: the same model, guide, objective, optimizer and estimators (an estimator's "
                "state, such as a baseline's or mg.auto()'s, is part of it). To continue from its parameters "
                "with other settings, resume from the new settings' initial state holding them: "
                "mg.trainer(model, guide, *args, key=..., <the new settings>).init(key)._replace(params=state.params)."
            )


def _strongly_typed(tree: Any) -> Any:
    """Python scalars and weakly typed arrays (``numpyro.param("loc", 0.0)``) as strongly
    typed arrays: a step returns strong types, so weak ones in the initial state would
    change the chunk's input types and recompile it for the second chunk."""

    def strong(leaf):
        if isinstance(leaf, (bool, int, float, complex)) or getattr(leaf, "weak_type", False):
            array = jnp.asarray(leaf)
            return jnp.asarray(array, dtype=array.dtype)
        return leaf

    return jax.tree.map(strong, tree)


def check_setup(objective: Any, optimizer: Any) -> None:
    """Raise a clear ``TypeError`` for an objective or optimizer that is not one: most often
    the factory itself (``mg.elbo``, ``optax.adam``) where its value was meant, or a NumPyro
    optimizer (``numpyro.optim.Adam``) where mcgrad takes optax's."""
    if not isinstance(objective, Objective):
        what = describe_argument(objective)
        hint = f" (call it: objective={what.removeprefix('the function ')}(...))" if callable(objective) else ""
        raise TypeError(f"objective must be an mcgrad objective such as mg.elbo(4), mg.iwae(8) or "
                        f"mg.maximum_likelihood(), got {what}{hint}.")
    if not isinstance(optimizer, optax.GradientTransformation):
        kind = type(optimizer)
        if kind.__module__.startswith("numpyro.optim"):
            what = (f"a NumPyro optimizer (numpyro.optim.{kind.__name__}): mcgrad takes optax's, e.g. "
                    f"optax.{kind.__name__.lower()}(...)")
        else:
            what = describe_argument(optimizer)
            if callable(optimizer):
                what += f" (call it with its settings: optimizer={what.removeprefix('the function ')}(...))"
        raise TypeError(f"optimizer must be an optax.GradientTransformation such as optax.adam(1e-3), got {what}.")


def check_data(args: tuple, kwargs: dict, model: Callable | None = None) -> None:
    """Raise a clear error for model arguments with infinite values, or with NaN the model
    does not mask.

    ``±inf`` is never a missing-value marker (an overflow, ``log 0``), so it is refused up
    front, masked or not. NaN is how missing data is written: with ``model``, arguments
    that hold NaN are checked on one trace of it, and only observed values the model does
    not mask (``numpyro.handlers.mask``) are refused, naming the site
    (:func:`mcgrad.inference.checks.check_observations`; every variational objective and
    maximum likelihood also run that check at setup).
    """
    from mcgrad.inference import handlers
    from mcgrad.inference.checks import check_observations, count, is_floating

    named = [(f"argument {i}", a) for i, a in enumerate(args)] + [(f"keyword '{k}'", v) for k, v in kwargs.items()]
    has_nan = False
    for label, value in named:
        for path, leaf in jax.tree_util.tree_flatten_with_path(value)[0]:
            if not is_floating(leaf) and not isinstance(leaf, float):
                continue
            num_infinite = count(jnp.isinf, leaf)  # a reduction: global (multi-process) arrays too
            if num_infinite:
                raise ValueError(
                    f"model {label}{jax.tree_util.keystr(path)} (shape {jnp.shape(leaf)}) contains "
                    f"{num_infinite} infinite values. Fix or drop them before fitting "
                    "(for missing values use NaN and mask them in the model with numpyro.handlers.mask)."
                )
            has_nan = has_nan or count(jnp.isnan, leaf) > 0
    if has_nan and model is not None:
        check_observations(handlers.run(model, args, kwargs, key=jax.random.key(0)), args, kwargs)


def _diagnostics_from(
    infos: list[StepInfo], starts: list[int], previous: TrainingDiagnostics, diagnostics_every: int
) -> TrainingDiagnostics:
    """The recorded steps of the chunks' infos after ``previous`` (restarts on a leading axis)."""
    names = list(previous.variance)
    steps = np.concatenate([np.arange(start, start + np.shape(info.loss)[-1]) for start, info in zip(starts, infos)] or [np.zeros(0, np.int64)])
    recorded = steps % diagnostics_every == 0 if diagnostics_every else np.zeros(len(steps), bool)

    def gather(field):
        before = getattr(previous, field)
        chunks = [getattr(info, "gradient_" + field) for info in infos]
        masks = _split(recorded, infos)
        return {
            n: np.concatenate(
                [before[n]] + [np.asarray(chunk[n])[..., mask] for chunk, mask in zip(chunks, masks)], axis=-1
            ).astype(np.float32)
            for n in names
        }

    return TrainingDiagnostics(
        np.concatenate([previous.steps, steps[recorded]]).astype(np.int64), gather("variance"), gather("snr"), previous.num_nonfinite
    )


def _split(mask: np.ndarray, infos: list[StepInfo]) -> list[np.ndarray]:
    lengths = np.cumsum([np.shape(info.loss)[-1] for info in infos])[:-1]
    return np.split(mask, lengths)


def fit(
    model: Callable | None,
    guide: Callable | None,
    *args: Any,
    key: Array,
    num_steps: int,
    optimizer: optax.GradientTransformation,
    objective: Objective,
    estimators: dict | str | None = None,
    progress_bar: bool = True,
    chunk_size: int | None = None,
    diagnostics_every: int | None = None,
    diagnostics_replicates: int = 2,
    max_nonfinite: int = 10,
    checkpoint_path: str | Path | None = None,
    resume_from: str | Path | FitState | None = None,
    shard: bool = True,
    **kwargs: Any,
) -> FitResult:
    r"""Fit a NumPyro model (and guide) by minimising ``objective`` with ``optimizer``.

    The convenience over :func:`trainer`: its pure step runs inside ``lax.scan``. With
    ``progress_bar`` a tqdm bar advances between chunks of ``chunk_size`` steps (never a
    host round trip per step); without it the whole run is one scan. Both follow the same
    keys and give the same result.

    Args:
        model: the NumPyro model (the generator for adversarial objectives).
        guide: the NumPyro guide (``None`` for maximum likelihood and adversarial objectives).
        *args: passed to both.
        key: a ``jax.random.key`` (or a raw ``jax.random.PRNGKey``, NumPyro's idiom); a batch of
            keys (``jax.random.split(key, n)``) fits ``n`` restarts at once.
        num_steps: total steps (a resumed run continues up to this many).
        optimizer: an optax optimizer.
        objective: :func:`mcgrad.elbo`, :func:`mcgrad.iwae`, :func:`mcgrad.renyi`,
            :func:`mcgrad.maximum_likelihood`, :func:`mcgrad.adversarial`,
            :func:`mcgrad.expectation`.
        estimators: per-site overrides, e.g. ``{"z": mg.measure_valued()}``; ``"auto"`` (or
            ``mg.auto()`` for a site, also as ``infer={"estimator": mg.auto()}``): measure
            the applicable estimators' variance × seconds at step 0 and every ``every``
            steps and run the most efficient (:mod:`mcgrad.selection`); the decisions are in
            ``result.diagnostics.choices``.
        progress_bar: show a tqdm bar (with auto sites, the current choice of each).
        chunk_size: steps per compiled chunk (default: about 1/20 of the run with a progress
            bar, the whole run without). Every chunk runs one compiled program (a shorter
            last chunk too: the number of steps is its argument), and the result is the
            single-chunk run's bit for bit. Given, it is the compiled length even for a
            shorter run, so fits of different lengths (resumed runs, auto's segments)
            share one program.
        diagnostics_every: record the variance and SNR of the step's gradient every this
            many steps (default ``num_steps // 50``; 0 turns it off); see :func:`trainer`.
        diagnostics_replicates: extra gradient estimates per record.
        max_nonfinite: non-finite steps tolerated before stopping with :class:`NonFiniteError`
            (which carries the last finite state).
        checkpoint_path: write the full state there after every chunk.
        resume_from: a checkpoint path or a :class:`FitState` to continue from.
        shard: lay particles and data out over ``jax.devices()`` when there are several.
        **kwargs: passed to both.

    Returns:
        A :class:`FitResult`.

    Example:
        >>> import jax, mcgrad as mg, numpyro, numpyro.distributions as dist, optax
        >>> def model(x):
        ...     z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        ...     numpyro.sample("x", dist.Normal(z, 1.0), obs=x)
        >>> def guide(x):
        ...     numpyro.sample("z", dist.Normal(numpyro.param("loc", 0.0),
        ...                                     numpyro.param("scale", 1.0, constraint=dist.constraints.positive)))
        >>> result = mg.fit(model, guide, 1.0, key=jax.random.key(0), num_steps=100,
        ...                 optimizer=optax.adam(0.05), objective=mg.elbo(4), progress_bar=False)
        >>> sorted(result.params), result.losses.shape
        (['loc', 'scale'], (100,))
    """
    check_whole_number("num_steps", num_steps, 0)
    check_whole_number("max_nonfinite", max_nonfinite, 0)
    check_setup(objective, optimizer)
    key = typed_key(key)
    if chunk_size is not None:
        check_whole_number("chunk_size", chunk_size, 1)
    if not selection.SEGMENT.get():  # an auto segment's data were checked when its fit began
        check_data(args, kwargs, model)
    if diagnostics_every is None:
        diagnostics_every = max(1, num_steps // 50)
    check_whole_number("diagnostics_every", diagnostics_every, 0)
    batched = jnp.ndim(key) == 1
    if batched and resume_from is not None and not isinstance(resume_from, FitState):
        raise ValueError("fit(key=<a batch of keys>) resumes from a FitState of the same batch, not from a file.")
    keys = jax.vmap(jax.random.split)(key) if batched else jax.random.split(key)
    key_setup, key_run = (keys[:, 0], keys[:, 1]) if batched else (keys[0], keys[1])
    mesh = parallel.device_mesh()
    if shard and mesh.size > 1:
        args, kwargs = parallel.shard_data((args, kwargs), mesh)
    array_inputs, static_inputs = eqx.partition((args, kwargs), eqx.is_array)
    settings = dict(
        objective=objective,
        optimizer=optimizer,
        estimators=estimators,
        diagnostics_every=diagnostics_every,
        diagnostics_replicates=diagnostics_replicates,
        max_nonfinite=max_nonfinite,
        shard=shard,
    )
    shapes = jax.tree.map(lambda a: (a.shape, str(a.dtype), str(getattr(a, "sharding", ""))), array_inputs)

    def build():
        first_key = key_setup[0] if batched else key_setup
        training = trainer(model, guide, *args, key=first_key, **settings, **kwargs)
        # infos [restarts, length] when batched; the initial state's shapes per key shape, when asked
        return training, _chunk_runner(training.advance, static_inputs, batched), {}

    program_key = (fingerprint((model, guide, settings, static_inputs, batched)), fingerprint(shapes))
    training, run_chunk, initial_shapes = _PROGRAMS.get(program_key, build)
    def initial():
        return jax.vmap(training.init)(key_run, key_setup) if batched else training.init(key_run, params_key=key_setup)

    # A run resumed from a state does not build the initial one (a seeded trace of the
    # guide and model); a user's state is checked against its shapes (an abstract trace,
    # ~10 ms for a small VAE: once per program and number of restarts), auto's segments,
    # which resume its own states, not at all: they cost no tracing.
    state = resume_from if isinstance(resume_from, FitState) else initial()
    if isinstance(resume_from, FitState) and not selection.SEGMENT.get():
        if jnp.shape(key_run) not in initial_shapes:
            initial_shapes[jnp.shape(key_run)] = jax.eval_shape(initial)
        check_resumable(resume_from, initial_shapes[jnp.shape(key_run)])
    names = list(state.params)
    empty = np.zeros((len(key_run), 0) if batched else (0,), np.float32)
    history = TrainingDiagnostics(
        np.zeros(0, np.int64), {n: empty for n in names}, {n: empty for n in names}, 0
    )
    losses = empty
    if resume_from is not None and not isinstance(resume_from, FitState):
        state, losses, history = load_checkpoint(resume_from, like=state, objective=objective, key=key)

    if not selection.SEGMENT.get() and selection.auto_sites(training.estimators):
        if batched:
            raise ValueError(
                "mg.auto() chooses one estimator per site for the whole run, so it cannot serve a batch of "
                "restarts (key=<a batch of keys>): fit the restarts with fixed estimators, e.g. the ones a "
                "single auto fit chose (result.diagnostics.choices)."
            )
        run = selection.AutoRun(fit, trainer, model, guide, args, kwargs, key, key_setup, settings, estimators)
        return selection.run(run, training, state, losses, history, num_steps=num_steps, progress_bar=progress_bar,
                             checkpoint_path=checkpoint_path, chunk_size=chunk_size)
    done = int(np.max(np.asarray(state.step)))
    if done > num_steps:
        raise ValueError(
            f"fit(num_steps={num_steps}) but the state to resume from has already taken {done} steps; "
            "num_steps counts all steps, so pass at least that many."
        )
    remaining = num_steps - done
    if chunk_size is None:
        periodic = progress_bar or checkpoint_path is not None
        chunk_size = default_chunk_size(remaining) if periodic else max(remaining, 1)
    bar = None
    if progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, initial=done, desc=objective.name)
    loss_chunks, infos, starts = [losses], [], []

    def run_steps(state, num_steps):
        # Restarts step in lockstep; one halted stays behind, and its later records are moot.
        first_step = jnp.int32(np.max(np.asarray(state.step)))
        state, infos, clean = run_chunk(state, array_inputs, jnp.int32(num_steps), first_step, length=chunk_size)
        return state, jax.tree.map(lambda leaf: np.asarray(leaf)[..., :num_steps], infos), np.asarray(clean)
    try:
        while remaining > 0:
            length = min(chunk_size, remaining)
            starts.append(done)
            new_state, info = _replayed(run_steps, state, length, max_nonfinite)
            chunk_losses = np.asarray(info.loss)
            loss_chunks.append(chunk_losses)
            infos.append(info)
            state = new_state
            remaining -= length
            done += length
            num_nonfinite = int(np.max(np.asarray(state.num_nonfinite)))
            if checkpoint_path is not None:
                record = _diagnostics_from(infos, starts, history, diagnostics_every)
                save_checkpoint(
                    checkpoint_path, state, np.concatenate(loss_chunks, axis=-1), record._replace(num_nonfinite=num_nonfinite), objective,
                    key if not batched else None,
                )
            if bar is not None:
                last = chunk_losses[..., -1]
                finite = last[np.isfinite(last)]
                bar.set_postfix(loss=f"{np.min(finite):.4g}" if finite.size else "nan")
                bar.update(length)
            if num_nonfinite > max_nonfinite:
                raise NonFiniteError(
                    f"fit stopped at step {int(np.min(np.asarray(state.step)))}: {num_nonfinite} steps had a "
                    f"non-finite loss or update (from a non-finite gradient, or an overflow; "
                    f"max_nonfinite={max_nonfinite}). The skipped steps left the parameters unchanged and the "
                    "run halted there; `error.state` "
                    "is the last finite state. Check the model for log(0), overflow or invalid parameters, "
                    "or lower the learning rate.",
                    state,
                    np.concatenate(loss_chunks, axis=-1),
                )
    finally:
        if bar is not None:
            bar.close()

    diagnostics = _diagnostics_from(infos, starts, history, diagnostics_every)
    diagnostics = diagnostics._replace(num_nonfinite=int(np.max(np.asarray(state.num_nonfinite))))
    params = jax.vmap(training.params)(state) if batched else training.params(state)
    return FitResult(params, np.concatenate(loss_chunks, axis=-1), state, diagnostics, model, guide, args, kwargs)


fit.cache = _PROGRAMS

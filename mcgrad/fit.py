"""``mg.fit``: one pure step, compiled ``lax.scan`` drivers, checkpoints, ArviZ output."""

from __future__ import annotations

import functools
import math
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mcgrad import inference, parallel
from mcgrad.objectives.base import Objective, ObjectiveSetup

Array = jax.Array


class FitState(NamedTuple):
    """Everything needed to resume bit for bit.

    Attributes:
        params: unconstrained ``numpyro.param`` values.
        optimizer_state: the optax state.
        objective_state: baseline states, a critic, … (the objective's own).
        key: the raw key data (``uint32``) the next step splits.
        step: steps taken.
        num_nonfinite: steps skipped because the loss or a gradient was not finite.
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

    ``variance[name][j]`` is the mean over the parameter's coordinates of the variance of
    the step's gradient estimate (per-particle variance / M) at step ``steps[j]``;
    ``snr[name][j]`` the mean of ``|mean| / std`` of that estimate.
    """

    steps: np.ndarray
    variance: dict
    snr: dict
    num_nonfinite: int


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


# --------------------------------------------------------------------------- the step


def _gradient_statistics(per_particle: dict, num_particles: int) -> tuple[dict, dict]:
    variance, snr = {}, {}
    for name, tree in per_particle.items():
        leaves = [jnp.reshape(leaf, (num_particles, -1)) for leaf in jax.tree.leaves(tree)]
        grads = jnp.concatenate(leaves, axis=1)
        estimate_variance = jnp.var(grads, axis=0, ddof=1) / num_particles
        mean = jnp.mean(grads, axis=0)
        variance[name] = jnp.mean(estimate_variance)
        snr[name] = jnp.mean(jnp.abs(mean) / jnp.sqrt(estimate_variance + 1e-30))
    return variance, snr


def make_step(
    bound: ObjectiveSetup,
    optimizer: optax.GradientTransformation,
    num_particles: int,
    diagnostics_every: int,
    shard: Callable[[Array], Array] = lambda keys: keys,
) -> Callable[[FitState, tuple, dict], tuple[FitState, StepInfo]]:
    """The pure step ``(state, args, kwargs) -> (state, info)``: estimate, guard, update."""
    constraints = bound.params.constraints

    def surrogate(params, objective_state, key, args, kwargs):
        return bound.surrogate(inference.constrain(params, constraints), objective_state, key, args, kwargs, shard)

    def nan_statistics(params):
        nan = jnp.full((), jnp.nan)
        return {name: nan for name in params}, {name: nan for name in params}

    def step(state: FitState, args: tuple, kwargs: dict) -> tuple[FitState, StepInfo]:
        key, step_key = jax.random.split(jax.random.wrap_key_data(state.key))

        def per_particle(params):
            s, (new_objective_state, _) = surrogate(params, state.objective_state, step_key, args, kwargs)
            return s, new_objective_state

        # One forward pass serves the gradient and, every few steps, the per-particle gradients.
        s, pullback, objective_state = jax.vjp(per_particle, state.params, has_aux=True)
        loss = jnp.mean(s)
        (grads,) = pullback(jnp.full_like(s, 1.0 / s.shape[0]))
        finite = jnp.isfinite(loss) & jnp.all(
            jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
        )
        grads = jax.tree.map(lambda g: jnp.where(finite, g, 0.0), grads)
        updates, optimizer_state = optimizer.update(grads, state.optimizer_state, state.params)
        params = optax.apply_updates(state.params, updates)

        def keep_if_finite(new, old):
            return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

        if diagnostics_every and num_particles > 1:

            def record(_):
                (jacobian,) = jax.vmap(pullback)(jnp.eye(s.shape[0], dtype=s.dtype))
                return _gradient_statistics(jacobian, s.shape[0])

            variance, snr = jax.lax.cond(
                state.step % diagnostics_every == 0, record, lambda _: nan_statistics(state.params), None
            )
        else:
            variance, snr = nan_statistics(state.params)

        new_state = FitState(
            keep_if_finite(params, state.params),
            keep_if_finite(optimizer_state, state.optimizer_state),
            keep_if_finite(objective_state, state.objective_state),
            jax.random.key_data(key),
            state.step + 1,
            state.num_nonfinite + (~finite).astype(jnp.int32),
        )
        return new_state, StepInfo(jnp.where(finite, loss, jnp.nan), finite, variance, snr)

    return step


@functools.partial(jax.jit, static_argnames=("step_fn", "static_inputs", "length"))
def _run_chunk(state, array_inputs, num_active=None, *, step_fn, static_inputs, length):
    """``length`` steps in one ``lax.scan``; with ``num_active`` only the first that many
    (the rest leave the state alone), so a run's shorter last chunk reuses the program."""
    args, kwargs = eqx.combine(array_inputs, static_inputs.value)
    if num_active is None:
        return jax.lax.scan(lambda s, _: step_fn(s, args, kwargs), state, None, length=length)
    _, info_shape = jax.eval_shape(step_fn, state, args, kwargs)
    skipped = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), info_shape)

    def masked_step(s, index):
        return jax.lax.cond(index < num_active, lambda s: step_fn(s, args, kwargs), lambda s: (s, skipped), s)

    return jax.lax.scan(masked_step, state, jnp.arange(length))


def _default_chunk_size(num_steps: int) -> int:
    """About 1/20 of the run, preferring a size that divides it (no masked last chunk)."""
    target = max(1, math.ceil(num_steps / 20))
    for size in range(target, min(num_steps, 2 * target) + 1):
        if num_steps % size == 0:
            return size
    return target


class _Static:
    """Hashable-by-identity holder for the non-array model arguments (plate sizes, flags…)."""

    def __init__(self, value):
        self.value = value


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str | Path, state: FitState, losses: np.ndarray, infos: list) -> None:
    """Write the whole state (params, optimizer, objective state, key, step) and history."""
    payload = {"state": jax.tree.map(np.asarray, state), "losses": np.asarray(losses), "infos": infos}
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(payload, f)
    tmp.replace(path)


def load_checkpoint(path: str | Path) -> tuple[FitState, np.ndarray, list]:
    """Read a checkpoint written by :func:`save_checkpoint` (or by ``fit(checkpoint_path=...)``)."""
    with open(path, "rb") as f:
        payload = pickle.load(f)
    return jax.tree.map(jnp.asarray, payload["state"]), payload["losses"], payload["infos"]


# --------------------------------------------------------------------------- fit


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


def check_data(args: tuple, kwargs: dict) -> None:
    """Raise a clear error for model arguments that contain NaN."""
    named = [(f"argument {i}", a) for i, a in enumerate(args)] + [(f"keyword '{k}'", v) for k, v in kwargs.items()]
    for label, value in named:
        for leaf in jax.tree.leaves(value):
            array = np.asarray(leaf) if hasattr(leaf, "shape") or isinstance(leaf, float) else None
            if array is not None and np.issubdtype(array.dtype, np.floating) and np.isnan(array).any():
                raise ValueError(
                    f"model {label} (shape {array.shape}) contains {int(np.isnan(array).sum())} NaN "
                    "values. Impute or drop them before fitting, or mask them in the model with "
                    "numpyro.handlers.mask."
                )


def _diagnostics_from(infos: list, num_nonfinite: int, names: list[str]) -> TrainingDiagnostics:
    if not infos:
        return TrainingDiagnostics(np.zeros(0, int), {n: np.zeros(0) for n in names}, {n: np.zeros(0) for n in names}, num_nonfinite)
    steps = np.concatenate([i["steps"] for i in infos])
    variance = {n: np.concatenate([i["variance"][n] for i in infos]) for n in names}
    snr = {n: np.concatenate([i["snr"][n] for i in infos]) for n in names}
    recorded = np.isfinite(variance[names[0]]) if names else np.zeros(len(steps), bool)
    return TrainingDiagnostics(
        steps[recorded], {n: v[recorded] for n, v in variance.items()}, {n: v[recorded] for n, v in snr.items()}, num_nonfinite
    )


def fit(
    model: Callable,
    guide: Callable | None,
    *args,
    key: Array,
    num_steps: int,
    optimizer: optax.GradientTransformation,
    objective: Objective,
    estimators: dict | None = None,
    progress_bar: bool = True,
    chunk_size: int | None = None,
    diagnostics_every: int | None = None,
    max_nonfinite: int = 10,
    checkpoint_path: str | Path | None = None,
    resume_from: str | Path | FitState | None = None,
    shard: bool = True,
    **kwargs,
) -> FitResult:
    r"""Fit a NumPyro model (and guide) by minimising ``objective`` with ``optimizer``.

    One pure step (estimate the gradient with the per-site estimators, skip it if the loss
    or a gradient is not finite, apply the optax update) runs inside ``lax.scan``. With
    ``progress_bar`` a tqdm bar advances between chunks of ``chunk_size`` steps (never a
    host round trip per step); without it the whole run is one scan. Both follow the same
    keys and give the same result.

    Args:
        model, guide: NumPyro callables (``guide=None`` for maximum likelihood and
            adversarial objectives).
        *args, **kwargs: passed to both.
        key: a ``jax.random.key``.
        num_steps: total steps (a resumed run continues up to this many).
        optimizer: an optax optimizer.
        objective: :func:`mcgrad.elbo`, :func:`mcgrad.iwae`, :func:`mcgrad.maximum_likelihood`,
            :func:`mcgrad.adversarial`.
        estimators: per-site overrides, e.g. ``{"z": mg.measure_valued()}``.
        chunk_size: steps per compiled chunk (default: about 1/20 of the run with a progress
            bar, the whole run without). Every chunk runs one compiled program; when the
            size does not divide the steps, the last chunk runs it masked, and the result
            agrees with the single-scan driver to float rounding instead of bit for bit.
        diagnostics_every: record gradient variance and SNR from the per-particle gradients
            every this many steps (default ``num_steps // 50``; 0 turns it off; needs
            ``num_particles > 1``).
        max_nonfinite: non-finite steps tolerated before stopping with :class:`NonFiniteError`
            (which carries the last finite state).
        checkpoint_path: write the full state there after every chunk.
        resume_from: a checkpoint path or a :class:`FitState` to continue from.
        shard: lay particles and data out over ``jax.devices()`` when there are several.

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
    check_data(args, kwargs)
    key_setup, key_run = jax.random.split(key)
    bound = objective.setup(model, guide, args, kwargs, estimators, key_setup)
    names = list(bound.params.unconstrained)
    if diagnostics_every is None:
        diagnostics_every = max(1, num_steps // 50)
    mesh = parallel.device_mesh()
    particle_shard = parallel.particle_sharding(objective.num_particles, mesh) if shard else (lambda k: k)
    if shard and mesh.size > 1:
        args, kwargs = parallel.shard_data((args, kwargs), mesh)
    step_fn = make_step(bound, optimizer, objective.num_particles, diagnostics_every, particle_shard)
    array_inputs, static_inputs = eqx.partition((args, kwargs), eqx.is_array)
    static_inputs = _Static(static_inputs)

    if resume_from is None:
        params = _strongly_typed(bound.params.unconstrained)
        state = FitState(
            params,
            optimizer.init(params),
            _strongly_typed(bound.init_state),
            jax.random.key_data(key_run),
            jnp.zeros((), jnp.int32),
            jnp.zeros((), jnp.int32),
        )
        losses, infos = np.zeros(0), []
    elif isinstance(resume_from, FitState):
        state, losses, infos = resume_from, np.zeros(0), []
    else:
        state, losses, infos = load_checkpoint(resume_from)

    remaining = num_steps - int(state.step)
    if chunk_size is None:
        chunk_size = _default_chunk_size(remaining) if progress_bar else max(remaining, 1)
    bar = None
    if progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, initial=int(state.step), desc=objective.name)
    loss_chunks = [losses]
    # Chunks all run one compiled program; a shorter last chunk runs it masked.
    masked = 0 < remaining % chunk_size < remaining
    try:
        while remaining > 0:
            length = min(chunk_size, remaining)
            start = int(state.step)
            new_state, info = _run_chunk(
                state,
                array_inputs,
                jnp.int32(length) if masked else None,
                step_fn=step_fn,
                static_inputs=static_inputs,
                length=chunk_size if masked else length,
            )
            if masked:
                info = jax.tree.map(lambda leaf: leaf[:length], info)
            chunk_losses = np.asarray(info.loss)
            loss_chunks.append(chunk_losses)
            infos.append(
                {
                    "steps": np.arange(start, start + length),
                    "variance": {n: np.asarray(v) for n, v in info.gradient_variance.items()},
                    "snr": {n: np.asarray(v) for n, v in info.gradient_snr.items()},
                }
            )
            state = new_state
            remaining -= length
            if checkpoint_path is not None:
                save_checkpoint(checkpoint_path, state, np.concatenate(loss_chunks), infos)
            if bar is not None:
                finite = chunk_losses[np.isfinite(chunk_losses)]
                bar.set_postfix(loss=f"{finite[-1]:.4g}" if finite.size else "nan")
                bar.update(length)
            if int(state.num_nonfinite) > max_nonfinite:
                raise NonFiniteError(
                    f"fit stopped at step {int(state.step)}: {int(state.num_nonfinite)} steps had a "
                    f"non-finite loss or gradient (max_nonfinite={max_nonfinite}). The skipped steps "
                    "left the parameters unchanged; `error.state` is the last finite state. Check the "
                    "model for log(0), overflow or invalid parameters, or lower the learning rate.",
                    state,
                    np.concatenate(loss_chunks),
                )
    finally:
        if bar is not None:
            bar.close()

    params = inference.constrain(state.params, bound.params.constraints)
    diagnostics = _diagnostics_from(infos, int(state.num_nonfinite), names)
    return FitResult(params, np.concatenate(loss_chunks), state, diagnostics, model, guide, args, kwargs)

r"""Gradient estimators for a discrete VAE: mcgrad against hand-written JAX and NumPyro.

The setup of the DisARM paper's small benchmark (Dong, Mnih & Tucker 2020): binarized
8×8 digits (scikit-learn's bundled set, ``x/16 > ½``, the fixed 1437 / 360 split of
``models/data.py``), ``L = 16`` Bernoulli latents, one-hidden-layer tanh MLPs of 64
units for the encoder ``g_φ`` and the decoder ``f_θ``::

    z_i ~ Π_l Bernoulli(½),   x_i | z_i ~ Π_d Bernoulli(σ(f_θ(z_i)_d)),   q_φ(z_i | x_i) = Π_l Bernoulli(σ(g_φ(x_i)_l)),

minibatches of 32 (``numpyro.plate("data", N, subsample_size=32)``), Adam at ``1e-3``,
the same initial weights for every method. The encoder's gradient is where the methods
differ; each is an unbiased estimate of ``∇ E_q[log q − log p]`` unless labelled biased:

* ``hand_disarm``: hand-written JAX, one antithetic pair ``b = 1[u < σ(φ)]``,
  ``b̃ = 1[1 − u < σ(φ)]`` per datum (``K = 2`` evaluations), the DisARM weight
  ``½ (f(b̃) − f(b)) 1[b ≠ b̃] (−1)^b σ(|φ|)``; the decoder's gradient averages the pair;
  minibatches from shuffled epochs, as a data loader draws them;
* ``hand_reinforce_loo``: hand-written JAX, REINFORCE with the leave-one-out baseline,
  ``K = 2`` draws per datum;
* ``hand_measure_valued``: hand-written JAX, one draw and its ``L`` one-coordinate flips per
  datum (``K = 1 + L``): the floor of the measure-valued estimator's cost;
* ``mcgrad_disarm`` (``mg.disarm()``, ``mg.elbo(2)``: one antithetic pair of particles,
  ``K = 2``) and ``mcgrad_disarm_k4`` (``mg.elbo(4)``, two pairs, ``K = 4``);
* ``mcgrad_score_function_loo`` (``mg.score_function(baseline=leave_one_out())``,
  ``mg.elbo(2)``);
* ``mcgrad_measure_valued`` (``mg.measure_valued()``, ``mg.elbo(1)``: ``1 + L``
  evaluations per datum);
* ``mcgrad_straight_through_gumbel`` (``mg.gumbel_softmax(0.5, straight_through=True)``,
  ``mg.elbo(2)``), **biased**;
* ``numpyro_tracegraph_k2`` / ``_k4``: NumPyro's ``SVI`` with ``TraceGraph_ELBO``.

mcgrad is called as a user calls it: ``mg.fit`` with its defaults (gradient diagnostics
every ``num_steps // 50`` steps), without a progress bar, resumed from its returned
``FitState`` at each checkpoint. NumPyro: ``SVI.run(..., progress_bar=False)``, resumed
with ``init_state``. Each method's run is cut into ``num_segments`` equal segments: the
first call compiles (its compile seconds come from ``jax.monitoring``), and the seconds
per compiled step are the fastest of the other segments and ``num_timing_repeats``
further segments run interleaved across methods (compile time, if any, taken out; the
median is reported too).

*Time to target* is (steps until the smoothed training −ELBO per image first reaches
``target``) × (compiled seconds per step); the smoothing is a trailing mean over
``smoothing_window`` steps. At every checkpoint each method's encoder gradient is
estimated ``num_variance_repeats`` times at its own parameters on one fixed minibatch (no
subsampling), and the total variance (sum over coordinates) of the gradient of the
per-image −ELBO is recorded. The held-out bound is IWAE-``K`` on the test split.

    from mcgrad.experiments import discrete_vae
    comparison = discrete_vae.run(num_steps=8000)
    discrete_vae.plot(comparison, "discrete_vae_estimators.png")
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pandas as pd
from numpyro.contrib.module import eqx_module

import mcgrad as mg

NUM_PIXELS = 64
DIGITS_NUM_TEST = 360
DIGITS_SPLIT_SEED = 0
TARGET = 21.09  # nats per image: the smoothed training −ELBO "time to target" waits for

Array = jax.Array


# --------------------------------------------------------------------------- data, model, guide


class Digits(NamedTuple):
    train: np.ndarray  # [1437, 64] in {0, 1}, float32
    test: np.ndarray  # [360, 64]


def load_binarized_digits() -> Digits:
    """scikit-learn's 8×8 digits, pixels ``x/16 > ½``; the fixed split of ``models/data.py``
    (a permutation from seed 0, the first 360 held out)."""
    from sklearn.datasets import load_digits

    pixels = (load_digits().data / 16.0 > 0.5).astype(np.float32)
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(pixels))
    return Digits(pixels[order[DIGITS_NUM_TEST:]], pixels[order[:DIGITS_NUM_TEST]])


class DiscreteVAE(eqx.Module):
    """Encoder and decoder networks and the NumPyro ``model`` / ``guide`` that use them.

    Both take the data ``x`` and a ``batch_size`` (``None``: every row of ``x``) for
    ``numpyro.plate("data", x.shape[0], subsample_size=batch_size)``.
    """

    encoder: eqx.nn.MLP
    decoder: eqx.nn.MLP
    latent_dim: int = eqx.field(static=True)

    def model(self, x, batch_size=None):
        decoder = eqx_module("decoder", self.decoder)
        with numpyro.plate("data", x.shape[0], subsample_size=batch_size) as index:
            z = numpyro.sample("z", dist.Bernoulli(probs=0.5).expand([self.latent_dim]).to_event(1))
            logits = jax.vmap(decoder)(z)
            numpyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x[index])

    def guide(self, x, batch_size=None):
        encoder = eqx_module("encoder", self.encoder)
        with numpyro.plate("data", x.shape[0], subsample_size=batch_size) as index:
            logits = jax.vmap(encoder)(x[index])
            numpyro.sample("z", dist.Bernoulli(logits=logits).to_event(1))


def make_discrete_vae(latent_dim: int = 8, hidden: int = 64, key: Array | None = None) -> DiscreteVAE:
    """One-hidden-layer tanh MLPs ``64 → hidden → L`` (encoder logits) and ``L → hidden → 64``."""
    key_encoder, key_decoder = jax.random.split(key if key is not None else jax.random.key(0))
    encoder = eqx.nn.MLP(NUM_PIXELS, latent_dim, hidden, 1, activation=jnp.tanh, key=key_encoder)
    decoder = eqx.nn.MLP(latent_dim, NUM_PIXELS, hidden, 1, activation=jnp.tanh, key=key_decoder)
    return DiscreteVAE(encoder, decoder, latent_dim)


def initial_params(vae: DiscreteVAE) -> dict:
    """The networks' initial weights, keyed as ``FitResult.params`` (``"encoder$params"``, …)."""
    return {f"{name}$params": eqx.filter(getattr(vae, name), eqx.is_inexact_array) for name in ("encoder", "decoder")}


def network(vae: DiscreteVAE, params: dict, name: str):
    """The fitted network ``name`` ("encoder" / "decoder") from ``FitResult.params``."""
    _, static = eqx.partition(getattr(vae, name), eqx.is_inexact_array)
    return eqx.combine(params[f"{name}$params"], static)


# --------------------------------------------------------------------------- the same ELBO by hand


def mlp(layers, x: Array) -> Array:
    """A one-hidden-layer tanh MLP from its weights (the ``eqx.nn.MLP`` of :func:`make_discrete_vae`)."""
    first, second = layers.layers
    return jnp.tanh(x @ first.weight.T + first.bias) @ second.weight.T + second.bias


def log_bernoulli(value: Array, logits: Array) -> Array:
    """``Σ_d log Bernoulli(value_d; σ(logits_d))`` over the last axis."""
    return jnp.sum(value * logits - jax.nn.softplus(logits), axis=-1)


def negative_elbo_terms(params: dict, x: Array, z: Array, encoder_logits: Array) -> Array:
    """``log q(z | x) − log p(z) − log p(x | z)`` per datum (``[..., B]``), with the
    encoder's logits given (so that the caller decides what carries a gradient)."""
    latent_dim = z.shape[-1]
    log_prior = -latent_dim * math.log(2.0)
    decoder_logits = mlp(params["decoder$params"], z)
    return log_bernoulli(z, encoder_logits) - log_prior - log_bernoulli(x, decoder_logits)


# A hand-written estimator: (params, key, x [B, 64], scale) -> (surrogate, loss); the
# gradient of the surrogate is the estimate of ∇ (scale · Σ_i −ELBO_i), loss its value.
HandSurrogate = Callable[[dict, Array, Array, float], tuple[Array, Array]]


def hand_disarm(params: dict, key: Array, x: Array, scale: float) -> tuple[Array, Array]:
    r"""DisARM by hand: one antithetic pair per datum, ``K = 2`` decoder evaluations.

    Encoder: ``½ (f(b̃) − f(b)) 1[b ≠ b̃] (−1)^b σ(|φ|)`` per coordinate of the logits
    ``φ`` (the zero-mean ``∇ log q(b)|_b`` term dropped); decoder: ``∇_θ ½ (f(b) + f(b̃))``.
    """
    logits = mlp(params["encoder$params"], x)
    frozen = jax.lax.stop_gradient(logits)
    u = jax.random.uniform(key, logits.shape)
    probs = jax.nn.sigmoid(frozen)
    b = (u < probs).astype(logits.dtype)
    partner = (1.0 - u < probs).astype(logits.dtype)
    cost = negative_elbo_terms(params, x, b, frozen)
    partner_cost = negative_elbo_terms(params, x, partner, frozen)
    weight = 0.5 * (partner_cost - cost)[:, None] * (b != partner) * (1.0 - 2.0 * b) * jax.nn.sigmoid(jnp.abs(frozen))
    loss = 0.5 * (cost + partner_cost)
    surrogate = loss + jnp.sum(jax.lax.stop_gradient(weight) * logits, axis=-1)
    return scale * jnp.sum(surrogate), scale * jnp.sum(jax.lax.stop_gradient(loss))


def hand_reinforce_loo(params: dict, key: Array, x: Array, scale: float, num_samples: int = 2) -> tuple[Array, Array]:
    r"""REINFORCE with the leave-one-out baseline by hand: ``K`` draws per datum.

    Encoder: ``(1/K) Σ_k (f(b_k) − (1/(K−1)) Σ_{j≠k} f(b_j)) ∇_φ log q(b_k | x)``;
    decoder: ``∇_θ (1/K) Σ_k f(b_k)``.
    """
    logits = mlp(params["encoder$params"], x)
    frozen = jax.lax.stop_gradient(logits)
    b = jax.random.bernoulli(key, jax.nn.sigmoid(frozen), (num_samples, *logits.shape)).astype(logits.dtype)
    cost = negative_elbo_terms(params, x, b, frozen)  # [K, B]
    baseline = (jnp.sum(cost, axis=0) - cost) / (num_samples - 1)
    signal = jax.lax.stop_gradient(cost - baseline)
    surrogate = jnp.mean(cost + signal * log_bernoulli(b, logits), axis=0)
    return scale * jnp.sum(surrogate), scale * jnp.sum(jax.lax.stop_gradient(jnp.mean(cost, axis=0)))


def hand_measure_valued(params: dict, key: Array, x: Array, scale: float) -> tuple[Array, Array]:
    r"""Measure-valued gradients by hand: one draw ``b`` per datum and its ``L`` one-coordinate
    flips ``b^{(l)}``, ``K = 1 + L`` evaluations (the draw is its own positive or negative part).

    Encoder: ``∂/∂p_l E f = E[f(b_l = 1) − f(b_l = 0)] = E[(1 − 2 b_l)(f(b^{(l)}) − f(b))]``,
    chained through ``p = σ(φ)`` (the zero-mean ``∇ log q(b)|_b`` term dropped); decoder:
    ``∇_θ f(b)``. The flips' costs carry no gradient: they only weigh the probabilities.
    """
    logits = mlp(params["encoder$params"], x)
    frozen = jax.lax.stop_gradient(logits)
    b = jax.random.bernoulli(key, jax.nn.sigmoid(frozen)).astype(logits.dtype)  # [B, L]
    flips = jnp.eye(b.shape[-1], dtype=b.dtype)  # row l flips coordinate l
    flipped = jnp.abs(b[:, None, :] - flips)  # [B, L, L]
    cost = negative_elbo_terms(params, x, b, frozen)  # [B]
    flipped_cost = jax.lax.stop_gradient(negative_elbo_terms(params, x[:, None], flipped, frozen[:, None]))  # [B, L]
    weight = (1.0 - 2.0 * b) * (flipped_cost - jax.lax.stop_gradient(cost)[:, None])
    surrogate = cost + jnp.sum(weight * jax.nn.sigmoid(logits), axis=-1)
    return scale * jnp.sum(surrogate), scale * jnp.sum(jax.lax.stop_gradient(cost))


def epoch_batches(key: Array, num_data: int, batch_size: int, num_steps: int) -> Array:
    """``[num_steps, batch_size]`` row indices as a data loader gives them: each epoch a fresh
    permutation of the data, cut into ``num_data // batch_size`` batches (the rest dropped).

    One permutation per epoch, not per step: ``jax.random.choice(..., replace=False)`` at
    every step permutes all ``N`` rows each time (here about 0.35 ms a step on a CPU core,
    more than the whole DisARM step).
    """
    per_epoch = num_data // batch_size
    num_epochs = -(-num_steps // per_epoch)
    orders = jax.vmap(lambda k: jax.random.permutation(k, num_data))(jax.random.split(key, num_epochs))
    return orders[:, : per_epoch * batch_size].reshape(num_epochs * per_epoch, batch_size)[:num_steps]


def hand_segment(surrogate_fn: HandSurrogate, train: Array, batch_size: int, optimizer: optax.GradientTransformation,
                 num_steps: int) -> Callable:
    """``(params, opt_state, key) -> ((params, opt_state, key), losses [num_steps])``:
    ``num_steps`` optimizer steps in one ``lax.scan`` over shuffled epochs of minibatches
    (:func:`epoch_batches`), jitted. Losses are the −ELBO estimates of the whole data set."""
    num_data = train.shape[0]
    scale = num_data / batch_size

    def step(carry, index):
        params, opt_state, key = carry
        key, sample_key = jax.random.split(key)
        grads, loss = jax.grad(surrogate_fn, has_aux=True)(params, sample_key, train[index], scale)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, key), loss

    def segment(carry):
        params, opt_state, key = carry
        key, shuffle_key = jax.random.split(key)
        indices = epoch_batches(shuffle_key, num_data, batch_size, num_steps)
        return jax.lax.scan(step, (params, opt_state, key), indices)

    return jax.jit(segment)


def iwae_bound(params: dict, x: Array, key: Array, num_samples: int = 100) -> float:
    """The held-out IWAE-``K`` bound ``log (1/K) Σ_k p(x, z_k) / q(z_k | x)``, mean over ``x``
    (nats per image), by hand: every method's parameters are scored by the same code."""
    logits = mlp(params["encoder$params"], x)
    z = jax.random.bernoulli(key, jax.nn.sigmoid(logits), (num_samples, *logits.shape)).astype(logits.dtype)
    log_weights = -negative_elbo_terms(params, x, z, logits)  # [K, N]
    return float(jnp.mean(jax.nn.logsumexp(log_weights, axis=0) - math.log(num_samples)))


# --------------------------------------------------------------------------- methods


class Method(NamedTuple):
    """One way to train the VAE, as values the driver calls.

    Attributes:
        name: the row's name.
        evaluations: decoder evaluations per datum and step (``K``).
        bias: ``None`` for an unbiased encoder gradient, else what biases it.
        advance: ``(state | None, num_steps) -> (state, losses)``: that many more steps
            (``None``: from the initial weights); ``losses`` the whole-data −ELBO estimates.
        params: ``state | None -> params`` keyed as ``FitResult.params``.
        encoder_gradients: ``(params, batch, keys) -> [R, P]``: one estimate of the
            gradient of the per-image −ELBO on ``batch`` (no subsampling) per key, the
            encoder's coordinates flattened.
        description: how it is called.
    """

    name: str
    evaluations: int
    bias: str | None
    advance: Callable[[Any, int], tuple[Any, np.ndarray]]
    params: Callable[[Any], dict]
    encoder_gradients: Callable[[dict, Array, Array], Array]
    description: str


def _flat_encoder(grads: dict) -> Array:
    """``[R, P]``: the encoder's gradient coordinates of ``R`` stacked estimates."""
    leaves = jax.tree.leaves(grads["encoder$params"])
    return jnp.concatenate([jnp.reshape(leaf, (leaf.shape[0], -1)) for leaf in leaves], axis=1)


def hand_method(name: str, surrogate_fn: HandSurrogate, evaluations: int, init: dict, train, key, *,
                batch_size: int, learning_rate: float, description: str) -> Method:
    train = jnp.asarray(train)
    optimizer = optax.adam(learning_rate)
    segments: dict[int, Callable] = {}  # steps per call -> its compiled scan

    def advance(state, num_steps):
        if num_steps not in segments:
            segments[num_steps] = hand_segment(surrogate_fn, train, batch_size, optimizer, num_steps)
        if state is None:
            state = (init, optimizer.init(init), key)
        state, losses = segments[num_steps](state)
        return state, np.asarray(losses)

    @jax.jit
    def encoder_gradients(params, batch, keys):
        def one(k):
            return jax.grad(surrogate_fn, has_aux=True)(params, k, batch, 1.0 / batch.shape[0])[0]

        return _flat_encoder(jax.vmap(one)(keys))

    return Method(name, evaluations, None, advance, lambda state: init if state is None else state[0],
                  encoder_gradients, description)


def mcgrad_method(name: str, vae: DiscreteVAE, objective, estimator, evaluations: int, train, key, *,
                  batch_size: int, learning_rate: float, num_steps: int, description: str,
                  diagnostics: bool = True) -> Method:
    """``mg.fit`` with its defaults (diagnostics every ``num_steps // 50`` steps; with
    ``diagnostics=False`` none), resumed from its ``FitState`` segment by segment."""
    train = jnp.asarray(train)
    init = initial_params(vae)
    estimators = {"z": estimator}
    diagnostics_every = max(1, num_steps // 50) if diagnostics else 0  # mg.fit's default for the whole run

    def advance(state, steps):
        done = 0 if state is None else int(state.step)
        result = mg.fit(
            vae.model, vae.guide, train, batch_size, key=key, num_steps=done + steps,
            optimizer=optax.adam(learning_rate), objective=objective, estimators=estimators,
            progress_bar=False, diagnostics_every=diagnostics_every, resume_from=state,
        )
        return result.state, np.asarray(result.losses)

    compiled = {}  # batch shape -> the jitted estimates (one trace per method, not per checkpoint)

    def encoder_gradients(params, batch, keys):
        if batch.shape not in compiled:
            # No step is taken: only `training.estimate` at the given params is used.
            training = mg.trainer(vae.model, vae.guide, batch, None, key=jax.random.key(0), objective=objective,
                                  optimizer=optax.set_to_zero(), estimators=estimators)
            empty = training.init(jax.random.key(0))

            def estimates(params, batch, keys):
                state = empty._replace(params=params)
                grads = jax.vmap(lambda k: training.estimate(state, k, batch, None)[1])(keys)
                return _flat_encoder(grads) / batch.shape[0]

            compiled[batch.shape] = jax.jit(estimates)
        return compiled[batch.shape](params, batch, keys)

    bias = getattr(estimator, "bias", None)
    return Method(name, evaluations, bias, advance, lambda state: init if state is None else state.params,
                  encoder_gradients, description)


def numpyro_method(name: str, vae: DiscreteVAE, num_particles: int, train, key, *,
                   batch_size: int, learning_rate: float, description: str) -> Method:
    """NumPyro's ``SVI(model, guide, Adam, TraceGraph_ELBO(num_particles)).run``, resumed
    with ``init_state``."""
    from numpyro.infer import SVI, TraceGraph_ELBO
    from numpyro.optim import optax_to_numpyro

    train = jnp.asarray(train)
    init = initial_params(vae)
    loss = TraceGraph_ELBO(num_particles)
    svi = SVI(vae.model, vae.guide, optax_to_numpyro(optax.adam(learning_rate)), loss)

    def advance(state, steps):
        result = svi.run(key, steps, train, batch_size, progress_bar=False, init_state=state)
        return result.state, np.asarray(result.losses)

    @jax.jit
    def encoder_gradients(params, batch, keys):
        def one(k):
            return jax.grad(lambda p: loss.loss(k, p, vae.model, vae.guide, batch, None))(params)

        return _flat_encoder(jax.vmap(one)(keys)) / batch.shape[0]

    return Method(name, num_particles, None, advance,
                  lambda state: init if state is None else svi.get_params(state), encoder_gradients, description)


def methods(vae: DiscreteVAE, train, key: Array, *, batch_size: int = 32, learning_rate: float = 1e-3,
            num_steps: int = 8000, names: list[str] | None = None) -> dict[str, Method]:
    """Every method of the comparison, keyed by name (``names``: a subset, in that order)."""
    init = initial_params(vae)
    options = dict(batch_size=batch_size, learning_rate=learning_rate)
    latent_dim = vae.latent_dim

    def mcgrad(name, objective, estimator, evaluations, description, **extra):
        return lambda: mcgrad_method(name, vae, objective, estimator, evaluations, train, key, num_steps=num_steps,
                                     description=description, **options, **extra)

    every = {
        "hand_disarm": lambda: hand_method("hand_disarm", hand_disarm, 2, init, train, key, **options,
                                           description="hand-written JAX, one antithetic pair per datum"),
        "hand_reinforce_loo": lambda: hand_method("hand_reinforce_loo", hand_reinforce_loo, 2, init, train, key,
                                                  **options, description="hand-written JAX, 2 draws, leave-one-out"),
        "hand_measure_valued": lambda: hand_method(
            "hand_measure_valued", hand_measure_valued, 1 + latent_dim, init, train, key, **options,
            description="hand-written JAX, one draw and its L one-coordinate flips per datum",
        ),
        "mcgrad_disarm": mcgrad("mcgrad_disarm", mg.elbo(2), mg.disarm(), 2, "mg.disarm(), mg.elbo(2): one pair"),
        "mcgrad_score_function_loo": mcgrad(
            "mcgrad_score_function_loo", mg.elbo(2), mg.score_function(baseline=mg.baselines.leave_one_out()), 2,
            "mg.score_function(baseline=leave_one_out()), mg.elbo(2)",
        ),
        "mcgrad_measure_valued": mcgrad("mcgrad_measure_valued", mg.elbo(1), mg.measure_valued(), 1 + latent_dim,
                                        "mg.measure_valued(), mg.elbo(1)"),
        "mcgrad_disarm_k4": mcgrad("mcgrad_disarm_k4", mg.elbo(4), mg.disarm(), 4, "mg.disarm(), mg.elbo(4): two pairs"),
        "mcgrad_double_cv": mcgrad("mcgrad_double_cv", mg.elbo(2), mg.double_control_variate(), 2,
                                   "mg.double_control_variate(), mg.elbo(2): leave-one-out plus a Taylor term"),
        "mcgrad_rebar": mcgrad("mcgrad_rebar", mg.elbo(2), mg.rebar(), 8, "mg.rebar(), mg.elbo(2)"),
        "mcgrad_relax": mcgrad("mcgrad_relax", mg.elbo(2), mg.relax(), 8,
                               "mg.relax() (quadratic surrogate), mg.elbo(2)"),
        "mcgrad_straight_through_gumbel": mcgrad(
            "mcgrad_straight_through_gumbel", mg.elbo(2),
            mg.gumbel_softmax(0.5, straight_through=True), 2,
            "mg.gumbel_softmax(0.5, straight_through=True), mg.elbo(2)",
        ),
        "numpyro_tracegraph_k2": lambda: numpyro_method("numpyro_tracegraph_k2", vae, 2, train, key, **options,
                                                        description="SVI, TraceGraph_ELBO(num_particles=2)"),
        "numpyro_tracegraph_k4": lambda: numpyro_method("numpyro_tracegraph_k4", vae, 4, train, key, **options,
                                                        description="SVI, TraceGraph_ELBO(num_particles=4)"),
    }
    chosen = names if names is not None else list(every)
    unknown = [name for name in chosen if name not in every]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(every)}.")
    return {name: every[name]() for name in chosen}


# --------------------------------------------------------------------------- the driver


@contextlib.contextmanager
def compile_timer():
    """Yields a one-element list that accumulates the seconds JAX spends tracing, lowering
    and compiling inside the ``with`` block (``jax.monitoring`` events)."""
    seconds = [0.0]
    events = ("jaxpr_trace_duration", "jaxpr_to_mlir_module_duration", "backend_compile_duration")

    def listener(event: str, duration: float, **_):
        if event.rsplit("/", 1)[-1] in events:
            seconds[0] += duration

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seconds
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def timed_advance(method: Method, state, num_steps: int) -> tuple[Any, np.ndarray, float, float]:
    """``method.advance`` blocking on its result: ``(state, losses, wall seconds, compile seconds)``."""
    with compile_timer() as compile_seconds:
        start = time.perf_counter()
        state, losses = method.advance(state, num_steps)
        jax.block_until_ready(state)
        wall = time.perf_counter() - start
    return state, losses, wall, compile_seconds[0]


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` values (fewer at the start)."""
    values = np.asarray(values, np.float64)
    sums = np.cumsum(np.insert(values, 0, 0.0))
    index = np.arange(1, len(values) + 1)
    start = np.maximum(index - window, 0)
    return (sums[index] - sums[start]) / (index - start)


def steps_to_target(smoothed: np.ndarray, target: float) -> int | None:
    """Steps taken when ``smoothed`` first reaches ``target`` (``None`` if it never does)."""
    reached = np.flatnonzero(smoothed <= target)
    return int(reached[0]) + 1 if reached.size else None


def total_variance(gradients: Array) -> float:
    """``Σ_d Var(g_d)`` over the ``R`` estimates of ``gradients [R, P]`` (unbiased)."""
    return float(jnp.sum(jnp.var(gradients, axis=0, ddof=1)))


class Comparison(NamedTuple):
    """The table (one row per method) and the curves behind it."""

    table: pd.DataFrame
    curves: dict  # name -> {"losses": per-image −ELBO per step, "seconds_per_step": float, "compile_seconds": float}
    variances: pd.DataFrame  # [checkpoint step, method] encoder total variance
    settings: dict


def seed_keys(seed: int) -> list[Array]:
    """``[init, train, batch, variance, eval]``: the keys of one seed's run."""
    return list(jax.random.split(jax.random.key(seed), 5))


# The unbiased methods, for the spread over seeds (NumPyro's never reach the target in time).
SEED_METHODS = ["hand_disarm", "hand_reinforce_loo", "hand_measure_valued", "mcgrad_disarm",
                "mcgrad_score_function_loo", "mcgrad_measure_valued", "mcgrad_disarm_k4", "mcgrad_double_cv",
                "mcgrad_rebar", "mcgrad_relax"]


def over_seeds(
    seeds,
    *,
    num_steps: int = 8000,
    latent_dim: int = 16,
    hidden: int = 64,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    num_segments: int = 4,
    target: float = TARGET,
    smoothing_window: int | None = None,
    names: list[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """Each method trained again from each seed's weights and keys, untimed: one row per
    ``(method, seed)`` with ``steps to target`` (NaN: never) and ``final -ELBO``.

    A single run ranks methods that share an estimator by chance (the same DisARM by hand
    and in mcgrad differ by a few hundred steps from one seed to the next); this is the
    spread to read it against. The segments are :func:`run`'s, so ``run(seed=s)``'s
    trajectories are reproduced exactly.
    """
    log = log or (lambda message: None)
    digits = load_binarized_digits()
    num_data = digits.train.shape[0]
    segment = num_steps // num_segments
    window = smoothing_window or max(1, min(100, num_steps // 20))
    rows = []
    for seed in seeds:
        key_init, key_train, *_ = seed_keys(seed)
        vae = make_discrete_vae(latent_dim, hidden, key_init)
        chosen = methods(vae, digits.train, key_train, batch_size=batch_size, learning_rate=learning_rate,
                         num_steps=num_steps, names=names or SEED_METHODS)
        for name, method in chosen.items():
            state, parts = None, []
            for _ in range(num_segments):
                state, part = method.advance(state, segment)
                parts.append(part)
            losses = np.concatenate(parts) / num_data
            steps = steps_to_target(smooth(losses, window), target)
            rows.append({"method": name, "seed": seed, "steps to target": np.nan if steps is None else steps,
                         "final -ELBO": float(np.mean(losses[-max(1, num_steps // 10):]))})
        log(f"seed {seed}: {len(chosen)} methods")
    return pd.DataFrame(rows)


def run(
    *,
    num_steps: int = 8000,
    seed: int = 0,
    latent_dim: int = 16,
    hidden: int = 64,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    num_segments: int = 4,
    num_timing_repeats: int = 2,
    num_variance_repeats: int = 32,
    num_eval_samples: int = 100,
    target: float = TARGET,
    smoothing_window: int | None = None,
    names: list[str] | None = None,
    tuned: bool = True,
    log: Callable[[str], None] | None = None,
) -> Comparison:
    """Train the VAE with every method from the same weights and keys; tabulate.

    Columns: ``final −ELBO`` (per image, mean over the last 10% of steps), ``IWAE-K``
    (held-out −bound, nats per image), ``encoder variance`` at each checkpoint,
    ``ms/step`` (compiled: the fastest of the calls after the first; the median beside
    it), ``compile s`` (first call) and per later call, ``steps to target``, ``time to
    target s`` (steps × s/step), its ratio to ``hand_disarm``'s. With ``tuned``, a row
    ``mcgrad_disarm_no_diagnostics``: the same trajectory (diagnostics draw keys of
    their own), timed with ``diagnostics_every=0``.
    """
    if num_steps % num_segments:
        raise ValueError(f"num_steps ({num_steps}) must be a multiple of num_segments ({num_segments}).")
    log = log or (lambda message: None)
    digits = load_binarized_digits()
    num_data = digits.train.shape[0]
    key_init, key_train, key_batch, key_variance, key_eval = seed_keys(seed)
    vae = make_discrete_vae(latent_dim, hidden, key_init)
    batch = jnp.asarray(digits.train[np.asarray(jax.random.choice(key_batch, num_data, (batch_size,), replace=False))])
    variance_keys = jax.random.split(key_variance, num_variance_repeats)
    segment = num_steps // num_segments
    window = smoothing_window or max(1, min(100, num_steps // 20))
    chosen = methods(vae, digits.train, key_train, batch_size=batch_size, learning_rate=learning_rate,
                     num_steps=num_steps, names=names)
    if tuned and "mcgrad_disarm" in chosen:
        chosen["mcgrad_disarm_no_diagnostics"] = mcgrad_method(
            "mcgrad_disarm_no_diagnostics", vae, mg.elbo(2), mg.disarm(), 2, digits.train, key_train,
            batch_size=batch_size, learning_rate=learning_rate, num_steps=num_steps, diagnostics=False,
            description="mg.disarm(), mg.elbo(2), diagnostics_every=0 (timed only)",
        )
    timing_only = {"mcgrad_disarm_no_diagnostics"}

    states, losses, walls, compiles, variances, final_params = {}, {}, {}, {}, {}, {}
    for name, method in chosen.items():
        state, parts, walls[name], compiles[name], variances[name] = None, [], [], [], {}
        trained = name not in timing_only
        for index in range(num_segments if trained else 1):
            if trained:
                variances[name][index * segment] = total_variance(
                    method.encoder_gradients(method.params(state), batch, variance_keys)
                )
            state, part, wall, compile_seconds = timed_advance(method, state, segment)
            parts.append(part)
            walls[name].append(wall)
            compiles[name].append(compile_seconds)
        if trained:
            variances[name][num_steps] = total_variance(
                method.encoder_gradients(method.params(state), batch, variance_keys)
            )
            final_params[name] = method.params(state)
            losses[name] = np.concatenate(parts) / num_data
        states[name] = state
        log(f"{name}: {sum(walls[name]):.1f} s ({compiles[name][0]:.1f} s compiling)")
    for _ in range(num_timing_repeats):  # interleaved: the machine's load falls on every method alike
        for name, method in chosen.items():
            _, _, wall, compile_seconds = timed_advance(method, states[name], segment)
            walls[name].append(wall)
            compiles[name].append(compile_seconds)

    rows, curves = [], {}
    for name, method in chosen.items():
        run_seconds = [w - c for w, c in zip(walls[name], compiles[name], strict=True)]
        later = run_seconds[1:] or run_seconds
        # The fastest call: other load on the machine only ever adds time (the median is kept too).
        seconds_per_step = float(np.min(later)) / segment
        source = "mcgrad_disarm" if name in timing_only else name
        smoothed = smooth(losses[source], window)
        steps = steps_to_target(smoothed, target)
        tail = losses[source][-max(1, num_steps // 10):]
        row = {
            "method": name,
            "evaluations per datum": method.evaluations,
            "biased": method.bias is not None,
            "final -ELBO": float(np.mean(tail)),
            f"IWAE-{num_eval_samples} (test, -bound)": -iwae_bound(final_params[source], jnp.asarray(digits.test),
                                                                   key_eval, num_eval_samples),
            "ms/step": 1e3 * seconds_per_step,
            "ms/step median": 1e3 * float(np.median(later)) / segment,
            "compile s": compiles[name][0],
            # Later calls: mg.fit traces the model and guide again when it resumes, SVI.run compiles its scan again.
            "compile s per later call": float(np.median(compiles[name][1:])) if len(compiles[name]) > 1 else np.nan,
            "steps to target": steps if steps is not None else np.nan,
            "time to target s": steps * seconds_per_step if steps is not None else np.nan,
        }
        for step, variance in variances[source].items():
            row[f"encoder variance @{step}"] = variance
        rows.append(row)
        curves[name] = {"losses": losses[source], "smoothed": smoothed, "seconds_per_step": seconds_per_step,
                        "compile_seconds": compiles[name][0], "run_seconds_per_call": run_seconds,
                        "compile_seconds_per_call": compiles[name]}
    table = pd.DataFrame(rows)
    if "hand_disarm" in chosen:
        reference = table.set_index("method").loc["hand_disarm", "time to target s"]
        table["time to target / hand_disarm"] = table["time to target s"] / reference
    table["description"] = [chosen[name].description for name in table["method"]]
    table["bias"] = [chosen[name].bias or "" for name in table["method"]]
    variance_table = pd.DataFrame({name: pd.Series(v) for name, v in variances.items() if v})
    variance_table.index.name = "step"
    settings = dict(
        num_steps=num_steps, seed=seed, latent_dim=latent_dim, hidden=hidden, batch_size=batch_size,
        learning_rate=learning_rate, num_segments=num_segments, num_timing_repeats=num_timing_repeats,
        num_variance_repeats=num_variance_repeats, num_eval_samples=num_eval_samples, target=target,
        smoothing_window=window, num_train=num_data, num_test=int(digits.test.shape[0]),
    )
    return Comparison(table, curves, variance_table, settings)


# --------------------------------------------------------------------------- figure


def plot(comparison: Comparison, path) -> None:
    """Smoothed training −ELBO against compiled run time (left) and against steps (middle),
    one line per method, the target dashed; the encoder's gradient variance at the
    checkpoints (right)."""
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no global backend to set

    figure = Figure(figsize=(16, 4.8))
    left, middle, right = figure.subplots(1, 3)
    target = comparison.settings["target"]
    biased = dict(zip(comparison.table["method"], comparison.table["biased"], strict=True))
    palette = matplotlib.colormaps["tab20"]  # a colour per method: the default cycle repeats after ten
    colors = {name: palette(index % palette.N) for index, name in enumerate(comparison.curves)}
    for name, curve in comparison.curves.items():
        if name.endswith("_no_diagnostics"):
            continue
        steps = np.arange(1, len(curve["smoothed"]) + 1)
        label = name + (" (biased)" if biased[name] else "")
        style = "--" if biased[name] else "-"
        left.plot(steps * curve["seconds_per_step"], curve["smoothed"], style, label=label, linewidth=1.2,
                  color=colors[name])
        middle.plot(steps, curve["smoothed"], style, label=label, linewidth=1.2, color=colors[name])
    for ax in (left, middle):
        ax.axhline(target, color="black", linestyle=":", linewidth=1)
        low = min(np.nanmin(c["smoothed"]) for c in comparison.curves.values())
        ax.set_ylim(low - 0.5, max(low + 12.0, target + 3.0))
    left.set(xlabel="compiled run time (s, compile excluded)", ylabel="training −ELBO, nats/image (smoothed)",
             title=f"to the target {target} (dotted)")
    middle.set(xlabel="step", title=f"batch {comparison.settings['batch_size']}, Adam "
               f"{comparison.settings['learning_rate']:g}, L = {comparison.settings['latent_dim']}")
    variance = comparison.variances
    for name in variance.columns:
        right.plot(variance.index, variance[name], "o-", label=name, markersize=3, color=colors[name])
    right.set(xlabel="step", ylabel="encoder gradient total variance (per-image −ELBO)", yscale="log",
              title=f"{comparison.settings['num_variance_repeats']} estimates, fixed minibatch")
    middle.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)

"""Adversarial objectives for implicit models (GAN, Wasserstein GAN)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from mcgrad.inference import handlers
from mcgrad.inference.costs import Term, site_plates
from mcgrad.inference.params import constrain, find_params
from mcgrad.inference.particles import Program, average_surrogate, count_site_keys, init_site_states
from mcgrad.inference.site_estimators import resolve_estimators
from mcgrad.objectives.base import Objective, ObjectiveSetup

Loss = Literal["minimax", "non_saturating", "wasserstein"]


class AdversarialState(NamedTuple):
    """The critic, its optimizer state, its last loss, and the generator's site states."""

    critic_params: Any
    critic_optimizer_state: Any
    critic_loss: jax.Array
    site_states: dict


def generator_loss(scores: jax.Array, loss: Loss) -> jax.Array:
    """Per-sample generator loss from critic scores (logits, or critic values for Wasserstein)."""
    if loss == "minimax":
        return -jax.nn.softplus(scores)  # log(1 − σ(s))
    if loss == "non_saturating":
        return jax.nn.softplus(-scores)  # −log σ(s)
    return -scores


def critic_loss(critic_fn, critic_params, real, fake, key, loss: Loss, gradient_penalty: float) -> jax.Array:
    """The critic's loss: logistic for the GAN losses, Wasserstein with gradient penalty otherwise."""
    real_scores, fake_scores = critic_fn(critic_params, real), critic_fn(critic_params, fake)
    if loss != "wasserstein":
        return jnp.mean(jax.nn.softplus(-real_scores)) + jnp.mean(jax.nn.softplus(fake_scores))
    value = jnp.mean(fake_scores) - jnp.mean(real_scores)
    if gradient_penalty > 0:
        mix = jax.random.uniform(key, (real.shape[0],) + (1,) * (real.ndim - 1))
        between = mix * real + (1.0 - mix) * fake.astype(real.dtype)
        slopes = jax.vmap(jax.grad(lambda x: critic_fn(critic_params, x[None])[0]))(between)
        norms = jnp.sqrt(jnp.sum(jnp.reshape(slopes, (slopes.shape[0], -1)) ** 2, axis=1) + 1e-12)
        value = value + gradient_penalty * jnp.mean((norms - 1.0) ** 2)
    return value


def adversarial(
    critic: Callable | eqx.Module,
    critic_params: Any = None,
    *,
    data: jax.Array,
    site: str = "x",
    loss: Loss = "non_saturating",
    critic_optimizer: optax.GradientTransformation | None = None,
    critic_steps: int = 1,
    gradient_penalty: float = 10.0,
    clip: float | None = None,
    num_particles: int = 1,
) -> Objective:
    r"""Adversarial fitting of an implicit model (the NumPyro model is the generator).

    Each step trains the critic ``critic_steps`` times on a real minibatch from ``data`` and
    a fake batch from the generator, then returns the generator's loss on fresh fakes:

    * ``"minimax"``: ``E log(1 − σ(D(x)))``; ``"non_saturating"``: ``−E log σ(D(x))``
      (Goodfellow et al., 2014);
    * ``"wasserstein"``: ``−E D(x)``, the critic trained on ``E D(fake) − E D(real)`` plus
      ``gradient_penalty · E(‖∇D(x̂)‖ − 1)²`` (Gulrajani et al., 2017) or weight ``clip``.

    The generator's gradient goes through mcgrad's per-site estimators: a generator whose
    output is a discrete sample site trains through the score function (each sample's
    learning signal is its own critic score when the site is inside a ``plate``).

    Args:
        critic: ``critic(critic_params, x_batch) -> scores [B]``, or an equinox module
            mapping a batch to scores (then ``critic_params`` is ``None``).
        critic_params: the critic's initial parameters (a pytree).
        data: real samples ``[n, ...]``; minibatches as large as the fake batch.
        site: the generator's output site (a sample or deterministic site).
        loss: ``"minimax"``, ``"non_saturating"`` or ``"wasserstein"``.
        critic_optimizer: optax optimizer of the critic (default ``adam(1e-3, b1=0.5)``).
        critic_steps: critic updates per generator step.
        gradient_penalty: WGAN-GP weight (Wasserstein only; 0 turns it off).
        clip: clip the critic's weights to ``[−clip, clip]`` after each update (WGAN).
        num_particles: generator runs per step.

    Example:
        >>> import jax, jax.numpy as jnp, mcgrad as mg, numpyro, numpyro.distributions as dist, optax
        >>> data = 2.0 + 0.5 * jax.random.normal(jax.random.key(0), (256, 1))
        >>> def generator(batch):
        ...     loc = numpyro.param("loc", jnp.zeros(1))
        ...     with numpyro.plate("batch", batch):
        ...         noise = numpyro.sample("noise", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
        ...     numpyro.deterministic("x", loc + 0.5 * noise)
        >>> critic = lambda p, x: (x @ p["w"] + p["b"]).squeeze(-1) - p["q"] * (x ** 2).squeeze(-1)
        >>> params = {"w": jnp.zeros((1, 1)), "b": jnp.zeros(1), "q": jnp.zeros(())}
        >>> result = mg.fit(generator, None, 64, key=jax.random.key(1), num_steps=400,
        ...                 optimizer=optax.adam(0.02), progress_bar=False,
        ...                 objective=mg.adversarial(critic, params, data=data))
        >>> bool(abs(result.params["loc"][0] - 2.0) < 0.3)
        True
    """
    if isinstance(critic, eqx.Module):
        critic_params, static = eqx.partition(critic, eqx.is_array)
        critic_fn = lambda p, x: eqx.combine(p, static)(x)  # noqa: E731
    else:
        critic_fn = critic
    critic_optimizer = critic_optimizer if critic_optimizer is not None else optax.adam(1e-3, b1=0.5)
    data = jnp.asarray(data)

    def setup(model, guide, args, kwargs, estimators, key):
        if guide is not None:
            raise ValueError("adversarial() trains the model as a generator; pass guide=None.")
        param_info = find_params([(model, args, kwargs)], key)
        params = constrain(param_info.unconstrained, param_info.constraints)
        model_trace, key_table = count_site_keys(model, params, key, args, kwargs)
        if site not in model_trace:
            raise ValueError(f"adversarial(site='{site}'): the generator has no site '{site}' "
                             f"(its sites: {list(model_trace)}).")
        # The score function stays the default here: DisARM applies (the particles' losses are
        # averaged), but has not been measured against it on an adversarial objective.
        chosen = resolve_estimators(model_trace, {}, estimators, num_particles, independent_rows=False)

        def fake_batch(params, key, args, kwargs):
            return handlers.run(model, args, kwargs, key=key, params=params)[site]["value"]

        def surrogate(params, state, key, args, kwargs, shard=None):
            key_critic, key_generator = jax.random.split(key)
            critic_params, optimizer_state = state.critic_params, state.critic_optimizer_state
            frozen = jax.lax.stop_gradient(params)
            value = state.critic_loss
            for step in range(critic_steps):
                key_fake, key_real, key_penalty = jax.random.split(jax.random.fold_in(key_critic, step), 3)
                fake = jax.lax.stop_gradient(fake_batch(frozen, key_fake, args, kwargs))
                real = data[jax.random.randint(key_real, (fake.shape[0],), 0, data.shape[0])]
                value, grads = jax.value_and_grad(
                    lambda p: critic_loss(critic_fn, p, real, fake, key_penalty, loss, gradient_penalty)
                )(critic_params)
                updates, optimizer_state = critic_optimizer.update(grads, optimizer_state, critic_params)
                critic_params = optax.apply_updates(critic_params, updates)
                if clip is not None:
                    critic_params = jax.tree.map(lambda w: jnp.clip(w, -clip, clip), critic_params)
            trained = jax.lax.stop_gradient(critic_params)

            def cost_terms(program_trace, params, key, args, kwargs):
                output = program_trace[site]
                scores = critic_fn(trained, output["value"])
                per_sample = generator_loss(scores, loss) / scores.shape[0]
                return [Term(per_sample, site_plates(output), float("inf"))]

            program = Program(model, cost_terms, chosen, log_density=False, keys=key_table)
            s, (site_states, losses) = average_surrogate(
                program, params, state.site_states, key_generator, num_particles, args, kwargs, shard
            )
            new_state = AdversarialState(critic_params, optimizer_state, value, site_states)
            return s, (new_state, losses)

        init_state = AdversarialState(
            critic_params, critic_optimizer.init(critic_params), jnp.zeros(()), init_site_states(chosen, params)
        )
        return ObjectiveSetup(param_info, init_state, surrogate, chosen)

    return Objective(f"adversarial({loss})", num_particles, setup)

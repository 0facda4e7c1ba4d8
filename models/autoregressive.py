"""MADE: a masked autoencoder for distribution estimation of the binarized 8×8 digits.

    log p(x) = Σ_{d=1}^{64} log Bernoulli(x_d; σ(ℓ_d(x_{<d}))),
    ℓ(x) = b + V_< x + W₂^{M₂} relu(W₁^{M₁} x + c)

One hidden layer whose masks ``M₁, M₂`` let output ``d`` see only pixels ``< d``
(Germain et al., 2015), plus a strictly lower-triangular direct connection ``V_<``
(as in NADE). The likelihood is exact, so the model is fitted by
``mg.maximum_likelihood()`` on minibatches (``numpyro.plate(..., subsample_size=B)``)
and scored by the exact held-out NLL in nats per image, beside the factorized Bernoulli
baseline. Weights are plain ``numpyro.param`` sites.

    python -m models.autoregressive --num-steps 3000 --hidden 256
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax

import mcgrad as mg
from models import common, data

NUM_PIXELS = 64


class Masks(NamedTuple):
    """``input_to_hidden [D, H]``, ``hidden_to_output [H, D]``, ``direct [D, D]`` (strictly lower)."""

    input_to_hidden: jax.Array
    hidden_to_output: jax.Array
    direct: jax.Array


def made_masks(num_inputs: int, num_hidden: int) -> Masks:
    """Degrees: input ``d`` has ``d`` (1…D), hidden unit ``h`` has ``m_h ∈ {1…D−1}`` (cycled);
    hidden ``h`` sees input ``d`` iff ``m_h ≥ d``, output ``d`` sees hidden ``h`` iff ``d > m_h``."""
    input_degrees = np.arange(1, num_inputs + 1)
    hidden_degrees = np.arange(num_hidden) % (num_inputs - 1) + 1
    return Masks(
        jnp.asarray(hidden_degrees[None, :] >= input_degrees[:, None], jnp.float32),
        jnp.asarray(input_degrees[None, :] > hidden_degrees[:, None], jnp.float32),
        jnp.asarray(input_degrees[None, :] > input_degrees[:, None], jnp.float32),
    )


def made_logits(params: dict, masks: Masks, x: jax.Array) -> jax.Array:
    """``[N, D]`` logits; logit ``d`` depends on ``x_{<d}`` only."""
    hidden = jax.nn.relu(x @ (params["input_to_hidden"] * masks.input_to_hidden) + params["hidden_bias"])
    return (
        hidden @ (params["hidden_to_output"] * masks.hidden_to_output)
        + x @ (params["direct"] * masks.direct)
        + params["output_bias"]
    )


def made_params(num_inputs: int, num_hidden: int, pixel_means: jax.Array | None = None) -> dict:
    """Declare the weights as ``numpyro.param`` sites (random init; output bias at the pixel log-odds)."""
    if pixel_means is None:
        output_bias = jnp.zeros(num_inputs)
    else:
        clipped = jnp.clip(jnp.asarray(pixel_means, jnp.float32), 1e-3, 1 - 1e-3)
        output_bias = jnp.log(clipped) - jnp.log1p(-clipped)

    def normal(shape, scale):
        return lambda key: scale * jax.random.normal(key, shape)

    return {
        "input_to_hidden": numpyro.param("input_to_hidden", normal((num_inputs, num_hidden), num_inputs**-0.5)),
        "hidden_bias": numpyro.param("hidden_bias", jnp.zeros(num_hidden)),
        "hidden_to_output": numpyro.param("hidden_to_output", normal((num_hidden, num_inputs), 0.1 * num_hidden**-0.5)),
        "direct": numpyro.param("direct", jnp.zeros((num_inputs, num_inputs))),
        "output_bias": numpyro.param("output_bias", output_bias),
    }


def model(x, masks: Masks, pixel_means=None, batch_size=None):
    """Binary images ``x [N, 64]`` ~ MADE; ``batch_size`` subsamples the data plate."""
    num_hidden = masks.input_to_hidden.shape[1]
    params = made_params(x.shape[1], num_hidden, pixel_means)
    with numpyro.plate("data", x.shape[0], subsample_size=batch_size) as index:
        batch = x[index]
        numpyro.sample("x", dist.Bernoulli(logits=made_logits(params, masks, batch)).to_event(1), obs=batch)


def sample(params: dict, masks: Masks, key: jax.Array, num_samples: int) -> jax.Array:
    """Ancestral sampling, one pixel at a time: ``[num_samples, 64]``."""
    num_pixels = masks.direct.shape[0]

    def draw_pixel(d, carry):
        x, key = carry
        key, pixel_key = jax.random.split(key)
        logits = made_logits(params, masks, x)[:, d]
        return x.at[:, d].set(jax.random.bernoulli(pixel_key, jax.nn.sigmoid(logits)).astype(x.dtype)), key

    x, _ = jax.lax.fori_loop(0, num_pixels, draw_pixel, (jnp.zeros((num_samples, num_pixels)), key))
    return x


def run(
    num_steps: int = 3000,
    seed: int = 0,
    hidden: int = 256,
    batch_size: int = 100,
    learning_rate: float = 3e-3,
    weight_decay: float = 0.1,
    output_dir=None,
    progress_bar: bool = False,
) -> dict:
    """Fit MADE on the training digits; metric: held-out NLL (nats/image) beside the Bernoulli baseline."""
    split = data.binarized_digits()
    baseline = data.bernoulli_baseline(split.train, split.test)
    masks = made_masks(NUM_PIXELS, hidden)
    pixel_means = split.train.mean(axis=0)
    train, test = jnp.asarray(split.train), jnp.asarray(split.test)
    optimizer = optax.adamw(optax.cosine_decay_schedule(learning_rate, num_steps, alpha=0.05), weight_decay=weight_decay)
    result, seconds = common.timed_fit(
        model, None, train, masks, pixel_means, batch_size=batch_size,
        key=jax.random.key(seed), num_steps=num_steps, optimizer=optimizer,
        objective=mg.maximum_likelihood(), progress_bar=progress_bar,
    )
    test_nll = -float(mg.evaluation.log_likelihood(model, result.params, test, masks, pixel_means).mean)
    train_nll = -float(mg.evaluation.log_likelihood(model, result.params, train, masks, pixel_means).mean)
    metrics = common.metrics(
        "maximum_likelihood", None, "test_nll_nats", test_nll, seconds,
        baseline=baseline.test_nll, baseline_name="factorized Bernoulli",
        improvement_over_baseline=baseline.test_nll - test_nll,
        train_nll_nats=train_nll, hidden=hidden, batch_size=batch_size, num_steps=num_steps,
    )
    if output_dir is not None:
        samples = np.asarray(sample(result.params, masks, jax.random.key(seed + 1), 40))
        metrics["figure"] = common.save_figure(_figure(split.test[:40], samples), output_dir, "autoregressive")
    return metrics


def _figure(real, samples):
    figure, axes = common.new_figure(2, 1, size=4.0)
    for axis, images, title in zip(axes[0], [real, samples], ["held-out digits", "MADE samples"]):
        axis.imshow(common.image_grid(images, num_cols=8), cmap="gray_r", vmin=0, vmax=1)
        axis.set_title(title)
        axis.axis("off")
    return figure


def main(argv=None):
    parser = common.parser(__doc__, num_steps=3000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    args = parser.parse_args(argv)
    common.report("autoregressive", run(**common.run_kwargs(args)))


if __name__ == "__main__":
    main()

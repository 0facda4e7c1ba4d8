"""Variational autoencoder on binarized 8×8 digits: Gaussian latents, Bernoulli decoder.

The generative model, with an MLP decoder ``f_θ``::

    z_i ~ N(0, I_L),     x_i | z_i ~ Π_d Bernoulli(σ(f_θ(z_i)_d)),     i = 1 … N

and the amortized guide ``q_φ(z_i | x_i) = N(μ_φ(x_i), diag σ_φ(x_i)²)`` (an MLP encoder).
Both live in one ``numpyro.plate("data", N, subsample_size=B)`` so each step sees a
minibatch and the ELBO is scaled by ``N/B``. The networks are equinox modules registered
with ``numpyro.contrib.module.eqx_module``. ``mg.elbo`` estimates the gradient pathwise
(``z`` has ``rsample``); ``--estimator score_function`` or ``measure_valued`` swaps it.

Evaluation on the 360 held-out digits: the importance-weighted bound ``𝓛_K`` (K = 100)
and the ELBO ``𝓛_1`` in nats per image, against the factorized Bernoulli baseline; and the
downstream accuracy of a logistic regression on the encoder means (digit labels).

    python -m models.vae --num-steps 5000
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from numpyro.contrib.module import eqx_module

import mcgrad as mg
from models import common, data

NUM_PIXELS = 64


class VAE(eqx.Module):
    """The encoder and decoder networks and the NumPyro ``model`` / ``guide`` that use them."""

    encoder: eqx.nn.MLP
    decoder: eqx.nn.MLP
    latent_dim: int = eqx.field(static=True)

    def model(self, x, batch_size=None):
        decoder = eqx_module("decoder", self.decoder)
        with numpyro.plate("data", x.shape[0], subsample_size=batch_size) as index:
            z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([self.latent_dim]).to_event(1))
            logits = jax.vmap(decoder)(z)
            numpyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x[index])

    def guide(self, x, batch_size=None):
        encoder = eqx_module("encoder", self.encoder)
        with numpyro.plate("data", x.shape[0], subsample_size=batch_size) as index:
            loc, scale = encode(encoder, x[index], self.latent_dim)
            numpyro.sample("z", dist.Normal(loc, scale).to_event(1))


def encode(encoder, x, latent_dim: int):
    """Encoder means and scales ``[B, L]`` of a batch ``[B, 64]``."""
    out = jax.vmap(encoder)(x)
    return out[:, :latent_dim], jax.nn.softplus(out[:, latent_dim:]) + 1e-4


def make_vae(latent_dim: int = 8, hidden: int = 128, key: jax.Array | None = None) -> VAE:
    """A VAE with one-hidden-layer ReLU MLPs ``64 → hidden → 2L`` and ``L → hidden → 64``."""
    key_encoder, key_decoder = jax.random.split(key if key is not None else jax.random.key(0))
    encoder = eqx.nn.MLP(NUM_PIXELS, 2 * latent_dim, hidden, 1, activation=jax.nn.relu, key=key_encoder)
    decoder = eqx.nn.MLP(latent_dim, NUM_PIXELS, hidden, 1, activation=jax.nn.relu, key=key_decoder)
    return VAE(encoder, decoder, latent_dim)


def network(vae: VAE, params: dict, name: str):
    """The fitted network ``name`` ("encoder" / "decoder") from ``FitResult.params``."""
    _, static = eqx.partition(getattr(vae, name), eqx.is_inexact_array)
    return eqx.combine(params[f"{name}$params"], static)


def figure(vae: VAE, params: dict, test: np.ndarray, key: jax.Array):
    """Held-out digits, their reconstructions (decoder probabilities at the encoder mean),
    and samples from the prior (decoder probabilities)."""
    encoder, decoder = network(vae, params, "encoder"), network(vae, params, "decoder")
    originals = test[:20]
    loc, _ = encode(encoder, jnp.asarray(originals), vae.latent_dim)
    reconstructions = jax.nn.sigmoid(jax.vmap(decoder)(loc))
    prior = jax.random.normal(key, (20, vae.latent_dim))
    samples = jax.nn.sigmoid(jax.vmap(decoder)(prior))
    fig, axes = common.new_figure(3, 1, size=3.6)
    for ax, images, title in zip(
        axes[0], (originals, reconstructions, samples), ("held-out digits", "reconstructions", "samples from p(z)")
    ):
        ax.imshow(common.image_grid(np.asarray(images), num_cols=5), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(title)
        ax.axis("off")
    return fig


def run(
    num_steps: int = 5000,
    seed: int = 0,
    estimator: str | None = "default",
    output_dir: str | None = None,
    progress_bar: bool = False,
    latent_dim: int = 8,
    hidden: int = 128,
    batch_size: int = 128,
    num_particles: int = 1,
    learning_rate: float = 2e-3,
    num_eval_samples: int = 100,
) -> dict:
    """Fit the VAE with ``mg.elbo`` and evaluate it on held-out digits.

    Returns the metrics dict of :func:`models.common.metrics`: ``metric`` is the held-out
    negative IWAE-K bound (nats per image; lower is better), ``baseline`` the factorized
    Bernoulli NLL, plus ``test_elbo``, ``test_iwae``, ``downstream_accuracy`` and
    ``figure`` (with ``output_dir``).
    """
    split = data.binarized_digits()
    key_init, key_fit, key_eval, key_figure = jax.random.split(jax.random.key(seed), 4)
    vae = make_vae(latent_dim, hidden, key_init)
    site_estimator = common.estimator_from_name(estimator)
    estimators = None if site_estimator is None else {"z": site_estimator}
    result, seconds = common.timed_fit(
        vae.model,
        vae.guide,
        jnp.asarray(split.train),
        batch_size,
        key=key_fit,
        num_steps=num_steps,
        optimizer=optax.adam(learning_rate),
        objective=mg.elbo(num_particles),
        estimators=estimators,
        progress_bar=progress_bar,
        diagnostics_every=0,
    )
    test = jnp.asarray(split.test)
    bound = mg.evaluation.iwae_bound(
        vae.model, vae.guide, result.params, test, None, key=key_eval, num_samples=num_eval_samples
    )
    elbo = mg.evaluation.iwae_bound(vae.model, vae.guide, result.params, test, None, key=key_eval, num_samples=1)
    encoder = network(vae, result.params, "encoder")
    train_means, _ = encode(encoder, jnp.asarray(split.train), latent_dim)
    test_means, _ = encode(encoder, test, latent_dim)
    downstream = mg.evaluation.downstream_accuracy(
        np.asarray(train_means), split.train_labels, np.asarray(test_means), split.test_labels
    )
    baseline = data.bernoulli_baseline(split.train, split.test)
    metrics = common.metrics(
        "elbo",
        estimator or "default",
        f"test NLL bound (IWAE-{num_eval_samples}, nats)",
        -float(bound.mean),
        seconds,
        baseline=baseline.test_nll,
        baseline_name="factorized Bernoulli",
        test_iwae=float(bound.mean),
        test_elbo=float(elbo.mean),
        downstream_accuracy=downstream.accuracy,
        final_train_loss=float(np.nanmean(result.losses[-100:]) / split.train.shape[0]),
        num_steps=num_steps,
        latent_dim=latent_dim,
    )
    if output_dir is not None:
        metrics["figure"] = common.save_figure(figure(vae, result.params, split.test, key_figure), output_dir, "vae")
    return metrics


def main(argv=None):
    parser = common.parser(__doc__, num_steps=5000, estimators=True)
    parser.add_argument("--latent-dim", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args(argv)
    common.report("vae", run(**common.run_kwargs(args)))


if __name__ == "__main__":
    main()
